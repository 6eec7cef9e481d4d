//! vCPU threads: one per vCPU, each running `KVM_RUN` and routing port and
//! MMIO exits through the buses.
//!
//! A vCPU is stopped for a freeze the race-free way: the freezer raises
//! `pause`, then signals the thread; the signal handler sets the thread's
//! `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` whether the signal
//! came during the run or just before it. Only at that `EINTR` does the
//! thread park: by then KVM has completed any I/O the previous exit left
//! pending, so the state it saves is architecturally consistent. Parked, the
//! thread saves its own state (the `VcpuFd` is its own) and waits for the
//! freezer to lower `pause`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Why the machine stops, as reported to the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (reboot, or a triple fault).
    Reset,
    /// The user typed the console escape.
    Escape,
    /// SIGTERM, SIGINT or SIGHUP reached evm.
    Signal(i32),
    /// A control API client asked to stop (`PUT /stop`).
    ApiStop,
    /// Something failed; the message says what.
    Error(String),
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer was taken from this thread's own VcpuFd,
        // whose kvm_run mapping lives until the thread ends (the VcpuFd is
        // owned by the thread's closure and the pointer is cleared before it
        // is dropped). A volatile byte store is async-signal-safe.
        let field = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: `field` points into the live kvm_run mapping (see above).
        unsafe { field.write_volatile(1) };
    }
}

/// Install the kick handler; without it the signal would kill us.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// The meeting point of vCPU threads and the freezer. `T` is what each
/// parked vCPU leaves behind (its saved state).
#[derive(Debug)]
pub struct Pauser<T> {
    inner: Mutex<PauseState<T>>,
    cv: Condvar,
}

#[derive(Debug)]
struct PauseState<T> {
    pause: bool,
    /// Whether parking vCPUs save their state (`false`: a brief stop).
    save: bool,
    parked: usize,
    finished: usize,
    saved: Vec<Option<T>>,
}

/// Why a freeze could not stop every vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a vCPU thread has ended; the machine is stopping")]
pub struct MachineEnding;

