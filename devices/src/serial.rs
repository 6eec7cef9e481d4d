//! The COM1 16550 UART: vm-superio's register model, plus a host-side input
//! queue so that bytes typed (or piped) before the guest reads them are kept,
//! never dropped when the 64-byte receive FIFO is full.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

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

/// IIR bit 0: no interrupt pending.
const IIR_NO_INTERRUPT: u8 = 0x01;

/// Largest amount of host input kept waiting for the guest; beyond it the
/// oldest bytes are dropped (a guest that never reads its console).
const MAX_PENDING: usize = 1 << 20;

/// A 16550 UART on the port-I/O bus.
pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
    /// Line control register as last written (bit 7: divisor latch).
    lcr: u8,
    /// When the guest enabled the received-data interrupt (and has kept it
    /// on since). Input waits in `pending` until it has been on for
    /// `RX_SETTLE`: a driver probing or starting up toggles the interrupt
    /// and drains the receive register, which would eat queued input.
    rx_enabled_at: Option<Instant>,
}

/// How long the received-data interrupt must stay enabled before queued
/// input is offered to the guest (Linux's 8250 probe turns it on and off
/// again within microseconds and then reads the receive register).
pub const RX_SETTLE: Duration = Duration::from_millis(20);

const IER: u64 = 1;
const LCR: u64 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_RDI: u8 = 0x01;

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Saved state of the UART (the guest-visible registers and receive FIFO).
/// Host input not yet offered to the guest is not part of it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialPortState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// A saved UART state that cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("serial state: receive FIFO of {0} bytes exceeds the 16550's 64")]
pub struct SerialStateError(usize);

impl SerialPort {
    /// Raise the interrupt again if the UART has one pending (IIR says so).
    /// After a restore, call it once the VM's interrupt controllers hold
    /// their restored state: an edge raised before that (vm-superio raises
    /// it while rebuilding the UART) met a masked, freshly reset IOAPIC
    /// pin and was lost. A spurious one is harmless: the 8250 driver reads
    /// IIR. Returns whether it raised it.
    pub fn resignal(&self) -> std::io::Result<bool> {
        let pending = self.uart.state().interrupt_identification & IIR_NO_INTERRUPT == 0;
        if pending {
            self.uart.interrupt_evt().trigger()?;
        }
        Ok(pending)
    }

    /// The UART's state. Take it with the port locked.
    pub fn state(&self) -> SerialPortState {
        let s = self.uart.state();
        SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state (validated), raising `irq`, writing to `out`.
    pub fn from_state(
        state: &SerialPortState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialStateError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqLine(irq), NoEvents, out)
            .map_err(|_| SerialStateError(state.in_buffer.len()))?;
        let rx_on = state.line_control & LCR_DLAB == 0 && state.interrupt_enable & IER_RDI != 0;
        Ok(Self {
            uart,
            pending: VecDeque::new(),
            lcr: state.line_control,
            // The driver was ready before the checkpoint: it still is.
            rx_enabled_at: rx_on.then(|| Instant::now() - RX_SETTLE),
        })
    }

    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), out),
            pending: VecDeque::new(),
            lcr: 0,
            rx_enabled_at: None,
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

    /// Offer queued input to the guest if its driver is ready for it.
    /// Called on guest accesses and periodically by the console pump.
    pub fn pump(&mut self) {
        self.fill_fifo();
    }

    fn fill_fifo(&mut self) {
        if self.pending.is_empty() || self.rx_enabled_at.is_none_or(|t| t.elapsed() < RX_SETTLE) {
            return;
        }
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
        self.fill_fifo();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::warn!("serial: write failed: {e:?}");
        }
        match offset {
            LCR => self.lcr = data[0],
            IER if self.lcr & LCR_DLAB == 0 => {
                if data[0] & IER_RDI == 0 {
                    self.rx_enabled_at = None;
                } else if self.rx_enabled_at.is_none() {
                    self.rx_enabled_at = Some(Instant::now());
                }
                self.fill_fifo();
            }
            _ => {}
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
        let mut b = [0u8];
        // A driver starting up drains the receive register before it
        // enables the receive interrupt: nothing may be lost to that.
        port.read(0, &mut b);
        port.read(0, &mut b);
        assert_eq!(port.pending_input(), 200);
        // Probing toggles the interrupt on and off: still nothing offered.
        port.write(IER, &[0x0f]);
        port.write(IER, &[0]);
        port.read(0, &mut b);
        assert_eq!(port.pending_input(), 200);
        port.write(IER, &[IER_RDI]);
        port.read(0, &mut b);
        assert_eq!(port.pending_input(), 200, "not before RX_SETTLE");
        std::thread::sleep(RX_SETTLE);
        port.pump();
        assert!(port.pending_input() > 0, "the FIFO holds at most 64 bytes");
        let mut got = Vec::new();
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

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq, Box::new(std::io::sink()));
        port.write(LCR, &[0x03]);
        port.write(IER, &[IER_RDI]);
        std::thread::sleep(RX_SETTLE);
        port.queue_input(b"abc");
        let st = port.state();
        assert_eq!(st.in_buffer, b"abc");
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back = SerialPort::from_state(&st, irq2, Box::new(std::io::sink())).unwrap();
        assert_eq!(back.state(), st);
        let mut b = [0u8];
        back.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let mut bad = st.clone();
        bad.in_buffer = vec![0; 65];
        let irq3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialPort::from_state(&bad, irq3, Box::new(std::io::sink())).is_err());
    }
}
