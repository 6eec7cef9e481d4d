//! `evm export`: the guest disk of a committed epoch as a raw image.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use checkpoint::{Store, StoreError};

/// Errors of `evm export`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store (its errors name the path).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store keeps no disk.
    #[error("--store {}: this store holds no disk", .0.display())]
    NoDisk(PathBuf),
    /// The asked-for epoch is not retained.
    #[error("--epoch {epoch}: not a retained committed epoch of {} (retained: {retained})", path.display())]
    NotRetained {
        /// The epoch asked for.
        epoch: u64,
        /// The store.
        path: PathBuf,
        /// What is retained.
        retained: String,
    },
    /// The output cannot be written.
    #[error("--disk {}", path.display())]
    Output {
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Write the disk of `epoch` (default: the newest) of the store at `store`
/// to the new file `out`; returns the epoch written, or None for the disk
/// home of a store without machine state.
pub fn disk(store_path: &Path, out: &Path, epoch: Option<u64>) -> Result<Option<u64>, ExportError> {
    let store = Store::open_read_only(store_path)?;
    if store.disk_bytes() == 0 {
        return Err(ExportError::NoDisk(store_path.to_path_buf()));
    }
    // Without machine state (a fresh store, or after the guest powered off,
    // when every epoch was folded into the homes) the disk is the disk home.
    let source = match (epoch, store.last_epoch()) {
        (None, None) => None,
        (None, Some(newest)) => Some(newest),
        (Some(epoch), _) => {
            let is_home = epoch > 0 && epoch == store.home_epoch() && store.resumable();
            if !is_home && !store.epochs().iter().any(|e| e.epoch == epoch) {
                return Err(ExportError::NotRetained {
                    epoch,
                    path: store_path.to_path_buf(),
                    retained: crate::tools::retained(&store),
                });
            }
            Some(epoch)
        }
    };
    let output = |source| ExportError::Output {
        path: out.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(output)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let written = match source {
        Some(epoch) => store.read_disk(epoch, &mut w),
        None => store.read_disk_home(&mut w),
    }
    .map_err(ExportError::from)
    .and_then(|_| w.flush().map_err(output));
    if let Err(e) = written {
        // Leave no half-written image behind.
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    w.get_ref().sync_data().map_err(output)?;
    let what = match source {
        Some(epoch) => format!("the disk of epoch {epoch}"),
        None => "the disk (the store holds no machine state)".to_string(),
    };
    eprintln!(
        "evm: exported {what} of {} to {}",
        store_path.display(),
        out.display()
    );
    Ok(source)
}
