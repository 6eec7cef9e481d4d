//! A crash-simulating, fault-injecting in-memory device for tests (this
//! crate's, and other crates' with the `testing` feature).
//!
//! [`CrashDevice`] keeps two images: the *durable* one (what survived the
//! last sync) and the *volatile* one (what reads see), plus the list of
//! writes since the last sync. Every write and every sync is one numbered
//! operation. [`CrashDevice::cut_at`] makes operation `k` the moment the
//! power goes out: it fails, and so does everything after it.
//! [`CrashDevice::after_power_cut`] then builds the image a real disk could
//! hold after such a cut (like SQLite's crash-test VFS or CrashMonkey's
//! replay of a prefix of writes): only what was synced, everything written,
//! a seeded subset of the unsynced writes, or one unsynced write torn at a
//! 512-byte sector boundary. [`CrashDevice::fail_at`] injects one error
//! (EIO, ENOSPC, …) into one operation without cutting the power.

use crate::io::{ReadAt, StoreIo};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Sector size at which torn writes split.
pub const SECTOR: usize = 512;

/// A small seeded RNG (SplitMix64) so crash cases are reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// What survives a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCut {
    /// Only what the last completed sync made durable.
    SyncedOnly,
    /// Every write issued, including the one in flight (a process kill).
    AllWritten,
    /// A seeded random subset of the unsynced writes, applied in order.
    Subset(u64),
    /// Every unsynced write, except that one (chosen by the seed) keeps only
    /// a prefix of its sectors.
    Torn(u64),
    /// Every unsynced write, the last one (the one in flight at the cut)
    /// keeping only its first `n` sectors.
    TornLast(usize),
}

const BLK: u64 = 4096;

/// A sparse disk image: 4 KiB blocks never written read as zeros; blocks
/// are shared between clones until written (cheap snapshots).
#[derive(Clone, Debug, Default)]
pub struct Image {
    size: u64,
    blocks: std::collections::HashMap<u64, Arc<Vec<u8>>>,
}

