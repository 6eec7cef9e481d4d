//! Seeded power cuts of a real guest run through `scripts/run` (the
//! `linux_power` and `linux_sqlite` chains): the seed, a cut at a random
//! moment after two commits, and the resume that must be the same boot.
//! Each helper panics with the run's transcript when something is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::evm_process::{SplitMix64, number_from_env, seed_from_env};
use crate::store_run::StoreRun;
use crate::{HarnessError, TempDir, evm_bin};

/// Longest wait for one shell command in the guest.
pub const CMD: Duration = Duration::from_secs(120);
/// Longest wait for the next commit line.
pub const COMMIT: Duration = Duration::from_secs(90);
/// Longest wait for a resume.
pub const RESUME: Duration = Duration::from_secs(300);

/// The kernel command line of the kill and power-cut chains: evm's default
/// plus `nokaslr`, so that the RIP of a guest that wedged (`stuck_report`)
/// is the kernel's own address, which `scripts/symbolize` names. Append
/// the chain's `evm.*` options with [`cmdline`].
pub const CMDLINE: &str = "console=ttyS0 pci=off panic=-1 quiet nokaslr";

/// [`CMDLINE`] followed by `extra`.
pub fn cmdline(extra: &str) -> String {
    format!("{CMDLINE} {extra}")
}

fn fail<T>(e: HarnessError) -> T {
    panic!("{e}")
}

/// `EVM_POWER_SEED` (default: from the clock) and `EVM_POWER_CUTS`
/// (default `default_cuts`), printed first so a failure can be replayed.
pub fn seed(default_cuts: u64) -> (u64, u64) {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let seed = seed_from_env("EVM_POWER_SEED", clock);
    let cuts = number_from_env("EVM_POWER_CUTS", default_cuts);
    eprintln!("EVM_POWER_SEED={seed:#x} EVM_POWER_CUTS={cuts}");
    (seed, cuts)
}

/// The guest's boot id (a resume keeps it, a boot changes it).
pub fn boot_id(run: &mut StoreRun) -> String {
    run.run_cmd("cat /proc/sys/kernel/random/boot_id", CMD)
        .unwrap_or_else(fail)
}

/// After console line `from`: two commits (the second one's freeze came
/// after line `from`), then a random wait of up to one interval, then the
/// power cut. Returns the last epoch reported committed before the cut.
pub fn cut_after_commits(
    run: &mut StoreRun,
    from: usize,
    rng: &mut SplitMix64,
    interval_ms: u64,
) -> u64 {
    let (i, _) = run.wait_commit(from, COMMIT).unwrap_or_else(fail);
    run.wait_commit(i + 1, COMMIT).unwrap_or_else(fail);
    // A third of the cuts right after a commit, the rest anywhere in the
    // interval (during the next freeze, write or fdatasync).
    if !rng.chance(1, 3) {
        sleep(Duration::from_millis(rng.below(interval_ms)));
    }
    let last = run.commits().last().map(|c| c.2.epoch).expect("a commit");
    run.power_cut().unwrap_or_else(fail);
    // Commit lines that arrived between reading `last` and the cut count.
    run.commits().last().map(|c| c.2.epoch).unwrap_or(last)
}

/// `scripts/run --store S --vcpus 1`: it must resume, from `last` or
/// later, the boot `id`.
pub fn resume(name: &str, store: &Path, last: u64, id: &str) -> StoreRun {
    let store = store.to_str().expect("UTF-8 path");
    let mut b =
        StoreRun::start(name, &["--store", store, "--vcpus", "1"], &[]).unwrap_or_else(fail);
    let (epoch, took) = b.wait_resumed(RESUME).unwrap_or_else(fail);
    assert!(
        epoch >= last,
        "resumed from epoch {epoch}, but epoch {last} was reported committed\n{}",
        b.tail()
    );
    let got = match b.run_cmd("cat /proc/sys/kernel/random/boot_id", CMD) {
        Ok(got) => got,
        Err(e) => panic!("{e}\n{}", stuck_report(Path::new(store), epoch)),
    };
    assert_eq!(got, id, "the guest rebooted\n{}", b.tail());
    eprintln!(
        "{name}: resumed from epoch {epoch} (last reported {last}) after {:.1}s",
        took.as_secs_f64()
    );
    b
}

