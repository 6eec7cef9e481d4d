//! The `counter` workload: a counter incremented ten times a second (every
//! 100 ms of CLOCK_MONOTONIC, by deadline), printed once a second as
//! `EVM-AGENT counter <n>` (every tenth increment, to keep the console
//! usable).
//!
//! The counter is kept twice, as its value and as a check word derived from
//! it, so a torn or corrupted counter is noticed, and each check remembers
//! the value it saw: a later check seeing a smaller value means memory went
//! back in time.

use super::pace::{Pacer, lock};
use crate::say;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const CHECK_KEY: u64 = 0x5a5a_c0de_f00d_a5a5;

#[derive(Debug)]
struct State {
    value: u64,
    check: u64,
    /// The value the last successful check saw.
    last_verified: u64,
}

/// What is wrong with the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterError {
    WentBack { was: u64, now: u64 },
    Corrupt { value: u64, check: u64 },
}

impl fmt::Display for CounterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CounterError::WentBack { was, now } => {
                write!(f, "counter went back from {was} to {now}")
            }
            CounterError::Corrupt { value, check } => {
                write!(
                    f,
                    "counter {value} disagrees with its check word {check:#018x}"
                )
            }
        }
    }
}

impl std::error::Error for CounterError {}

/// The running counter.
#[derive(Debug)]
pub struct Counter {
    state: Mutex<State>,
    seen: AtomicU64,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            state: Mutex::new(State {
                value: 0,
                check: CHECK_KEY,
                last_verified: 0,
            }),
            seen: AtomicU64::new(0),
        }
    }
}

impl Counter {
    pub fn value(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    fn step(&self) -> u64 {
        let mut s = lock(&self.state);
        s.value += 1;
        s.check = s.value ^ CHECK_KEY;
        self.seen.store(s.value, Ordering::Relaxed);
        s.value
    }

    /// The thread's body; never returns.
    pub fn run(&self) -> ! {
        let mut pacer = Pacer::new(10);
        loop {
            pacer.done(1);
            let n = self.step();
            if n.is_multiple_of(10) {
                say!("counter {n}");
            }
        }
    }

    /// Checks the counter and remembers the value seen.
    pub fn verify(&self) -> Result<u64, CounterError> {
        let mut s = lock(&self.state);
        if s.check != s.value ^ CHECK_KEY {
            return Err(CounterError::Corrupt {
                value: s.value,
                check: s.check,
            });
        }
        if s.value < s.last_verified {
            return Err(CounterError::WentBack {
                was: s.last_verified,
                now: s.value,
            });
        }
        s.last_verified = s.value;
        Ok(s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_catches_going_back_or_corruption() {
        let c = Counter::default();
        assert_eq!(c.verify(), Ok(0));
        c.step();
        c.step();
        assert_eq!(c.verify(), Ok(2));
        assert_eq!(c.value(), 2);
        lock(&c.state).value = 1;
        assert!(matches!(
            c.verify(),
            Err(CounterError::Corrupt { value: 1, .. })
        ));
        lock(&c.state).check = 1 ^ CHECK_KEY;
        assert_eq!(c.verify(), Err(CounterError::WentBack { was: 2, now: 1 }));
    }
}
