//! Copy-on-write capture of an epoch's dirty pages, with userfaultfd's
//! write protection (the mechanism of QEMU's background snapshot).
//!
//! During the freeze the epoch's dirty pages are write-protected instead of
//! copied — one `UFFDIO_WRITEPROTECT` per run of adjacent pages — and the
//! vCPUs run again at once. Afterwards the checkpoint thread copies the
//! pages aside (`Capture::drain`). A vCPU (through KVM's page fault) or a
//! device thread that writes a protected page first blocks in the kernel;
//! the fault thread here copies that page aside (if still to be copied),
//! then lifts its protection, which wakes the writer. Either way each page
//! is copied exactly once, as it was at the freeze.
//!
//! Protection stays on after the copy until the guest writes the page (the
//! fault then lifts it for the 512 KiB-aligned block around it, unless that
//! holds a page still to be copied). Lifting it eagerly after the copy was
//! measured to inflate the dirty set: the protection dropped KVM's mapping
//! of the page, unprotecting makes the host PTE writable, and KVM then maps
//! a page the guest only *reads* as writable and logs it dirty — a page
//! read once per epoch stayed dirty for ever (probe guest at 16 MiB/s with
//! a verify pass: 46 MiB per epoch instead of 15).
//!
//! Protecting costs time in proportion to the pages (about 0.1-1 µs each),
//! so most of it happens before the freeze, with the guest running
//! (`protect_early`): the pages dirtied so far are protected then; a write
//! to one of them before the freeze only marks it `released` and lifts its
//! protection (KVM's dirty log has that write, so the page is dirtied again
//! for the freeze). The freeze then protects only the pages dirtied since
//! (fresh in the dirty log) and the released ones.
//!
//! Each page's `state` says who copies it: `PROTECTED` (nobody yet; the
//! page is write-protected, so its contents are still the freeze's),
//! `COPYING` (one side won it and is copying) and `COPIED`. Protection is
//! lifted only from pages that are `COPIED` or not part of the capture, and
//! the fault thread does that while holding `Cow::current`, which the
//! freeze also holds while it protects the next epoch's pages: so a late
//! fault of one epoch can never unprotect a page of the next before it was
//! copied.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::GuestMem;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::freeze::PAGE;

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOWR(0xaa, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `_UFFDIO_WRITEPROTECT` in the ioctls a registration allows.
const UFFD_IOCTL_WRITEPROTECT: u64 = 1 << 0x06;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_MSG_SIZE: usize = 32;

/// Pages whose protection a write fault lifts at once (512 KiB, aligned),
/// unless one of them is still to be copied: a guest writing a run of pages
/// then takes one fault per block, not per page.
const UNPROTECT_BLOCK: usize = 128;

const PROTECTED: u8 = 0;
const COPYING: u8 = 1;
const COPIED: u8 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// Why copy-on-write capture is not available (the freeze then copies).
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The userfaultfd syscall failed (no kernel support, or not allowed).
    #[error("userfaultfd")]
    Open(#[source] std::io::Error),
    /// The API handshake failed.
    #[error("UFFDIO_API")]
    Api(#[source] std::io::Error),
    /// Guest memory could not be registered for write protection.
    #[error("UFFDIO_REGISTER (write-protect mode) of guest memory at {0:#x}")]
    Register(u64, #[source] std::io::Error),
    /// The kernel registers but cannot write-protect this memory.
    #[error("the kernel cannot write-protect guest memory at {0:#x}")]
    NoWriteProtect(u64),
    /// The fault thread could not start.
    #[error("fault thread")]
    Thread(#[source] std::io::Error),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest memory registered for write protection, and its fault thread.
#[derive(Debug)]
pub struct Cow {
    uffd: OwnedFd,
    /// The pages that may still be protected.
    current: Mutex<Protected>,
    /// Guest RAM regions as host `(start, len)`.
    regions: Vec<(usize, usize)>,
    /// Pages the fault thread copied (for the logs and tests).
    faults: AtomicU64,
    stop: AtomicBool,
}

impl Cow {
    /// Register every region of `mem` for write protection and start the
    /// thread that serves write faults on protected pages.
    pub fn new(mem: &GuestMem) -> Result<Arc<Self>, CowError> {
        // SAFETY: a plain syscall with flags; it returns a new descriptor
        // or -1 and touches no memory of ours.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(CowError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor the kernel just gave us and nothing
        // else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly a `struct uffdio_api`,
        // which `api` is (repr(C), three u64s), alive for the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(CowError::Api(std::io::Error::last_os_error()));
        }
        let mut regions = Vec::new();
        for region in mem.iter() {
            let start = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| {
                    CowError::Register(
                        region.start_addr().0,
                        std::io::Error::from_raw_os_error(libc::EFAULT),
                    )
                })? as u64;
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start,
                    len: region.len(),
                },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes exactly a `struct
            // uffdio_register`; the range is a live anonymous mapping owned
            // by `mem` (guest RAM), which the VM keeps for its lifetime.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
                return Err(CowError::Register(
                    region.start_addr().0,
                    std::io::Error::last_os_error(),
                ));
            }
            if reg.ioctls & UFFD_IOCTL_WRITEPROTECT == 0 {
                return Err(CowError::NoWriteProtect(region.start_addr().0));
            }
            regions.push((start as usize, region.len() as usize));
        }
        let cow = Arc::new(Self {
            uffd,
            current: Mutex::new(Protected::Nothing),
            regions,
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let c = cow.clone();
        std::thread::Builder::new()
            .name("cow faults".into())
            .spawn(move || c.serve_faults())
            .map_err(CowError::Thread)?;
        Ok(cow)
    }

    /// Pages copied by the fault thread so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Stop the fault thread (within its poll timeout). Only once no page
    /// is protected any more: a writer of a protected page would wait for
    /// ever.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Set or lift write protection on `len` bytes at host address `start`.
    fn protect(&self, start: usize, len: usize, wp: bool) -> std::io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads and writes exactly a
            // `struct uffdio_writeprotect`; the range lies in guest RAM
            // registered in `new` (the callers pass host addresses of guest
            // pages). Lifting protection also wakes threads waiting on it.
            let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // EAGAIN: the address space changed under the call; retry.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
    }

    /// Before a freeze, with the guest running: write-protect the pages at
    /// host addresses `srcs` (those dirtied so far in this epoch, whose
    /// dirty bits were just taken).
    pub fn protect_early(&self, srcs: &[Option<usize>]) {
        let mut current = lock(&self.current);
        let t = std::time::Instant::now();
        let mut addrs: Vec<usize> = srcs.iter().flatten().copied().collect();
        addrs.sort_unstable();
        addrs.dedup();
        let mut released = vec![false; addrs.len()];
        let mut from = 0;
        for i in 1..=addrs.len() {
            if i == addrs.len() || addrs[i] != addrs[i - 1] + PAGE {
                if let Err(e) = self.protect(addrs[from], (i - from) * PAGE, true) {
                    log::debug!("early write protection of {} pages failed: {e}", i - from);
                    released[from..i].fill(true);
                }
                from = i;
            }
        }
        log::debug!(
            "early: {} pages write-protected in {} µs",
            addrs.len(),
            t.elapsed().as_micros()
        );
        *current = Protected::Early { addrs, released };
    }

    /// During a freeze: the capture of the pages at host addresses `srcs`
    /// (ascending within each memory region; `None`: not RAM, reads as
    /// zeros), which will copy them into `buf`, a buffer with room for
    /// `srcs.len()` pages. Pages in `fresh` (dirtied since `protect_early`,
    /// or all of them without it) and early ones written since are
    /// write-protected now; runs the kernel refuses to protect are copied on
    /// the spot.
    pub fn capture(
        self: &Arc<Self>,
        srcs: &[Option<usize>],
        fresh: &[Option<usize>],
        mut buf: Vec<u8>,
    ) -> Arc<Capture> {
        let n = srcs.len();
        buf.clear();
        buf.reserve(n * PAGE);
        let cap = Arc::new(Capture {
            cow: self.clone(),
            srcs: srcs.to_vec(),
            by_addr: {
                let mut v: Vec<(usize, u32)> = srcs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.map(|a| (a, i as u32)))
                    .collect();
                v.sort_unstable();
                v
            },
            state: (0..n).map(|_| AtomicU8::new(PROTECTED)).collect(),
            dst: buf.as_mut_ptr() as usize,
            buf: Mutex::new(Some(buf)),
        });
        let mut current = lock(&self.current);
        let t = std::time::Instant::now();
        // Not RAM: zeros, copied now.
        for (i, s) in srcs.iter().enumerate() {
            if s.is_none() {
                cap.claim(i);
            }
        }
        let mut todo: Vec<usize> = fresh.iter().flatten().copied().collect();
        if let Protected::Early { addrs, released } = &*current {
            todo.extend(
                addrs
                    .iter()
                    .zip(released)
                    .filter(|(_, r)| **r)
                    .map(|(a, _)| *a),
            );
        }
        todo.sort_unstable();
        todo.dedup();
        let todo: Vec<Option<usize>> = todo.into_iter().map(Some).collect();
        let runs = runs(&todo);
        for &(from, to) in &runs {
            let Some(start) = todo[from] else { continue };
            if let Err(e) = self.protect(start, (to - from) * PAGE, true) {
                log::warn!(
                    "write-protecting {} pages failed ({e}): copying them now",
                    to - from
                );
                for a in todo[from..to].iter().flatten() {
                    if let Some(i) = cap.index(*a) {
                        cap.claim(i);
                    }
                }
            }
        }
        log::debug!(
            "freeze: {} of {} pages write-protected now, in {} runs, in {} µs",
            todo.len(),
            n,
            runs.len(),
            t.elapsed().as_micros()
        );
        *current = Protected::Epoch(cap.clone());
        cap
    }

    /// The fault thread: copy each page a writer waits for, then lift its
    /// protection.
    fn serve_faults(&self) {
        let mut msgs = [0u8; UFFD_MSG_SIZE * 16];
        while !self.stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, FAULT_POLL.as_millis() as i32) };
            if r <= 0 {
                continue;
            }
            // SAFETY: reads at most `msgs.len()` bytes into `msgs`; the
            // descriptor is non-blocking.
            let got =
                unsafe { libc::read(self.uffd.as_raw_fd(), msgs.as_mut_ptr().cast(), msgs.len()) };
            if got <= 0 {
                continue;
            }
            for msg in msgs[..got as usize].chunks_exact(UFFD_MSG_SIZE) {
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                // struct uffd_msg: event (u8), 7 reserved bytes, then
                // pagefault.flags (u64) and pagefault.address (u64).
                let mut a = [0u8; 8];
                a.copy_from_slice(&msg[16..24]);
                let addr = u64::from_ne_bytes(a) as usize & !(PAGE - 1);
                self.serve(addr);
            }
        }
    }

    fn serve(&self, addr: usize) {
        // Held until the protection is lifted: see the module comment.
        let mut current = lock(&self.current);
        let (mut from, mut to) = self.block(addr);
        match &mut *current {
            Protected::Epoch(cap) => {
                if let Some(i) = cap.index(addr)
                    && cap.claim(i)
                {
                    self.faults.fetch_add(1, Ordering::Relaxed);
                }
                if !cap.copied(from, to) {
                    (from, to) = (addr, addr + PAGE);
                }
            }
            Protected::Early { addrs, released } => {
                let lo = addrs.partition_point(|a| *a < from);
                let hi = addrs.partition_point(|a| *a < to);
                released[lo..hi].fill(true);
            }
            Protected::Nothing => {}
        }
        if let Err(e) = self.protect(from, to - from, false) {
            log::error!("lifting write protection of guest memory at {from:#x}: {e}");
        }
    }

    /// The `UNPROTECT_BLOCK`-aligned block of guest RAM around `addr`, as
    /// host addresses `[from, to)`.
    fn block(&self, addr: usize) -> (usize, usize) {
        let bytes = UNPROTECT_BLOCK * PAGE;
        for &(start, len) in &self.regions {
            if (start..start + len).contains(&addr) {
                let from = (addr & !(bytes - 1)).max(start);
                return (from, (from + bytes).min(start + len));
            }
        }
        (addr, addr + PAGE)
    }
}

