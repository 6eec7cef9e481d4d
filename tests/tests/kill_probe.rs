//! Kill tests with the probe guest on this machine's own `/dev/kvm`
//! (issue 3, item 5): evm is killed with `SIGKILL` at seeded random
//! instants while it takes epochs every 50–100 ms, and resumed from its
//! store again and again; after every resume the probe must re-verify its
//! stamped pages against its generation table (both in guest memory, so a
//! resume that mixes two epochs or tears a page fails the verify), and
//! evm must resume from the last epoch it reported committed, or a newer
//! one. Also: `SIGTERM`/`SIGINT` then resume loses nothing, and a guest
//! power-off makes the next run boot fresh.
//!
//! Reproduce a run with `EVM_KILL_SEED=<seed>` (printed first). Other
//! knobs: `EVM_KILL_CYCLES` (kills per chain, default 125; four chains),
//! `EVM_KILL_JOBS` (chains run at once, default 2). Nothing here asserts
//! on timing; a run that prints nothing useful for 60 s fails with its
//! output attached. Without `/dev/kvm` these tests fail, never skip.

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use evm_tests::TempDir;
use evm_tests::evm_process::{
    EpochLine, EvmProcess, Seen, SplitMix64, Stream, field, final_epoch, last_counts,
    number_from_env, probe_elf, probe_failure, resumed_epoch, seed_from_env, verified_vcpu,
};
use evm_tests::host::{evm_bin, require_kvm};
use evm_tests::lock::GuestLock;

/// Longest wait for any one thing (a resume proving itself alive, an exit).
const WAIT: Duration = Duration::from_secs(60);
/// Kills land uniformly in this long after a resume proved alive: many
/// epoch intervals, so every phase of the epoch cycle.
const KILL_WITHIN: Duration = Duration::from_millis(700);
/// Earlier runs whose output a failure shows.
const PREV_TAILS: usize = 3;
/// "kill-9" in ASCII.
const DEFAULT_SEED: u64 = 0x6b69_6c6c_2d39;
const MEM: &str = "256M";
/// Every run logs its epochs, resumes and migrations.
const ENV: &[(&str, &str)] = &[("EVM_LOG", "debug")];

/// One chain's guest and epoch interval. Paced dirtying (a pass over a
/// vCPU's slice takes 2 s, longer than `verify_every`) keeps a wrong page
/// alive until the next verify even where the guest TSC is restored
/// exactly (where it jumps across a resume, as on PVM, the probe verifies
/// at once); flat-out dirtying (`rate=0`) makes every epoch the whole
/// 32 MiB buffer, so kills land mid-write and the 512 MiB log
/// (max(2 × mem, 256 MiB)) fills and migrates every few seconds. The
/// buffer is small so that the verify after each resume is quick.
/// Intervals of 50 and 100 ms put many kills in or near a freeze; one
/// chain uses the shortest interval evm accepts (10 ms), where freezes
/// follow each other closely.
#[derive(Debug)]
struct Profile {
    name: &'static str,
    vcpus: u8,
    interval: &'static str,
    interval_ms: u64,
    cmdline: &'static str,
    /// Fills the log fast enough that aiming kills at migrations pays.
    migrates: bool,
}

const PROFILES: [Profile; 4] = [
    Profile {
        name: "1vcpu-paced",
        vcpus: 1,
        interval: "50ms",
        interval_ms: 50,
        cmdline: "dirty=32 rate=16 verify_every=1",
        migrates: false,
    },
    Profile {
        name: "2vcpu-paced",
        vcpus: 2,
        interval: "10ms",
        interval_ms: 10,
        cmdline: "dirty=32 rate=16 verify_every=1",
        migrates: false,
    },
    Profile {
        name: "1vcpu-flat-out",
        vcpus: 1,
        interval: "100ms",
        interval_ms: 100,
        cmdline: "dirty=32 rate=0 verify_every=1",
        migrates: true,
    },
    Profile {
        name: "2vcpu-flat-out",
        vcpus: 2,
        interval: "50ms",
        interval_ms: 50,
        cmdline: "dirty=32 rate=0 verify_every=1",
        migrates: true,
    },
];

