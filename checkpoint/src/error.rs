//! The store's errors. Every message names the store's path and what is
//! wrong; an I/O error also names the operation (its `source` is not
//! repeated in the text).

use std::path::PathBuf;

/// Everything that can go wrong with a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on the store failed.
    #[error("{path}: {op} failed", path = .path.display())]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The file holds something that is not an evm store (and is not blank).
    #[error("{path}: not an evm store (no store superblock, and its first 8 KiB are not zero); refusing to use or overwrite it", path = .path.display())]
    NotAStore { path: PathBuf },
    /// `create` on something that already holds data.
    #[error("{path}: exists and is not blank (its first 8 KiB are not all zero); refusing to overwrite it", path = .path.display())]
    NotBlank { path: PathBuf },
    /// `create` on something that is neither a regular file nor a block device.
    #[error("{path}: not a regular file or block device", path = .path.display())]
    NotFileOrDevice { path: PathBuf },
    /// The file is shorter than its superblock says.
    #[error("{path}: truncated: the superblock describes {expected} bytes but the store has {actual}", path = .path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A block device or existing file too small for the requested store.
    #[error("{path}: too small: the store needs {needed} bytes but the device has {actual}", path = .path.display())]
    TooSmall {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    /// Neither superblock is valid.
    #[error("{path}: both superblocks are corrupt (A: {a}; B: {b})", path = .path.display())]
    BothSuperblocksCorrupt { path: PathBuf, a: String, b: String },
    /// The store was written by a newer (or unknown) format.
    #[error("{path}: store format version {found}; this evm reads version {supported}", path = .path.display())]
    UnknownVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Another process holds the store's lock.
    #[error("{path}: locked by another evm (another process holds its advisory lock)", path = .path.display())]
    Locked { path: PathBuf },
    /// The epoch asked for is not in the store (any more).
    #[error("{path}: epoch {epoch} is not retained ({retained})", path = .path.display())]
    EpochNotRetained {
        path: PathBuf,
        epoch: u64,
        retained: String,
    },
    /// The log cannot hold the epoch even after migrating every committed epoch.
    #[error("{path}: log full: epoch {epoch} needs more than the {log_bytes}-byte log can hold even after migration", path = .path.display())]
    LogFull {
        path: PathBuf,
        epoch: u64,
        log_bytes: u64,
    },
    /// A state blob larger than the store accepts.
    #[error("{path}: machine state of {len} bytes exceeds the store's limit of {max} bytes", path = .path.display())]
    StateTooLarge { path: PathBuf, len: usize, max: u64 },
    /// A caller passed something invalid (sizes, buffers, addresses).
    #[error("{path}: {what}", path = .path.display())]
    Invalid { path: PathBuf, what: String },
    /// Data that was valid when the store was opened no longer is.
    #[error("{path}: corrupt: {what}", path = .path.display())]
    Corrupt { path: PathBuf, what: String },
    /// A read-only opener read while a running evm rewrote that part.
    #[error("{path}: the store changed while it was being read (a running evm migrated it); open it again", path = .path.display())]
    Changed { path: PathBuf },
    /// A write was attempted through a read-only store.
    #[error("{path}: opened read-only", path = .path.display())]
    ReadOnly { path: PathBuf },
}

impl StoreError {
    pub(crate) fn io(
        path: &std::path::Path,
        op: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }
}
