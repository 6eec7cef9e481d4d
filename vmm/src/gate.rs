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
