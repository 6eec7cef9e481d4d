//! Bad stores and bad store flags given to `evm run` (issue 3, item 6).
//!
//! Each test makes a real store with the probe guest on this machine's
//! `/dev/kvm` (boot with `--store`, at least three committed epochs,
//! `SIGTERM` for a final one), copies it, damages the copies as
//! `checkpoint/README.md` lays the file out (`evm_tests::store_file`), and
//! runs evm on them. A run that must refuse: non-zero exit (no signal, so
//! no panic), nothing on stdout, exactly one `evm: ` line on stderr that
//! names the store and the problem without repeating itself, and the file
//! left byte for byte as it was. A run that recovers (a damaged newest
//! epoch, one bad superblock): exactly one stderr line naming the store and
//! what was given up, then a resume from the expected epoch after which
//! the probe re-verifies every stamped page (`PROBE VERIFY OK`). After the
//! refusals an undamaged store still resumes from its last epoch.
//!
//! Nothing here asserts on timing; waits are generous. Without `/dev/kvm`
//! these tests fail, never skip.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evm_tests::evm_process::{
    EpochLine, EvmProcess, Line, Seen, SplitMix64, Stream, final_epoch, probe_elf, resumed_epoch,
};
use evm_tests::refusal::{refused, repeated, s};
use evm_tests::store_file::{
    self, K_COMMIT, K_PAGES, K_STATE, SB_VERSION_OFF, fingerprint, put_u32,
};
use evm_tests::{TempDir, evm_bin, require_kvm};

/// Longest wait for anything a running guest or evm should do.
const WAIT: Duration = Duration::from_secs(120);
/// Small guest RAM: the store is 128 MiB of home + a 256 MiB log.
const MEM: &str = "128M";
/// The probe dirties 8 MiB at 16 MiB/s and verifies its pages every second.
const CMDLINE: &str = "dirty=8 rate=16 verify_every=1 report=1";
const INTERVAL: &str = "100ms";
/// Runs that are not refusals log their epochs and resumes.
const LOG: &[(&str, &str)] = &[("EVM_LOG", "info")];

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// A line that ends a wait at once.
fn bad_line(l: &Line, resumed: bool) -> Option<String> {
    let t = &l.text;
    match l.stream {
        Stream::Stdout if t.contains("VERIFY FAIL") || t.contains("PROBE ERROR") => {
            Some(format!("the probe says: {t}"))
        }
        Stream::Stdout if !l.partial && t.starts_with("PROBE DONE") => {
            Some("the probe ended (it dirties until stopped)".into())
        }
        Stream::Stdout if resumed && !l.partial && t.starts_with("PROBE READY") => {
            Some("the guest booted again instead of resuming".into())
        }
        Stream::Stderr if t.contains("panicked") => Some(format!("evm panicked: {t}")),
        _ => None,
    }
}

fn verify_ok(l: &Line) -> bool {
    l.stream == Stream::Stdout && !l.partial && l.text.starts_with("PROBE VERIFY OK ")
}

/// SIGTERM: evm must commit a final epoch and exit 0; returns its number.
fn stop(p: &mut EvmProcess) -> u64 {
    p.signal(libc::SIGTERM).expect("SIGTERM evm");
    let status = p.wait_exit(WAIT).expect("evm exits after SIGTERM");
    assert!(
        status.success(),
        "SIGTERM: evm exited with {status}\n{}",
        p.tail()
    );
    p.lines()
        .iter()
        .find_map(|l| final_epoch(&l.text))
        .unwrap_or_else(|| panic!("SIGTERM: no final epoch line\n{}", p.tail()))
}

/// A store made by a real run, in its own temporary directory.
struct Built {
    dir: TempDir,
    store: PathBuf,
    elf: PathBuf,
    /// The final epoch the SIGTERM committed: the store's newest.
    last: u64,
}