/// The pages under write protection (or about to be).
#[derive(Debug)]
enum Protected {
    Nothing,
    /// Protected by `protect_early`: `addrs` sorted; `released[k]`: the
    /// protection of `addrs[k]` was lifted (or never set) since.
    Early {
        addrs: Vec<usize>,
        released: Vec<bool>,
    },
    /// One epoch's capture.
    Epoch(Arc<Capture>),
}

/// Index ranges `[from, to)` of `srcs` whose pages are adjacent in host
/// memory (or all not RAM), in order.
fn runs(srcs: &[Option<usize>]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    for i in 1..=srcs.len() {
        let joined = i < srcs.len()
            && match (srcs[i - 1], srcs[i]) {
                (Some(a), Some(b)) => b == a + PAGE,
                (None, None) => true,
                _ => false,
            };
        if !joined {
            if from < i {
                out.push((from, i));
            }
            from = i;
        }
    }
    out
}

/// One epoch's pages, protected at the freeze and copied afterwards.
#[derive(Debug)]
pub struct Capture {
    cow: Arc<Cow>,
    /// Host address of each page (`None`: zeros).
    srcs: Vec<Option<usize>>,
    /// `(host address, index)`, sorted, to find a faulting page.
    by_addr: Vec<(usize, u32)>,
    state: Vec<AtomicU8>,
    /// Start of the destination buffer (`buf`'s allocation).
    dst: usize,
    /// The destination, handed out by `drain`.
    buf: Mutex<Option<Vec<u8>>>,
}

