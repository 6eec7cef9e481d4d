//! The freeze: stop every vCPU and device queue for a moment, take the
//! epoch's dirty pages (KVM's log plus the VMM's own writes) and the whole
//! machine's state, write-protect the dirty pages (`cow`; or, where
//! userfaultfd cannot, copy them aside), and let the guest run again; then
//! copy the protected pages while the guest runs. Everything slow (writing,
//! syncing) happens afterwards, in `epoch`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::GuestMem;
use devices::serial::{SerialPort, SerialPortState};
use devices::virtio::{BlockMap, EpochDisk, MmioTransport, MmioTransportState};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::cow::{Capture, Cow};
use crate::gate::Gate;
use crate::state::{self, MachineState, VcpuState};
use crate::vcpu::MachineEnding;

/// Page size of dirty tracking.
pub const PAGE: usize = 4096;

/// Errors of a freeze.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The machine is stopping.
    #[error(transparent)]
    Ending(#[from] MachineEnding),
    /// A vCPU could not save its state.
    #[error("saving vCPU state: {0}")]
    Vcpu(String),
    /// Saving the VM-wide state failed.
    #[error("saving VM state")]
    Vm(#[source] state::StateError),
    /// KVM's dirty log could not be read.
    #[error("KVM_GET_DIRTY_LOG of slot {0}")]
    DirtyLog(u32, #[source] kvm_ioctls::Error),
}

/// Every device's state, saved during the freeze.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialPortState,
    /// virtio-mmio transports, in window order.
    pub virtio: Vec<MmioTransportState>,
}

/// What a vCPU leaves behind when it parks.
pub type ParkedState = Result<VcpuState, String>;

/// The devices the freeze quiesces (by holding their locks).
#[derive(Debug, Clone)]
pub struct Quiesce {
    /// COM1.
    pub serial: Arc<Mutex<SerialPort>>,
    /// virtio-mmio transports; while one is locked no request is half done.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The store's disk, whose overlay is sealed at each freeze.
    pub disk: Option<Arc<EpochDisk>>,
}

/// One frozen epoch, ready to be written while the guest runs on.
#[derive(Debug)]
pub struct Frozen {
    /// Guest-physical address of each copied page.
    pub gpas: Vec<u64>,
    /// Offset of each copied page in the flat memory image the store keeps
    /// (RAM above the MMIO gap follows RAM below it).
    pub offsets: Vec<u64>,
    /// The pages' contents, `PAGE` bytes each, in `gpas` order.
    pub data: Vec<u8>,
    /// The machine state, encoded.
    pub state: Vec<u8>,
    /// Disk blocks written since the last committed epoch (store disk only).
    pub disk: Arc<BlockMap>,
    /// How long the vCPUs were stopped: with a pre-copy or `cow`, the
    /// brief stop that read the dirty log and the freeze itself, summed.
    pub freeze: Duration,
    /// Wall-clock time of the freeze.
    pub wall_time_ns: u64,
}

/// Everything the freeze needs, shared with the machine.
pub struct Freezer {
    /// The VM (dirty log, VM-wide state).
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMem,
    /// Stops and restarts the vCPUs.
    pub gate: Arc<Gate>,
    /// Devices to quiesce and save.
    pub devices: Quiesce,
    /// The page buffer of the last written epoch, reused.
    pub staging: Mutex<Vec<u8>>,
    /// The buffer the stopped copy after a pre-copy fills, reused.
    pub freeze_staging: Mutex<Vec<u8>>,
    /// Copy the dirty pages once with the guest running before each
    /// stop-and-copy freeze (see `freeze`; `FreezeMode::Precopy`); unused
    /// with `cow`.
    pub precopy: bool,
    /// Copy-on-write capture of dirty pages; `None`: copy them while the
    /// vCPUs are stopped.
    pub cow: Option<Arc<Cow>>,
    /// Pages whose dirty bits were taken before a freeze (`Cow::
    /// protect_early`, or the pre-copy) and that are not yet in an epoch:
    /// the next freeze's.
    pub early: Mutex<Vec<u64>>,
}

/// The dirty pages as the freeze leaves them.
enum Pages {
    /// Copied during the freeze.
    Copied(Vec<u8>),
    /// Write-protected during the freeze, to be copied after it.
    Protected(Arc<Capture>),
}

impl std::fmt::Debug for Freezer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Freezer")
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Freezer {
    /// Protect early (or pre-copy), stop, capture, protect the rest (or
    /// copy what the guest wrote since the pre-copy), resume, copy.
    /// `carry` names pages that must be in this epoch although they may not
    /// be dirty now (those of an epoch whose write failed: it may or may not
    /// have reached the store).
    ///
    /// The pre-copy takes the dirty bits and copies those pages while the
    /// guest runs on, so that the vCPUs stop only for the pages written
    /// during that copy. A page the guest writes after its bit was taken
    /// (mid-copy, so its early copy may be torn) is dirty again, and the
    /// stopped copy replaces its early one.
    pub fn freeze(&self, carry: &[u64]) -> Result<Frozen, FreezeError> {
        let mut pre: Option<(Vec<u64>, Vec<u8>)> = None;
        // The brief stop before a pre-copy or the early protection.
        let mut first_stop = Duration::ZERO;
        if self.cow.is_none() && self.precopy {
            let t = Instant::now();
            let mut early = lock(&self.early);
            let mut gpas = self.dirty_gpas_stopped(&mut first_stop)?;
            gpas.extend_from_slice(&early);
            gpas.extend_from_slice(carry);
            gpas.sort_unstable();
            gpas.dedup();
            // Taken, not yet in an epoch: kept for the next freeze should
            // this one fail.
            early.clone_from(&gpas);
            drop(early);
            let buf = std::mem::take(&mut *lock(&self.staging));
            let data = copy_pages(&self.srcs(&gpas), buf);
            log::debug!(
                "freeze: {} pages pre-copied in {} µs",
                gpas.len(),
                t.elapsed().as_micros()
            );
            pre = Some((gpas, data));
        }
        if let Some(cow) = &self.cow {
            // The bulk of the write protection, with the guest running.
            let mut early = lock(&self.early);
            let mut gpas = self.dirty_gpas_stopped(&mut first_stop)?;
            gpas.extend_from_slice(&early);
            gpas.sort_unstable();
            gpas.dedup();
            cow.protect_early(&self.srcs(&gpas));
            *early = gpas;
        }
        let start = Instant::now();
        let wall_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // The pre-copy took `carry` already.
        let carry = if pre.is_some() { &[] } else { carry };
        let mut t_parked = Duration::ZERO;
        let result = self
            .gate
            .with_parked(|vcpus| {
                t_parked = start.elapsed();
                self.capture(vcpus, carry)
            })
            .map_err(FreezeError::from)
            .and_then(|r| r);
        let second_stop = start.elapsed();
        // The guest was stopped twice: count both.
        let freeze = first_stop + second_stop;
        // On an error the early pages stay protected until written, as
        // copied pages do, and stay in `early` for the next freeze (as do
        // pre-copied ones).
        let (gpas, pages, state, disk) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some((_, data)) = pre {
                    self.recycle(data);
                }
                return Err(e);
            }
        };
        let (gpas, data) = match (pages, pre) {
            (Pages::Copied(d), None) => (gpas, d),
            (Pages::Copied(d), Some((pre_gpas, pre_data))) => {
                let merged = merge_pages(pre_gpas, pre_data, &gpas, &d);
                lock(&self.early).clear();
                *lock(&self.freeze_staging) = d;
                merged
            }
            (Pages::Protected(capture), _) => (gpas, capture.drain()),
        };
        log::debug!(
            "freeze: {}parked after {} µs, captured after {} µs, pages copied after {} µs{}",
            if first_stop.is_zero() {
                String::new()
            } else {
                format!(
                    "dirty log read in a stop of {} µs; ",
                    first_stop.as_micros()
                )
            },
            t_parked.as_micros(),
            second_stop.as_micros(),
            start.elapsed().as_micros(),
            match &self.cow {
                Some(c) => format!(" ({} copied on write faults so far)", c.faults()),
                None => String::new(),
            }
        );
        Ok(Frozen {
            disk,
            offsets: gpas.iter().map(|g| image_offset(*g)).collect(),
            gpas,
            data,
            state,
            freeze,
            wall_time_ns,
        })
    }

    /// With every vCPU parked: quiesce devices, take dirty pages and state.
    #[allow(clippy::type_complexity)]
    fn capture(
        &self,
        vcpus: Vec<ParkedState>,
        carry: &[u64],
    ) -> Result<(Vec<u64>, Pages, Vec<u8>, Arc<BlockMap>), FreezeError> {
        let vcpus: Vec<VcpuState> = vcpus
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(FreezeError::Vcpu)?;
        let t = Instant::now();
        let serial = lock(&self.devices.serial);
        let transports: Vec<_> = self.devices.virtio.iter().map(|t| lock(t)).collect();
        log::debug!("freeze: devices locked in {} µs", t.elapsed().as_micros());
        let devices = DeviceStates {
            serial: serial.state(),
            virtio: transports.iter().map(|t| t.state()).collect(),
        };
        let t = Instant::now();
        let vm = state::save_vm(&self.vm).map_err(FreezeError::Vm)?;
        let t_vm = t.elapsed();
        let t = Instant::now();
        let (gpas, data) = self.copy_dirty(carry)?;
        log::debug!(
            "freeze: {} pages collected and protected or copied in {} µs",
            gpas.len(),
            t.elapsed().as_micros()
        );
        // With the transports locked no disk request is half done: the
        // overlay holds exactly the writes the guest's memory knows of.
        let disk = match &self.devices.disk {
            Some(d) => d.seal(),
            None => Arc::default(),
        };
        drop(transports);
        drop(serial);
        let t = Instant::now();
        let machine = MachineState::new(vcpus, vm, encode_devices(&devices));
        let state = state::encode(&machine);
        log::debug!(
            "freeze: VM state saved in {} µs, machine state encoded in {} µs",
            t_vm.as_micros(),
            t.elapsed().as_micros()
        );
        Ok((gpas, data, state, disk))
    }

    /// Collect the epoch's dirty pages (KVM's log OR the VMM's bitmap) and
    /// protect them or copy them into one buffer.
    fn copy_dirty(&self, carry: &[u64]) -> Result<(Vec<u64>, Pages), FreezeError> {
        let t = Instant::now();
        let mut fresh = self.dirty_gpas()?;
        if !carry.is_empty() {
            fresh.extend_from_slice(carry);
            fresh.sort_unstable();
            fresh.dedup();
        }
        log::debug!("freeze: dirty logs read in {} µs", t.elapsed().as_micros());
        let fresh_srcs = self.srcs(&fresh);
        let pages = match &self.cow {
            Some(cow) => {
                let early = std::mem::take(&mut *lock(&self.early));
                let gpas = if early.is_empty() {
                    fresh.clone()
                } else {
                    let mut g = [fresh.as_slice(), early.as_slice()].concat();
                    g.sort_unstable();
                    g.dedup();
                    g
                };
                let srcs = self.srcs(&gpas);
                let buf = std::mem::take(&mut *lock(&self.staging));
                return Ok((gpas, Pages::Protected(cow.capture(&srcs, &fresh_srcs, buf))));
            }
            None => {
                let buf = if self.precopy {
                    std::mem::take(&mut *lock(&self.freeze_staging))
                } else {
                    std::mem::take(&mut *lock(&self.staging))
                };
                Pages::Copied(copy_pages(&fresh_srcs, buf))
            }
        };
        Ok((fresh, pages))
    }

    /// Host addresses of the pages at `gpas` (`None`: not RAM).
    fn srcs(&self, gpas: &[u64]) -> Vec<Option<usize>> {
        // Host addresses as integers: plain data the copy threads share.
        gpas.iter()
            .map(|g| host_ptr(&self.mem, *g).map(|p| p as usize))
            .collect()
    }

    /// `dirty_gpas` in a brief stop of every vCPU, whose length goes to
    /// `stopped`. KVM write-protects the pages whose bits it hands out and
    /// flushes TLBs; done under running vCPUs, that preceded two triple
    /// faults of real guests in the nested test host (one with the first
    /// pre-copy, one with `cow`), while stop-and-copy, which reads the log
    /// only with the vCPUs parked, had shown none. Later the same test host
    /// crashed guests of this freeze and of QEMU's own migration too, so it
    /// may well be the test host's fault (issue 4's notes); reading the log
    /// parked is kept as the cautious order. The stop costs a kick, the log
    /// read and a release (well under a millisecond on the probe).
    fn dirty_gpas_stopped(&self, stopped: &mut Duration) -> Result<Vec<u64>, FreezeError> {
        let t = Instant::now();
        let gpas = self.gate.with_stopped(|| self.dirty_gpas());
        *stopped = t.elapsed();
        gpas?
    }

    /// The pages dirtied since the last call (KVM's log OR the VMM's
    /// bitmap), ascending; their dirty bits are cleared.
    fn dirty_gpas(&self) -> Result<Vec<u64>, FreezeError> {
        let mut gpas = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let len = region.len() as usize;
            let kvm_log = self
                .vm
                .get_dirty_log(slot as u32, len)
                .map_err(|e| FreezeError::DirtyLog(slot as u32, e))?;
            let vmm_log = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let base = region.start_addr().0;
            let pages = len / PAGE;
            for (w, word) in kvm_log.iter().enumerate() {
                let mut bits = *word | vmm_log.get(w).copied().unwrap_or(0);
                while bits != 0 {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let page = w * 64 + b;
                    if page < pages {
                        gpas.push(base + (page * PAGE) as u64);
                    }
                }
            }
        }
        Ok(gpas)
    }

    /// Give a written epoch's page buffer back for the next freeze.
    pub fn recycle(&self, mut buf: Vec<u8>) {
        let mut spare = lock(&self.staging);
        if buf.capacity() > spare.capacity() {
            buf.clear();
            *spare = buf;
        }
    }
}

