//! What a running VM reports about itself: the checkpoint thread records
//! every committed or failed epoch here, and the control API (`api`) reads
//! it for `/status`, `/epochs` and `/metrics`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How many recent epochs are kept for `/epochs` and `evm top`.
pub const HISTORY: usize = 1024;

/// One committed epoch, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EpochRecord {
    /// Its number.
    pub epoch: u64,
    /// When it was frozen (ns since the Unix epoch).
    pub wall_time_ns: u64,
    /// How long the vCPUs were stopped (µs).
    pub freeze_us: u32,
    /// Dirty guest pages it holds.
    pub dirty_pages: u64,
    /// Disk blocks it holds.
    pub disk_blocks: u64,
    /// Bytes it occupies in the log.
    pub bytes: u64,
    /// From the start of writing to durable (µs; 0 when unknown).
    pub commit_latency_us: u32,
}

impl From<&checkpoint::EpochInfo> for EpochRecord {
    fn from(e: &checkpoint::EpochInfo) -> Self {
        Self {
            epoch: e.epoch,
            wall_time_ns: e.wall_time_ns,
            freeze_us: e.freeze_us,
            dirty_pages: e.dirty_pages,
            disk_blocks: e.disk_blocks,
            bytes: e.bytes,
            commit_latency_us: e.commit_latency_us,
        }
    }
}

/// The store's side of the picture after the last append.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LogState {
    /// Size of the log ring.
    pub log_bytes: u64,
    /// Fraction of the ring in use (0..1).
    pub log_fill: f64,
    /// Fill at which committed epochs are migrated into home.
    pub migrate_threshold: f64,
    /// The epoch home holds.
    pub home_epoch: u64,
}

/// Counters and recent history of a running VM.
#[derive(Debug, Default)]
pub struct Counters {
    /// Epochs committed since this `evm run` started.
    pub committed: u64,
    /// Checkpoint attempts that failed since start.
    pub failures: u64,
    /// Whether the last attempt failed.
    pub failing: bool,
    /// Why the last failed attempt failed.
    pub last_error: Option<String>,
    /// Sum of `dirty_pages` over the epochs committed this run.
    pub dirty_pages: u64,
    /// Sum of `bytes` over the epochs committed this run.
    pub log_bytes_written: u64,
    /// Sum of freeze times this run (µs).
    pub freeze_us: u64,
    /// Times home advanced (migrations) this run.
    pub migrations: u64,
    /// The newest committed epoch (this run or before).
    pub last_committed: Option<u64>,
    /// Recent committed epochs, oldest first.
    pub history: VecDeque<EpochRecord>,
    /// The store's log.
    pub log: LogState,
}

/// Shared between the checkpoint thread and the API.
#[derive(Debug)]
pub struct Telemetry {
    /// The store, if any.
    pub store: Option<PathBuf>,
    /// Epoch interval.
    pub interval: Duration,
    /// vCPU count.
    pub vcpus: usize,
    /// Guest RAM.
    pub mem_bytes: u64,
    started: Instant,
    counters: Mutex<Counters>,
}

impl Telemetry {
    /// For a VM about to run.
    pub fn new(store: Option<PathBuf>, interval: Duration, vcpus: usize, mem_bytes: u64) -> Self {
        Self {
            store,
            interval,
            vcpus,
            mem_bytes,
            started: Instant::now(),
            counters: Mutex::new(Counters::default()),
        }
    }

    /// Time since the VM started running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The counters, locked.
    pub fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the store held when the VM started.
    pub fn seed(&self, epochs: &[checkpoint::EpochInfo], log: LogState, last: Option<u64>) {
        let mut c = self.lock();
        c.history = epochs
            .iter()
            .rev()
            .take(HISTORY)
            .rev()
            .map(EpochRecord::from)
            .collect();
        c.log = log;
        c.last_committed = last;
    }

    /// An epoch was committed.
    pub fn committed(&self, e: &checkpoint::EpochInfo, log: LogState) {
        let mut c = self.lock();
        c.committed += 1;
        c.failing = false;
        c.dirty_pages += e.dirty_pages;
        c.log_bytes_written += e.bytes;
        c.freeze_us += u64::from(e.freeze_us);
        if log.home_epoch > c.log.home_epoch {
            c.migrations += 1;
        }
        c.log = log;
        c.last_committed = Some(e.epoch);
        if c.history.len() == HISTORY {
            c.history.pop_front();
        }
        c.history.push_back(EpochRecord::from(e));
    }

    /// A checkpoint attempt failed.
    pub fn failed(&self, why: &str) {
        let mut c = self.lock();
        c.failures += 1;
        c.failing = true;
        c.last_error = Some(why.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(epoch: u64) -> checkpoint::EpochInfo {
        checkpoint::EpochInfo {
            epoch,
            freeze_us: 10,
            dirty_pages: 3,
            bytes: 4096 * 4,
            ..Default::default()
        }
    }

    #[test]
    fn counts_and_bounds_history() {
        let t = Telemetry::new(None, Duration::from_secs(1), 1, 1 << 20);
        t.seed(&[info(1), info(2)], LogState::default(), Some(2));
        t.failed("EIO");
        assert!(t.lock().failing);
        for n in 3..3 + HISTORY as u64 {
            let log = LogState {
                home_epoch: if n == 10 { 5 } else { t.lock().log.home_epoch },
                ..Default::default()
            };
            t.committed(&info(n), log);
        }
        let c = t.lock();
        assert!(!c.failing);
        assert_eq!(c.failures, 1);
        assert_eq!(c.committed, HISTORY as u64);
        assert_eq!(c.history.len(), HISTORY);
        assert_eq!(c.history.back().map(|e| e.epoch), Some(2 + HISTORY as u64));
        assert_eq!(c.last_committed, Some(2 + HISTORY as u64));
        assert_eq!(c.migrations, 1);
        assert_eq!(c.dirty_pages, 3 * HISTORY as u64);
    }
}