impl<T> Pauser<T> {
    /// For `count` vCPUs.
    pub fn new(count: usize) -> Self {
        Self {
            inner: Mutex::new(PauseState {
                pause: false,
                save: true,
                parked: 0,
                finished: 0,
                saved: (0..count).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask every vCPU to park; the caller then kicks the threads and calls
    /// `wait_parked`. A vCPU released by the last `release` may not have
    /// left its park yet: wait for that first, or this request would find
    /// it still counted as parked, with its saved state already taken, and
    /// a freeze would return one state too few.
    pub fn request(&self) {
        self.request_with(true);
    }

    /// Ask every vCPU to park, saving its state or (`save` false, a brief
    /// stop) not: `wait_parked` then returns no states.
    pub fn request_with(&self, save: bool) {
        let mut g = self.lock();
        while g.parked > 0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.pause = true;
        g.save = save;
        // Wakes vCPUs that hold (`wait_request`) rather than run.
        self.cv.notify_all();
    }

    /// Wait until a pause is requested, or `timeout` passes.
    fn wait_request(&self, timeout: std::time::Duration) {
        let g = self.lock();
        if !g.pause {
            let _ = self.cv.wait_timeout(g, timeout);
        }
    }

    /// Wait until every vCPU is parked and return what each saved.
    pub fn wait_parked(&self) -> Result<Vec<T>, MachineEnding> {
        let mut g = self.lock();
        let n = g.saved.len();
        while g.parked + g.finished < n {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.finished > 0 {
            g.pause = false;
            self.cv.notify_all();
            return Err(MachineEnding);
        }
        Ok(g.saved.iter_mut().filter_map(Option::take).collect())
    }

    /// Let every parked vCPU run again. It does not wait for the threads
    /// to be scheduled (the next `request` does): the freeze ends when the
    /// vCPUs may run, as a VMM's downtime usually does.
    pub fn release(&self) {
        let mut g = self.lock();
        g.pause = false;
        self.cv.notify_all();
    }

    pub(crate) fn pause_requested(&self) -> bool {
        self.lock().pause
    }

    /// Park until released, leaving `save()`'s result unless the request
    /// is a brief stop. The vCPUs save in parallel, outside the lock.
    pub(crate) fn park(&self, index: usize, mut save: impl FnMut() -> T) {
        let want = {
            let g = self.lock();
            if !g.pause {
                return;
            }
            g.save
        };
        let mut saved = want.then(&mut save);
        let mut g = self.lock();
        if !g.pause {
            return;
        }
        if g.save {
            // Saved above unless the request changed meanwhile.
            g.saved[index] = Some(match saved.take() {
                Some(s) => s,
                None => save(),
            });
        }
        g.parked += 1;
        self.cv.notify_all();
        while g.pause {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
        self.cv.notify_all();
    }

    fn finish(&self) {
        self.lock().finished += 1;
        self.cv.notify_all();
    }
}

/// Saves a parked vCPU's state (runs on the vCPU's own thread).
pub type SaveFn<T> = Arc<dyn Fn(&VcpuFd) -> T + Send + Sync>;

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// A stand-in vCPU thread, for tests of what stops and kicks them.
    #[cfg(test)]
    pub(crate) fn from_handle(handle: JoinHandle<()>) -> Self {
        Self { handle }
    }

    /// Interrupt `KVM_RUN` on this thread.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread_t comes from a JoinHandle that has not been
        // joined, so the thread (or its zombie) still exists; the signal has
        // a handler installed, so delivering it only sets immediate_exit.
        unsafe {
            libc::pthread_kill(self.handle.as_pthread_t(), kick_signal());
        }
    }
}

/// What a vCPU thread needs besides its `VcpuFd`.
pub struct VcpuContext<T> {
    /// Port-I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Set when the machine stops for good.
    pub stop: Arc<AtomicBool>,
    /// Set when the guest has asked for power-off or reset: the vCPU stops
    /// running guest code and holds (it still parks for a freeze) until
    /// `stop`.
    pub machine_off: Arc<AtomicBool>,
    /// Where power-off, reset and errors are reported.
    pub events: Sender<VmEvent>,
    /// The freeze meeting point.
    pub pauser: Arc<Pauser<T>>,
    /// Saves the vCPU's state when it parks.
    pub save: SaveFn<T>,
}

impl<T> std::fmt::Debug for VcpuContext<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuContext")
    }
}

/// Start vCPU `index` on its own thread.
pub fn spawn<T: Send + 'static>(
    index: u8,
    mut vcpu: VcpuFd,
    ctx: VcpuContext<T>,
) -> std::io::Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            KVM_RUN.with(|r| r.set(vcpu.get_kvm_run() as *mut kvm_run));
            let event = run_loop(index, &mut vcpu, &ctx);
            KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
            ctx.pauser.finish();
            if let Some(e) = event {
                let _ = ctx.events.send(e);
            }
        })?;
    Ok(VcpuThread { handle })
}

fn run_loop<T>(index: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext<T>) -> Option<VmEvent> {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return None;
        }
        if ctx.machine_off.load(Ordering::Acquire) {
            hold(index, vcpu, ctx);
            return None;
        }
        if ctx.pauser.pause_requested() {
            // Park only at an EINTR exit (see the module comment): make the
            // next KVM_RUN complete pending I/O and return at once.
            vcpu.set_kvm_immediate_exit(1);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(port as u64, data) {
                    log::trace!("vcpu{index}: in from unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(port as u64, data) {
                    log::trace!("vcpu{index}: out to unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    log::debug!("vcpu{index}: read from unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    log::debug!("vcpu{index}: write to unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vcpu{index}: triple fault; treating it as a reset");
                return Some(VmEvent::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                    other => VmEvent::Error(format!("vcpu{index}: system event {other}")),
                });
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip, HLT does not exit unless the
                // guest halted with interrupts off: it will never wake.
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: guest halted with interrupts disabled"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: KVM internal error (the guest ran something KVM cannot emulate)"
                )));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::debug!("vcpu{index}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if ctx.pauser.pause_requested() {
                    ctx.pauser.park(index as usize, || (ctx.save)(vcpu));
                }
            }
            Err(e) => {
                return Some(VmEvent::Error(format!("vcpu{index}: KVM_RUN failed: {e}")));
            }
        }
    }
}

/// The machine is off (the guest wrote the ACPI sleep or reset register,
/// or pulsed the i8042 reset line): run no more guest code. Left running, a
/// Linux guest spins on the sleep status register after its power-off
/// write, an exit to this process per read, for as long as the last epoch
/// and the discard take. Holding, the vCPU still parks for that last
/// freeze, whose epoch carries the disk's last writes.
fn hold<T>(index: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext<T>) {
    // Complete the I/O the last exit left pending (see the module
    // comment), so that a state saved while holding is consistent.
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        other => log::debug!("vcpu{index}: last run before holding: {other:?}"),
    }
    log::debug!("vcpu{index}: the machine is off; holding");
    hold_until_stop(&ctx.pauser, &ctx.stop, index as usize, || (ctx.save)(vcpu));
}

