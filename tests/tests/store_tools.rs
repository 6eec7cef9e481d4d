//! Offline commands on a real store (issue 5, item 1), made by the probe
//! guest on this machine's `/dev/kvm`: `evm epochs` (table and `--json`)
//! lists exactly the epochs evm reported committed, with their freeze
//! times; `evm diff` covers the pages the epochs dirtied; `evm inspect`
//! shows both vCPUs and the devices, and its `--page` dump is the page of
//! the memory export; `evm export --memory` writes an epoch's memory image; `evm fork`
//! of an older epoch makes a new store whose epoch 1 has byte for byte that
//! epoch's memory and disk, and which runs from that older state (the
//! probe's page generations go back, and it re-verifies every page). Bad
//! input to each is refused in one line and changes nothing.
//!
//! Nothing here asserts on timing. Without `/dev/kvm` these tests fail.

use std::path::Path;

use evm_tests::evm_process::{
    EpochLine, EvmProcess, Line, Seen, Stream, field, probe_elf, probe_failure, resumed_epoch,
};
use evm_tests::probe_run::{self, LOG, WAIT};
use evm_tests::refusal::{refused, s};
use evm_tests::store_file::fingerprint;
use evm_tests::{RunOptions, TempDir, evm_bin, require_kvm, run_evm};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// `evm <argv>`: must succeed; returns stdout.
fn evm_ok(argv: &[&str]) -> String {
    evm_tests::evm_ok(argv, WAIT)
}

/// The latest `gen=` the probe reported for vCPU 0 in `lines`.
fn last_gen(lines: &[Line]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .filter(|l| l.stream == Stream::Stdout && l.text.starts_with("PROBE dirty vcpu=0 "))
        .find_map(|l| field(&l.text, "gen"))
}