/// How the freeze takes the dirty pages, as `EVM_FREEZE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeMode {
    /// Copy them all while the vCPUs are stopped (`stop`): the freeze
    /// grows with the dirty set.
    Stop,
    /// The default (`precopy`): read the dirty log in a brief stop, copy
    /// those pages with the guest running, then, stopped, copy only those
    /// written meanwhile. Its first version read the log under running
    /// vCPUs, and in its first CI run a real Linux guest triple-faulted
    /// about 1 s after such a freeze (see `dirty_gpas_stopped`).
    Precopy,
    /// Write-protect them in the freeze and copy them after it (`cow`,
    /// experimental; see `cow.rs`).
    Cow,
}

impl FreezeMode {
    /// The mode a value of `EVM_FREEZE` names (unset: `Precopy`).
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("") | Some("precopy") => Ok(Self::Precopy),
            Some("stop") => Ok(Self::Stop),
            Some("cow") => Ok(Self::Cow),
            Some(other) => Err(format!("EVM_FREEZE={other}: not stop, precopy or cow")),
        }
    }

    /// The mode `EVM_FREEZE` names; an unknown value is said loudly and
    /// falls back to the default.
    pub fn from_env() -> Self {
        let value = std::env::var("EVM_FREEZE").ok();
        Self::parse(value.as_deref()).unwrap_or_else(|e| {
            log::warn!("{e}; the freeze pre-copies (the default)");
            Self::Precopy
        })
    }
}