/// Park for every freeze requested until `stop`, saving with `save`.
fn hold_until_stop<T>(
    pauser: &Pauser<T>,
    stop: &AtomicBool,
    index: usize,
    mut save: impl FnMut() -> T,
) {
    while !stop.load(Ordering::Acquire) {
        if pauser.pause_requested() {
            pauser.park(index, &mut save);
        } else {
            // `stop` comes without a notification: look again soon.
            pauser.wait_request(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Threads = Vec<std::thread::JoinHandle<()>>;

    /// `n` threads standing in for vCPU threads: each runs `body(index,
    /// pauser, stop)`, then counts itself finished.
    fn spawn_vcpus(
        n: usize,
        body: fn(usize, &Pauser<usize>, &AtomicBool),
    ) -> (Arc<Pauser<usize>>, Arc<AtomicBool>, Threads) {
        let pauser = Arc::new(Pauser::<usize>::new(n));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let (p, s) = (pauser.clone(), stop.clone());
                std::thread::spawn(move || {
                    body(i, &p, &s);
                    p.finish();
                })
            })
            .collect();
        (pauser, stop, threads)
    }

    /// A vCPU thread's loop, minus KVM_RUN: park when asked, until `stop`.
    fn run_until_stop(p: &Pauser<usize>, stop: &AtomicBool, i: usize) {
        while !stop.load(Ordering::Acquire) {
            if p.pause_requested() {
                p.park(i, || i);
            }
            std::thread::yield_now();
        }
    }

    /// `rounds` freezes in a row, each collecting all `n` vCPUs' states.
    fn freeze_rounds(pauser: &Pauser<usize>, n: usize, rounds: usize) {
        for round in 0..rounds {
            pauser.request();
            let mut ids = pauser.wait_parked().expect("no vCPU ended");
            ids.sort_unstable();
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "round {round}");
            pauser.release();
        }
    }

    /// Back-to-back freezes must each collect every vCPU's state, even when
    /// a parked thread is slow to wake (the race a kill test found: a vCPU
    /// still counted as parked from the last freeze, its state already taken).
    #[test]
    fn back_to_back_freezes_collect_every_vcpu() {
        let n = 3;
        let (pauser, stop, threads) = spawn_vcpus(n, |i, p, s| run_until_stop(p, s, i));
        freeze_rounds(&pauser, n, 2000);
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
        pauser.request();
        assert_eq!(pauser.wait_parked(), Err(MachineEnding));
    }

    /// A brief stop (`request_with(false)`) parks every vCPU but has none
    /// save its state; the full freezes between brief stops still collect
    /// every vCPU's.
    #[test]
    fn brief_stops_save_no_state() {
        static SAVES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let (n, rounds) = (3, 500);
        let (pauser, stop, threads) = spawn_vcpus(n, |i, p, s| {
            while !s.load(Ordering::Acquire) {
                if p.pause_requested() {
                    p.park(i, || {
                        SAVES.fetch_add(1, Ordering::Relaxed);
                        i
                    });
                }
                std::thread::yield_now();
            }
        });
        for round in 0..rounds {
            pauser.request_with(false);
            assert_eq!(pauser.wait_parked(), Ok(vec![]), "round {round}");
            pauser.release();
            freeze_rounds(&pauser, n, 1);
        }
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(SAVES.load(Ordering::Relaxed), n * rounds);
    }

    /// vCPUs holding after a power-off still park for every freeze (the
    /// last epoch's) and end at `stop`; a mix of running and holding ones
    /// freezes too.
    #[test]
    fn holding_vcpus_park_for_freezes_and_end_at_stop() {
        let n = 3;
        let (pauser, stop, threads) = spawn_vcpus(n, |i, p, s| {
            if i == 0 {
                // Still running guest code, as a vCPU not yet kicked.
                run_until_stop(p, s, i);
            } else {
                let mut saves = 0;
                hold_until_stop(p, s, i, || {
                    saves += 1;
                    i
                });
                assert!(saves >= 200, "vcpu{i} saved {saves} times");
            }
        });
        freeze_rounds(&pauser, n, 200);
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }
}
