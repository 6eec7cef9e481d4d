//! The store on a raw block device (issue 4, item 4), with the probe guest
//! on this machine's `/dev/kvm`: a loop device over a sparse all-zero file
//! is formatted in place by the first `evm run --store /dev/loopN`, which
//! boots with a disk in the store and commits epochs; SIGTERM, a resume,
//! `kill -9`, another resume, each re-verifying the probe's stamped pages;
//! `evm export` of the disk. A device too small for the store and a device
//! holding something else are refused, byte for byte untouched.
//!
//! Needs root and a loop device (`losetup`); when the machine has none the
//! test says why in its output and checks nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use evm_tests::evm_process::{EvmProcess, Seen, probe_elf, probe_failure, resumed_epoch};
use evm_tests::probe_run::{self, LOG, WAIT};
use evm_tests::refusal::{refused, s};
use evm_tests::store_file::fingerprint;
use evm_tests::{TempDir, evm_bin, require_kvm};

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// `losetup --find --show <file>`, or why not.
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", s(file)])
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Loop { dev: dev.into() })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn sparse(dir: &TempDir, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create backing file");
    f.set_len(len).expect("size backing file");
    p
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

#[test]
fn a_store_on_a_loop_device_boots_resumes_and_exports() {
    require_kvm();
    let dir = TempDir::new("store-blockdev");
    let backing = sparse(&dir, "dev.img", 512 << 20);
    let lo = match Loop::attach(&backing) {
        Ok(lo) => lo,
        Err(why) => {
            eprintln!("NOT TESTED: no loop device on this machine ({why})");
            return;
        }
    };
    let dev = s(&lo.dev);
    eprintln!("store on {dev} (backed by {})", backing.display());
    let elf = probe_elf();
    let boot = args(&[
        "run",
        "--store",
        dev,
        "--kernel",
        s(&elf),
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk-size",
        "8M",
        "--cmdline",
        "dirty=4 rate=16 verify_every=1 report=1",
        "--interval",
        "100ms",
    ]);
    let (_, last) = probe_run::three_epochs(&boot, false);
    let resume = args(&["run", "--store", dev, "--interval", "100ms"]);
    let (_, again) = probe_run::three_epochs(&resume, true);
    assert!(
        again > last,
        "final epoch {again} after the resume <= {last}"
    );

    // kill -9, then resume: at least the last commit seen.
    let mut p = EvmProcess::spawn(&evm_bin(), &resume, LOG).expect("start evm");
    let mut commits = Vec::new();
    p.wait_for("a resume and two commits", WAIT, |l| {
        if let Some(bad) = probe_failure(l, true) {
            return Seen::Bad(bad);
        }
        commits.extend(evm_tests::evm_process::EpochLine::parse(&l.text).map(|e| e.epoch));
        if commits.len() >= 2 {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("resume on the loop device");
    p.kill().expect("kill -9 evm");
    let killed_after = *commits.last().expect("commits");
    let mut p = EvmProcess::spawn(&evm_bin(), &resume, LOG).expect("start evm");
    let mut from = None;
    p.wait_for("a resume and a verify", WAIT, |l| {
        if let Some(bad) = probe_failure(l, true) {
            return Seen::Bad(bad);
        }
        from = from.or_else(|| resumed_epoch(&l.text));
        let ok = l.text.starts_with("PROBE VERIFY OK ");
        if from.is_some() && ok {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("resume after kill -9");
    let from = from.expect("resumed");
    assert!(
        from >= killed_after,
        "resumed {from} < last commit {killed_after}"
    );
    probe_run::stop(&mut p);

    let out = dir.join("disk.img");
    let run = Command::new(evm_bin())
        .args(["export", "--store", dev, "--disk", s(&out)])
        .output()
        .expect("run evm export");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let disk = std::fs::read(&out).expect("read export");
    assert_eq!(disk.len(), 8 << 20);
    assert!(
        disk.iter().all(|&b| b == 0),
        "the probe never writes its disk"
    );
}

#[test]
fn a_device_too_small_or_holding_data_is_refused_untouched() {
    require_kvm();
    let dir = TempDir::new("store-blockdev-bad");
    let small = sparse(&dir, "small.img", 16 << 20);
    let full = sparse(&dir, "full.img", 512 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&full)
            .expect("open");
        f.write_all_at(b"a file system, say", 4096).expect("write");
    }
    let (lo_small, lo_full) = match (Loop::attach(&small), Loop::attach(&full)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => {
            eprintln!("NOT TESTED: no loop device on this machine ({why})");
            return;
        }
    };
    let elf = probe_elf();
    for (lo, problem) in [(&lo_small, "too small"), (&lo_full, "not an evm store")] {
        let dev = s(&lo.dev);
        let before = fingerprint(&lo.dev).expect("fingerprint");
        refused(
            &["run", "--store", dev, "--kernel", s(&elf), "--mem", "64M"],
            &[dev],
            problem,
        );
        assert_eq!(
            fingerprint(&lo.dev).expect("fingerprint"),
            before,
            "{dev} was written"
        );
    }
}