impl Capture {
    /// Whether every page of this capture in host addresses `[from, to)`
    /// is copied.
    fn copied(&self, from: usize, to: usize) -> bool {
        let lo = self.by_addr.partition_point(|(a, _)| *a < from);
        let hi = self.by_addr.partition_point(|(a, _)| *a < to);
        self.by_addr[lo..hi]
            .iter()
            .all(|(_, i)| self.state[*i as usize].load(Ordering::Acquire) == COPIED)
    }

    fn index(&self, addr: usize) -> Option<usize> {
        self.by_addr
            .binary_search_by_key(&addr, |(a, _)| *a)
            .ok()
            .map(|k| self.by_addr[k].1 as usize)
    }

    /// Copy page `i` unless someone else has (or is); wait until it is
    /// copied either way. True if this call copied it.
    fn claim(&self, i: usize) -> bool {
        let s = &self.state[i];
        if s.compare_exchange(PROTECTED, COPYING, Ordering::Acquire, Ordering::Acquire)
            .is_ok()
        {
            let d = (self.dst + i * PAGE) as *mut u8;
            match self.srcs[i] {
                // SAFETY: `d` is page `i` of the buffer, whose capacity is
                // `srcs.len()` pages and which `buf` keeps alive until
                // `drain` returns it (after every page is COPIED); only the
                // winner of this compare-exchange writes page `i`. The
                // source is a guest RAM page that is write-protected (or,
                // during the freeze, not written by anyone) while PROTECTED
                // or COPYING, so it holds the freeze's contents.
                Some(p) => unsafe { std::ptr::copy_nonoverlapping(p as *const u8, d, PAGE) },
                // SAFETY: as above for `d`.
                None => unsafe { std::ptr::write_bytes(d, 0, PAGE) },
            }
            s.store(COPIED, Ordering::Release);
            return true;
        }
        while s.load(Ordering::Acquire) != COPIED {
            std::hint::spin_loop();
        }
        false
    }

