//! The store's I/O layer. Every byte the store reads or writes goes through
//! [`StoreIo`], so tests (and issue 4's fault injection) can put a
//! crash-simulating device under it (`testing::CrashDevice`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::Arc;

/// Positioned reads that may be shared between threads (the running VM's
/// disk reads, see `DiskView`), independent of the `&mut` writer.
pub trait ReadAt: Send + Sync + std::fmt::Debug {
    /// Fill `buf` from offset `off` (short reads are errors).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }
}

/// Positioned I/O on the store's backing file or device.
pub trait StoreIo: Send + std::fmt::Debug {
    /// Fill `buf` from offset `off` (short reads are errors).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`.
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    /// Size of the file or device in bytes.
    fn size(&self) -> u64;
    /// A shareable reader of the same bytes (what [`StoreIo::read_at`]
    /// sees), usable from other threads while this one writes.
    fn reader(&self) -> Arc<dyn ReadAt>;
    /// Make `[off, off+len)` read as zeros, keeping it allocated. Not durable
    /// until [`StoreIo::sync`].
    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }
}

/// Zero a range with ordinary writes of 1 MiB.
pub fn write_zeros<T: StoreIo + ?Sized>(io: &mut T, off: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (1usize << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        io.write_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The real implementation: pread/pwrite/fdatasync on a regular file or a
/// block device.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    /// The same file opened again (its own open file description, so it
    /// does not hold the store's lock) for shared readers.
    reader: Arc<File>,
    size: u64,
    block_device: bool,
}

impl FileIo {
    /// Wrap an open file or block device.
    pub fn new(file: File) -> io::Result<FileIo> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            block_device_size(&file)?
        } else {
            meta.len()
        };
        // A new description via /proc (works for files and block devices);
        // failing that, a duplicate descriptor, which keeps the lock held
        // while a reader lives.
        let reader = match File::open(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            Ok(f) => f,
            Err(e) => {
                log::debug!(
                    "reopening the store through /proc failed ({e}); sharing its descriptor"
                );
                file.try_clone()?
            }
        };
        Ok(FileIo {
            reader: Arc::new(reader),
            file,
            size,
            block_device,
        })
    }

    /// The underlying file (its lock lives as long as it does).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl StoreIo for FileIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn reader(&self) -> Arc<dyn ReadAt> {
        // pread on a shared descriptor is thread-safe.
        self.reader.clone()
    }

    fn zero_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is open for writing and owned by `self.file`.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
                log::debug!(
                    "fallocate(ZERO_RANGE) unsupported ({err}); writing zeros (block device: {})",
                    self.block_device
                );
                write_zeros(self, off, len)
            }
            _ => Err(err),
        }
    }
}

/// BLKGETSIZE64 = _IOR(0x12, 114, size_t).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of a block device.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, writable u64 on our stack.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Take an exclusive advisory lock without waiting. `Ok(false)`: another
/// open file description holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock only takes the descriptor and flags; the descriptor is
    // valid for the lifetime of `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Allocate `[0, len)` of a regular file for real (not sparse), extending it
/// if needed.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // valid for the lifetime of `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    // A file system without fallocate: allocate by writing zeros where the
    // file has none yet (never over existing bytes).
    let have = file.metadata()?.len();
    let zeros = vec![0u8; 1 << 20];
    let mut off = have;
    while off < len {
        let n = (len - off).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Fill `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    File::open("/dev/urandom")?.read_exact(buf)
}

/// Whether `file` is a block device (else a regular file is assumed).
pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}
