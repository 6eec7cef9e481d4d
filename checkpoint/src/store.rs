//! The store: creation, opening (superblock choice, locking), accessors and
//! durable superblock updates. Appending, recovery, migration and reads live
//! in their own modules.

use crate::error::StoreError;
use crate::format::*;
use crate::io::{self, FileIo, StoreIo};
use crate::recovery::{self, LogEpoch};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What evm stores about a VM at creation.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Guest RAM size: the memory home is this many bytes (4 KiB multiple).
    pub mem_bytes: u64,
    /// Guest disk size: the disk home is this many bytes (4 KiB multiple;
    /// 0: no disk). It starts as zeros (see [`Store::import_disk`]).
    pub disk_bytes: u64,
    /// Size of the log ring (4 KiB multiple, at least [`MIN_LOG_BYTES`]).
    pub log_bytes: u64,
    /// The vmm's serialized VM config (at most 1 MiB), kept with a CRC.
    pub config: Vec<u8>,
}

impl CreateOptions {
    /// Total bytes a store with these options occupies.
    pub fn store_bytes(&self) -> u64 {
        layout(self, [0; 16], 0).total_len
    }

    /// The smallest log that always holds one epoch in which every page of
    /// `mem_bytes` is dirty and the state is as large as allowed (with room
    /// for a wrap). A log of twice this keeps older epochs for time travel.
    pub fn log_bytes_for(mem_bytes: u64) -> u64 {
        let pages = mem_bytes.div_ceil(PAGE_SIZE);
        let index = pages.div_ceil(CHUNK_ENTRIES as u64) * BLOCK;
        let wrap = BLOCK * (CHUNK_ENTRIES as u64 + 1);
        round_up(pages * PAGE_SIZE + index + 4 * BLOCK + round_up(MAX_STATE_BYTES) + wrap)
            .max(MIN_LOG_BYTES)
    }
}

/// What the vmm tells the store about an epoch it appends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochMeta {
    pub wall_time_ns: u64,
    pub freeze_us: u32,
    pub dirty_pages: u64,
}

/// A committed epoch retained in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochInfo {
    pub epoch: u64,
    pub wall_time_ns: u64,
    pub freeze_us: u32,
    /// The dirty page count the vmm reported (see also `pages`).
    pub dirty_pages: u64,
    /// Page records actually stored.
    pub pages: u64,
    /// Disk blocks stored.
    pub disk_blocks: u64,
    /// Size of the machine state blob.
    pub state_bytes: u64,
    /// Bytes the epoch occupies in the log (records, padding, wrap).
    pub bytes: u64,
    /// From the start of `append_epoch` to durable, when known (it is stored
    /// in the next epoch's header, so it is 0 for the newest epoch after a
    /// reopen).
    pub commit_latency_us: u32,
}

/// Why recovery did not use an epoch it found at the end of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryNote {
    /// The epoch that was found but not accepted.
    pub epoch: u64,
    /// What was wrong with it.
    pub reason: String,
    /// The epoch recovery fell back to (None: none is resumable).
    pub fell_back_to: Option<u64>,
}

impl std::fmt::Display for RecoveryNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fell_back_to {
            Some(n) => write!(
                f,
                "fell back from epoch {} to {n}: epoch {} {}",
                self.epoch, self.epoch, self.reason
            ),
            None => write!(f, "epoch {} not recovered: {}", self.epoch, self.reason),
        }
    }
}

