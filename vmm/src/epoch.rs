//! The epoch pipeline: every interval the checkpoint thread freezes the
//! machine (`freeze`), then — with the guest running again — writes the
//! epoch's pages and state to the store and commits it (`checkpoint`).
//! One epoch is written at a time: if writing epoch N outlasts the
//! interval, freeze N+1 waits and dirty logging keeps accumulating.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::{EpochInfo, EpochMeta, Store};

use crate::freeze::{Freezer, Frozen, PAGE};
use crate::telemetry::{LogState, Telemetry};

/// Shortest and longest epoch interval `--interval` accepts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// See `MIN_INTERVAL`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(600);

/// Orders for the checkpoint thread.
#[derive(Debug)]
pub enum Order {
    /// Take an epoch now; reply with its number once committed.
    Now(Sender<Result<u64, String>>),
    /// Take a final epoch, commit it, and stop.
    Final(Sender<Result<u64, String>>),
    /// Commit a last epoch (so the disk writes made since the previous one
    /// are kept), stop, and mark the store as holding no machine state (the
    /// guest powered off or reset).
    Discard(Sender<Result<(), String>>),
}

/// Handle to the running checkpoint thread.
#[derive(Debug)]
pub struct Checkpointer {
    orders: Sender<Order>,
    handle: JoinHandle<()>,
}

/// A handle that asks the checkpoint thread for an epoch now (the API's).
#[derive(Debug, Clone)]
pub struct EpochNow {
    orders: Sender<Order>,
}

impl EpochNow {
    /// Take an epoch now and wait until it is committed.
    pub fn checkpoint_now(&self) -> Result<u64, String> {
        ask(&self.orders, Order::Now)
    }
}

fn ask<T>(
    orders: &Sender<Order>,
    make: impl FnOnce(Sender<Result<T, String>>) -> Order,
) -> Result<T, String> {
    let (tx, rx) = channel();
    orders
        .send(make(tx))
        .map_err(|_| "the checkpoint thread has stopped".to_string())?;
    rx.recv()
        .map_err(|_| "the checkpoint thread has stopped".to_string())?
}

/// The store's log as the telemetry reports it.
fn log_state(store: &Store) -> LogState {
    LogState {
        log_bytes: store.log_bytes(),
        log_fill: store.log_fill(),
        migrate_threshold: store.migrate_threshold(),
        home_epoch: store.home_epoch(),
    }
}

impl Checkpointer {
    /// Start taking an epoch every `interval`, reporting each to `telemetry`.
    pub fn spawn(
        freezer: Freezer,
        store: Store,
        interval: Duration,
        telemetry: Arc<Telemetry>,
    ) -> std::io::Result<Self> {
        telemetry.seed(store.epochs(), log_state(&store), store.last_epoch());
        let (tx, rx) = channel();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || run(&Pipeline { freezer, telemetry }, store, interval, rx))?;
        Ok(Self { orders: tx, handle })
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<Result<T, String>>) -> Order) -> Result<T, String> {
        ask(&self.orders, make)
    }

    /// Take an epoch now and wait until it is committed.
    pub fn checkpoint_now(&self) -> Result<u64, String> {
        self.ask(Order::Now)
    }

    /// A handle for taking epochs on demand from other threads.
    pub fn epoch_now(&self) -> EpochNow {
        EpochNow {
            orders: self.orders.clone(),
        }
    }

    /// Take and commit a final epoch, then stop the thread.
    pub fn finish(self) -> Result<u64, String> {
        let r = self.ask(Order::Final);
        let _ = self.handle.join();
        r
    }

    /// Stop and mark the store as holding no machine state.
    pub fn discard(self) -> Result<(), String> {
        let r = self.ask(Order::Discard);
        let _ = self.handle.join();
        r
    }
}

/// What the checkpoint thread works with besides the store.
struct Pipeline {
    freezer: Freezer,
    telemetry: Arc<Telemetry>,
}

impl Pipeline {
    /// `take_epoch`, reported to the telemetry.
    fn epoch(&self, store: &mut Store, carry: &mut Vec<u64>) -> Result<u64, String> {
        match take_epoch(&self.freezer, store, carry) {
            Ok(info) => {
                self.telemetry.committed(&info, log_state(store));
                Ok(info.epoch)
            }
            Err(e) => {
                self.telemetry.failed(&e);
                Err(e)
            }
        }
    }
}