/// Where a kill landed, judged from evm's log of the killed run.
#[derive(Debug, Default, Clone)]
struct Tally {
    kills: u64,
    /// Killed before evm said it resumed (opening the store, restoring).
    in_restore: u64,
    /// Killed between "migrating through" and "migrated through".
    in_migration: u64,
    /// evm starts the next freeze one interval after an epoch's commit
    /// line: killed within 5 ms of that instant (in or next to a freeze),
    /// later (while the epoch is written and committed), or earlier.
    near_freeze: u64,
    mid_write: u64,
    between: u64,
    /// Resumes from the last epoch reported committed, and from the one
    /// after it (committed, killed before its line was written).
    resumed_reported: u64,
    resumed_after_reported: u64,
    migrations: u64,
    fallbacks: u64,
    /// Freezes that write-protected pages instead of copying them (evm's
    /// debug line "… write-protected now …").
    cow_freezes: u64,
    /// Freezes after a pre-copy (debug line "… pages pre-copied …").
    precopy_freezes: u64,
    epochs: u64,
    max_freeze_us: u64,
    /// The longest freeze of a run's first epoch (after boot or resume).
    max_first_freeze_us: u64,
    resumes_with_flags: u64,
    /// Resumes that proved alive, and their summed times from launch to
    /// evm's resume line and from launch to the last vCPU's verify.
    alive: u64,
    to_resumed: Duration,
    to_alive: Duration,
}

/// A failure, with what is needed to reproduce it.
fn fail(seed: u64, chain: &str, cycle: u64, what: impl std::fmt::Display) -> String {
    format!("EVM_KILL_SEED={seed:#x} chain {chain} cycle {cycle}: {what}")
}

struct Chain<'a> {
    seed: u64,
    profile: &'a Profile,
    /// Environment of every evm run.
    env: &'a [(&'a str, &'a str)],
    rng: SplitMix64,
    bin: PathBuf,
    elf: String,
    store: PathBuf,
    /// The newest epoch any run has reported committed.
    reported: u64,
    cycle: u64,
    tally: Tally,
    /// The ends of the last runs' output, oldest first (one of them wrote
    /// the epoch that the current run resumes from), for failure messages.
    prev_tails: VecDeque<String>,
}

