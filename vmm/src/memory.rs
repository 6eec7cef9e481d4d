//! Guest physical memory: layout, allocation, and registration with KVM.
//!
//! RAM sits below the 32-bit MMIO gap (`[0, MMIO_GAP_START)`) and, for
//! larger guests, above 4 GiB. The gap holds the virtio-mmio devices, the
//! IOAPIC and the local APICs.

use devices::GuestMem;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI used by virtio-mmio devices.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Most virtio-mmio devices (GSIs 5..=23 on the IOAPIC).
pub const VIRTIO_MAX_DEVICES: u32 = 19;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {0} MiB of guest memory")]
    Allocate(u64, #[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot} at {gpa:#x}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges `(start, len)` of a guest with `mem_bytes` of RAM.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Allocate guest RAM (anonymous, private mmap; the dirty bitmap tracks the
/// VMM's own writes).
pub fn create(mem_bytes: u64) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMem::from_ranges(&ranges).map_err(|e| MemoryError::Allocate(mem_bytes >> 20, e))
}

/// Register every region of `mem` with KVM, one slot each. With
/// `log_dirty`, KVM tracks the pages the guest writes.
pub fn register(vm: &VmFd, mem: &GuestMem, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let gpa = region.start_addr().0;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Register {
                slot,
                gpa,
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let flags = if log_dirty {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region's host memory is a live mmap owned by `mem`,
        // which the VM holds for as long as the VM exists; KVM only accesses
        // it through this mapping, and slots do not overlap (the regions of a
        // GuestMemoryMmap are disjoint).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Register {
            slot,
            gpa,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 2 << 30)]
        );
    }
}
