//! The guest disk kept in the store: reading it as of an epoch, importing
//! an image into a fresh store, and the shared read path of a running VM
//! ([`DiskView`]), which sees every committed block while the writer
//! appends and migrates.

use crate::error::StoreError;
use crate::format::*;
use crate::io::ReadAt;
use crate::migrate::page_runs;
use crate::recovery::PageLoc;
use crate::store::Store;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, PoisonError, RwLock};

/// Where the newest committed version of each block lives, when that is
/// the log: block offset → absolute store offset. Blocks not in the map are
/// read from the disk home.
#[derive(Debug)]
struct ViewInner {
    reader: Arc<dyn ReadAt>,
    disk: Region,
    map: RwLock<HashMap<u64, u64>>,
}

/// The store's side of the [`DiskView`]s it hands out.
#[derive(Clone, Debug)]
pub(crate) struct DiskMap(Arc<ViewInner>);

impl DiskMap {
    pub(crate) fn new(reader: Arc<dyn ReadAt>, disk: Region) -> DiskMap {
        DiskMap(Arc::new(ViewInner {
            reader,
            disk,
            map: RwLock::new(HashMap::new()),
        }))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, u64>> {
        self.0.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// An epoch with these blocks (ring offsets; log at `log_off`) is
    /// durable. Later entries win.
    pub(crate) fn committed(&self, log_off: u64, blocks: &[PageLoc]) {
        if blocks.is_empty() {
            return;
        }
        let mut m = self.write();
        for b in blocks {
            m.insert(b.addr, log_off + b.pos);
        }
    }

    /// These block versions are durable in the disk home: blocks whose
    /// newest version they are are read from home from now on. Called
    /// before their ring space can be reused; readers hold the read lock
    /// across their read, so none still reads that space afterwards.
    pub(crate) fn folded(&self, log_off: u64, blocks: &[PageLoc]) {
        if blocks.is_empty() {
            return;
        }
        let mut m = self.write();
        for b in blocks {
            if m.get(&b.addr) == Some(&(log_off + b.pos)) {
                m.remove(&b.addr);
            }
        }
    }

    fn replace(&self, map: HashMap<u64, u64>) {
        *self.write() = map;
    }
}

/// A thread-safe reader of the newest committed disk, for the running VM's
/// block device: a block is read from the log if a retained epoch wrote
/// it, else from the disk home. It stays correct while the store (on
/// another thread) appends and migrates; it never sees uncommitted blocks.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct DiskView(Arc<ViewInner>);

impl DiskView {
    /// Size of the disk in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.0.disk.len
    }

    /// The newest committed version of the 4 KiB block at disk byte offset
    /// `off` (4096-aligned, inside the disk).
    pub fn read_block(&self, off: u64, dst: &mut [u8; 4096]) -> io::Result<()> {
        if !off.is_multiple_of(DISK_BLOCK) || off >= self.0.disk.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "disk block {off:#x} is not a 4 KiB block inside the {}-byte disk",
                    self.0.disk.len
                ),
            ));
        }
        let m = self.0.map.read().unwrap_or_else(PoisonError::into_inner);
        let at = m.get(&off).copied().unwrap_or(self.0.disk.off + off);
        // Held across the read: the writer cannot redirect this block (and
        // then reuse its ring space) until the read is done.
        self.0.reader.read_at(dst, at)
    }
}

/// Longest piece of the disk home `read_disk` reads at once.
const DISK_READ: usize = 1 << 20;

impl Store {
    /// A shared reader of the newest committed disk (see [`DiskView`]).
    pub fn disk_view(&self) -> DiskView {
        DiskView(Arc::clone(&self.disk_map.0))
    }

    /// Point the disk view at the newest version of every block in the log.
    pub(crate) fn rebuild_disk_map(&self) {
        let mut m = HashMap::new();
        for e in &self.log {
            for b in &e.disk {
                m.insert(b.addr, self.sb.log.off + b.pos);
            }
        }
        self.disk_map.replace(m);
    }