impl Chain<'_> {
    fn err(&self, what: impl std::fmt::Display) -> String {
        let mut what = what.to_string();
        for (i, tail) in self.prev_tails.iter().rev().enumerate() {
            what.push_str(&format!("\n--- {} run(s) before it ---\n{tail}", i + 1));
        }
        fail(self.seed, self.profile.name, self.cycle, what)
    }

    fn boot_args(&self) -> Vec<String> {
        let p = self.profile;
        [
            "run",
            "--store",
            &self.store.to_string_lossy(),
            "--kernel",
            &self.elf,
            "--vcpus",
            &p.vcpus.to_string(),
            "--mem",
            MEM,
            "--cmdline",
            p.cmdline,
            "--interval",
            p.interval,
        ]
        .map(String::from)
        .to_vec()
    }

    /// `run --store S --interval I`; one resume in four repeats the boot
    /// flags (they match the stored config, so evm must accept them).
    fn resume_args(&mut self) -> Vec<String> {
        if self.rng.chance(1, 4) {
            self.tally.resumes_with_flags += 1;
            return self.boot_args();
        }
        let store = self.store.to_string_lossy().into_owned();
        [
            "run",
            "--store",
            &store,
            "--interval",
            self.profile.interval,
        ]
        .map(String::from)
        .to_vec()
    }

    fn spawn(&self, args: &[String]) -> Result<EvmProcess, String> {
        EvmProcess::spawn(&self.bin, args, self.env).map_err(|e| self.err(e))
    }

    /// Waits until this run has proved the guest alive: (after a resume)
    /// evm's "resumed from epoch N" with N at least the last epoch reported
    /// committed, and a periodic `PROBE VERIFY OK` from every vCPU.
    fn wait_alive(&mut self, p: &mut EvmProcess, resumed: bool) -> Result<(), String> {
        let vcpus = u64::from(self.profile.vcpus);
        let mut verified = BTreeSet::new();
        let mut resumed_from = None;
        let mut committed = false;
        let what = if resumed {
            "the resume line and a PROBE VERIFY OK from every vCPU"
        } else {
            "PROBE READY, a committed epoch and a PROBE VERIFY OK from every vCPU"
        };
        let mut ready = false;
        let r = p.wait_for(what, WAIT, |l| {
            if let Some(bad) = probe_failure(l, resumed) {
                return Seen::Bad(bad);
            }
            if let Some(v) = verified_vcpu(l) {
                verified.insert(v);
            }
            if let Some(n) = resumed_epoch(&l.text) {
                resumed_from = Some(n);
            }
            ready |= l.stream == Stream::Stdout && l.text.starts_with("PROBE READY");
            committed |= EpochLine::parse(&l.text).is_some();
            let started = if resumed {
                resumed_from.is_some()
            } else {
                ready && committed
            };
            if started && verified.len() as u64 == vcpus {
                Seen::Yes
            } else {
                Seen::No
            }
        });
        let alive = r.map_err(|e| self.err(e))?;
        if let Some(n) = resumed_from {
            self.check_resumed(n, p)?;
            let resumed_at = p.lines().iter().find(|l| resumed_epoch(&l.text).is_some());
            self.tally.alive += 1;
            self.tally.to_resumed += resumed_at.map_or(Duration::ZERO, |l| l.at - p.started());
            self.tally.to_alive += alive.at - p.started();
        }
        Ok(())
    }

    /// Invariant 3: a resume is from the newest epoch any earlier run
    /// reported committed, or a newer one.
    fn check_resumed(&self, n: u64, p: &EvmProcess) -> Result<(), String> {
        if n < self.reported {
            return Err(self.err(format!(
                "resumed from epoch {n}, but epoch {} was reported committed before the kill \
                 (a committed epoch was lost)\n{}",
                self.reported,
                p.tail()
            )));
        }
        Ok(())
    }

    /// After a run ended: every line it printed is checked again (lines
    /// that came after the last wait), and the tally updated.
    fn account(
        &mut self,
        p: &EvmProcess,
        resumed: bool,
        killed_at: Option<Instant>,
    ) -> Result<(), String> {
        // Before this run's own commit lines raise `reported`.
        if let Some(n) = p.lines().iter().find_map(|l| resumed_epoch(&l.text)) {
            self.check_resumed(n, p)?;
            if n == self.reported {
                self.tally.resumed_reported += 1;
            } else if n == self.reported + 1 {
                self.tally.resumed_after_reported += 1;
            }
        }
        let mut resumed_line = None;
        let mut migrating_at = None;
        let mut last_commit = None;
        for l in p.lines() {
            if let Some(bad) = probe_failure(l, resumed) {
                return Err(self.err(format!("{bad}\n{}", p.tail())));
            }
            if let Some(e) = EpochLine::parse(&l.text) {
                self.reported = self.reported.max(e.epoch);
                self.tally.epochs += 1;
                if last_commit.is_none() {
                    self.tally.max_first_freeze_us =
                        self.tally.max_first_freeze_us.max(e.freeze_us);
                } else {
                    self.tally.max_freeze_us = self.tally.max_freeze_us.max(e.freeze_us);
                }
                last_commit = Some(l.at);
            }
            if let Some(n) = final_epoch(&l.text) {
                self.reported = self.reported.max(n);
            }
            if resumed_epoch(&l.text).is_some() {
                resumed_line = Some(l.at);
            }
            if l.text.contains("migrating through epoch") {
                migrating_at = Some(l.at);
            }
            if l.text.contains("migrated through epoch") {
                migrating_at = None;
                self.tally.migrations += 1;
            }
            if l.text.contains("falling back") {
                self.tally.fallbacks += 1;
            }
            if l.text.contains("write-protected now") {
                self.tally.cow_freezes += 1;
            }
            if l.text.contains("pages pre-copied") {
                self.tally.precopy_freezes += 1;
            }
        }
        if let Some(at) = killed_at {
            self.tally.kills += 1;
            if resumed && resumed_line.is_none_or(|t| t > at) {
                self.tally.in_restore += 1;
            } else if migrating_at.is_some_and(|t| t <= at) {
                self.tally.in_migration += 1;
            } else if let Some(t) = last_commit.filter(|&t| t <= at) {
                let since = (at - t).as_secs_f64() * 1000.0;
                let due = self.profile.interval_ms as f64;
                if (since - due).abs() < 5.0 {
                    self.tally.near_freeze += 1;
                } else if since > due {
                    self.tally.mid_write += 1;
                } else {
                    self.tally.between += 1;
                }
            } else {
                self.tally.between += 1;
            }
            let status = p.status().expect("reaped");
            if status.signal() != Some(libc::SIGKILL) {
                return Err(self.err(format!(
                    "evm ended by itself ({status}) before the kill\n{}",
                    p.tail()
                )));
            }
        }
        if self.prev_tails.len() == PREV_TAILS {
            self.prev_tails.pop_front();
        }
        self.prev_tails.push_back(p.tail());
        Ok(())
    }

    /// SIGKILL at `at` (or now, if that has passed), reap, account.
    fn kill_at(&mut self, p: &mut EvmProcess, at: Instant, resumed: bool) -> Result<(), String> {
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let at = Instant::now();
        p.kill().map_err(|e| self.err(e))?;
        self.account(p, resumed, Some(at))
    }

    /// Reads on (checking every line) until a stderr line for which
    /// `pred` holds; returns when it arrived, or `None` if none came within
    /// `within` (not a failure: the kill then lands where it lands).
    fn wait_stderr(
        &self,
        p: &mut EvmProcess,
        what: &str,
        within: Duration,
        pred: fn(&str) -> bool,
    ) -> Result<Option<Instant>, String> {
        p.wait_maybe(what, within, |l| {
            if let Some(bad) = probe_failure(l, true) {
                Seen::Bad(bad)
            } else if l.stream == Stream::Stderr && pred(&l.text) {
                Seen::Yes
            } else {
                Seen::No
            }
        })
        .map(|l| l.map(|l| l.at))
        .map_err(|e| self.err(e))
    }

    /// One resume and one kill, aimed at a phase chosen by the seed.
    fn cycle(&mut self) -> Result<(), String> {
        let args = self.resume_args();
        let mut p = self.spawn(&args)?;
        let spawned = Instant::now();
        let aim = self.rng.below(10);
        if aim < 2 {
            // While evm opens the store and restores the machine (or just
            // after): no wait for a sign of life.
            let delay = self.rng.duration(Duration::ZERO, Duration::from_secs(1));
            return self.kill_at(&mut p, spawned + delay, true);
        }
        self.wait_alive(&mut p, true)?;
        let now = Instant::now();
        let at = if aim < 4 {
            // Into the next freeze: evm starts it one interval after the
            // last epoch's commit.
            let interval = Duration::from_millis(self.profile.interval_ms);
            let jitter = self.rng.duration(Duration::ZERO, Duration::from_millis(10));
            let commit = self.wait_stderr(&mut p, "an epoch's commit line", WAIT, |t| {
                EpochLine::parse(t).is_some()
            })?;
            commit.map_or(now, |c| c + interval + jitter)
        } else if aim < 6 && self.profile.migrates {
            // Into a migration of committed epochs into home.
            let jitter = self.rng.duration(Duration::ZERO, Duration::from_millis(80));
            let started =
                self.wait_stderr(&mut p, "a migration", Duration::from_secs(20), |t| {
                    t.contains("migrating through epoch")
                })?;
            started.map_or(now, |m| m + jitter)
        } else {
            now + self.rng.duration(Duration::ZERO, KILL_WITHIN)
        };
        self.kill_at(&mut p, at, true)
    }

    fn run(&mut self, cycles: u64, stop: &AtomicBool) -> Result<(), String> {
        // Boot: the store is created, and holds a committed epoch before
        // the first kill.
        let mut p = self.spawn(&self.boot_args())?;
        self.wait_alive(&mut p, false)?;
        let at = Instant::now() + self.rng.duration(Duration::ZERO, KILL_WITHIN);
        self.kill_at(&mut p, at, false)?;
        for cycle in 1..=cycles {
            if stop.load(Ordering::Relaxed) {
                return Err(self.err("stopped: another chain failed"));
            }
            self.cycle = cycle;
            self.cycle()?;
            if cycle % 25 == 0 {
                eprintln!(
                    "[{}] cycle {cycle}/{cycles}: newest epoch {}, {:?}",
                    self.profile.name, self.reported, self.tally
                );
            }
        }
        self.cycle = cycles + 1;
        self.finish()
    }

    /// SIGTERM (a final epoch, exit 0), then one more resume that must be
    /// from exactly that epoch and verify every vCPU's pages.
    fn finish(&mut self) -> Result<(), String> {
        let args = self.resume_args();
        let mut p = self.spawn(&args)?;
        self.wait_alive(&mut p, true)?;
        let delay = self
            .rng
            .duration(Duration::ZERO, Duration::from_millis(1000));
        thread::sleep(delay);
        let final_n = self.sigterm(&mut p)?;
        let mut p = self.spawn(&args)?;
        self.wait_alive(&mut p, true)?;
        let resumed = p.lines().iter().find_map(|l| resumed_epoch(&l.text));
        if resumed != Some(final_n) {
            return Err(self.err(format!(
                "after SIGTERM committed final epoch {final_n}, the next run resumed from {resumed:?}\n{}",
                p.tail()
            )));
        }
        self.sigterm(&mut p)?;
        Ok(())
    }

    /// SIGTERM; evm must exit 0 after committing a final epoch, whose
    /// number it returns.
    fn sigterm(&mut self, p: &mut EvmProcess) -> Result<u64, String> {
        p.signal(libc::SIGTERM).map_err(|e| self.err(e))?;
        let status = p.wait_exit(WAIT).map_err(|e| self.err(e))?;
        self.account(p, true, None)?;
        if !status.success() {
            return Err(self.err(format!("SIGTERM: evm exited with {status}\n{}", p.tail())));
        }
        let n = p
            .lines()
            .iter()
            .find_map(|l| final_epoch(&l.text))
            .ok_or_else(|| {
                self.err(format!(
                    "SIGTERM: no 'final epoch N committed' line\n{}",
                    p.tail()
                ))
            })?;
        Ok(n)
    }
}

