//! The disk behind virtio-blk: a raw regular file or block device, read
//! and written with pread/pwrite straight into and out of guest memory, or
//! an [`EpochDisk`] whose writes belong to the epoch (`overlay`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::BlockError;
use super::overlay::EpochDisk;
use crate::GuestMem;
use crate::virtio::transfer_all;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Where a disk's bytes live.
#[derive(Debug)]
enum Backing {
    /// A raw image, written in place.
    Raw(File),
    /// Committed store contents plus the epoch overlays.
    Epoch(std::sync::Arc<EpochDisk>),
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    backing: Backing,
    path: PathBuf,
    capacity_sectors: u64,
    read_only: bool,
}

impl Disk {
    /// Open `path` (read-write unless `read_only`), lock it against a second
    /// user (exclusive for read-write, shared for read-only), and size it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let path_buf = path.to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path_buf.clone(),
                read_only,
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: path_buf.clone(),
            source,
        })?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotADisk { path: path_buf });
        }
        lock(&file, read_only).map_err(|source| BlockError::Locked {
            path: path_buf.clone(),
            source,
        })?;
        // Seeking to the end sizes regular files and block devices alike.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path_buf.clone(),
                source,
            })?;
        if size == 0 {
            return Err(BlockError::Empty { path: path_buf });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Unaligned {
                path: path_buf,
                size,
            });
        }
        Ok(Self {
            backing: Backing::Raw(file),
            path: path_buf,
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// A disk whose contents are `epoch`'s (named `path` in messages, the
    /// store's path).
    pub fn epoch(epoch: std::sync::Arc<EpochDisk>, path: &Path) -> Self {
        Self {
            capacity_sectors: epoch.size() / SECTOR_SIZE,
            backing: Backing::Epoch(epoch),
            path: path.to_path_buf(),
            read_only: false,
        }
    }

    /// The epoch disk, if this is one.
    pub fn epoch_disk(&self) -> Option<&std::sync::Arc<EpochDisk>> {
        match &self.backing {
            Backing::Epoch(e) => Some(e),
            Backing::Raw(_) => None,
        }
    }

    /// The image's path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fill guest memory `[addr, addr + len)` from the image at byte
    /// `offset`. Writes go through `GuestMem`, so its dirty bitmap records
    /// them.
    pub fn read_to_guest(
        &self,
        mem: &GuestMem,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let file = match &self.backing {
            Backing::Raw(file) => file,
            Backing::Epoch(e) => return e.read_to_guest(mem, addr, len, offset),
        };
        let mut src = FileAt { file, offset };
        mem.read_exact_volatile_from(addr, &mut src, len)
    }

    /// Write guest memory `[addr, addr + len)` to the image at byte `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMem,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let file = match &self.backing {
            Backing::Raw(file) => file,
            Backing::Epoch(e) => return e.write_from_guest(mem, addr, len, offset),
        };
        let mut dst = FileAt { file, offset };
        mem.write_all_volatile_to(addr, &mut dst, len)
    }

    /// Make every completed write durable: fdatasync of a raw image; for an
    /// epoch disk nothing, as its writes are durable with their epoch.
    pub fn flush(&self) -> io::Result<()> {
        match &self.backing {
            Backing::Raw(file) => file.sync_data(),
            Backing::Epoch(_) => Ok(()),
        }
    }
}

/// Take an advisory lock so that two VMs never share a writable image.
fn lock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock only reads its arguments; the fd is valid for the
    // lifetime of `file`, which outlives the call.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A file cursor that uses pread/pwrite at its own offset, so that several
/// positioned accesses never race on the file's shared position.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Fills the whole slice unless the file ends first: vm-memory moves to
    /// the next slice after each call, so a short read would misplace data.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let fd = self.file.as_raw_fd();
        let guard = buf.ptr_guard_mut();
        let len = buf.len();
        let result = transfer_all(len, |done| {
            // SAFETY: the fd is valid while `self.file` is borrowed; the
            // VolatileSlice guarantees `len` writable bytes at its pointer,
            // kept mapped by `guard`, and `done < len`, so the `len - done`
            // bytes at `ptr + done` are inside it.
            unsafe {
                libc::pread(
                    fd,
                    guard.as_ptr().wrapping_add(done).cast(),
                    len - done,
                    offset.saturating_add(done as libc::off_t),
                )
            }
        });
        match result {
            Ok(n) => {
                buf.bitmap().mark_dirty(0, n);
                self.offset += n as u64;
                Ok(n)
            }
            Err(e) => {
                // Part of the buffer may have been written.
                buf.bitmap().mark_dirty(0, len);
                Err(VolatileMemoryError::IOError(e))
            }
        }
    }
}

impl WriteVolatile for FileAt<'_> {
    /// Writes the whole slice (see `read_volatile`).
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let fd = self.file.as_raw_fd();
        let guard = buf.ptr_guard();
        let len = buf.len();
        let n = transfer_all(len, |done| {
            // SAFETY: as in `read_volatile`, with `len` readable bytes.
            unsafe {
                libc::pwrite(
                    fd,
                    guard.as_ptr().wrapping_add(done).cast(),
                    len - done,
                    offset.saturating_add(done as libc::off_t),
                )
            }
        })
        .map_err(VolatileMemoryError::IOError)?;
        self.offset += n as u64;
        Ok(n)
    }
}
