//! The probe guest (`guest-images/probe/`) under `evm run` on this machine's
//! own `/dev/kvm`: its work runs in guest user mode, so it runs at native
//! speed even where `/dev/kvm` is PVM. Runs `target/release/evm` (or
//! `$EVM_BIN`) and builds the probe image with `guest-images/probe/build.sh`.
//! Without `/dev/kvm` these tests fail with a clear message; they never skip.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn evm_bin() -> PathBuf {
    let bin = std::env::var_os("EVM_BIN")
        .map_or_else(|| repo().join("target/release/evm"), PathBuf::from);
    assert!(
        bin.is_file(),
        "{} does not exist: build it with `cargo build --release -p vmm` (or set EVM_BIN)",
        bin.display()
    );
    bin
}

/// Builds the probe image if its sources changed; returns its path.
fn probe_elf() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let out = Command::new("sh")
            .arg(repo().join("guest-images/probe/build.sh"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run guest-images/probe/build.sh: {e}"));
        assert!(
            out.status.success(),
            "guest-images/probe/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let cache = std::env::var_os("EVM_CACHE").map_or_else(|| repo().join(".cache"), PathBuf::from);
    cache.join("probe/probe.elf")
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "cannot open /dev/kvm ({e}): the probe tests need KVM on this machine and never skip"
        );
    }
}

/// How one `evm run` ended.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    fn field(line: &str, key: &str) -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {key}= in '{line}'"))
    }
}

fn drain(mut from: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `evm run` with `args`, stdin closed, killing it after `timeout`.
fn evm_run(args: &[&str], timeout: Duration) -> Outcome {
    let mut child = Command::new(evm_bin())
        .arg("run")
        .arg("--no-store")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start evm: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for evm") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "evm run {args:?} still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = Outcome {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    eprintln!(
        "--- evm run {args:?}: {status} after {:?}\n{}{}---",
        start.elapsed(),
        out.stdout,
        out.stderr
    );
    out
}

/// Boots the probe with `vcpus` and `cmdline` (None: evm's default);
/// checks what every run must show: exit 0, the READY line first, only
/// whole probe lines on stdout, `PROBE DONE` last.
fn probe_with(vcpus: u8, cmdline: Option<&str>) -> Outcome {
    require_kvm();
    let elf = probe_elf();
    let vcpus_arg = vcpus.to_string();
    let mut args = vec![
        "--kernel",
        elf.to_str().expect("UTF-8 path"),
        "--vcpus",
        &vcpus_arg,
        "--mem",
        "256M",
    ];
    if let Some(cmdline) = cmdline {
        args.extend(["--cmdline", cmdline]);
    }
    let out = evm_run(&args, Duration::from_secs(90));
    assert!(out.status.success(), "evm exited with {}", out.status);
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("PROBE READY vcpus={vcpus} tsc_khz=")),
        "first line: '{first}'"
    );
    assert!(
        Outcome::field(first, "tsc_khz") > 0,
        "evm passed no TSC frequency"
    );
    for line in out.stdout.lines() {
        assert!(
            line.starts_with("PROBE "),
            "not a whole probe line: '{line}'"
        );
    }
    assert!(out.stdout.ends_with("PROBE DONE\n"), "no final PROBE DONE");
    out
}

fn probe(vcpus: u8, cmdline: &str) -> Outcome {
    probe_with(vcpus, Some(cmdline))
}

#[test]
fn default_workload_runs_and_powers_off() {
    // Without --cmdline evm gives the probe an empty one (not Linux's).
    for (vcpus, cmdline) in [(1, Some("")), (2, None), (8, None)] {
        let out = probe_with(vcpus, cmdline);
        assert_eq!(out.lines("PROBE start cmdline=\"\" ").len(), 1);
        let ok = format!("PROBE COUNT OK vcpus={vcpus} count=10000000");
        assert_eq!(out.lines(&ok).len(), 1);
    }
}

#[test]
fn count_workload_on_one_and_two_vcpus() {
    for vcpus in [1u8, 2] {
        let out = probe(vcpus, "count=200000000 report=1");
        let done: Vec<_> = out
            .lines("PROBE count vcpu=")
            .into_iter()
            .filter(|l| l.contains(" done="))
            .collect();
        assert_eq!(done.len(), usize::from(vcpus), "one summary per vCPU");
        for (i, line) in done.iter().enumerate() {
            assert!(line.starts_with(&format!("PROBE count vcpu={i} done=200000000 ")));
        }
        assert_eq!(out.lines("PROBE COUNT OK").len(), 1);
    }
}

#[test]
fn dirty_workload_verifies_on_one_and_two_vcpus() {
    for vcpus in [1, 2] {
        let out = probe(vcpus, "dirty=32 passes=2 verify_every=1");
        assert_eq!(
            Outcome::field(out.lines("PROBE dirty table=")[0], "pages"),
            32 * 256
        );
        let done = out.lines("PROBE DIRTY DONE")[0];
        assert_eq!(Outcome::field(done, "written"), 2 * 32 * 256, "{done}");
        assert!(out.lines("PROBE VERIFY FAIL").is_empty());
        assert_eq!(out.lines("PROBE VERIFY OK pages=8192").len(), 1);
    }
}

#[test]
fn timed_dirty_workload_reports_progress() {
    let out = probe(2, "dirty=16 rate=32 seconds=3 verify_every=1");
    for vcpu in 0..2 {
        let progress = out.lines(&format!("PROBE dirty vcpu={vcpu} gen="));
        assert!(!progress.is_empty(), "no progress from vCPU {vcpu}");
        let verified = out.lines("PROBE VERIFY OK pages=");
        assert!(
            verified
                .iter()
                .any(|l| l.ends_with(&format!(" vcpu={vcpu}"))),
            "no periodic verify from vCPU {vcpu}"
        );
    }
    let done = out.lines("PROBE DIRTY DONE")[0];
    let mibs = Outcome::field(done, "mib_per_s");
    assert!(mibs <= 40, "asked for 32 MiB/s, dirtied {mibs} MiB/s");
    assert_eq!(out.lines("PROBE VERIFY OK pages=4096").len(), 1);
}

#[test]
fn bad_probe_command_line_is_reported_by_the_probe() {
    require_kvm();
    let elf = probe_elf();
    let elf = elf.to_str().expect("UTF-8 path");
    let out = evm_run(
        &[
            "--kernel",
            elf,
            "--vcpus",
            "1",
            "--cmdline",
            "count=5 colour=7",
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "evm exited with {}", out.status);
    assert_eq!(out.lines("PROBE ERROR unknown option 'colour'").len(), 1);
    assert!(!out.stdout.contains("PROBE DONE"));
}

#[test]
fn elf_without_the_probe_marker_is_refused() {
    require_kvm();
    // A real ELF executable that is not a probe image.
    let not_probe = std::env::current_exe().expect("this test binary");
    let path = not_probe.to_str().expect("UTF-8 path");
    let out = evm_run(&["--kernel", path], Duration::from_secs(30));
    assert!(!out.status.success(), "evm accepted {path}");
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "want one line on stderr, got:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains(path), "stderr does not name {path}");
    assert!(out.stdout.is_empty());
}