/// What the store says of a guest that does not answer after resuming from
/// `epoch`: `evm inspect` of that epoch and of the newest (vCPU mode,
/// registers, pending events, the code at RIP and the words at RSP), to
/// tell a wedged guest kernel from a stopped device,
/// and the kernel functions at those RIPs (`scripts/symbolize`). L1's side
/// is printed before this, by the timed-out wait (`StoreRun::dump_threads`:
/// evm's threads in L1, or L1's registers if L1 itself is stuck).
pub fn stuck_report(store: &Path, epoch: u64) -> String {
    let path = store.to_str().expect("UTF-8 path");
    let mut out = String::from("--- the store of the guest that did not answer ---\n");
    for which in [Some(epoch.to_string()), None] {
        let mut c = Command::new(evm_bin());
        c.args(["inspect", "--store", path]);
        if let Some(n) = &which {
            c.args(["--epoch", n]);
        }
        match c.output() {
            Ok(o) => {
                out.push_str(&format!(
                    "evm inspect --epoch {}:\n{}{}",
                    which.as_deref().unwrap_or("newest"),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            Err(e) => out.push_str(&format!("evm inspect: {e}\n")),
        }
    }
    out.push_str(&symbolize(&out));
    out
}

/// `scripts/symbolize` of the kernel addresses in `evm inspect`'s text: the
/// RIPs and the words at RSP (return addresses among them; a guest booted
/// with [`CMDLINE`] has no KASLR), or how to get the symbols.
fn symbolize(inspect: &str) -> String {
    let mut rips: Vec<&str> = inspect
        .lines()
        .flat_map(|l| {
            let words = l.split_whitespace();
            if l.trim_start().starts_with("stack at RSP:") {
                words.skip(3).collect::<Vec<_>>()
            } else {
                words
                    .skip_while(|w| *w != "RIP")
                    .nth(1)
                    .into_iter()
                    .collect()
            }
        })
        .filter(|a| a.starts_with("0xffffffff"))
        .collect();
    rips.sort_unstable();
    rips.dedup();
    if rips.is_empty() {
        return String::new();
    }
    let script = crate::host::repo().join("scripts/symbolize");
    match Command::new(&script).args(&rips).output() {
        Ok(o) if o.status.success() => {
            format!("scripts/symbolize:\n{}", String::from_utf8_lossy(&o.stdout))
        }
        Ok(o) => format!(
            "scripts/symbolize {}: {}",
            rips.join(" "),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("{}: {e}\n", script.display()),
    }
}

/// Exports the disk of `epoch` into `dir` and makes it what a crash of the
/// guest itself would leave: the ext4 journal replayed, then `e2fsck -fn`
/// must find it clean. Returns the image, or None if the epoch is no
/// longer retained (migrated into the home).
pub fn export_clean_ext4(store: &Path, dir: &TempDir, epoch: u64) -> Option<PathBuf> {
    let out = dir.join(&format!("epoch-{epoch}.img"));
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
    let exp = Command::new(evm_bin())
        .args(["export", "--store", &path(store), "--disk", &path(&out)])
        .args(["--epoch", &epoch.to_string()])
        .output()
        .expect("run evm export");
    let err = String::from_utf8_lossy(&exp.stderr);
    if !exp.status.success() && err.contains("not a retained") {
        return None;
    }
    assert!(exp.status.success(), "evm export --epoch {epoch}: {err}");
    // What mounting it after a crash of the guest would do first.
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y", &path(&out)])
        .output()
        .expect("run e2fsck -E journal_only");
    assert!(
        replay.status.code().is_some_and(|c| c <= 1),
        "journal replay of epoch {epoch}: {}\n{}{}",
        replay.status,
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn", &path(&out)])
        .output()
        .expect("run e2fsck -fn");
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the disk of epoch {epoch}: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    Some(out)
}