/// Copy the pages at host addresses `srcs` into one buffer, with two
/// threads, reusing `data`, a buffer of an earlier epoch (no zeroing, no
/// fresh page faults).
fn copy_pages(srcs: &[Option<usize>], mut data: Vec<u8>) -> Vec<u8> {
    let n = srcs.len();
    data.clear();
    data.reserve(n * PAGE);
    let dst = data.as_mut_ptr() as usize;
    let copy = |from: usize, to: usize| {
        for (i, src) in srcs.iter().enumerate().take(to).skip(from) {
            let d = (dst + i * PAGE) as *mut u8;
            match src {
                // SAFETY: `d` is inside the buffer's reserved capacity of
                // `n * PAGE` bytes (i < n) and the two threads write
                // disjoint index ranges. The source is PAGE bytes of live
                // guest memory (host_ptr checked it), mapped for the whole
                // run and reached only through raw pointers. In a freeze no
                // one writes it (vCPUs parked, devices locked); in a
                // pre-copy the guest may, outside this program: a torn copy
                // is then replaced by the stopped copy (see `freeze`).
                Some(p) => unsafe { std::ptr::copy_nonoverlapping(*p as *const u8, d, PAGE) },
                // SAFETY: as above for `d`.
                None => unsafe { std::ptr::write_bytes(d, 0, PAGE) },
            }
        }
    };
    let half = n / 2;
    std::thread::scope(|s| {
        if half > 256 {
            s.spawn(|| copy(0, half));
            copy(half, n);
        } else {
            copy(0, n);
        }
    });
    // SAFETY: every byte of the first `n * PAGE` was written above and the
    // capacity is at least that.
    unsafe { data.set_len(n * PAGE) };
    data
}

