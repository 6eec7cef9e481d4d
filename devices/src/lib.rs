//! evm's emulated devices. Each device keeps its own state and never touches
//! KVM vCPU details; the `vmm` crate wires them to buses and interrupts.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};

/// Guest memory as every part of evm sees it: mmap-backed, with a dirty
/// bitmap that records the pages the VMM itself writes (KVM's dirty log does
/// not see those).
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