    /// The newest version of every disk block written by the first `n`
    /// retained epochs, in log order.
    pub(crate) fn newest_blocks(&self, n: usize) -> Vec<PageLoc> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in self.log[..n].iter().rev() {
            for b in e.disk.iter().rev() {
                if seen.insert(b.addr) {
                    out.push(*b);
                }
            }
        }
        out.sort_unstable_by_key(|b| b.pos);
        out
    }

    fn check_disk_off(&self, off: u64) -> Result<(), StoreError> {
        if !off.is_multiple_of(DISK_BLOCK) || off >= self.sb.disk.len {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!(
                    "disk offset {off:#x} is not a 4 KiB block inside the {}-byte disk",
                    self.sb.disk.len
                ),
            });
        }
        Ok(())
    }

    /// The disk block at byte offset `off` as of `epoch`.
    pub fn read_disk_block(
        &self,
        epoch: u64,
        off: u64,
        dst: &mut [u8; 4096],
    ) -> Result<(), StoreError> {
        let n = self.epochs_through(epoch)?;
        self.check_disk_off(off)?;
        let found = self.log[..n]
            .iter()
            .rev()
            .find_map(|e| e.disk.iter().rev().find(|b| b.addr == off));
        if let Some(b) = found {
            let mut scratch = Vec::new();
            self.read_pages(std::slice::from_ref(b), &mut scratch)?;
            dst.copy_from_slice(&scratch);
        } else {
            let at = self.sb.disk.off + off;
            self.io.read_at(dst, at).map_err(|e| {
                StoreError::io(&self.path, format!("read the disk home at {at}"), e)
            })?;
        }
        self.check_unchanged()
    }

    /// The whole disk as of `epoch`, streamed to `out` (`disk_bytes()`
    /// bytes, in order; memory use is bounded, not the disk's size).
    pub fn read_disk(&self, epoch: u64, out: &mut dyn io::Write) -> Result<(), StoreError> {
        let n = self.epochs_through(epoch)?;
        self.stream_disk(n, &format!("the disk of epoch {epoch}"), out)
    }

    /// The disk home as it stands, streamed to `out`: what the disk holds
    /// when the store has no resumable epoch (fresh, or after the guest
    /// powered off: `discard_machine_state` folds every epoch into the
    /// homes first, so the disk home then holds the guest's last writes).
    pub fn read_disk_home(&self, out: &mut dyn io::Write) -> Result<(), StoreError> {
        self.stream_disk(0, "the disk home", out)
    }

    /// The disk home overlaid with the newest blocks of the first `n`
    /// retained epochs, streamed to `out`.
    fn stream_disk(&self, n: usize, what: &str, out: &mut dyn io::Write) -> Result<(), StoreError> {
        let mut blocks: Vec<PageLoc> = self.newest_blocks(n);
        blocks.sort_unstable_by_key(|b| b.addr);
        let mut next = 0usize;
        let mut piece = vec![0u8; DISK_READ.min(self.sb.disk.len as usize)];
        let mut scratch = Vec::new();
        let mut off = 0u64;
        while off < self.sb.disk.len {
            let len = (self.sb.disk.len - off).min(DISK_READ as u64) as usize;
            let buf = &mut piece[..len];
            let at = self.sb.disk.off + off;
            self.io.read_at(buf, at).map_err(|e| {
                StoreError::io(&self.path, format!("read the disk home at {at}"), e)
            })?;
            let end = off + len as u64;
            let first = next;
            while next < blocks.len() && blocks[next].addr < end {
                next += 1;
            }
            let mut in_piece = blocks[first..next].to_vec();
            in_piece.sort_unstable_by_key(|b| b.pos);
            for run in page_runs(&in_piece) {
                self.read_pages(run, &mut scratch)?;
                for (k, b) in run.iter().enumerate() {
                    let o = (b.addr - off) as usize;
                    buf[o..o + DISK_BLOCK as usize].copy_from_slice(
                        &scratch[k * DISK_BLOCK as usize..(k + 1) * DISK_BLOCK as usize],
                    );
                }
            }
            out.write_all(buf)
                .map_err(|e| StoreError::io(&self.path, format!("write {what}"), e))?;
            off = end;
        }
        self.check_unchanged()
    }

    /// Copy a raw disk image of `len` bytes (exactly the disk's size) from
    /// `src` into the disk home, then fdatasync. Only on a fresh store,
    /// before its first epoch. All-zero blocks are skipped (the home starts
    /// as zeros).
    pub fn import_disk(&mut self, src: &mut dyn io::Read, len: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let invalid = |what: String| StoreError::Invalid {
            path: self.path.clone(),
            what,
        };
        if len != self.sb.disk.len {
            return Err(invalid(format!(
                "a {len}-byte disk image does not fit the store's {}-byte disk",
                self.sb.disk.len
            )));
        }
        if self.sb.home_epoch != 0 || !self.log.is_empty() {
            return Err(invalid(
                "a disk image can only be imported into a new store, before its first epoch".into(),
            ));
        }
        let mut buf = vec![0u8; DISK_READ.min(len as usize)];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(DISK_READ as u64) as usize;
            src.read_exact(&mut buf[..n]).map_err(|e| {
                StoreError::io(&self.path, format!("read the disk image at {off}"), e)
            })?;
            // Write runs of non-zero blocks.
            let mut i = 0usize;
            while i < n {
                let nonzero = |k: usize| {
                    buf[k..(k + DISK_BLOCK as usize).min(n)]
                        .iter()
                        .any(|&b| b != 0)
                };
                if !nonzero(i) {
                    i += DISK_BLOCK as usize;
                    continue;
                }
                let mut j = i + DISK_BLOCK as usize;
                while j < n && nonzero(j) {
                    j += DISK_BLOCK as usize;
                }
                let at = self.sb.disk.off + off + i as u64;
                self.io.write_at(&buf[i..j.min(n)], at).map_err(|e| {
                    StoreError::io(&self.path, format!("write the disk home at {at}"), e)
                })?;
                i = j;
            }
            off += n as u64;
        }
        self.io
            .sync()
            .map_err(|e| StoreError::io(&self.path, "sync the disk home", e))
    }
}