/// The pre-copied pages (`pre_gpas` ascending, `pre_data` in that order)
/// with the pages copied in the freeze laid over them: a page in both takes
/// its frozen copy; the others follow the pre-copied ones.
fn merge_pages(
    mut pre_gpas: Vec<u64>,
    mut pre_data: Vec<u8>,
    gpas: &[u64],
    data: &[u8],
) -> (Vec<u64>, Vec<u8>) {
    let sorted = pre_gpas.len();
    for (i, g) in gpas.iter().enumerate() {
        let page = &data[i * PAGE..(i + 1) * PAGE];
        match pre_gpas[..sorted].binary_search(g) {
            Ok(j) => pre_data[j * PAGE..(j + 1) * PAGE].copy_from_slice(page),
            Err(_) => {
                pre_gpas.push(*g);
                pre_data.extend_from_slice(page);
            }
        }
    }
    (pre_gpas, pre_data)
}

/// Where the page at `gpa` lives in the store's flat memory image.
pub fn image_offset(gpa: u64) -> u64 {
    use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};
    if gpa >= MMIO_GAP_END {
        gpa - (MMIO_GAP_END - MMIO_GAP_START)
    } else {
        gpa
    }
}

/// Host address of the page at `gpa`, if all of it is guest RAM.
pub fn host_ptr(mem: &GuestMem, gpa: u64) -> Option<*mut u8> {
    let region = mem.find_region(vm_memory::GuestAddress(gpa))?;
    let off = gpa - region.start_addr().0;
    if off + PAGE as u64 > region.len() {
        return None;
    }
    region
        .get_host_address(vm_memory::MemoryRegionAddress(off))
        .ok()
}