impl Built {
    /// Boots the probe with a new store, waits for three committed epochs
    /// and a verify, and stops it with SIGTERM.
    fn new(tag: &str) -> Built {
        require_kvm();
        let elf = probe_elf();
        let dir = TempDir::new(tag);
        let store = dir.join("base.store");
        let boot = args(&[
            "run",
            "--store",
            s(&store),
            "--kernel",
            s(&elf),
            "--vcpus",
            "1",
            "--mem",
            MEM,
            "--cmdline",
            CMDLINE,
            "--interval",
            INTERVAL,
        ]);
        let mut p = EvmProcess::spawn(&evm_bin(), &boot, LOG).expect("start evm");
        let mut committed = 0;
        let mut verified = false;
        p.wait_for("3 committed epochs and a PROBE VERIFY OK", WAIT, |l| {
            if let Some(bad) = bad_line(l, false) {
                return Seen::Bad(bad);
            }
            committed += u32::from(EpochLine::parse(&l.text).is_some());
            verified |= verify_ok(l);
            if committed >= 3 && verified {
                Seen::Yes
            } else {
                Seen::No
            }
        })
        .expect("the first run commits epochs");
        let last = stop(&mut p);
        eprintln!("built {} with epochs up to {last}", store.display());
        Built {
            dir,
            store,
            elf,
            last,
        }
    }

    /// A copy of the store named `name`.
    fn copy(&self, name: &str) -> PathBuf {
        self.dir.copy(&self.store, name, 0o644)
    }
}

