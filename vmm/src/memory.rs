//! Guest physical memory: layout, allocation, and registration with KVM.
//!
//! RAM sits below the 32-bit MMIO gap (`[0, MMIO_GAP_START)`) and, for
//! larger guests, above 4 GiB. The gap holds the virtio-mmio devices, the
//! IOAPIC and the local APICs.

use devices::GuestMem;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{FromRangesError, MmapRegionError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

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

/// Alignment of guest RAM in evm's address space: a transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Allocate guest RAM (anonymous, private mmap; the dirty bitmap tracks the
/// VMM's own writes), each region aligned to 2 MiB and advised for
/// transparent huge pages, as QEMU does.
///
/// Both halves matter. Where THP is in `madvise` mode (Debian's default),
/// anonymous memory without `MADV_HUGEPAGE` gets 4 KiB pages only; and KVM
/// maps a slot with 2 MiB pages only when the slot's host address and guest
/// address agree modulo 2 MiB, which a plain `mmap` does not promise (Linux
/// before 6.7 hands out page-aligned addresses). Without both, every 4 KiB
/// of guest RAM the guest first touches costs a nested-paging fault and a
/// KVM exit: measured in the test host, ~29,000 such faults before the
/// agent's ready line against ~600 under QEMU.
///
/// The mapping is never unmapped: guest RAM lives as long as the process
/// (`GuestMem` is shared by every device and vCPU thread), and vm-memory
/// cannot take ownership of a mapping it did not make itself.
pub fn create(mem_bytes: u64) -> Result<GuestMem, MemoryError> {
    let alloc = |e| MemoryError::Allocate(mem_bytes >> 20, e);
    let regions = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| {
            let len = len as usize;
            let host = map_aligned(len).map_err(|e| alloc(MmapRegionError::Mmap(e).into()))?;
            advise_huge_pages(host, len);
            // SAFETY: `host..host + len` is a live anonymous read-write
            // private mapping made by `map_aligned` with exactly these
            // `prot` and `flags`, which nothing else uses and which is never
            // unmapped.
            let region = unsafe {
                MmapRegion::<AtomicBitmap>::build_raw(
                    host,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .map_err(|e| alloc(e.into()))?;
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| alloc(FromRangesError::InvalidGuestRegion))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMem::from_regions(regions).map_err(|e| alloc(e.into()))
}

/// Map `len` bytes of anonymous memory at a 2 MiB-aligned address: reserve
/// `len + 2 MiB`, then unmap the slack before and after the aligned part.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses
    // (no MAP_FIXED): it cannot alias any memory the program uses.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = reserve - head - len;
    for (addr, size) in [(base, head), (start + len, tail)] {
        if size > 0 {
            // SAFETY: `addr..addr + size` is part of the mapping made above
            // and outside `start..start + len`; nothing has used it.
            unsafe { libc::munmap(addr as *mut libc::c_void, size) };
        }
    }
    Ok(start as *mut u8)
}

/// Ask for transparent huge pages behind `host..host + len`. Advice only: a
/// kernel without THP says no and the memory works as before.
fn advise_huge_pages(host: *mut u8, len: usize) {
    // SAFETY: `host..host + len` is one anonymous mapping owned by guest
    // RAM; MADV_HUGEPAGE changes only how the kernel backs it, never its
    // contents or validity.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
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

    #[test]
    fn ram_is_huge_page_aligned_and_usable() {
        use vm_memory::Bytes;
        for mib in [32u64, 66, 512] {
            let mem = create(mib << 20).expect("guest memory");
            let region = mem.iter().next().expect("one region");
            assert_eq!(region.len(), mib << 20);
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("host address");
            assert_eq!(host as usize % HUGE_PAGE, 0, "{mib} MiB at {host:p}");
            let last = GuestAddress((mib << 20) - 8);
            mem.write_obj(0x1234_5678_9abc_def0u64, last)
                .expect("write");
            assert_eq!(
                mem.read_obj::<u64>(last).expect("read"),
                0x1234_5678_9abc_def0
            );
        }
    }
}
