//! The guest disk kept inside the store (issue 4): sizing it at creation
//! (`--disk-size`, or `--disk IMG` imported), and the virtio-blk device
//! over it, whose committed blocks come from the store's log and disk home
//! (`checkpoint::DiskView`) and whose newer writes live in the epoch
//! overlays (`devices::virtio::block::overlay`).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use checkpoint::{DiskView, Store};
use devices::virtio::block::overlay::DiskBlock;
use devices::virtio::{Block, CommittedBlocks, EpochDisk};

use crate::vm::{DISK_ID, VmError};

/// Block size of the store's disk: its size must be a multiple.
pub const DISK_BLOCK: u64 = 4096;

/// The store's committed disk, as the epoch disk reads it.
#[derive(Debug)]
struct StoreBlocks(DiskView);

impl CommittedBlocks for StoreBlocks {
    fn read_block(&self, off: u64, dst: &mut DiskBlock) -> std::io::Result<()> {
        self.0.read_block(off, dst)
    }
}

/// Errors about the store's disk.
#[derive(Debug, thiserror::Error)]
pub enum StoreDiskError {
    /// Both ways of making a disk were given.
    #[error(
        "--disk and --disk-size are exclusive when creating a store (--disk imports an image of its own size)"
    )]
    BothFlags,
    /// `--disk-size` without a store.
    #[error("--disk-size {0} needs a store (the disk lives in it); use --disk IMG with --no-store")]
    SizeWithoutStore(String),
    /// A size the store cannot hold.
    #[error("{flag} {given}: {bytes} bytes is not a positive multiple of 4096")]
    Unaligned {
        /// The flag.
        flag: &'static str,
        /// Its value.
        given: String,
        /// The size.
        bytes: u64,
    },
    /// The image to import cannot be read.
    #[error("--disk {}: cannot import it into the store", path.display())]
    Import {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The disk a new store gets: its size, and the image to import, if any.
pub fn plan(
    disk: Option<&Path>,
    disk_size: Option<&(String, u64)>,
) -> Result<(u64, Option<PathBuf>), StoreDiskError> {
    match (disk, disk_size) {
        (Some(_), Some(_)) => Err(StoreDiskError::BothFlags),
        (None, None) => Ok((0, None)),
        (None, Some((text, bytes))) => {
            check_size("--disk-size", text, *bytes)?;
            Ok((*bytes, None))
        }
        (Some(p), None) => {
            let import = |source| StoreDiskError::Import {
                path: p.to_path_buf(),
                source,
            };
            let mut f = File::open(p).map_err(import)?;
            let bytes = f.seek(SeekFrom::End(0)).map_err(import)?;
            check_size("--disk", &p.display().to_string(), bytes)?;
            Ok((bytes, Some(p.to_path_buf())))
        }
    }
}

fn check_size(flag: &'static str, given: &str, bytes: u64) -> Result<(), StoreDiskError> {
    if bytes == 0 || !bytes.is_multiple_of(DISK_BLOCK) {
        return Err(StoreDiskError::Unaligned {
            flag,
            given: given.to_string(),
            bytes,
        });
    }
    Ok(())
}

/// Copy the image at `path` into the fresh store's disk home.
pub fn import(store: &mut Store, path: &Path) -> Result<(), VmError> {
    let import = |source| StoreDiskError::Import {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(import)?;
    let len = f.seek(SeekFrom::End(0)).map_err(import)?;
    f.seek(SeekFrom::Start(0)).map_err(import)?;
    store.import_disk(&mut f, len).map_err(VmError::Store)?;
    log::info!(
        "imported {} ({} MiB) into {}",
        path.display(),
        len >> 20,
        store.path().display()
    );
    Ok(())
}

/// The virtio-blk device over the store's disk, and its epoch disk (for
/// the freeze).
pub fn device(store: &Store) -> Result<(Block, Arc<EpochDisk>), VmError> {
    let path = store.path().to_path_buf();
    let epoch = EpochDisk::new(Arc::new(StoreBlocks(store.disk_view())), store.disk_bytes())
        .map_err(|e| VmError::Run(format!("--store {}: disk: {e}", path.display())))?;
    let epoch = Arc::new(epoch);
    let block =
        Block::with_epoch_disk(epoch.clone(), &path, DISK_ID).map_err(|source| VmError::Disk {
            path: path.clone(),
            source,
        })?;
    Ok((block, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(plan(None, None).unwrap(), (0, None));
        let four = ("4M".to_string(), 4 << 20);
        assert_eq!(plan(None, Some(&four)).unwrap(), (4 << 20, None));
        let odd = ("4097".to_string(), 4097);
        let e = plan(None, Some(&odd)).unwrap_err().to_string();
        assert!(e.contains("--disk-size 4097"), "{e}");
        let img = std::env::temp_dir().join(format!("evm-plan-{}.img", std::process::id()));
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        assert_eq!(plan(Some(&img), None).unwrap(), (8192, Some(img.clone())));
        assert!(matches!(
            plan(Some(&img), Some(&four)),
            Err(StoreDiskError::BothFlags)
        ));
        std::fs::write(&img, vec![0u8; 1000]).unwrap();
        let e = plan(Some(&img), None).unwrap_err().to_string();
        assert!(e.contains("1000 bytes"), "{e}");
        std::fs::remove_file(&img).unwrap();
        let e = plan(Some(&img), None).unwrap_err().to_string();
        assert!(e.starts_with("--disk "), "{e}");
    }
}