/// An open store. See the crate docs and README.md.
#[derive(Debug)]
pub struct Store {
    pub(crate) path: PathBuf,
    pub(crate) io: Box<dyn StoreIo>,
    pub(crate) read_only: bool,
    /// The superblock last made durable.
    pub(crate) sb: Superblock,
    pub(crate) config: Vec<u8>,
    /// Retained epochs, oldest first, and their public descriptions.
    pub(crate) log: Vec<LogEpoch>,
    pub(crate) infos: Vec<EpochInfo>,
    /// Log epochs before this index are not readable (read-only view of an
    /// interrupted migration).
    pub(crate) readable_from: usize,
    /// Ring offset where the next epoch starts, and bytes retained.
    pub(crate) tail: u64,
    pub(crate) used: u64,
    pub(crate) sb_warning: Option<String>,
    pub(crate) recovery: Option<RecoveryNote>,
    pub(crate) rate_limit: Option<u64>,
    pub(crate) migrate_threshold: f64,
    pub(crate) batch_bytes: usize,
    pub(crate) buf: Vec<u8>,
    pub(crate) last_commit_latency_us: u32,
    /// The running VM's view of the committed disk (see `disk.rs`).
    pub(crate) disk_map: crate::disk::DiskMap,
}

pub(crate) fn layout(opts: &CreateOptions, uuid: [u8; 16], created_ns: u64) -> Superblock {
    let config = Region {
        off: CONFIG_OFF,
        len: opts.config.len() as u64,
    };
    let state = Region {
        off: CONFIG_OFF + round_up(config.len),
        len: 2 * STATE_SLOT_BYTES,
    };
    let mem = Region {
        off: state.off + state.len,
        len: opts.mem_bytes,
    };
    let disk = Region {
        off: mem.off.saturating_add(mem.len),
        len: opts.disk_bytes,
    };
    let log = Region {
        off: disk.off.saturating_add(disk.len),
        len: opts.log_bytes,
    };
    Superblock {
        uuid,
        generation: 0,
        flags: 0,
        home_epoch: 0,
        log_head_pos: 0,
        log_head_epoch: 1,
        migrate_upto: 0,
        config,
        config_crc: crate::crc::crc32c(&opts.config),
        mem,
        disk,
        state,
        log,
        total_len: log.off.saturating_add(log.len),
        home_state: HomeState::NONE,
        created_ns,
    }
}

fn invalid(path: &Path, what: String) -> StoreError {
    StoreError::Invalid {
        path: path.to_path_buf(),
        what,
    }
}

fn check_options(path: &Path, o: &CreateOptions) -> Result<(), StoreError> {
    if o.mem_bytes == 0 || !o.mem_bytes.is_multiple_of(PAGE_SIZE) || o.mem_bytes > (1 << 46) {
        return Err(invalid(
            path,
            format!(
                "memory size {} is not a positive multiple of 4 KiB (up to 64 TiB)",
                o.mem_bytes
            ),
        ));
    }
    if o.log_bytes < MIN_LOG_BYTES || !o.log_bytes.is_multiple_of(BLOCK) || o.log_bytes > (1 << 46)
    {
        return Err(invalid(
            path,
            format!(
                "log size {} is not a multiple of 4 KiB of at least {MIN_LOG_BYTES}",
                o.log_bytes
            ),
        ));
    }
    if !o.disk_bytes.is_multiple_of(DISK_BLOCK) || o.disk_bytes > (1 << 50) {
        return Err(invalid(
            path,
            format!(
                "disk size {} is not a multiple of 4 KiB (up to 1 PiB)",
                o.disk_bytes
            ),
        ));
    }
    if o.config.len() > MAX_CONFIG_BYTES {
        return Err(invalid(
            path,
            format!("config of {} bytes exceeds 1 MiB", o.config.len()),
        ));
    }
    Ok(())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Read up to the first 8 KiB; true if all zero.
fn prefix_blank(file: &File, size: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let n = size.min(2 * BLOCK) as usize;
    let mut b = vec![0u8; n];
    file.read_exact_at(&mut b, 0)?;
    Ok(b.iter().all(|&x| x == 0))
}

/// True if every byte of the regular file is zero. Holes are skipped with
/// SEEK_DATA/SEEK_HOLE, so a sparse file is checked at once; data extents
/// are read (a file that merely starts with zeros is not blank).
fn file_blank(file: &File, size: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own has no memory effects.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No SEEK_DATA here: treat everything as data.
            Some(libc::EINVAL) => Ok(Some(off)),
            _ => Err(e),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let Some(data) = seek(off, libc::SEEK_DATA)? else {
            return Ok(true);
        };
        let end = match seek(data, libc::SEEK_HOLE)? {
            Some(h) if h > data => h.min(size),
            _ => size,
        };
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&x| x != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        off = end;
    }
    Ok(true)
}

