//! The COM1 16550 UART: vm-superio's register model, plus a host-side input
//! queue so that bytes typed (or piped) before the guest reads them are kept,
//! never dropped when the 64-byte receive FIFO is full.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Largest amount of host input kept waiting for the guest; beyond it the
/// oldest bytes are dropped (a guest that never reads its console).
const MAX_PENDING: usize = 1 << 20;

/// A 16550 UART on the port-I/O bus.
pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl SerialPort {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// Queue bytes for the guest to receive.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        let excess = self.pending.len().saturating_sub(MAX_PENDING);
        self.pending.drain(..excess);
        self.fill_fifo();
    }

    /// Bytes waiting for room in the receive FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn fill_fifo(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(room).copied().collect();
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("serial: cannot queue input: {e:?}"),
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        if offset == 0 {
            self.fill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::warn!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn keeps_input_beyond_the_fifo_and_transmits_output() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq, Box::new(sink.clone()));
        let input: Vec<u8> = (0..200u8).collect();
        port.queue_input(&input);
        assert!(port.pending_input() > 0, "the FIFO holds at most 64 bytes");
        let mut got = Vec::new();
        let mut b = [0u8];
        for _ in 0..200 {
            port.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(port.pending_input(), 0);
        for c in b"hi" {
            port.write(0, &[*c]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
    }
}
