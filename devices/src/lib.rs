//! evm's emulated devices. Each device keeps its own state and never touches
//! KVM vCPU details; the `vmm` crate wires them to buses and interrupts.

pub mod bus;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