fn encode_devices(d: &DeviceStates) -> Vec<u8> {
    // Plain structs of integers and vectors: serialisation cannot fail.
    serde_json::to_vec(d).unwrap_or_default()
}

/// Decode the device blob of a machine state.
pub fn decode_devices(b: &[u8]) -> Result<DeviceStates, serde_json::Error> {
    serde_json::from_slice(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    /// A page in both sets takes its frozen copy; a page only in the freeze
    /// is added once; the pre-copied rest is kept.
    #[test]
    fn frozen_copies_replace_pre_copied_ones() {
        let pre_gpas = vec![0x1000, 0x3000, 0x8000];
        let pre_data = [page(1), page(3), page(8)].concat();
        let gpas = [0x2000, 0x3000, 0x9000];
        let data = [page(0x22), page(0x33), page(0x99)].concat();
        let (g, d) = merge_pages(pre_gpas, pre_data, &gpas, &data);
        assert_eq!(g, vec![0x1000, 0x3000, 0x8000, 0x2000, 0x9000]);
        let fills: Vec<u8> = d.chunks(PAGE).map(|p| p[0]).collect();
        assert_eq!(fills, vec![1, 0x33, 8, 0x22, 0x99]);
        assert!(d.chunks(PAGE).all(|p| p.iter().all(|b| *b == p[0])));
    }

    #[test]
    fn freeze_modes_parse() {
        assert_eq!(FreezeMode::parse(None), Ok(FreezeMode::Precopy));
        assert_eq!(FreezeMode::parse(Some("stop")), Ok(FreezeMode::Stop));
        assert_eq!(FreezeMode::parse(Some("precopy")), Ok(FreezeMode::Precopy));
        assert_eq!(FreezeMode::parse(Some("cow")), Ok(FreezeMode::Cow));
        let e = FreezeMode::parse(Some("pre-copy")).unwrap_err();
        assert!(e.contains("EVM_FREEZE=pre-copy"), "{e}");
    }

    #[test]
    fn copies_pages_and_zero_fills_holes() {
        let src: Vec<Vec<u8>> = (0..600).map(|i| page(i as u8)).collect();
        let mut srcs: Vec<Option<usize>> = src.iter().map(|p| Some(p.as_ptr() as usize)).collect();
        srcs[5] = None;
        let out = copy_pages(&srcs, vec![0xff; 3]);
        assert_eq!(out.len(), 600 * PAGE);
        for (i, p) in out.chunks(PAGE).enumerate() {
            let want = if i == 5 { 0 } else { i as u8 };
            assert!(p.iter().all(|b| *b == want), "page {i}");
        }
    }
}