#[test]
fn epochs_export_memory_and_fork_of_a_real_store() {
    require_kvm();
    let dir = TempDir::new("store-tools");
    let store = dir.join("vm.store");
    let elf = probe_elf();
    let boot = args(&[
        "run",
        "--store",
        s(&store),
        "--kernel",
        s(&elf),
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk-size",
        "4M",
        "--cmdline",
        "dirty=4 rate=16 verify_every=1 report=1",
        "--interval",
        "100ms",
    ]);
    let mut p = EvmProcess::spawn(&evm_bin(), &boot, LOG).expect("start evm");
    let mut commits: Vec<EpochLine> = Vec::new();
    let mut reports = 0;
    p.wait_for("eight commits and three generation reports", WAIT, |l| {
        if let Some(bad) = probe_failure(l, false) {
            return Seen::Bad(bad);
        }
        commits.extend(EpochLine::parse(&l.text));
        reports += usize::from(l.text.starts_with("PROBE dirty vcpu=0 "));
        if commits.len() >= 8 && reports >= 3 {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("the probe commits epochs");
    let last = probe_run::stop(&mut p);
    let gen_at_end = last_gen(p.lines()).expect("the probe reported its generations");
    let before = fingerprint(&store).expect("fingerprint");

    // epochs: every epoch evm logged (none migrated yet), same freeze times.
    let table = evm_ok(&["epochs", "--store", s(&store)]);
    for c in &commits {
        let row = table
            .lines()
            .find(|r| r.split_whitespace().next() == Some(&c.epoch.to_string()))
            .unwrap_or_else(|| panic!("epoch {} missing from\n{table}", c.epoch));
        assert!(
            row.split_whitespace().nth(2) == Some(&c.freeze_us.to_string()),
            "epoch {}: freeze {} µs logged, table row {row:?}",
            c.epoch,
            c.freeze_us
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&evm_ok(&["epochs", "--store", s(&store), "--json"]))
            .expect("evm epochs --json is JSON");
    let listed: Vec<u64> = json["epochs"]
        .as_array()
        .expect("an epochs array")
        .iter()
        .map(|e| e["epoch"].as_u64().expect("epoch number"))
        .collect();
    assert_eq!(listed.last(), Some(&last), "{json}");
    for c in &commits {
        assert!(
            listed.contains(&c.epoch),
            "epoch {} not in {listed:?}",
            c.epoch
        );
    }
    assert_eq!(json["last_epoch"].as_u64(), Some(last));

    // diff: the probe rewrites its 4 MiB buffer, so every epoch's pages
    // include it; the count is at least the largest epoch's dirty pages.
    let old = commits[2].epoch;
    let newer = commits[5].epoch;
    let diff = evm_ok(&[
        "diff",
        "--store",
        s(&store),
        &old.to_string(),
        &newer.to_string(),
    ]);
    let head = diff.lines().next().unwrap_or_default();
    let n: u64 = head
        .split_once(": ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad diff summary {head:?}"));
    let most = commits[3..=5]
        .iter()
        .map(|c| c.dirty_pages)
        .max()
        .unwrap_or(0);
    assert!(
        head.starts_with(&format!("epoch {old} -> {newer}: ")) && n >= most && n > 0,
        "diff {old} {newer}: {head:?}, but epochs up to {newer} logged up to {most} dirty pages"
    );
    assert!(diff.contains("pages (guest-physical):\n  0x"), "{diff}");
    refused(
        &[
            "diff",
            "--store",
            s(&store),
            &newer.to_string(),
            &old.to_string(),
        ],
        &[&newer.to_string(), &old.to_string()],
        "must be older",
    );
    refused(
        &["diff", "--store", s(&store), &old.to_string(), "99999"],
        &["99999"],
        "not a retained",
    );

    // export --memory of an older epoch; fork it; the fork's epoch 1 is it.
    let mem_old = dir.join("old.raw");
    evm_ok(&[
        "export",
        "--store",
        s(&store),
        "--epoch",
        &old.to_string(),
        "--memory",
        s(&mem_old),
    ]);
    assert_eq!(std::fs::metadata(&mem_old).expect("export").len(), 64 << 20);
    // inspect: registers of both vCPUs, the devices; --page agrees with
    // the memory export.
    let report = evm_ok(&["inspect", "--store", s(&store), "--epoch", &old.to_string()]);
    for want in [
        "vcpu0: 64-bit long mode",
        "vcpu1: 64-bit long mode",
        "RIP 0x",
        "CR3 0x",
        "EFER 0x",
        "RAX 0x",
        "R15 0x",
        "    events: ",
        "virtio-blk",
        "virtio-rng",
        "COM1",
        "memory 64 MiB",
        "disk 4 MiB",
    ] {
        assert!(report.contains(want), "inspect lacks {want:?}:\n{report}");
    }
    let dump = evm_ok(&[
        "inspect",
        "--store",
        s(&store),
        "--epoch",
        &old.to_string(),
        "--page",
        "0x600000",
    ]);
    let image = std::fs::read(&mem_old).expect("read the memory export");
    let mut from_dump = Vec::new();
    for line in dump.lines() {
        let hex: String = line
            .split_once(": ")
            .map(|(_, r)| r[..39].split_whitespace().collect())
            .unwrap_or_default();
        for i in (0..hex.len()).step_by(2) {
            from_dump.push(u8::from_str_radix(&hex[i..i + 2], 16).expect("hex byte"));
        }
    }
    assert!(
        from_dump == image[0x60_0000..0x60_1000],
        "inspect --page 0x600000 differs from the memory export"
    );
    refused(
        &["inspect", "--store", s(&store), "--page", "0x10000000"],
        &["0x10000000"],
        "outside guest RAM",
    );
    refused(
        &["inspect", "--store", s(&store), "--page", "0x1001"],
        &["0x1001"],
        "multiple of 4096",
    );
    refused(
        &["inspect", "--store", s(&store), "--epoch", "99999"],
        &["99999"],
        "not a retained",
    );
    let disk_old = dir.join("old.img");
    evm_ok(&[
        "export",
        "--store",
        s(&store),
        "--epoch",
        &old.to_string(),
        "--disk",
        s(&disk_old),
    ]);
    let fork = dir.join("fork.store");
    evm_ok(&[
        "fork",
        "--store",
        s(&store),
        "--epoch",
        &old.to_string(),
        s(&fork),
    ]);
    assert_eq!(
        fingerprint(&store).expect("fingerprint"),
        before,
        "fork wrote its source"
    );
    let mem_fork = dir.join("fork.raw");
    let disk_fork = dir.join("fork.img");
    evm_ok(&[
        "export",
        "--store",
        s(&fork),
        "--epoch",
        "1",
        "--memory",
        s(&mem_fork),
        "--disk",
        s(&disk_fork),
    ]);
    assert!(
        std::fs::read(&mem_old).expect("read") == std::fs::read(&mem_fork).expect("read"),
        "the fork's memory is not epoch {old}'s"
    );
    assert!(
        std::fs::read(&disk_old).expect("read") == std::fs::read(&disk_fork).expect("read"),
        "the fork's disk is not epoch {old}'s"
    );

    // The fork runs from the older state.
    let resume = args(&["run", "--store", s(&fork), "--interval", "100ms"]);
    let mut f = EvmProcess::spawn(&evm_bin(), &resume, LOG).expect("start evm");
    let mut from = None;
    let mut verified = false;
    let mut first_gen = None;
    f.wait_for("a resume, a generation report and a verify", WAIT, |l| {
        if let Some(bad) = probe_failure(l, true) {
            return Seen::Bad(bad);
        }
        from = from.or_else(|| resumed_epoch(&l.text));
        if l.text.starts_with("PROBE dirty vcpu=0 ") {
            first_gen = first_gen.or_else(|| field(&l.text, "gen"));
        }
        verified |= l.text.starts_with("PROBE VERIFY OK ");
        if from.is_some() && verified && first_gen.is_some() {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("the fork resumes");
    probe_run::stop(&mut f);
    assert_eq!(from, Some(1), "the fork did not resume its epoch 1");
    let first_gen = first_gen.expect("a generation");
    assert!(
        first_gen < gen_at_end,
        "the fork of epoch {old} starts at generation {first_gen}, not before the source's final {gen_at_end}"
    );

    // Bad input: nothing is created or changed.
    let before = fingerprint(&store).expect("fingerprint");
    refused(
        &[
            "fork",
            "--store",
            s(&store),
            "--epoch",
            "99999",
            s(&dir.join("x.store")),
        ],
        &["99999", s(&store)],
        "not a retained",
    );
    assert!(!dir.join("x.store").exists());
    refused(
        &[
            "fork",
            "--store",
            s(&store),
            "--epoch",
            &old.to_string(),
            s(&fork),
        ],
        &[s(&fork)],
        "exists",
    );
    refused(
        &["export", "--store", s(&store), "--memory", s(&mem_old)],
        &[s(&mem_old)],
        "exists",
    );
    refused(
        &[
            "export",
            "--store",
            s(&store),
            "--epoch",
            "0",
            "--memory",
            s(&dir.join("y.raw")),
        ],
        &["--epoch 0"],
        "not a retained",
    );
    assert!(!dir.join("y.raw").exists());
    let junk = dir.write("junk", &[0x5a; 1 << 16], 0o644);
    for cmd in [
        &["epochs", "--store", s(&junk)][..],
        &["epochs", "--store", s(&junk), "--json"],
    ] {
        refused(cmd, &[s(&junk)], "not an evm store");
    }
    refused(
        &["epochs", "--store", s(Path::new("/nonexistent/x.store"))],
        &["/nonexistent/x.store"],
        "no such file",
    );
    assert_eq!(
        fingerprint(&store).expect("fingerprint"),
        before,
        "a refusal changed the store"
    );
}

/// `evm verify` of a damaged store: exit 1, its report on stdout, one
/// `evm: ` line on stderr naming the store and every string of `names`.
fn verify_fails(store: &Path, names: &[&str]) {
    let run = run_evm(
        &evm_bin(),
        &["verify", "--store", s(store)],
        &RunOptions::default(),
        WAIT,
    );
    assert_eq!(
        run.status.code(),
        Some(1),
        "verify {}: {}\n{}",
        store.display(),
        run.status,
        run.stderr
    );
    let err = run.stderr.trim_end();
    assert!(
        err.lines().count() == 1 && err.starts_with("evm: ") && err.contains(s(store)),
        "verify {}: stderr {err:?}",
        store.display()
    );
    for n in names {
        assert!(
            err.contains(n),
            "verify {}: {err:?} does not name {n:?}",
            store.display()
        );
        assert!(
            run.stdout.contains(n),
            "the report does not show {n:?}:\n{}",
            run.stdout
        );
    }
}

/// `evm verify` of a sound store passes; of a copy with one page of a
/// middle epoch damaged, or with a damaged superblock, it fails naming the
/// damage in one stderr line.
#[test]
fn verify_passes_a_sound_store_and_names_the_first_damage() {
    use evm_tests::store_file::{self, K_PAGES};
    require_kvm();
    let dir = TempDir::new("store-verify");
    let store = dir.join("vm.store");
    let elf = probe_elf();
    let boot = args(&[
        "run",
        "--store",
        s(&store),
        "--kernel",
        s(&elf),
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--cmdline",
        "dirty=4 rate=16 verify_every=1 report=1",
        "--interval",
        "100ms",
    ]);
    let (first, last) = probe_run::three_epochs(&boot, false);
    let report = evm_ok(&["verify", "--store", s(&store)]);
    assert!(
        report.contains(&format!("log: epochs {first}..{last} ")),
        "verify of a sound store:\n{report}"
    );

    // A page of the second epoch: recovery stops there.
    let (_, records) = store_file::log_records(&store).expect("walk the log");
    let victim = records
        .iter()
        .find(|r| r.epoch == first + 1 && r.kind == K_PAGES)
        .expect("a page record of the second epoch");
    let bad = dir.copy(&store, "bad-page.store", 0o644);
    let sb = store_file::current_superblock(&bad).expect("superblock");
    store_file::flip_byte(&bad, victim.payload_off(&sb) + 100).expect("damage a page");
    let before = fingerprint(&bad).expect("fingerprint");
    verify_fails(&bad, &[&format!("epoch {}", first + 1), "CRC mismatch"]);
    assert_eq!(
        fingerprint(&bad).expect("fingerprint"),
        before,
        "verify wrote the store"
    );

    let bad_sb = dir.copy(&store, "bad-sb.store", 0o644);
    store_file::patch_superblock(&bad_sb, 0, false, |blk| blk[32..48].fill(0xa5))
        .expect("damage superblock A");
    verify_fails(&bad_sb, &["superblock A", "invalid"]);
}
