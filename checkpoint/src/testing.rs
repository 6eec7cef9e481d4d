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

use crate::io::StoreIo;
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
}

#[derive(Debug)]
struct Inner {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    ops: u64,
    cut_at: Option<u64>,
    cut: bool,
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
        CrashDevice::from_image(vec![0u8; size as usize])
    }

    /// A device holding `image`, all of it durable.
    pub fn from_image(image: Vec<u8>) -> CrashDevice {
        CrashDevice {
            inner: Arc::new(Mutex::new(Inner {
                durable: image.clone(),
                volatile: image,
                pending: Vec::new(),
                ops: 0,
                cut_at: None,
                cut: false,
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
        lock(&self.inner).volatile.clone()
    }

    /// Change bytes in place, durably (simulated media corruption).
    pub fn corrupt(&self, off: u64, f: impl Fn(&mut [u8])) {
        let mut g = lock(&self.inner);
        let o = off as usize;
        f(&mut g.volatile[o..]);
        f(&mut g.durable[o..]);
    }

    /// The image a disk could hold after the power cut, under `mode`.
    pub fn after_power_cut(&self, mode: PowerCut) -> Vec<u8> {
        let g = lock(&self.inner);
        let mut img = g.durable.clone();
        let apply = |img: &mut Vec<u8>, off: u64, data: &[u8]| {
            img[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
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
        }
        img
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

impl StoreIo for CrashIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let g = lock(&self.inner);
        if g.cut {
            return Err(cut_error());
        }
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= g.volatile.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&g.volatile[off as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the device",
            )),
        }
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= g.volatile.len() as u64);
        let Some(end) = end else {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        };
        g.begin(Some((off, buf)))?;
        g.volatile[off as usize..end as usize].copy_from_slice(buf);
        g.pending.push((off, buf.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut g = lock(&self.inner);
        g.begin(None)?;
        let pending = std::mem::take(&mut g.pending);
        for (off, data) in pending {
            g.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        lock(&self.inner).volatile.len() as u64
    }
}
