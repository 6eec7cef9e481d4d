//! Small legacy platform devices: the i8042 reset line and the ACPI power
//! device that the FADT points Linux at for power-off and reset.

use crate::bus::BusDevice;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5 (`poweroff`).
    PowerOff,
    /// A reset (`reboot`): ACPI reset register or the i8042 reset line.
    Reset,
}

/// Called when the guest powers off or resets the machine.
pub type PowerHandler = Box<dyn Fn(PowerEvent) + Send>;

/// The i8042 keyboard controller, reduced to what guests use of it here:
/// command 0xFE on port 0x64 pulses the CPU reset line.
pub struct I8042 {
    on_power: PowerHandler,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

/// Port base of the i8042 (data at +0, command/status at +4).
pub const I8042_BASE: u64 = 0x60;
/// Length of the i8042's range.
pub const I8042_LEN: u64 = 5;

impl I8042 {
    /// An i8042 that reports a reset to `on_power`.
    pub fn new(on_power: PowerHandler) -> Self {
        Self { on_power }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        log::debug!("i8042: write {data:x?} at offset {offset}");
        if offset == 4 && data.first() == Some(&0xfe) {
            (self.on_power)(PowerEvent::Reset);
        }
    }
}

/// Port of the ACPI power device (hardware-reduced ACPI sleep control,
/// sleep status and reset registers).
pub const ACPI_POWER_BASE: u64 = 0x600;
/// Length of the ACPI power device's range.
pub const ACPI_POWER_LEN: u64 = 4;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET_REGISTER: u64 = 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 as the DSDT's `_S5_` package names it.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// The hardware-reduced ACPI power device.
pub struct AcpiPower {
    on_power: PowerHandler,
}

impl std::fmt::Debug for AcpiPower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcpiPower")
    }
}

impl AcpiPower {
    /// A power device that reports to `on_power`.
    pub fn new(on_power: PowerHandler) -> Self {
        Self { on_power }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        log::debug!("acpi power: write {v:#x} at offset {offset}");
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE => {
                (self.on_power)(PowerEvent::PowerOff)
            }
            RESET_REGISTER if v == RESET_VALUE => (self.on_power)(PowerEvent::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (PowerHandler, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Box::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    #[test]
    fn acpi_power_off_and_reset() {
        let (h, seen) = recorder();
        let mut dev = AcpiPower::new(h);
        dev.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]); // no SLP_EN: nothing
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: not supported
        dev.write(SLEEP_CONTROL, &[0x34]);
        dev.write(RESET_REGISTER, &[0x02]);
        dev.write(RESET_REGISTER, &[RESET_VALUE]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerEvent::PowerOff, PowerEvent::Reset]
        );
    }

    #[test]
    fn i8042_reset_line() {
        let (h, seen) = recorder();
        let mut dev = I8042::new(h);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