#[test]
fn sigkill_at_random_instants_resumes_a_committed_epoch() {
    kill_chains(ENV, 125, Freeze::Precopy);
}

/// The same with the copy-on-write freeze (`EVM_FREEZE=cow`, opt-in):
/// pages are write-protected in the freeze and copied while the guest
/// runs, so a page the guest writes meanwhile must still reach the epoch
/// as it was at the freeze. Fewer kills (CI time): `EVM_KILL_CYCLES` sets
/// both tests' count.
#[test]
fn sigkill_with_the_copy_on_write_freeze_resumes_a_committed_epoch() {
    kill_chains(
        &[("EVM_LOG", "debug"), ("EVM_FREEZE", "cow")],
        30,
        Freeze::Cow,
    );
}

/// The same with the plain stop-and-copy freeze (`EVM_FREEZE=stop`): every
/// dirty page is copied while the vCPUs are stopped, with no pre-copy.
#[test]
fn sigkill_with_the_stop_and_copy_freeze_resumes_a_committed_epoch() {
    kill_chains(
        &[("EVM_LOG", "debug"), ("EVM_FREEZE", "stop")],
        30,
        Freeze::Stop,
    );
}

/// The freeze a chain's evm runs must use (told by its debug lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freeze {
    Stop,
    Precopy,
    Cow,
}

