//! Real guests under real power cuts (issue 4, item 3), through
//! `scripts/run`. In the test host a `kill -9` of `scripts/run` kills L1
//! with evm in it: everything L1's kernel had not written to the store's
//! file here is lost, as in a power cut.
//!
//! Two seeded chains of cuts, each cut at a random moment (right after a
//! commit, or anywhere in the interval, so during a freeze, a write or an
//! fdatasync), then `scripts/run --store S` again:
//!
//! - the agent's `disk` workload appends checksummed, sequence-numbered
//!   records to /dev/vda (each pwrite + fdatasync) and remembers in memory
//!   the last issued and the last durable; after each resume
//!   `evm-agent verify` checks that disk and memory agree (the unbroken run
//!   of records on the disk ends between durable and issued), and the
//!   durable record is at least the one the agent reported before the last
//!   commit seen before the cut;
//! - an ext4 file system on /dev/vda with a shell loop of fsync'd appends
//!   (`dd oflag=append conv=fsync`), whose issued and durable numbers live
//!   in tmpfs (memory); after each resume, with the page cache dropped, the
//!   file holds exactly the records 1..N with durable <= N <= issued and N
//!   at least the durable number read before the last reported commit.
//!   At the end, the disks of the retained epochs are exported and each,
//!   after the journal replay a guest's own crash would need (`e2fsck -E
//!   journal_only`), is clean for `e2fsck -fn` and holds an unbroken log.
//!
//! Both chains run one vCPU: with two, the L2 guest in the QEMU TCG test
//! host intermittently dies of a triple fault on vCPU 1 even without any
//! checkpointing (`--no-store`, under parallel disk reads; 1 of 6 such
//! stress runs, 0 of 6 with one vCPU). Until that is understood (issue 3)
//! the power-cut chains, which must not flake, use one.
//!
//! `EVM_POWER_SEED` reproduces a schedule (printed first; default: from
//! the clock), `EVM_POWER_CUTS` sets the cuts per chain (default 15: 30 per
//! run). Nothing here asserts timing; each wait fails with the transcript.

use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use evm_tests::evm_process::SplitMix64;
use evm_tests::power;
use evm_tests::store_run::{StoreRun, agent_field};
use evm_tests::{HarnessError, TempDir, guest_image, require_kvm};

const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(120);
const COMMIT: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(180);
const INTERVAL: &str = "1s";
const INTERVAL_MS: u64 = 1000;
const MEM: &str = "256M";

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn fail<T>(e: HarnessError) -> T {
    panic!("{e}")
}

/// `d/i` of an agent reply's `disk_seq=`: durable and issued (`-`: none).
fn disk_seq(reply: &str) -> (Option<u64>, Option<u64>) {
    let v = agent_field(reply, "disk_seq").unwrap_or_else(|| panic!("no disk_seq in '{reply}'"));
    let (d, i) = v
        .split_once('/')
        .unwrap_or_else(|| panic!("bad disk_seq in '{reply}'"));
    (d.parse().ok(), i.parse().ok())
}

#[test]
fn disk_records_survive_seeded_power_cuts() {
    require_kvm();
    let (seed, cuts) = power::seed(15);
    let mut rng = SplitMix64::new(seed).fork(0xd15c);
    let dir = TempDir::new("power-disk");
    let store = dir.join("vm.store");
    let cmdline = power::cmdline("evm.workload=disk evm.disk_rate=20");
    let first = [
        "--store",
        s(&store),
        "--disk-size",
        "64M",
        "--mem",
        MEM,
        "--vcpus",
        "1",
        "--cmdline",
        &cmdline,
        "--interval",
        INTERVAL,
    ];
    let mut run = StoreRun::start("power-disk-boot", &first, &[]).unwrap_or_else(fail);
    let ready = run.wait_ready(BOOT).unwrap_or_else(fail);
    let id = ready.boot_id.clone();
    for k in 0..cuts {
        sleep(Duration::from_millis(rng.below(1500)));
        let (reply, end) = run.agent("status", "STATUS", CMD).unwrap_or_else(fail);
        let (before, _) = disk_seq(&reply);
        let last = power::cut_after_commits(&mut run, end + 1, &mut rng, INTERVAL_MS);
        drop(run);
        run = power::resume(&format!("power-disk-{k}"), &store, last, &id);
        let (ok, _) = run.agent("verify", "VERIFY OK", CMD).unwrap_or_else(fail);
        let (durable, issued) = disk_seq(&ok);
        assert!(
            durable >= before,
            "cut {k}: durable record {durable:?} after the resume is before {before:?}, \
             reported durable before epoch {last} committed\n{}",
            run.tail()
        );
        eprintln!("cut {k}: before {before:?}, after the resume {durable:?}/{issued:?}: {ok}");
    }
    run.signal(libc::SIGTERM).unwrap_or_else(fail);
    let st = run.wait_exit(EXIT).unwrap_or_else(fail);
    assert_eq!(
        st.code(),
        Some(0),
        "evm after SIGTERM: {st}\n{}",
        run.tail()
    );
}

/// The shell loop of fsync'd appends: record `i` is the line `rec i`;
/// /run/issued is written before the append, /run/durable after dd's
/// fsync returned, each by rename (a reader never sees a half-written
/// number).
const APPEND_LOOP: &str = "(i=$(cat /run/issued 2>/dev/null || echo 0); while :; do \
    i=$((i+1)); echo $i > /run/issued.new; mv /run/issued.new /run/issued; \
    echo rec $i | dd of=/mnt/log oflag=append conv=notrunc,fsync 2>/dev/null || exit; \
    echo $i > /run/durable.new; mv /run/durable.new /run/durable; usleep 20000; done) \
    >/dev/null 2>&1 & echo $! > /run/loop.pid";

