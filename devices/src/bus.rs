//! A bus of address ranges: port I/O and MMIO accesses are routed here by
//! address, never by port numbers inside the vCPU loop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes on a range of a bus.
///
/// `offset` is relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    /// Fill `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Act on what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus construction.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A range of zero length.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Start of the offending range.
        base: u64,
    },
    /// A range that overlaps one already inserted.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the offending range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// Address ranges mapped to devices. Cheap to clone (each vCPU holds one).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (base, r) in &self.ranges {
            list.entry(&format_args!("{base:#x}+{:#x}", r.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&b, r)) = self.ranges.range(..end).next_back()
            && b + r.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some((addr - base, &r.device))
    }

    /// Route a read. Returns false (and fills `data` with 0xff, as an open
    /// bus reads) when no device is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Route a write. Returns false when no device is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned lock (a panicking device thread
/// must not take every vCPU down with it).
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x3f8, 8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x400, 4)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3fc, 8).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3f0, 9).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x500, 0).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.write(0x400, &[7]));
        assert!(bus.read(0x403, &mut b));
        assert_eq!(b[0], 10);
        assert!(!bus.read(0x3f0, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x404, &mut b));
    }
}
