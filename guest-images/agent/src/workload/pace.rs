//! Plumbing shared by the workload threads: rate pacing, the gate that
//! stops writers while something inspects their data, and a poison-proof
//! lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How far behind schedule a pacer may fall before it starts over (rather
/// than bursting to catch up, e.g. after a pause or a VM stop).
const MAX_LAG: Duration = Duration::from_secs(1);

/// Spaces operations evenly at `per_sec` a second on CLOCK_MONOTONIC
/// (`Instant`), by deadline rather than by sleep count, so slow steps do not
/// lower the average rate.
#[derive(Debug)]
pub struct Pacer {
    per_sec: u64,
    base: Instant,
    done: u64,
}

impl Pacer {
    /// `per_sec == 0` means unpaced.
    pub fn new(per_sec: u64) -> Self {
        Pacer {
            per_sec,
            base: Instant::now(),
            done: 0,
        }
    }

    /// Counts `n` more operations done, then sleeps until the next is due.
    pub fn done(&mut self, n: u64) {
        if self.per_sec == 0 {
            return;
        }
        self.done += n;
        let nanos = u128::from(self.done) * 1_000_000_000 / u128::from(self.per_sec);
        let due = self.base + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > MAX_LAG {
            self.restart();
        }
    }

    /// Starts the schedule over from now.
    pub fn restart(&mut self) {
        self.base = Instant::now();
        self.done = 0;
    }
}

/// While closed (by anyone holding it), writers leave their data alone.
///
/// Writers check it *while holding their data's lock*, so closing the gate
/// and then taking that lock once guarantees no write is in progress or
/// will start until the gate opens. Writers also check it before locking,
/// so a busy writer does not starve the closer.
#[derive(Debug, Default)]
pub struct Gate(AtomicUsize);

impl Gate {
    pub fn close(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn open(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }

    /// Closes the gate until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        self.close();
        Held(self)
    }
}

/// A closed gate; opens (one level) on drop.
#[derive(Debug)]
pub struct Held<'a>(&'a Gate);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Locks a mutex, ignoring poisoning (a panicking writer powers the guest
/// off anyway; in tests the data is still worth checking).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long writers nap while the gate is closed.
pub const GATE_NAP: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_nests() {
        let g = Gate::default();
        assert!(!g.is_closed());
        let a = g.hold();
        g.close();
        drop(a);
        assert!(g.is_closed());
        g.open();
        assert!(!g.is_closed());
        g.open();
        assert!(!g.is_closed());
    }

    #[test]
    fn pacer_never_runs_ahead() {
        let start = Instant::now();
        let mut p = Pacer::new(200);
        for _ in 0..10 {
            p.done(1);
        }
        // 10 operations at 200/s take at least 50 ms; no upper bound asserted.
        assert!(start.elapsed() >= Duration::from_millis(50));
        let mut unpaced = Pacer::new(0);
        unpaced.done(1_000_000);
    }
}