/// With the page cache dropped: durable D, the number N of records in
/// /mnt/log if they are exactly `rec 1`..`rec N` (else the command fails
/// and says where), then issued I; returns (D, N, I).
fn check_log(run: &mut StoreRun) -> (u64, u64, u64) {
    let out = run
        .run_cmd(
            "sync; echo 3 > /proc/sys/vm/drop_caches; d=$(cat /run/durable 2>/dev/null || echo 0); \
             n=$(awk '$0 != (\"rec \" NR) { print \"bad line \" NR \": \" $0; exit 1 } END { print NR }' /mnt/log) \
             || { echo \"$n\"; false; }; echo $d $n $(cat /run/issued)",
            CMD,
        )
        .unwrap_or_else(fail);
    let v: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(v.len(), 3, "bad check output '{out}'");
    (v[0], v[1], v[2])
}

/// Exports the disk of `epoch` and checks it as a guest crash would leave
/// it: journal replay, then `e2fsck -fn` clean and an unbroken log.
/// Returns the records in the log, or None if the epoch is no longer
/// retained (migrated into the home).
fn check_exported(store: &Path, dir: &TempDir, epoch: u64) -> Option<u64> {
    let out = power::export_clean_ext4(store, dir, epoch)?;
    let cat = Command::new("debugfs")
        .args(["-R", "cat /log", s(&out)])
        .output()
        .expect("run debugfs");
    let text = String::from_utf8_lossy(&cat.stdout);
    let mut n = 0u64;
    for line in text.lines() {
        n += 1;
        assert_eq!(line, format!("rec {n}"), "epoch {epoch}: /log line {n}");
    }
    std::fs::remove_file(&out).expect("remove the export");
    Some(n)
}

#[test]
fn ext4_appends_survive_seeded_power_cuts_and_export_clean() {
    require_kvm();
    let (seed, cuts) = power::seed(15);
    let mut rng = SplitMix64::new(seed).fork(0xe474);
    let dir = TempDir::new("power-ext4");
    let store = dir.join("vm.store");
    let image = dir.copy(&guest_image("disk.ext4"), "disk.img", 0o644);
    let first = [
        "--store",
        s(&store),
        "--disk",
        s(&image),
        "--mem",
        MEM,
        "--vcpus",
        "1",
        "--cmdline",
        power::CMDLINE,
        "--interval",
        INTERVAL,
    ];
    let mut run = StoreRun::start("power-ext4-boot", &first, &[]).unwrap_or_else(fail);
    let ready = run.wait_ready(BOOT).unwrap_or_else(fail);
    let id = ready.boot_id.clone();
    run.run_cmd("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt", CMD)
        .unwrap_or_else(fail);
    run.run_cmd(APPEND_LOOP, CMD).unwrap_or_else(fail);
    // Every epoch reported committed while the loop appended, all runs.
    let mut commits: Vec<u64> = Vec::new();
    for k in 0..cuts {
        sleep(Duration::from_millis(rng.below(1500)));
        let (status, out, end) = run
            .run_status("cat /run/durable 2>/dev/null || echo 0", CMD)
            .unwrap_or_else(fail);
        assert_eq!(status, 0, "{}", run.tail());
        let before: u64 = out.trim().parse().expect("a number in /run/durable");
        let last = power::cut_after_commits(&mut run, end + 1, &mut rng, INTERVAL_MS);
        commits.extend(run.commits().iter().map(|c| c.2.epoch));
        drop(run);
        run = power::resume(&format!("power-ext4-{k}"), &store, last, &id);
        let (d, n, i) = check_log(&mut run);
        assert!(
            d <= n && n <= i,
            "cut {k}: durable {d}, records on disk {n}, issued {i}: disk and memory disagree\n{}",
            run.tail()
        );
        assert!(
            n >= before,
            "cut {k}: {n} records after the resume, but {before} were durable before epoch \
             {last} committed\n{}",
            run.tail()
        );
        eprintln!("cut {k}: durable before {before}; after the resume {d} <= {n} <= {i}");
    }
    let mark = run.mark();
    let (i, _) = run.wait_commit(mark, COMMIT).unwrap_or_else(fail);
    run.wait_commit(i + 1, COMMIT).unwrap_or_else(fail);
    commits.extend(run.commits().iter().map(|c| c.2.epoch));
    commits.sort_unstable();
    commits.dedup();
    // A `dd` the loop had started runs on (its fsync) after the loop is
    // killed, holding /mnt busy: wait for it (seen once in CI).
    run.run_cmd(
        "kill $(cat /run/loop.pid); while pidof dd >/dev/null; do sleep 0.2; done; umount /mnt",
        CMD,
    )
    .unwrap_or_else(fail);
    run.signal(libc::SIGTERM).unwrap_or_else(fail);
    let st = run.wait_exit(EXIT).unwrap_or_else(fail);
    assert_eq!(
        st.code(),
        Some(0),
        "evm after SIGTERM: {st}\n{}",
        run.tail()
    );
    drop(run);
    // Epochs committed while the loop was appending, up to five of the
    // newest (older ones may have been migrated out of the log).
    let mut checked = 0;
    for &epoch in commits.iter().rev().take(5) {
        match check_exported(&store, &dir, epoch) {
            Some(n) => {
                checked += 1;
                eprintln!("epoch {epoch}: exported disk clean, {n} records in /log");
            }
            None => eprintln!("epoch {epoch}: no longer retained, not exported"),
        }
    }
    assert!(
        checked > 0,
        "none of the epochs {commits:?} could be exported"
    );
    assert!(
        std::fs::read(&image).expect("read image")
            == std::fs::read(guest_image("disk.ext4")).expect("read"),
        "evm wrote to the imported image"
    );
}