    /// With the guest running: copy every page not yet copied (protection
    /// stays on until the guest writes; see the module comment), and return
    /// the buffer of all pages in order.
    pub fn drain(&self) -> Vec<u8> {
        for i in 0..self.srcs.len() {
            self.claim(i);
        }
        {
            let mut current = lock(&self.cow.current);
            if let Protected::Epoch(c) = &*current
                && std::ptr::eq(Arc::as_ptr(c), self)
            {
                *current = Protected::Nothing;
            }
        }
        let mut buf = lock(&self.buf).take().unwrap_or_default();
        let n = self.srcs.len();
        if buf.capacity() >= n * PAGE {
            // SAFETY: every page of the first `n * PAGE` bytes is COPIED
            // (claimed above), i.e. written, and the capacity suffices.
            unsafe { buf.set_len(n * PAGE) };
        }
        buf
    }
}

/// The freeze's copy-on-write capture for `mem` (`EVM_FREEZE=cow`), if
/// the kernel allows it; else evm says so once and copies.
/// Not the default yet: in its first CI run with it on, a real Linux guest
/// of the power-cut chain triple-faulted 2.5 s after a resume (cut 9 of 15),
/// which stop-and-copy has never shown; until that is explained the freeze
/// copies while the vCPUs are stopped.
pub fn for_freeze(mem: &GuestMem) -> Option<Arc<Cow>> {
    log::info!("EVM_FREEZE=cow: dirty pages are write-protected in the freeze and copied after it");
    match Cow::new(mem) {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!(
                "copy-on-write freeze unavailable ({e}: {}); dirty pages are copied while the vCPUs are stopped",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            None
        }
    }
}

