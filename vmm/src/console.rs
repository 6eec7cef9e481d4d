//! The host side of the guest console: stdin feeds COM1, COM1 writes to
//! stdout. On a terminal, stdin is put in raw mode for the run and restored
//! afterwards. `Ctrl-A x` quits; `Ctrl-A Ctrl-A` sends one Ctrl-A.

use std::io::Read;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use devices::serial::SerialPort;

use crate::vcpu::VmEvent;

/// The escape character (Ctrl-A).
pub const ESCAPE: u8 = 0x01;

/// Saved terminal settings of stdin, restored on drop or `restore()`.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Put stdin in raw mode if it is a terminal.
    pub fn enter() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is a plain C struct; all-zero is a valid value
        // that tcgetattr overwrites.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open and `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        // SAFETY: `t` is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd 0 is a terminal and `t` a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }

    /// Put the terminal back as it was.
    pub fn restore(&mut self) {
        if let Some(t) = self.saved.take() {
            // SAFETY: fd 0 is the terminal we saved `t` from.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Splits input into bytes for the guest and the escape command.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    armed: bool,
}

impl EscapeFilter {
    /// Filter `input`; returns the bytes for the guest and whether the user
    /// asked to quit.
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.armed {
                self.armed = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => {
                        out.push(ESCAPE);
                        out.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// How often queued console input is offered to the guest when nothing
/// else touches the serial port.
const PUMP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Offer queued input to the guest periodically (see `SerialPort::pump`).
pub fn spawn_pump(serial: Arc<Mutex<SerialPort>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-pump".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PUMP_INTERVAL);
                let mut s = serial.lock().unwrap_or_else(|e| e.into_inner());
                if s.pending_input() > 0 {
                    s.pump();
                }
            }
        })?;
    Ok(())
}

/// Read stdin on a thread of its own until EOF, feeding the serial port.
pub fn spawn_stdin(serial: Arc<Mutex<SerialPort>>, events: Sender<VmEvent>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let (bytes, quit) = filter.feed(&buf[..n]);
                        if !bytes.is_empty() {
                            serial
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .queue_input(&bytes);
                        }
                        if quit {
                            let _ = events.send(VmEvent::Escape);
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::warn!("stdin: {e}; the guest console gets no more input");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ab"), (b"ab".to_vec(), false));
        assert_eq!(f.feed(b"\x01\x01c"), (b"\x01c".to_vec(), false));
        assert_eq!(f.feed(b"\x01q"), (b"\x01q".to_vec(), false));
        // Split across reads.
        assert_eq!(f.feed(b"z\x01"), (b"z".to_vec(), false));
        assert_eq!(f.feed(b"x rest"), (Vec::new(), true));
    }
}