impl Image {
    /// An all-zero image of `size` bytes.
    pub fn zeroed(size: u64) -> Image {
        Image {
            size,
            blocks: Default::default(),
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Image {
        let mut img = Image::zeroed(bytes.len() as u64);
        for (i, ch) in bytes.chunks(BLK as usize).enumerate() {
            if ch.iter().any(|&b| b != 0) {
                img.write(i as u64 * BLK, ch);
            }
        }
        img
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Copy out all bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read(0, &mut v);
        v
    }

    /// A copy cut (or extended with zeros) to `size` bytes.
    pub fn resized(&self, size: u64) -> Image {
        let mut img = Image::zeroed(size);
        for (&b, data) in &self.blocks {
            if b * BLK < size {
                let n = (size - b * BLK).min(BLK) as usize;
                img.write(b * BLK, &data[..n]);
            }
        }
        img
    }

    /// Read `buf.len()` bytes at `off` (caller checks bounds).
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (b, o) = (pos / BLK, (pos % BLK) as usize);
            let n = (BLK as usize - o).min(buf.len() - done);
            match self.blocks.get(&b) {
                Some(d) => buf[done..done + n].copy_from_slice(&d[o..o + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Write `data` at `off` (caller checks bounds).
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (b, o) = (pos / BLK, (pos % BLK) as usize);
            let n = (BLK as usize - o).min(data.len() - done);
            let blk = self
                .blocks
                .entry(b)
                .or_insert_with(|| Arc::new(vec![0u8; BLK as usize]));
            Arc::make_mut(blk)[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }
}

#[derive(Debug)]
struct Inner {
    durable: Image,
    volatile: Image,
    pending: Vec<(u64, Vec<u8>)>,
    ops: u64,
    cut_at: Option<u64>,
    cut: bool,
    cut_on_write: bool,
    faults: Vec<(u64, i32)>,
    writes: u64,
    syncs: u64,
}

/// The shared handle: keep one in the test, give [`CrashDevice::io`] to the
/// store.
#[derive(Clone, Debug)]
pub struct CrashDevice {
    inner: Arc<Mutex<Inner>>,
}

/// The [`StoreIo`] side of a [`CrashDevice`].
#[derive(Debug)]
pub struct CrashIo {
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panicking test thread cannot leave the images half-updated in a way
    // that matters here; keep going with whatever is inside.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "simulated power cut")
}

impl CrashDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> CrashDevice {
        CrashDevice::from_sparse(Image::zeroed(size))
    }

    /// A device holding `image`, all of it durable.
    pub fn from_image(image: Vec<u8>) -> CrashDevice {
        CrashDevice::from_sparse(Image::from_bytes(&image))
    }

    /// A device holding `image`, all of it durable.
    pub fn from_sparse(image: Image) -> CrashDevice {
        CrashDevice {
            inner: Arc::new(Mutex::new(Inner {
                durable: image.clone(),
                volatile: image,
                pending: Vec::new(),
                ops: 0,
                cut_at: None,
                cut: false,
                cut_on_write: false,
                faults: Vec::new(),
                writes: 0,
                syncs: 0,
            })),
        }
    }

    /// A [`StoreIo`] over this device.
    pub fn io(&self) -> Box<dyn StoreIo> {
        Box::new(CrashIo {
            inner: Arc::clone(&self.inner),
        })
    }

    /// Operations (writes and syncs) started so far.
    pub fn ops(&self) -> u64 {
        lock(&self.inner).ops
    }

    /// (writes, syncs) started so far.
    pub fn counts(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.writes, g.syncs)
    }

    /// Cut the power at operation `op` (0-based): it and every later one fail.
    pub fn cut_at(&self, op: u64) {
        lock(&self.inner).cut_at = Some(op);
    }

    /// Whether the power has been cut.
    pub fn is_cut(&self) -> bool {
        lock(&self.inner).cut
    }

    /// Make operation `op` fail once with `errno` (the device keeps working;
    /// a failed write changes nothing, a failed sync makes nothing durable).
    pub fn fail_at(&self, op: u64, errno: i32) {
        lock(&self.inner).faults.push((op, errno));
    }

    /// What reads currently see.
    pub fn image(&self) -> Vec<u8> {
        lock(&self.inner).volatile.to_bytes()
    }

    /// What reads currently see, sparse.
    pub fn sparse_image(&self) -> Image {
        lock(&self.inner).volatile.clone()
    }

    /// Change the 4 KiB block holding `off`, in place and durably (simulated
    /// media corruption); `f` gets the block from `off` on.
    pub fn corrupt(&self, off: u64, f: impl Fn(&mut [u8])) {
        let mut g = lock(&self.inner);
        let end = (off - off % BLK + BLK).min(g.volatile.size);
        let mut b = vec![0u8; (end - off) as usize];
        g.volatile.read(off, &mut b);
        f(&mut b);
        g.volatile.write(off, &b);
        g.durable.write(off, &b);
    }

    /// A device holding what a disk could hold after the power cut, under
    /// `mode` (all of it durable).
    pub fn after_power_cut(&self, mode: PowerCut) -> CrashDevice {
        let g = lock(&self.inner);
        let mut img = g.durable.clone();
        let apply = |img: &mut Image, off: u64, data: &[u8]| img.write(off, data);
        match mode {
            PowerCut::SyncedOnly => {}
            PowerCut::AllWritten => {
                for (off, data) in &g.pending {
                    apply(&mut img, *off, data);
                }
            }
            PowerCut::Subset(seed) => {
                let mut rng = Rng::new(seed);
                for (off, data) in &g.pending {
                    if rng.chance(1, 2) {
                        apply(&mut img, *off, data);
                    }
                }
            }
            PowerCut::Torn(seed) => {
                let mut rng = Rng::new(seed);
                let torn = rng.below(g.pending.len() as u64) as usize;
                for (i, (off, data)) in g.pending.iter().enumerate() {
                    if i == torn {
                        let sectors = data.len().div_ceil(SECTOR);
                        let keep = (rng.below(sectors as u64) as usize * SECTOR).min(data.len());
                        apply(&mut img, *off, &data[..keep]);
                    } else {
                        apply(&mut img, *off, data);
                    }
                }
            }
            PowerCut::TornLast(n) => {
                let last = g.pending.len().saturating_sub(1);
                for (i, (off, data)) in g.pending.iter().enumerate() {
                    let keep = if i == last {
                        (n * SECTOR).min(data.len())
                    } else {
                        data.len()
                    };
                    apply(&mut img, *off, &data[..keep]);
                }
            }
        }
        CrashDevice::from_sparse(img)
    }

    /// Length of the write that was in flight when the power was cut, if
    /// the cut fell on a write.
    pub fn cut_write_len(&self) -> Option<usize> {
        let g = lock(&self.inner);
        if g.cut && g.cut_on_write {
            g.pending.last().map(|w| w.1.len())
        } else {
            None
        }
    }

    /// Number of writes not yet made durable (including one in flight at a cut).
    pub fn unsynced_writes(&self) -> usize {
        lock(&self.inner).pending.len()
    }
}

impl Inner {
    /// Start operation; `Err` if it must fail (`in_flight` is recorded for a
    /// write cut mid-way).
    fn begin(&mut self, write: Option<(u64, &[u8])>) -> io::Result<()> {
        if self.cut {
            return Err(cut_error());
        }
        let op = self.ops;
        self.ops += 1;
        if write.is_some() {
            self.writes += 1;
        } else {
            self.syncs += 1;
        }
        if self.cut_at == Some(op) {
            self.cut = true;
            self.cut_on_write = write.is_some();
            if let Some((off, data)) = write {
                // The write was issued when the power went: it may have
                // landed in part or whole (see PowerCut).
                self.pending.push((off, data.to_vec()));
            }
            return Err(cut_error());
        }
        if let Some(i) = self.faults.iter().position(|f| f.0 == op) {
            let (_, errno) = self.faults.remove(i);
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }
}

/// A shareable reader of a [`CrashDevice`] (what its reads see).
#[derive(Debug)]
pub struct CrashReader {
    inner: Arc<Mutex<Inner>>,
}

impl ReadAt for CrashReader {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        read_volatile(&self.inner, buf, off)
    }
}

fn read_volatile(inner: &Mutex<Inner>, buf: &mut [u8], off: u64) -> io::Result<()> {
    let g = lock(inner);
    if g.cut {
        return Err(cut_error());
    }
    let end = off
        .checked_add(buf.len() as u64)
        .filter(|&e| e <= g.volatile.size);
    match end {
        Some(_) => {
            g.volatile.read(off, buf);
            Ok(())
        }
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the device",
        )),
    }
}

impl StoreIo for CrashIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        read_volatile(&self.inner, buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= g.volatile.size);
        if end.is_none() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        g.begin(Some((off, buf)))?;
        g.volatile.write(off, buf);
        g.pending.push((off, buf.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut g = lock(&self.inner);
        g.begin(None)?;
        let pending = std::mem::take(&mut g.pending);
        for (off, data) in pending {
            g.durable.write(off, &data);
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        lock(&self.inner).volatile.size
    }

    fn reader(&self) -> Arc<dyn ReadAt> {
        Arc::new(CrashReader {
            inner: Arc::clone(&self.inner),
        })
    }
}