/// How long the fault thread sleeps in poll before it checks for a stop.
pub const FAULT_POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_adjacent_pages() {
        let p = PAGE;
        let srcs = [Some(0), Some(p), Some(3 * p), None, None, Some(4 * p)];
        assert_eq!(runs(&srcs), vec![(0, 2), (2, 3), (3, 5), (5, 6)]);
        assert_eq!(runs(&[]), vec![]);
    }

    /// Anonymous memory registered with userfaultfd: a write to a protected
    /// page blocks until the fault thread copied the page, so the capture
    /// holds the contents at `capture` time.
    #[test]
    fn writes_after_the_capture_do_not_reach_it() {
        let mem = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 64 * PAGE)]).unwrap();
        let base = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as usize;
        let page = move |i: usize| (base + i * PAGE) as *mut u8;
        for i in 0..64 {
            // SAFETY: page i of the 64-page mapping `mem` owns.
            unsafe { std::ptr::write_bytes(page(i), i as u8 + 1, PAGE) };
        }
        // Where the kernel or a seccomp policy forbids userfaultfd evm
        // copies during the freeze instead; this test is for the kernels
        // that allow it (Linux >= 5.7 on x86-64), as CI's does.
        let cow = Cow::new(&mem).expect("userfaultfd write protection");
        let srcs: Vec<Option<usize>> = (0..64).step_by(2).map(|i| Some(page(i) as usize)).collect();
        let cap = cow.capture(&srcs, &srcs, Vec::new());
        // A writer thread overwrites every page while protected.
        let writer = std::thread::spawn(move || {
            for i in 0..64 {
                // SAFETY: as above; the write blocks while the page is
                // protected, until the fault thread lifts the protection.
                unsafe { std::ptr::write_bytes(page(i), 0xee, PAGE) };
            }
        });
        writer.join().unwrap();
        let data = cap.drain();
        assert_eq!(data.len(), 32 * PAGE);
        for (k, chunk) in data.chunks(PAGE).enumerate() {
            let want = (2 * k) as u8 + 1;
            assert!(chunk.iter().all(|b| *b == want), "page {} changed", 2 * k);
        }
        assert!(cow.faults() > 0, "the writer never faulted");
        // SAFETY: page 0 is mapped; the writer has finished.
        assert_eq!(unsafe { *page(0) }, 0xee);
        cow.shutdown();
    }
}
