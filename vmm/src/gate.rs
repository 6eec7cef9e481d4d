//! The vCPU gate: the one place that stops and restarts every vCPU, for a
//! freeze (`with_parked`) and for the control API's pause and resume.
//!
//! A pause parks every vCPU (`Pauser`) and keeps the states they left
//! behind. While paused, a freeze needs no kick: the vCPUs are already
//! parked and their saved states are still exact (they have not run), so
//! an epoch taken during a pause is the paused machine. The gate's lock
//! orders freezes, pauses and resumes: a pause waits for a running freeze.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::freeze::ParkedState;
use crate::vcpu::{MachineEnding, Pauser, VcpuThread};

/// Stops and restarts every vCPU.
#[derive(Debug)]
pub struct Gate {
    pauser: Arc<Pauser<ParkedState>>,
    threads: Arc<Mutex<Vec<VcpuThread>>>,
    /// The states the vCPUs saved when the user paused them; `Some` while
    /// paused.
    held: Mutex<Option<Vec<ParkedState>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gate {
    /// A gate over these vCPU threads and their meeting point.
    pub fn new(pauser: Arc<Pauser<ParkedState>>, threads: Arc<Mutex<Vec<VcpuThread>>>) -> Self {
        Self {
            pauser,
            threads,
            held: Mutex::new(None),
        }
    }

    fn park_all(&self) -> Result<Vec<ParkedState>, MachineEnding> {
        self.pauser.request();
        for t in lock(&self.threads).iter() {
            t.kick();
        }
        self.pauser.wait_parked()
    }

    /// Run `f` with every vCPU parked, giving it the states they saved;
    /// the vCPUs run again when it returns (unless the machine is paused).
    pub fn with_parked<R>(
        &self,
        f: impl FnOnce(Vec<ParkedState>) -> R,
    ) -> Result<R, MachineEnding> {
        let held = lock(&self.held);
        if let Some(states) = held.as_ref() {
            return Ok(f(states.clone()));
        }
        let parked = self.park_all()?;
        let r = f(parked);
        self.pauser.release();
        Ok(r)
    }

    /// Run `f` with every vCPU stopped but without saving their states: a
    /// brief stop, for what must not happen under a running vCPU (reading
    /// KVM's dirty log, see `freeze`).
    pub fn with_stopped<R>(&self, f: impl FnOnce() -> R) -> Result<R, MachineEnding> {
        let held = lock(&self.held);
        if held.is_some() {
            return Ok(f());
        }
        self.pauser.request_with(false);
        self.kick_all();
        self.pauser.wait_parked()?;
        let r = f();
        self.pauser.release();
        Ok(r)
    }

    /// Park every vCPU until `resume`. `Ok(false)`: it was already paused.
    pub fn pause(&self) -> Result<bool, MachineEnding> {
        let mut held = lock(&self.held);
        if held.is_some() {
            return Ok(false);
        }
        *held = Some(self.park_all()?);
        Ok(true)
    }

    /// Let the vCPUs run again. `false`: it was not paused.
    pub fn resume(&self) -> bool {
        let mut held = lock(&self.held);
        if held.take().is_none() {
            return false;
        }
        self.pauser.release();
        true
    }

    /// Whether the user has paused the machine.
    pub fn paused(&self) -> bool {
        lock(&self.held).is_some()
    }

    /// Interrupt every vCPU's `KVM_RUN` (to make them see a stop).
    pub fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            t.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// `with_stopped` runs its closure only once every vCPU is parked, and
    /// they run again after it: threads standing in for vCPUs (kicked with
    /// the real signal) tick while they run, and no tick lands while the
    /// closure runs. (Without the wait for every vCPU to park, ticks land.)
    #[test]
    fn a_brief_stop_runs_with_every_vcpu_parked() {
        crate::vcpu::install_kick_handler().expect("kick handler");
        let n = 2;
        let pauser = Arc::new(Pauser::<ParkedState>::new(n));
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|i| {
                let (p, s, t) = (pauser.clone(), stop.clone(), ticks.clone());
                VcpuThread::from_handle(std::thread::spawn(move || {
                    while !s.load(Ordering::Acquire) {
                        if p.pause_requested() {
                            p.park(i, || Err("a stand-in saves nothing".into()));
                        }
                        // Slow to see a request, as a vCPU deep in
                        // KVM_RUN is until the kick (which a sleep ignores).
                        std::thread::sleep(Duration::from_micros(500));
                        t.fetch_add(1, Ordering::Relaxed);
                    }
                }))
            })
            .collect();
        let gate = Gate::new(pauser, Arc::new(Mutex::new(threads)));
        for round in 0..50 {
            let before = ticks.load(Ordering::Relaxed);
            let still = gate
                .with_stopped(|| {
                    let a = ticks.load(Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                    a == ticks.load(Ordering::Relaxed)
                })
                .expect("no vCPU ended");
            assert!(still, "round {round}: a vCPU ran during the brief stop");
            // And they run again afterwards.
            while ticks.load(Ordering::Relaxed) == before {
                std::thread::yield_now();
            }
        }
        stop.store(true, Ordering::Release);
    }
}
