//! The workloads (counter, dirty, disk), each on its own thread, and the
//! checks run on request across all of them.

pub mod counter;
pub mod dirty;
pub mod disk;
pub mod pace;
pub mod page;
pub mod record;

use crate::cmdline::Config;
use crate::console::error_chain;
use crate::say;
use counter::Counter;
use dirty::Dirty;
use disk::Disk;
use pace::lock;
use std::sync::{Arc, Mutex};

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub counter: Option<u64>,
    pub dirty_pages: u64,
    pub disk_durable: Option<u64>,
    pub disk_issued: Option<u64>,
    /// Empty when everything checked out.
    pub failures: Vec<String>,
}

/// Current values, for `evm-agent status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub counter: Option<u64>,
    pub dirty_gen: Option<u64>,
    pub disk_durable: Option<u64>,
    pub disk_issued: Option<u64>,
    pub paused: bool,
}

/// The workloads of this agent.
#[derive(Debug, Default)]
pub struct Workloads {
    counter: Option<Arc<Counter>>,
    dirty: Option<Arc<Dirty>>,
    disk: Option<Arc<Disk>>,
    /// Workloads asked for that could not start, with the reason.
    failed: Vec<String>,
    paused: Mutex<bool>,
}

fn spawn<T: Send + Sync + 'static>(
    name: &str,
    item: &Arc<T>,
    body: fn(&T) -> !,
) -> std::io::Result<()> {
    let item = Arc::clone(item);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || body(&item))
        .map(drop)
}

impl Workloads {
    /// Sets up and starts the configured workloads. Failures are printed
    /// and remembered (a later verification reports them), never fatal.
    pub fn start(cfg: &Config, boot_id: [u8; 16]) -> Self {
        let mut w = Workloads::default();
        let mut fail = |name: &str, why: String| {
            say!("ERROR {name} workload: {why}");
            w.failed.push(format!("{name} workload not running: {why}"));
        };
        let spec = &cfg.workloads;
        let counter = spec.counter.then(|| Arc::new(Counter::default()));
        if let Some(c) = &counter
            && let Err(e) = spawn("counter", c, Counter::run)
        {
            fail("counter", error_chain(&e));
        }
        let mut dirty = None;
        if let Some(d) = spec.dirty {
            match Dirty::new(d) {
                Ok(d) => {
                    let d = Arc::new(d);
                    say!("dirty start pages={} addr={:#x}", d.pages(), d.addr());
                    match spawn("dirty", &d, Dirty::run) {
                        Ok(()) => dirty = Some(d),
                        Err(e) => fail("dirty", error_chain(&e)),
                    }
                }
                Err(e) => fail("dirty", error_chain(&e)),
            }
        }
        let mut disk = None;
        if spec.disk {
            match Disk::new(&cfg.disk_path, cfg.disk_rate, boot_id) {
                Ok(d) => {
                    let d = Arc::new(d);
                    match spawn("disk", &d, Disk::run) {
                        Ok(()) => disk = Some(d),
                        Err(e) => fail("disk", error_chain(&e)),
                    }
                }
                Err(e) => fail("disk", error_chain(&e)),
            }
        }
        w.counter = counter;
        w.dirty = dirty;
        w.disk = disk;
        w
    }

    /// Checks everything the agent holds; writers are held off while their
    /// data is checked, so a check never sees a write half done.
    pub fn verify(&self) -> Verdict {
        let mut failures = self.failed.clone();
        let counter = self.counter.as_ref().map(|c| match c.verify() {
            Ok(v) => v,
            Err(e) => {
                failures.push(e.to_string());
                c.value()
            }
        });
        let mut dirty_pages = 0;
        if let Some(d) = &self.dirty {
            let check = d.verify();
            dirty_pages = check.pages;
            if let Some(first) = check.first_bad {
                failures.push(format!(
                    "dirty {first} ({} of {} pages bad)",
                    check.bad, check.pages
                ));
            }
        }
        let (mut disk_durable, mut disk_issued) = (None, None);
        if let Some(d) = &self.disk {
            let check = d.verify();
            (disk_durable, disk_issued) = (check.durable, check.issued);
            if let Err(e) = check.result {
                failures.push(format!(
                    "{} (memory: disk_seq={}/{})",
                    error_chain(&e),
                    disk::opt(check.durable),
                    disk::opt(check.issued)
                ));
            }
        }
        Verdict {
            counter,
            dirty_pages,
            disk_durable,
            disk_issued,
            failures,
        }
    }

    pub fn status(&self) -> Status {
        let (disk_durable, disk_issued) = self.disk.as_ref().map_or((None, None), |d| d.seqs());
        Status {
            counter: self.counter.as_ref().map(|c| c.value()),
            dirty_gen: self.dirty.as_ref().map(|d| d.generation()),
            disk_durable,
            disk_issued,
            paused: *lock(&self.paused),
        }
    }

    /// Stops (`true`) or restarts the writers of dirty pages and disk
    /// records, so tests can change their data without racing them. When
    /// this returns with `true`, no write is in progress.
    pub fn pause(&self, on: bool) {
        let mut paused = lock(&self.paused);
        if *paused == on {
            return;
        }
        *paused = on;
        if let Some(d) = &self.dirty {
            if on {
                d.gate().close();
                d.quiesce();
            } else {
                d.gate().open();
            }
        }
        if let Some(d) = &self.disk {
            if on {
                d.gate().close();
                d.quiesce();
            } else {
                d.gate().open();
            }
        }
    }
}