fn run(p: &Pipeline, mut store: Store, interval: Duration, orders: Receiver<Order>) {
    let mut next = Instant::now() + interval;
    let mut failing = false;
    // Pages of an epoch whose write failed: it may be durable or not, so
    // the next epoch (which reuses its number) must carry them again.
    let mut carry: Vec<u64> = Vec::new();
    loop {
        let order = match orders.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(o) => Some(o),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match order {
            None => {
                match p.epoch(&mut store, &mut carry) {
                    Ok(_) => {
                        if failing {
                            log::warn!("checkpoints are succeeding again");
                        }
                        failing = false;
                    }
                    Err(e) => {
                        // Loud, and retried at the next interval; the last
                        // committed epoch stays intact.
                        log::error!("checkpoint failed: {e}; retrying in {interval:?}");
                        failing = true;
                        if e.contains("stopping") {
                            return;
                        }
                    }
                }
                next = Instant::now() + interval;
            }
            Some(Order::Now(reply)) => {
                let _ = reply.send(p.epoch(&mut store, &mut carry));
                next = Instant::now() + interval;
            }
            Some(Order::Final(reply)) => {
                let _ = reply.send(p.epoch(&mut store, &mut carry));
                return;
            }
            Some(Order::Discard(reply)) => {
                // The disk outlives the machine: its last writes go into an
                // epoch first, which the discard then folds into home.
                // A vCPU that ended (triple fault, KVM's shutdown event)
                // cannot be frozen: the disk then keeps the last committed
                // epoch's contents, as after a power cut.
                if let Err(e) = p.epoch(&mut store, &mut carry) {
                    log::warn!(
                        "no last epoch at power-off ({e}): the disk keeps the last committed epoch's contents"
                    );
                }
                let _ = reply.send(store.discard_machine_state().map_err(|e| e.to_string()));
                return;
            }
        }
    }
}

/// Freeze, write, commit; log one line per epoch.
fn take_epoch(
    freezer: &Freezer,
    store: &mut Store,
    carry: &mut Vec<u64>,
) -> Result<EpochInfo, String> {
    let frozen: Frozen = freezer.freeze(carry).map_err(|e| e.to_string())?;
    let meta = EpochMeta {
        wall_time_ns: frozen.wall_time_ns,
        freeze_us: frozen.freeze.as_micros().min(u32::MAX as u128) as u32,
        dirty_pages: frozen.gpas.len() as u64,
    };
    let mut pages = frozen
        .offsets
        .iter()
        .enumerate()
        .map(|(i, off)| (*off, &frozen.data[i * PAGE..(i + 1) * PAGE]));
    // Sorted, so that the log's disk records (and export) are in order.
    let mut blocks: Vec<(&u64, &std::sync::Arc<_>)> = frozen.disk.iter().collect();
    blocks.sort_unstable_by_key(|(off, _)| **off);
    let mut disk = blocks.iter().map(|(off, b)| (**off, &b[..]));
    let info = match store.append_epoch_with_disk(&meta, &mut pages, &mut disk, &frozen.state) {
        Ok(info) => {
            carry.clear();
            freezer.recycle(frozen.data);
            // The store serves these blocks now (the overlay seals them
            // again into the next epoch if this commit had failed).
            if let Some(d) = &freezer.devices.disk {
                d.committed();
            }
            info
        }
        Err(e) => {
            *carry = frozen.gpas;
            return Err(with_causes(&e));
        }
    };
    log::info!(
        "epoch {} committed: freeze {} µs, {} dirty pages, {} disk blocks, {:.1} MiB, commit {} µs",
        info.epoch,
        info.freeze_us,
        info.dirty_pages,
        info.disk_blocks,
        info.bytes as f64 / (1 << 20) as f64,
        info.commit_latency_us
    );
    Ok(info)
}

/// `e: cause: cause…`, for one log line that says why.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.ends_with(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("store /s: sync epoch 4")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(
            with_causes(&e),
            "store /s: sync epoch 4: Input/output error (os error 5)"
        );
    }
}