/// Four seeded chains of `cycles` kills each (two at a time), with `env`
/// set for every evm run; panics with the first failure of each chain.
/// `freeze`: the freeze the runs must have used.
fn kill_chains(env: &[(&str, &str)], cycles: u64, freeze: Freeze) {
    require_kvm();
    let seed = seed_from_env("EVM_KILL_SEED", DEFAULT_SEED);
    let cycles = number_from_env("EVM_KILL_CYCLES", cycles);
    let jobs = number_from_env("EVM_KILL_JOBS", 2).max(1);
    eprintln!(
        "EVM_KILL_SEED={seed:#x} EVM_KILL_CYCLES={cycles} EVM_KILL_JOBS={jobs}: {} chains",
        PROFILES.len()
    );
    // The chains keep both cores busy: do not share them with a Linux guest.
    let lock = GuestLock::acquire().expect("take the real-guest lock");
    eprintln!("waited {:?} for the guest lock", lock.waited());
    let bin = evm_bin();
    let elf = probe_elf().to_string_lossy().into_owned();
    let dir = TempDir::new("kill-probe");
    let root = SplitMix64::new(seed);
    let start = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().expect("queue");
                        *n += 1;
                        *n - 1
                    };
                    let Some(profile) = PROFILES.get(i) else {
                        return;
                    };
                    let t0 = Instant::now();
                    let mut chain = Chain {
                        seed,
                        profile,
                        env,
                        rng: root.fork(i as u64),
                        bin: bin.clone(),
                        elf: elf.clone(),
                        store: dir.join(&format!("{}.store", profile.name)),
                        reported: 0,
                        cycle: 0,
                        tally: Tally::default(),
                        prev_tails: VecDeque::new(),
                    };
                    let r = chain.run(cycles, &stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    eprintln!(
                        "[{}] {} after {:.0?}: {:?}",
                        profile.name,
                        if r.is_ok() { "passed" } else { "FAILED" },
                        t0.elapsed(),
                        chain.tally
                    );
                    let _ = std::fs::remove_file(&chain.store);
                    results.lock().expect("results").push((
                        profile.name,
                        t0.elapsed(),
                        chain.tally.clone(),
                        r,
                    ));
                }
            });
        }
    });
    let results = std::mem::take(&mut *results.lock().expect("results"));
    let mut failures = Vec::new();
    eprintln!(
        "\nchain            kills restore migrate freeze±5ms writing between resumed=last/+1 epochs migrations max-freeze first/later resumed alive time"
    );
    for (name, took, t, r) in &results {
        eprintln!(
            "{name:<16} {:>5} {:>7} {:>7} {:>11} {:>7} {:>7} {:>9}/{:<4} {:>6} {:>10} {:>8}/{:<8}µs {:>5}ms {:>4}ms {:.0?}",
            t.kills,
            t.in_restore,
            t.in_migration,
            t.near_freeze,
            t.mid_write,
            t.between,
            t.resumed_reported,
            t.resumed_after_reported,
            t.epochs,
            t.migrations,
            t.max_first_freeze_us,
            t.max_freeze_us,
            t.to_resumed.as_millis() / u128::from(t.alive.max(1)),
            t.to_alive.as_millis() / u128::from(t.alive.max(1)),
            took
        );
        if let Err(e) = r {
            failures.push(e.clone());
        }
    }
    let sum = |f: fn(&Tally) -> u64| results.iter().map(|r| f(&r.2)).sum::<u64>();
    let kills = sum(|t| t.kills);
    eprintln!(
        "total: {kills} kill points in {:.0?} (seed {seed:#x}); {} resumes repeated the boot flags; {} 'falling back' lines",
        start.elapsed(),
        sum(|t| t.resumes_with_flags),
        sum(|t| t.fallbacks)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let (cow_freezes, precopy_freezes) = (sum(|t| t.cow_freezes), sum(|t| t.precopy_freezes));
    assert_eq!(
        (cow_freezes > 0, precopy_freezes > 0),
        (freeze == Freeze::Cow, freeze == Freeze::Precopy),
        "{cow_freezes} copy-on-write and {precopy_freezes} pre-copy freezes with {freeze:?}"
    );
    let want = PROFILES.len() as u64 * cycles;
    assert!(kills >= want, "only {kills} kill points, want {want}");
}