impl Store {
    /// Create a store at `path`: a file that does not exist yet (created and
    /// preallocated), or an existing regular file or block device whose first
    /// 8 KiB are zero (formatted in place). Anything else is refused and left
    /// untouched. The returned store holds the exclusive lock.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Store, StoreError> {
        check_options(path, opts)?;
        let total = opts.store_bytes();
        let (file, created) = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| StoreError::io(path, "create the store file", e))?;
                (f, true)
            }
            Err(e) => return Err(StoreError::io(path, "stat", e)),
            Ok(m) => {
                let ft = m.file_type();
                if !ft.is_file() && !ft.is_block_device() {
                    return Err(StoreError::NotFileOrDevice { path: path.into() });
                }
                let mut oo = OpenOptions::new();
                oo.read(true).write(true);
                if ft.is_block_device() {
                    // Exclusive open: refuses a device that is mounted or in use.
                    oo.custom_flags(libc::O_EXCL);
                }
                let f = oo.open(path).map_err(|e| StoreError::io(path, "open", e))?;
                (f, false)
            }
        };
        let result = Self::create_on_file(path, file, opts, total, created);
        if result.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn create_on_file(
        path: &Path,
        file: File,
        opts: &CreateOptions,
        total: u64,
        created: bool,
    ) -> Result<Store, StoreError> {
        if !io::try_lock_exclusive(&file).map_err(|e| StoreError::io(path, "lock", e))? {
            return Err(StoreError::Locked { path: path.into() });
        }
        let block = io::is_block_device(&file).map_err(|e| StoreError::io(path, "stat", e))?;
        let size = if block {
            io::block_device_size(&file)
                .map_err(|e| StoreError::io(path, "read the device size", e))?
        } else {
            file.metadata()
                .map_err(|e| StoreError::io(path, "stat", e))?
                .len()
        };
        let blank = if block {
            prefix_blank(&file, size)
        } else {
            file_blank(&file, size)
        };
        if !created && !blank.map_err(|e| StoreError::io(path, "check that it is blank", e))? {
            return Err(StoreError::NotBlank { path: path.into() });
        }
        if block {
            if size < total {
                return Err(StoreError::TooSmall {
                    path: path.into(),
                    needed: total,
                    actual: size,
                });
            }
        } else {
            io::preallocate(&file, total)
                .map_err(|e| StoreError::io(path, format!("preallocate {total} bytes"), e))?;
        }
        let fio = FileIo::new(file).map_err(|e| StoreError::io(path, "stat", e))?;
        // A new file is fallocated: it already reads as zeros.
        Self::create_inner(path, Box::new(fio), opts, !created)
    }

    /// Create a store on any [`StoreIo`] (tests, or a caller-opened device).
    /// `label` names it in errors. The device's first 8 KiB must be zero.
    pub fn create_with_io(
        label: &Path,
        io: Box<dyn StoreIo>,
        opts: &CreateOptions,
    ) -> Result<Store, StoreError> {
        check_options(label, opts)?;
        let mut b = vec![0u8; (2 * BLOCK).min(io.size()) as usize];
        io.read_at(&mut b, 0)
            .map_err(|e| StoreError::io(label, "read the first 8 KiB", e))?;
        if b.iter().any(|&x| x != 0) {
            return Err(StoreError::NotBlank { path: label.into() });
        }
        Self::create_inner(label, io, opts, true)
    }

    fn create_inner(
        path: &Path,
        mut io: Box<dyn StoreIo>,
        opts: &CreateOptions,
        zero_home: bool,
    ) -> Result<Store, StoreError> {
        let mut uuid = [0u8; 16];
        io::random_bytes(&mut uuid).map_err(|e| StoreError::io(path, "read /dev/urandom", e))?;
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let mut sb = layout(opts, uuid, now_ns());
        if io.size() < sb.total_len {
            return Err(StoreError::TooSmall {
                path: path.into(),
                needed: sb.total_len,
                actual: io.size(),
            });
        }
        if !opts.config.is_empty() {
            let mut c = opts.config.clone();
            c.resize(round_up(c.len() as u64) as usize, 0);
            io.write_at(&c, sb.config.off)
                .map_err(|e| StoreError::io(path, "write the config region", e))?;
        }
        if zero_home {
            io.zero_range(sb.mem.off, sb.mem.len)
                .map_err(|e| StoreError::io(path, "zero the memory home", e))?;
            io.zero_range(sb.disk.off, sb.disk.len)
                .map_err(|e| StoreError::io(path, "zero the disk home", e))?;
        }
        io.sync().map_err(|e| StoreError::io(path, "sync", e))?;
        // B (generation 1) then A (generation 2): both describe the new store.
        for generation in [1u64, 2] {
            sb.generation = generation;
            io.write_at(&sb.encode(), (generation % 2) * BLOCK)
                .map_err(|e| StoreError::io(path, "write a superblock", e))?;
            io.sync().map_err(|e| StoreError::io(path, "sync", e))?;
        }
        Ok(Store::assemble(path, io, false, sb, opts.config.clone()))
    }

    pub(crate) fn assemble(
        path: &Path,
        io: Box<dyn StoreIo>,
        read_only: bool,
        sb: Superblock,
        config: Vec<u8>,
    ) -> Store {
        let disk_map = crate::disk::DiskMap::new(io.reader(), sb.disk);
        Store {
            disk_map,
            path: path.into(),
            io,
            read_only,
            tail: sb.log_head_pos,
            sb,
            config,
            log: Vec::new(),
            infos: Vec::new(),
            readable_from: 0,
            used: 0,
            sb_warning: None,
            recovery: None,
            rate_limit: None,
            migrate_threshold: 0.5,
            batch_bytes: 2 << 20,
            buf: Vec::new(),
            last_commit_latency_us: 0,
        }
    }

    /// Open for `evm run`: exclusive lock, superblock choice, recovery.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let file = Self::open_file(path, true)?;
        if !io::try_lock_exclusive(&file).map_err(|e| StoreError::io(path, "lock", e))? {
            return Err(StoreError::Locked { path: path.into() });
        }
        let fio = FileIo::new(file).map_err(|e| StoreError::io(path, "stat", e))?;
        Self::open_inner(path, Box::new(fio), false)
    }

    /// Open without the lock and without writing (inspection while a VM runs).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let file = Self::open_file(path, false)?;
        let fio = FileIo::new(file).map_err(|e| StoreError::io(path, "stat", e))?;
        Self::open_inner(path, Box::new(fio), true)
    }

    /// Open a store on any [`StoreIo`] (no lock is taken).
    pub fn open_with_io(
        label: &Path,
        io: Box<dyn StoreIo>,
        read_only: bool,
    ) -> Result<Store, StoreError> {
        Self::open_inner(label, io, read_only)
    }

    fn open_file(path: &Path, write: bool) -> Result<File, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| {
                StoreError::io(
                    path,
                    if write {
                        "open read-write"
                    } else {
                        "open read-only"
                    },
                    e,
                )
            })?;
        let ft = file
            .metadata()
            .map_err(|e| StoreError::io(path, "stat", e))?
            .file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(StoreError::NotFileOrDevice { path: path.into() });
        }
        Ok(file)
    }

    /// True if `path` holds no store and nothing else: missing, a regular
    /// file that is all zeros (holes or zero bytes), or a block device whose
    /// first 8 KiB are zero.
    pub fn is_blank(path: &Path) -> std::io::Result<bool> {
        let file = match File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            r => r?,
        };
        if io::is_block_device(&file)? {
            let size = io::block_device_size(&file)?;
            return prefix_blank(&file, size);
        }
        let size = file.metadata()?.len();
        file_blank(&file, size)
    }

    fn open_inner(path: &Path, io: Box<dyn StoreIo>, read_only: bool) -> Result<Store, StoreError> {
        let (sb, warning) = read_superblocks(path, io.as_ref())?;
        if io.size() < sb.total_len {
            return Err(StoreError::Truncated {
                path: path.into(),
                expected: sb.total_len,
                actual: io.size(),
            });
        }
        let mut config = vec![0u8; sb.config.len as usize];
        io.read_at(&mut config, sb.config.off)
            .map_err(|e| StoreError::io(path, "read the config region", e))?;
        if crate::crc::crc32c(&config) != sb.config_crc {
            return Err(StoreError::Corrupt {
                path: path.into(),
                what: "config region CRC mismatch".into(),
            });
        }
        let mut store = Store::assemble(path, io, read_only, sb, config);
        store.sb_warning = warning;
        recovery::recover(&mut store)?;
        if !read_only {
            store.finish_pending()?;
        }
        store.rebuild_disk_map();
        Ok(store)
    }

    // ---- accessors ----

    /// The path (or label) the store was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The vmm's config blob stored at creation.
    pub fn config(&self) -> &[u8] {
        &self.config
    }
    pub fn uuid(&self) -> [u8; 16] {
        self.sb.uuid
    }
    pub fn mem_bytes(&self) -> u64 {
        self.sb.mem.len
    }
    /// Size of the guest disk (0: none).
    pub fn disk_bytes(&self) -> u64 {
        self.sb.disk.len
    }
    /// Size of the log ring.
    pub fn log_bytes(&self) -> u64 {
        self.sb.log.len
    }
    /// Total size of the store.
    pub fn store_bytes(&self) -> u64 {
        self.sb.total_len
    }
    /// The epoch home holds (0: nothing folded yet).
    pub fn home_epoch(&self) -> u64 {
        self.sb.home_epoch
    }
    /// Committed epochs retained in the log, oldest first.
    pub fn epochs(&self) -> &[EpochInfo] {
        &self.infos[self.readable_from..]
    }
    /// The newest committed epoch that can be resumed (None after creation
    /// or `discard_machine_state` until the next append).
    pub fn last_epoch(&self) -> Option<u64> {
        match self.infos.last() {
            Some(i) => Some(i.epoch),
            None if self.home_valid() => Some(self.sb.home_epoch),
            None => None,
        }
    }
    /// Whether there is machine state to resume.
    pub fn resumable(&self) -> bool {
        self.last_epoch().is_some()
    }
    /// Why one superblock was not used, if it was not.
    pub fn superblock_warning(&self) -> Option<&str> {
        self.sb_warning.as_deref()
    }
    /// The epoch found at the end of the log but not accepted, if any.
    pub fn recovery_note(&self) -> Option<&RecoveryNote> {
        self.recovery.as_ref()
    }
    /// Used bytes / ring bytes.
    pub fn log_fill(&self) -> f64 {
        self.used as f64 / self.sb.log.len as f64
    }
    /// The durable superblock's generation.
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }
    /// Pace appends to at most this many bytes per second (None: no limit).
    pub fn set_rate_limit(&mut self, bytes_per_sec: Option<u64>) {
        self.rate_limit = bytes_per_sec.filter(|&r| r > 0);
    }
    /// Log fill (0..1) past which `append_epoch` migrates first.
    pub fn migrate_threshold(&self) -> f64 {
        self.migrate_threshold
    }
    /// Log fill (0..1) past which `append_epoch` migrates first (default 0.5).
    pub fn set_migrate_threshold(&mut self, fill: f64) {
        self.migrate_threshold = fill.clamp(0.0, 1.0);
    }

    pub(crate) fn home_valid(&self) -> bool {
        self.sb.flags & FLAG_HOME_VALID != 0 && self.sb.migrate_upto == 0
    }

    pub(crate) fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Make `sb` durable: first as generation g+1 in the slot g+1 belongs
    /// to (the other slot keeps the previous superblock until this is
    /// synced: that sync is the commit point), then as a mirror, generation
    /// g+2, in the remaining slot, so that both slots describe the same state
    /// and either can be lost to corruption later. On error before the commit
    /// point the in-memory superblock is unchanged, so a retry rewrites the
    /// same slot; a failed mirror only costs redundancy until the next update.
    pub(crate) fn write_superblock(&mut self, mut sb: Superblock) -> Result<(), StoreError> {
        sb.generation = self.sb.generation + 1;
        let off = (sb.generation % 2) * BLOCK;
        self.io
            .write_at(&sb.encode(), off)
            .map_err(|e| StoreError::io(&self.path, format!("write superblock at {off}"), e))?;
        self.io
            .sync()
            .map_err(|e| StoreError::io(&self.path, "sync the superblock", e))?;
        self.sb = sb.clone();
        sb.generation += 1;
        let off = (sb.generation % 2) * BLOCK;
        let mirrored = self
            .io
            .write_at(&sb.encode(), off)
            .and_then(|()| self.io.sync());
        match mirrored {
            Ok(()) => self.sb = sb,
            Err(e) => log::warn!(
                "{}: writing the mirror superblock at {off} failed ({e}); the other superblock is current",
                self.path.display()
            ),
        }
        Ok(())
    }
}

