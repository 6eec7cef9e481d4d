//! evm's store: one preallocated file (or block device) that *is* a VM.
//!
//! Two superblocks (A/B, alternating generations), the VM config, two
//! home-state slots, the memory home, a (reserved) disk home, and a log ring
//! of epochs: header, page chunks, machine state, commit record with a
//! CRC32C over the whole epoch. Recovery walks the log from its head to the
//! newest committed epoch; migration folds committed epochs into home as the
//! log fills. `README.md` beside this crate specifies the format.
//!
//! All I/O goes through [`StoreIo`]; the `testing` module (tests, or the
//! `testing` feature) has a device that simulates power cuts and faults.
//! This crate never depends on KVM.

mod crc;
mod error;
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
pub use error::StoreError;
pub use io::{FileIo, StoreIo};
pub use store::{CreateOptions, EpochInfo, EpochMeta, RecoveryNote, Store};