fn store_args(store: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--store"].map(String::from).to_vec();
    args.push(store.to_string_lossy().into_owned());
    args.extend(["--interval", "100ms"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits for `n` whole count lines from every vCPU after the cursor; fails
/// on a READY line when `resumed`.
fn wait_counts(p: &mut EvmProcess, vcpus: u64, n: u64, resumed: bool) {
    let mut seen = vec![0u64; vcpus as usize];
    p.wait_for("PROBE count lines from every vCPU", WAIT, |l| {
        if let Some(bad) = probe_failure(l, resumed) {
            return Seen::Bad(bad);
        }
        if l.stream == Stream::Stdout
            && !l.partial
            && l.text.starts_with("PROBE count vcpu=")
            && let Some(v) = field(&l.text, "vcpu")
            && let Some(s) = seen.get_mut(v as usize)
        {
            *s += 1;
        }
        if seen.iter().all(|&s| s >= n) {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("count lines");
}

/// Sends `signal`, expects exit 0 and a final epoch; returns its number.
fn stop_with(p: &mut EvmProcess, signal: i32) -> u64 {
    p.signal(signal).expect("signal evm");
    let status = p.wait_exit(WAIT).expect("evm exits after the signal");
    assert!(
        status.success(),
        "signal {signal}: evm exited with {status}\n{}",
        p.tail()
    );
    p.lines()
        .iter()
        .find_map(|l| final_epoch(&l.text))
        .unwrap_or_else(|| panic!("signal {signal}: no final epoch line\n{}", p.tail()))
}

#[test]
fn sigterm_and_sigint_then_resume_lose_nothing() {
    require_kvm();
    let elf = probe_elf();
    let bin = evm_bin();
    let dir = TempDir::new("kill-probe-term");
    let store = dir.join("term.store");
    let vcpus = 2;
    let elf = elf.to_string_lossy();
    let boot = store_args(
        &store,
        &[
            "--kernel",
            &elf,
            "--vcpus",
            "2",
            "--mem",
            MEM,
            "--cmdline",
            "count=100000000000000 report=1",
        ],
    );
    let mut p = EvmProcess::spawn(&bin, &boot, ENV).unwrap();
    p.wait_for("PROBE READY", WAIT, |l| {
        if l.text.starts_with("PROBE READY vcpus=2 ") {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .unwrap();
    wait_counts(&mut p, vcpus, 2, false);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        p.poll();
        let before = last_counts(p.lines(), vcpus);
        let final_n = stop_with(&mut p, signal);
        eprintln!("signal {signal}: counters {before:?}, final epoch {final_n}");
        p = EvmProcess::spawn(&bin, &store_args(&store, &[]), ENV).unwrap();
        wait_counts(&mut p, vcpus, 1, true);
        let resumed = p.lines().iter().find_map(|l| resumed_epoch(&l.text));
        assert_eq!(
            resumed,
            Some(final_n),
            "not resumed from the final epoch\n{}",
            p.tail()
        );
        // The first count line of each vCPU after the resume.
        let mut first = vec![None; vcpus as usize];
        for l in p.lines() {
            let got = last_counts(std::slice::from_ref(l), vcpus);
            for (f, g) in first.iter_mut().zip(got) {
                if f.is_none() {
                    *f = g;
                }
            }
        }
        for (v, (b, a)) in before.iter().zip(&first).enumerate() {
            let (b, a) = (
                b.expect("a count before the signal"),
                a.expect("a count after"),
            );
            assert!(
                a >= b,
                "vCPU {v}: counted to {b} before signal {signal}, resumed at {a}: work was lost\n{}",
                p.tail()
            );
        }
    }
    stop_with(&mut p, libc::SIGTERM);
    // --fresh discards the saved machine: the probe boots again.
    let mut p = EvmProcess::spawn(&bin, &store_args(&store, &["--fresh"]), ENV).unwrap();
    p.wait_for("PROBE READY after --fresh", WAIT, |l| {
        if resumed_epoch(&l.text).is_some() {
            Seen::Bad("--fresh resumed".into())
        } else if l.text.starts_with("PROBE READY vcpus=2 ") {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .unwrap();
    wait_counts(&mut p, vcpus, 1, false);
    stop_with(&mut p, libc::SIGTERM);
}

#[test]
fn poweroff_then_the_next_run_boots_fresh() {
    require_kvm();
    let elf = probe_elf();
    let bin = evm_bin();
    let dir = TempDir::new("kill-probe-off");
    let store = dir.join("off.store");
    let elf = elf.to_string_lossy();
    let cmdline = "dirty=16 rate=16 seconds=3 verify_every=1";
    let boot = store_args(
        &store,
        &[
            "--kernel",
            &elf,
            "--vcpus",
            "1",
            "--mem",
            MEM,
            "--cmdline",
            cmdline,
        ],
    );
    for run in 0..2 {
        let args = if run == 0 {
            boot.clone()
        } else {
            store_args(&store, &[])
        };
        let mut p = EvmProcess::spawn(&bin, &args, ENV).unwrap();
        let status = p.wait_exit(WAIT + WAIT).unwrap();
        assert!(
            status.success(),
            "run {run}: evm exited with {status}\n{}",
            p.tail()
        );
        let out: Vec<&str> = p.stream(Stream::Stdout).map(|l| l.text.as_str()).collect();
        assert!(
            out.first()
                .is_some_and(|l| l.starts_with("PROBE READY vcpus=1 ")),
            "run {run}: the probe did not boot from the start\n{}",
            p.tail()
        );
        assert!(
            out.iter()
                .any(|l| l.starts_with("PROBE VERIFY OK pages=4096")),
            "{}",
            p.tail()
        );
        assert_eq!(out.last(), Some(&"PROBE DONE"), "{}", p.tail());
        assert!(
            !p.lines().iter().any(|l| resumed_epoch(&l.text).is_some()),
            "run {run}: resumed after a power-off\n{}",
            p.tail()
        );
        assert!(
            p.lines()
                .iter()
                .any(|l| EpochLine::parse(&l.text).is_some()),
            "run {run}: no epoch committed in 3 s, so the power-off proves nothing\n{}",
            p.tail()
        );
    }
}