/// Read both superblocks and choose: the valid one with the higher
/// generation. Returns a warning if the other is invalid.
pub(crate) fn read_superblocks(
    path: &Path,
    io: &dyn StoreIo,
) -> Result<(Superblock, Option<String>), StoreError> {
    let mut blocks = [vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]];
    let size = io.size();
    for (i, b) in blocks.iter_mut().enumerate() {
        let off = i as u64 * BLOCK;
        if size >= off + BLOCK {
            io.read_at(b, off)
                .map_err(|e| StoreError::io(path, format!("read superblock at {off}"), e))?;
        } else if size > off {
            let mut part = vec![0u8; (size - off) as usize];
            io.read_at(&mut part, off)
                .map_err(|e| StoreError::io(path, format!("read superblock at {off}"), e))?;
            b[..part.len()].copy_from_slice(&part);
            // A partial superblock block: magic present means truncation.
            if b[0..8] == SB_MAGIC {
                return Err(StoreError::Truncated {
                    path: path.into(),
                    expected: 2 * BLOCK,
                    actual: size,
                });
            }
        }
    }
    let a = Superblock::decode(&blocks[0], 0);
    let b = Superblock::decode(&blocks[1], 1);
    // A version we do not know is refused, unless that block is plainly
    // damaged (its CRC fails) and the other one is a valid superblock.
    for (this, other) in [(&a, &b), (&b, &a)] {
        if let Err(SbProblem::Version { found, crc_ok }) = this
            && (*crc_ok || other.is_err())
        {
            return Err(StoreError::UnknownVersion {
                path: path.into(),
                found: *found,
                supported: FORMAT_VERSION,
            });
        }
    }
    let name = |i: usize| {
        if i == 0 {
            "A (offset 0)"
        } else {
            "B (offset 4096)"
        }
    };
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((if a.generation > b.generation { a } else { b }, None)),
        (Ok(sb), Err(p)) | (Err(p), Ok(sb)) => {
            let (bad, good) = if sb.generation % 2 == 0 {
                (1, 0)
            } else {
                (0, 1)
            };
            let w = format!(
                "superblock {} is invalid ({p}); using superblock {} (generation {})",
                name(bad),
                name(good),
                sb.generation
            );
            Ok((sb, Some(w)))
        }
        (Err(SbProblem::NoMagic), Err(SbProblem::NoMagic)) => {
            Err(StoreError::NotAStore { path: path.into() })
        }
        (Err(pa), Err(pb)) => Err(StoreError::BothSuperblocksCorrupt {
            path: path.into(),
            a: pa.to_string(),
            b: pb.to_string(),
        }),
    }
}
