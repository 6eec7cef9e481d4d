//! evm's virtual machine monitor: KVM set-up, boot, devices on buses, vCPU
//! threads and the console. The `evm` binary (`main.rs`) is its command line.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod cow;
pub mod cpu;
pub mod cpuid;
pub mod epoch;
pub mod export;
pub mod freeze;
pub mod gate;
pub mod host;
pub mod inspect;
pub mod logger;
pub mod memory;
pub mod pagewalk;
pub mod persist;
pub mod signals;
pub mod state;
pub mod store_disk;
pub mod telemetry;
pub mod tools;
pub mod top;
pub mod vcpu;
pub mod virtio;
pub mod vm;
