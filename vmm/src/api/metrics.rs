//! `GET /metrics` in the Prometheus text exposition format (version
//! 0.0.4), and the recent rates `GET /status` reports.

use std::collections::VecDeque;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Control;
use crate::telemetry::EpochRecord;

/// Window of the rates in `/status`.
pub const RATE_WINDOW_S: u64 = 60;

/// Rates over the epochs of the last `RATE_WINDOW_S` seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Epochs committed per second.
    pub epochs_per_s: f64,
    /// Guest bytes dirtied per second (dirty pages × 4 KiB).
    pub dirty_bytes_per_s: f64,
    /// Log bytes written per second.
    pub log_bytes_per_s: f64,
    /// Median freeze (µs) of those epochs.
    pub freeze_us_p50: u32,
    /// Longest freeze (µs) of those epochs.
    pub freeze_us_max: u32,
}

/// The rates at `now` from `history` (oldest first).
pub fn rates(history: &VecDeque<EpochRecord>, now: SystemTime) -> Rates {
    let now_ns = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let from = now_ns.saturating_sub(RATE_WINDOW_S * 1_000_000_000);
    let recent: Vec<&EpochRecord> = history.iter().filter(|e| e.wall_time_ns >= from).collect();
    let mut freezes: Vec<u32> = recent.iter().map(|e| e.freeze_us).collect();
    freezes.sort_unstable();
    let mut r = Rates {
        freeze_us_p50: freezes.get(freezes.len() / 2).copied().unwrap_or(0),
        freeze_us_max: freezes.last().copied().unwrap_or(0),
        ..Rates::default()
    };
    if let (Some(first), Some(last)) = (recent.first(), recent.last()) {
        let span = last.wall_time_ns.saturating_sub(first.wall_time_ns) as f64 / 1e9;
        if recent.len() >= 2 && span > 0.0 {
            // Each epoch holds what was written since the one before, so
            // the first epoch of the window opens it.
            let after = &recent[1..];
            r.epochs_per_s = after.len() as f64 / span;
            r.dirty_bytes_per_s =
                after.iter().map(|e| e.dirty_pages * 4096).sum::<u64>() as f64 / span;
            r.log_bytes_per_s = after.iter().map(|e| e.bytes).sum::<u64>() as f64 / span;
        }
    }
    r
}

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// The metrics text.
pub fn render(ctl: &Control) -> String {
    let t = &ctl.telemetry;
    let c = t.lock();
    let mut o = Out(String::new());
    o.metric(
        "evm_up",
        "gauge",
        "1 while the VM process serves its API.",
        1,
    );
    o.metric(
        "evm_paused",
        "gauge",
        "1 while the vCPUs are paused by the API.",
        u8::from(ctl.gate.paused()),
    );
    o.metric("evm_vcpus", "gauge", "Number of vCPUs.", t.vcpus);
    o.metric(
        "evm_memory_bytes",
        "gauge",
        "Guest RAM in bytes.",
        t.mem_bytes,
    );
    o.metric(
        "evm_uptime_seconds",
        "gauge",
        "Seconds since this evm run started the VM.",
        format!("{:.3}", t.uptime().as_secs_f64()),
    );
    o.metric(
        "evm_store_attached",
        "gauge",
        "1 if the VM checkpoints to a store.",
        u8::from(t.store.is_some()),
    );
    o.metric(
        "evm_epoch_interval_seconds",
        "gauge",
        "Time between epochs.",
        t.interval.as_secs_f64(),
    );
    o.metric(
        "evm_last_committed_epoch",
        "gauge",
        "Number of the newest committed epoch (0: none).",
        c.last_committed.unwrap_or(0),
    );
    o.metric(
        "evm_epochs_committed_total",
        "counter",
        "Epochs committed by this evm run.",
        c.committed,
    );
    o.metric(
        "evm_checkpoint_failures_total",
        "counter",
        "Checkpoint attempts that failed (retried at the next interval).",
        c.failures,
    );
    o.metric(
        "evm_checkpoints_failing",
        "gauge",
        "1 if the last checkpoint attempt failed.",
        u8::from(c.failing),
    );
    o.metric(
        "evm_dirty_pages_total",
        "counter",
        "Guest pages written to the log by this evm run.",
        c.dirty_pages,
    );
    o.metric(
        "evm_log_written_bytes_total",
        "counter",
        "Bytes of epochs written to the log by this evm run.",
        c.log_bytes_written,
    );
    o.metric(
        "evm_log_size_bytes",
        "gauge",
        "Size of the store's log ring.",
        c.log.log_bytes,
    );
    o.metric(
        "evm_log_fill_ratio",
        "gauge",
        "Fraction of the log ring in use.",
        format!("{:.6}", c.log.log_fill),
    );
    o.metric(
        "evm_log_migrate_threshold_ratio",
        "gauge",
        "Log fill past which committed epochs are migrated into home.",
        c.log.migrate_threshold,
    );
    o.metric(
        "evm_home_epoch",
        "gauge",
        "The epoch the store's home holds.",
        c.log.home_epoch,
    );
    o.metric(
        "evm_migrations_total",
        "counter",
        "Migrations of committed epochs into home by this evm run.",
        c.migrations,
    );
    // A summary: quantiles over the recent history, sum and count over
    // this run.
    let mut freezes: Vec<u32> = c.history.iter().map(|e| e.freeze_us).collect();
    freezes.sort_unstable();
    let _ = writeln!(
        o.0,
        "# HELP evm_freeze_seconds How long the vCPUs were stopped to mark an epoch.\n# TYPE evm_freeze_seconds summary"
    );
    for q in [0.5, 0.9, 0.99] {
        let v = if freezes.is_empty() {
            "NaN".to_string()
        } else {
            let i = ((freezes.len() - 1) as f64 * q).round() as usize;
            format!("{:.6}", f64::from(freezes[i]) / 1e6)
        };
        let _ = writeln!(o.0, "evm_freeze_seconds{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(
        o.0,
        "evm_freeze_seconds_sum {:.6}",
        c.freeze_us as f64 / 1e6
    );
    let _ = writeln!(o.0, "evm_freeze_seconds_count {}", c.committed);
    if let Some(last) = c.history.back() {
        o.metric(
            "evm_last_freeze_seconds",
            "gauge",
            "Freeze time of the newest committed epoch.",
            format!("{:.6}", f64::from(last.freeze_us) / 1e6),
        );
        o.metric(
            "evm_last_commit_latency_seconds",
            "gauge",
            "Write-to-durable time of the newest committed epoch (0: unknown).",
            format!("{:.6}", f64::from(last.commit_latency_us) / 1e6),
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(epoch: u64, at_s: u64, freeze_us: u32) -> EpochRecord {
        EpochRecord {
            epoch,
            wall_time_ns: at_s * 1_000_000_000,
            freeze_us,
            dirty_pages: 256,
            disk_blocks: 0,
            bytes: 2 << 20,
            commit_latency_us: 5,
        }
    }

    #[test]
    fn rates_cover_the_window() {
        let h: VecDeque<_> = [
            rec(1, 10, 900),
            rec(2, 100, 100),
            rec(3, 101, 300),
            rec(4, 102, 200),
        ]
        .into_iter()
        .collect();
        let r = rates(&h, UNIX_EPOCH + Duration::from_secs(130));
        assert_eq!(r.epochs_per_s, 1.0);
        assert_eq!(r.dirty_bytes_per_s, (256 * 4096) as f64);
        assert_eq!(r.log_bytes_per_s, (2 << 20) as f64);
        assert_eq!((r.freeze_us_p50, r.freeze_us_max), (200, 300));
        assert_eq!(rates(&VecDeque::new(), SystemTime::now()), Rates::default());
    }
}
