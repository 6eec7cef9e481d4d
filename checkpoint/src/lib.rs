//! evm's store: one preallocated file (or block device) that *is* a VM.
//!
//! Two superblocks (A/B, alternating generations), the VM config, two
//! home-state slots, the memory home, the disk home, and a log ring
//! of epochs: header, page chunks, disk block chunks, machine state, commit record with a
//! CRC32C over the whole epoch. Recovery walks the log from its head to the
//! newest committed epoch; migration folds committed epochs into home as the
//! log fills. `README.md` beside this crate specifies the format.
//!
//! All I/O goes through [`StoreIo`]; the `testing` module (tests, or the
//! `testing` feature) has a device that simulates power cuts and faults.
//! This crate never depends on KVM.
//!
//! ```
//! use checkpoint::{CreateOptions, EpochMeta, Store};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = std::env::temp_dir().join(format!("doc-{}.evm", std::process::id()));
//! # let _ = std::fs::remove_file(&path);
//! let opts = CreateOptions { mem_bytes: 1 << 20, disk_bytes: 0, log_bytes: 1 << 20, config: b"cfg".to_vec() };
//! let mut store = Store::create(&path, &opts)?;
//! // The first epoch after creation holds every non-zero page.
//! let page = [0x5au8; 4096];
//! let meta = EpochMeta { wall_time_ns: 0, freeze_us: 120, dirty_pages: 1 };
//! let info = store.append_epoch(&meta, &mut std::iter::once((0x3000, &page[..])), b"vcpu state")?;
//! assert_eq!(info.epoch, 1);
//! drop(store);
//!
//! let store = Store::open(&path)?; // locks; recovers the newest committed epoch
//! let epoch = store.last_epoch().expect("resumable");
//! let mut mem = vec![0u8; store.mem_bytes() as usize];
//! store.read_memory(epoch, &mut mem)?;
//! assert_eq!(mem[0x3000], 0x5a);
//! assert_eq!(store.read_state(epoch)?, b"vcpu state");
//! # drop(store); std::fs::remove_file(&path)?;
//! # Ok(())
//! # }
//! ```

mod crc;
mod disk;
mod error;
mod fault;
pub mod format;
mod io;
mod migrate;
mod read;
mod recovery;
mod store;
mod writer;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use crc::{crc32c, crc32c_update};
pub use disk::DiskView;
pub use error::StoreError;
pub use fault::{FaultOp, FaultPlan, FaultPlanError, FaultyIo};
pub use io::{FileIo, ReadAt, StoreIo};
pub use read::EpochDiff;
pub use store::{CreateOptions, EpochInfo, EpochMeta, RecoveryNote, Store};
