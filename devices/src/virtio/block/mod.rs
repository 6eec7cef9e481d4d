//! virtio-blk (device type 2) over a raw image file or host block device.
//!
//! Requests: IN, OUT, FLUSH (fdatasync), GET_ID; anything else is answered
//! with VIRTIO_BLK_S_UNSUPP. Every chain is checked as coming from a hostile
//! driver (see `request`). Data moves between the image and guest memory
//! with pread/pwrite through `GuestMem`, so the dirty bitmap records every
//! page the device writes.

mod disk;
pub mod overlay;
mod request;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;

use super::{
    ActivateError, COMMON_FEATURES, GuestWarnings, QueueError, StateError, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, read_config_bytes, serve_queue,
};
use crate::GuestMem;

pub use disk::SECTOR_SIZE;
pub use overlay::{BlockMap, CommittedBlocks, EpochDisk};
pub use request::ID_LEN;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest number of data segments per request (`seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 128 << 10;
/// Most descriptors accepted in one chain: data segments, header, status,
/// and slack for drivers that split the header.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 8;
/// Largest transfer of one request; Linux never exceeds `seg_max * size_max`.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// Errors of opening a disk for virtio-blk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {} {}", path.display(), if *read_only { "read-only" } else { "read-write" })]
    Open {
        /// The image.
        path: PathBuf,
        /// How it was opened.
        read_only: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image's size cannot be found.
    #[error("cannot determine the size of disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("disk image {} is not a regular file or block device", path.display())]
    NotADisk {
        /// The path.
        path: PathBuf,
    },
    /// Another process holds the image's lock.
    #[error("disk image {} is locked (in use by another process?)", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A zero-byte image.
    #[error("disk image {} is empty", path.display())]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// An image that is not a whole number of sectors.
    #[error("disk image {} is {size} bytes, not a multiple of 512", path.display())]
    Unaligned {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// A device id longer than virtio-blk's 20 bytes.
    #[error("disk id {id:?} is {} bytes, at most 20 allowed", id.len())]
    IdTooLong {
        /// The id.
        id: String,
    },
}

/// Saved state of a virtio-blk device. The disk's contents are not part of
/// it; the image's size, mode and id are checked on restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Capacity in 512-byte sectors the guest saw.
    pub capacity_sectors: u64,
    /// Whether the guest saw a read-only disk.
    pub read_only: bool,
    /// The GET_ID answer, NUL padded.
    pub id: [u8; ID_LEN],
}

#[derive(Debug)]
struct Active {
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: disk::Disk,
    id: [u8; ID_LEN],
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    warnings: GuestWarnings,
}

fn check_id(id: &str) -> Result<(), BlockError> {
    if id.len() > ID_LEN {
        return Err(BlockError::IdTooLong { id: id.to_owned() });
    }
    Ok(())
}

/// Bytes of `struct virtio_blk_config` exposed (through `num_queues`).
const CONFIG_LEN: usize = 36;

impl Block {
    /// Open the raw image (file or block device) at `path`, read-write
    /// unless `read_only`, answering GET_ID with `id` (at most 20 bytes,
    /// e.g. `evm-disk0`).
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        check_id(id)?;
        Self::with_disk(disk::Disk::open(path, read_only)?, id)
    }

    /// A device over an epoch disk (see `overlay`), named `path` (the
    /// store's) in messages.
    pub fn with_epoch_disk(
        epoch: Arc<EpochDisk>,
        path: &Path,
        id: &str,
    ) -> Result<Self, BlockError> {
        check_id(id)?;
        Self::with_disk(disk::Disk::epoch(epoch, path), id)
    }

    /// The epoch disk behind this device, if it has one.
    pub fn epoch_disk(&self) -> Option<&Arc<EpochDisk>> {
        self.disk.epoch_disk()
    }

    fn with_disk(disk: disk::Disk, id: &str) -> Result<Self, BlockError> {
        check_id(id)?;
        let read_only = disk.read_only();
        let mut id_bytes = [0u8; ID_LEN];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        let mut avail_features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity_sectors().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            disk,
            id: id_bytes,
            avail_features,
            acked_features: 0,
            config,
            active: None,
            warnings: GuestWarnings::default(),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// Save the device's state.
    pub fn state(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            capacity_sectors: self.disk.capacity_sectors(),
            read_only: self.disk.read_only(),
            id: self.id,
        }
    }

    /// Restore saved state into a device freshly opened on the same image.
    /// The image must still have the size, mode and id the guest saw.
    pub fn restore(&mut self, state: &BlockState) -> Result<(), StateError> {
        let invalid = |reason: String| StateError::Invalid {
            device: "block",
            reason,
        };
        if state.capacity_sectors != self.disk.capacity_sectors() {
            return Err(invalid(format!(
                "the guest saw {} sectors but {} has {}",
                state.capacity_sectors,
                self.disk.path().display(),
                self.disk.capacity_sectors()
            )));
        }
        if state.read_only != self.disk.read_only() {
            return Err(invalid(format!(
                "the guest saw a {} disk but {} is opened {}",
                if state.read_only {
                    "read-only"
                } else {
                    "writable"
                },
                self.disk.path().display(),
                if self.disk.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        if state.id != self.id {
            return Err(invalid(format!(
                "disk id {:?} differs from the configured {:?}",
                String::from_utf8_lossy(&state.id),
                String::from_utf8_lossy(&self.id)
            )));
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(invalid(format!(
                "acked features {:#x} include unoffered {:#x}",
                state.acked_features,
                state.acked_features & !self.avail_features
            )));
        }
        self.acked_features = state.acked_features;
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "block"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` is only writable with VIRTIO_BLK_F_CONFIG_WCE, which
        // is not offered: every field is read-only.
        self.warnings.warn(
            "block",
            format_args!(
                "{}-byte write to read-only config at {offset:#x}",
                data.len()
            ),
        );
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.active = Some(Active { mem, interrupt });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue) -> Result<bool, QueueError> {
        let Some(active) = &self.active else {
            return Ok(false);
        };
        let (disk, id, warnings) = (&self.disk, &self.id, &mut self.warnings);
        serve_queue(index, queue, &active.mem, &active.interrupt, |chain| {
            request::serve(chain, &active.mem, disk, id, warnings)
        })
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::Block(s) => self.restore(s),
            other => Err(StateError::WrongDevice {
                saved: other.kind(),
                device: "block",
            }),
        }
    }
}