/// `evm run --store <store> --interval 100ms`: evm must say it resumed,
/// and the probe must re-verify its pages; then SIGTERM. Returns the epoch
/// it resumed from and the ended process (for its stderr).
fn resume(store: &Path) -> (u64, EvmProcess) {
    let a = args(&["run", "--store", s(store), "--interval", INTERVAL]);
    let mut p = EvmProcess::spawn(&evm_bin(), &a, LOG).expect("start evm");
    let mut from = None;
    let mut verified = false;
    p.wait_for("the resume line and a PROBE VERIFY OK", WAIT, |l| {
        if let Some(bad) = bad_line(l, true) {
            return Seen::Bad(bad);
        }
        from = from.or_else(|| resumed_epoch(&l.text));
        verified |= verify_ok(l);
        if from.is_some() && verified {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .unwrap_or_else(|e| panic!("resuming {}: {e}", store.display()));
    stop(&mut p);
    (from.expect("resumed"), p)
}

/// After a run that recovered from damage: exactly one stderr line says
/// `phrase`, and it names the store and every string in `names`, once.
fn says_once(p: &EvmProcess, store: &Path, phrase: &str, names: &[&str]) {
    let lines: Vec<&str> = p
        .stream(Stream::Stderr)
        .map(|l| l.text.as_str())
        .filter(|t| t.contains(phrase))
        .collect();
    assert!(
        lines.len() == 1,
        "want exactly one stderr line saying {phrase:?}, got {}: {lines:#?}\n{}",
        lines.len(),
        p.tail()
    );
    let line = lines[0];
    if let Some(twice) = repeated(line) {
        panic!("the line says the same thing twice ({twice:?}): {line:?}");
    }
    for name in std::iter::once(&s(store)).chain(names) {
        assert!(line.contains(name), "{line:?} does not name {name:?}");
    }
}

/// `evm run --store <store>` must refuse the file and leave it unchanged.
fn refused_unchanged(store: &Path, extra: &[&str], names: &[&str], problem: &str) {
    let before = fingerprint(store).expect("fingerprint the store");
    let mut argv = vec!["run", "--store", s(store)];
    argv.extend(extra);
    let mut all = vec![s(store)];
    all.extend(names);
    refused(&argv, &all, problem);
    let after = fingerprint(store).expect("fingerprint the store");
    assert_eq!(
        before,
        after,
        "refusing {} changed it (length, hash)",
        store.display()
    );
}

#[test]
fn truncated_store_is_refused() {
    let b = Built::new("store-truncated");
    let full = std::fs::metadata(&b.store).expect("stat").len();
    // Half the file; into superblock B; only superblock A left.
    for (name, len) in [("half", full / 2), ("cut-in-b", 6000), ("only-a", 4096)] {
        let copy = b.copy(&format!("{name}.store"));
        OpenOptions::new()
            .write(true)
            .open(&copy)
            .and_then(|f| f.set_len(len))
            .expect("truncate the copy");
        refused_unchanged(&copy, &[], &[&len.to_string()], "truncated");
    }
    assert_eq!(resume(&b.store).0, b.last, "the original did not resume");
}

#[test]
fn corrupt_newest_epoch_falls_back_to_the_one_before() {
    let b = Built::new("store-bad-epoch");
    let copy = b.copy("bad-epoch.store");
    let (sb, records) = store_file::log_records(&copy).expect("walk the log");
    let newest = records
        .iter()
        .filter(|r| r.kind == K_COMMIT)
        .map(|r| r.epoch)
        .max()
        .expect("committed epochs in the log");
    assert_eq!(
        newest, b.last,
        "the log's newest epoch is not the final one"
    );
    // A byte in the middle of one of its pages (or of its state, if it
    // wrote no page).
    let mine: Vec<_> = records.iter().filter(|r| r.epoch == newest).collect();
    let off = match mine.iter().find(|r| r.kind == K_PAGES) {
        Some(r) => r.payload_off(&sb) + 4096 * u64::from(r.count / 2) + 2000,
        None => {
            let r = mine
                .iter()
                .find(|r| r.kind == K_STATE)
                .expect("a state record");
            r.payload_off(&sb) + 16
        }
    };
    store_file::flip_byte(&copy, off).expect("damage the epoch");
    eprintln!("flipped the byte at {off} (epoch {newest}: {mine:?})");

    let (from, p) = resume(&copy);
    assert_eq!(
        from,
        newest - 1,
        "not resumed from the epoch before the damaged one"
    );
    says_once(
        &p,
        &copy,
        &format!("fell back from epoch {newest} to {}", newest - 1),
        &[],
    );
    // The next epochs overwrite the damaged one: the store is whole again.
    let last = p
        .lines()
        .iter()
        .find_map(|l| final_epoch(&l.text))
        .expect("final epoch");
    let (again, p) = resume(&copy);
    assert_eq!(
        again, last,
        "after the fall-back run, not resumed from its final epoch"
    );
    assert!(
        !p.lines().iter().any(|l| l.text.contains("fell back")),
        "fell back again\n{}",
        p.tail()
    );
}

#[test]
fn corrupt_superblock_uses_the_other_one() {
    let b = Built::new("store-bad-sb");
    let names = ["A (offset 0)", "B (offset 4096)"];
    for slot in [0u64, 1] {
        let copy = b.copy(&format!("bad-sb-{slot}.store"));
        // Generation and flags overwritten; the CRC no longer matches.
        store_file::patch_superblock(&copy, slot, false, |blk| blk[32..48].fill(0xa5))
            .expect("damage the superblock");
        let (from, p) = resume(&copy);
        assert_eq!(from, b.last, "superblock {} damaged", names[slot as usize]);
        says_once(
            &p,
            &copy,
            &format!("superblock {} is invalid", names[slot as usize]),
            &[&format!("using superblock {}", names[1 - slot as usize])],
        );
    }
    let copy = b.copy("bad-sbs.store");
    for slot in [0, 1] {
        store_file::patch_superblock(&copy, slot, false, |blk| blk[32..48].fill(0xa5))
            .expect("damage the superblock");
    }
    refused_unchanged(&copy, &[], &["both superblocks"], "corrupt");
}

#[test]
fn foreign_file_is_refused_and_left_unchanged() {
    require_kvm();
    let elf = probe_elf();
    let dir = TempDir::new("store-foreign");
    let services = std::fs::read("/etc/services").expect("read /etc/services");
    let mut rng = SplitMix64::new(0x5eed);
    let random: Vec<u8> = (0..(1 << 17))
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    let files = [
        dir.write("services", &services, 0o644),
        dir.write("random", &random, 0o644),
        dir.write("short", b"a short text file\n", 0o644),
    ];
    for f in &files {
        // Resuming it, and creating a store on it.
        refused_unchanged(f, &[], &[], "not an evm store");
        refused_unchanged(
            f,
            &["--kernel", s(&elf), "--mem", MEM, "--vcpus", "1"],
            &[],
            "not an evm store",
        );
    }
    let run = refused(
        &["run", "--store", s(dir.path()), "--kernel", s(&elf)],
        &[s(dir.path())],
        "directory",
    );
    drop(run);
}

#[test]
fn store_in_use_by_another_evm_is_refused() {
    let b = Built::new("store-locked");
    let a = args(&["run", "--store", s(&b.store), "--interval", INTERVAL]);
    let mut first = EvmProcess::spawn(&evm_bin(), &a, LOG).expect("start evm");
    let mut newest = 0;
    let mut resumed = false;
    first
        .wait_for("the resume line and a committed epoch", WAIT, |l| {
            if let Some(bad) = bad_line(l, true) {
                return Seen::Bad(bad);
            }
            resumed |= resumed_epoch(&l.text).is_some();
            if let Some(e) = EpochLine::parse(&l.text) {
                newest = e.epoch;
            }
            if resumed && newest > 0 {
                Seen::Yes
            } else {
                Seen::No
            }
        })
        .expect("the first evm runs");
    for extra in [&[][..], &["--fresh"], &["--kernel", s(&b.elf)]] {
        let mut argv = vec!["run", "--store", s(&b.store)];
        argv.extend(extra);
        refused(&argv, &[s(&b.store)], "locked");
    }
    // The first keeps running and committing.
    first.poll();
    let seen = first
        .lines()
        .iter()
        .filter_map(|l| EpochLine::parse(&l.text))
        .map(|e| e.epoch)
        .max()
        .unwrap_or(newest);
    first
        .wait_for("a later committed epoch", WAIT, |l| {
            if let Some(bad) = bad_line(l, true) {
                return Seen::Bad(bad);
            }
            match EpochLine::parse(&l.text) {
                Some(e) if e.epoch > seen => Seen::Yes,
                _ => Seen::No,
            }
        })
        .expect("the first evm commits after the refusals");
    let last = stop(&mut first);
    // The refused --fresh discarded nothing.
    assert_eq!(resume(&b.store).0, last);
}

#[test]
fn interval_out_of_range_is_refused() {
    let elf = probe_elf();
    let dir = TempDir::new("store-interval");
    let store = dir.join("new.store");
    for (v, problem) in [
        ("0", "between 10ms and 10min"),
        ("5ms", "between 10ms and 10min"),
        ("11m", "between 10ms and 10min"),
        ("abc", "not a duration"),
    ] {
        refused(
            &[
                "run",
                "--store",
                s(&store),
                "--kernel",
                s(&elf),
                "--mem",
                MEM,
                "--interval",
                v,
            ],
            &[&format!("--interval {v}")],
            problem,
        );
        assert!(!store.exists(), "--interval {v}: the store was created");
    }
}

#[test]
fn flags_contradicting_the_stored_config_are_refused() {
    let b = Built::new("store-flags");
    let other = b.dir.copy(&b.elf, "other-probe.elf", 0o644);
    let cases = [
        ("--vcpus", "2", "1".to_string()),
        ("--mem", "256M", MEM.to_string()),
        ("--kernel", s(&other), s(&b.elf).to_string()),
        ("--cmdline", "dirty=4", CMDLINE.to_string()),
    ];
    for (flag, given, stored) in &cases {
        let before = fingerprint(&b.store).expect("fingerprint");
        let run = refused(
            &["run", "--store", s(&b.store), flag, given],
            &[s(&b.store), flag, given],
            "contradicts",
        );
        let (_, stored_part) = run
            .stderr
            .split_once("contradicts")
            .expect("says contradicts");
        assert!(
            stored_part.contains(stored.as_str()),
            "{flag}: {:?} does not name the stored value {stored:?} after the given one",
            run.stderr
        );
        assert_eq!(before, fingerprint(&b.store).expect("fingerprint"));
    }
    assert_eq!(resume(&b.store).0, b.last, "the store did not resume");
}

#[test]
fn newer_format_version_is_refused() {
    let b = Built::new("store-version");
    let set_v2 = |blk: &mut [u8]| put_u32(blk, SB_VERSION_OFF, store_file::FORMAT_VERSION + 1);
    let both = b.copy("v2-both.store");
    for slot in [0, 1] {
        store_file::patch_superblock(&both, slot, true, set_v2).expect("patch");
    }
    refused_unchanged(
        &both,
        &[],
        &["store format version 3", "this evm reads version 2"],
        "version",
    );
    // One valid block of a newer version is enough to refuse.
    let one = b.copy("v2-a.store");
    store_file::patch_superblock(&one, 0, true, set_v2).expect("patch");
    refused_unchanged(&one, &[], &["store format version 3"], "version");
    // A block with another version and a bad CRC is merely corrupt: the
    // other superblock is used.
    let torn = b.copy("v2-a-bad-crc.store");
    store_file::patch_superblock(&torn, 0, false, set_v2).expect("patch");
    let (from, p) = resume(&torn);
    assert_eq!(from, b.last);
    says_once(&p, &torn, "superblock A (offset 0) is invalid", &[]);
}

/// The byte ranges of the numbers of each `[leaf, subleaf, "reg", bits]`
/// in the stored config's `cpu_features` (evm's JSON).
fn cpu_features(json: &str) -> Vec<(u32, u32, char, std::ops::Range<usize>)> {
    let start = json
        .find("\"cpu_features\"")
        .expect("cpu_features in the config");
    let mut tokens = Vec::new();
    let b = json.as_bytes();
    let mut i = start + "\"cpu_features\"".len();
    while i < b.len() && b[i] != b'}' {
        if b[i].is_ascii_digit() {
            let j = i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            tokens.push(i..j);
            i = j;
        } else if b[i] == b'"' {
            tokens.push(i + 1..i + 2);
            i += 3;
        } else {
            i += 1;
        }
    }
    tokens
        .chunks_exact(4)
        .map(|t| {
            let num = |r: &std::ops::Range<usize>| json[r.clone()].parse::<u32>().expect("a u32");
            let reg = json[t[2].clone()].chars().next().expect("a register");
            (num(&t[0]), num(&t[1]), reg, t[3].clone())
        })
        .collect()
}

/// Bits evm sets in the guest's CPUID itself (not the host's features).
fn evm_set_bits(leaf: u32, reg: char) -> u32 {
    match (leaf, reg) {
        (0x1, 'c') => (1 << 31) | (1 << 24),
        (0x1, 'd') => 1 << 28,
        (0x8000_0001, 'c') => 1 << 1,
        _ => 0,
    }
}

#[test]
fn store_from_a_cpu_with_more_features_is_refused() {
    let b = Built::new("store-cpu");
    let copy = b.copy("cpu.store");
    let original = store_file::read_config(&copy).expect("read the config");
    let json = String::from_utf8(original.clone()).expect("UTF-8 config");
    let features = cpu_features(&json);
    assert!(features.len() >= 4, "cpu_features: {features:?}\n{json}");
    // The first feature bit this host (where the store was made) lacks.
    let (leaf, sub, reg, range, bit) = features
        .iter()
        .find_map(|(leaf, sub, reg, range)| {
            let have: u32 = json[range.clone()].parse().expect("a u32");
            let free = !have & !evm_set_bits(*leaf, *reg);
            (free != 0).then(|| {
                (
                    *leaf,
                    *sub,
                    *reg,
                    range.clone(),
                    1u32 << free.trailing_zeros(),
                )
            })
        })
        .expect("a feature bit this host lacks");
    let have: u32 = json[range.clone()].parse().expect("a u32");
    let mut edited = json.clone();
    edited.replace_range(range, &(have | bit).to_string());
    store_file::write_config(&copy, edited.as_bytes()).expect("write the config");
    eprintln!("claimed CPUID {leaf:#x}.{sub} {reg} bit {bit:#x}");
    refused_unchanged(
        &copy,
        &[],
        &[
            &format!("CPUID leaf {leaf:#x}.{sub} {reg}"),
            &format!("{bit:#x}"),
        ],
        "lacks",
    );
    // The config put back, the same file resumes: the refusal changed nothing.
    store_file::write_config(&copy, &original).expect("restore the config");
    assert_eq!(resume(&copy).0, b.last);
}
