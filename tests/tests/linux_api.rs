//! The control API and the offline tools against a real Linux guest's
//! store (issue 5), through `scripts/run --api-sock A` (in the test host,
//! `A` on this machine is forwarded to evm's socket inside it):
//!
//! - while the guest runs: `evm epochs --store S --json` on this machine
//!   lists committed epochs with their freeze times; `evm checkpoint
//!   --api-sock A` returns a new committed epoch, which `evm epochs` then
//!   lists; `curl --unix-socket A http://localhost/metrics` is Prometheus
//!   text; `evm status` says running;
//! - `evm pause`: a command typed at the paused guest prints nothing until
//!   `evm resume`, then it runs;
//! - `evm stop`: a final epoch, `scripts/run` exits 0, the next run resumes
//!   the same boot;
//! - `evm fork` of an epoch taken before a file changed runs that older
//!   state (the file's old contents), and the original store still has the
//!   new one;
//! - `evm inspect`, `evm verify`, `evm diff` and `evm export --memory` on
//!   the real store.
//!
//! Nothing here asserts timing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use evm_tests::power;
use evm_tests::store_run::StoreRun;
use evm_tests::{HarnessError, TempDir, require_kvm};

const BOOT: Duration = Duration::from_secs(300);
const RESUME: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(120);
const COMMIT: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(180);
const TOOL: Duration = Duration::from_secs(300);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn fail<T>(e: HarnessError) -> T {
    panic!("{e}")
}

/// `evm <argv>`: must succeed; returns stdout.
fn evm_ok(argv: &[&str]) -> String {
    evm_tests::evm_ok(argv, TOOL)
}

fn json(argv: &[&str]) -> serde_json::Value {
    let out = evm_ok(argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("evm {argv:?}: not JSON ({e}): {out}"))
}

/// The epochs `evm epochs --store S --json` lists, with their freeze times.
fn listed(store: &Path) -> Vec<(u64, u64)> {
    let v = json(&["epochs", "--store", s(store), "--json"]);
    v["epochs"]
        .as_array()
        .unwrap_or_else(|| panic!("no epochs array: {v}"))
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().expect("epoch"),
                e["freeze_us"].as_u64().expect("freeze_us"),
            )
        })
        .collect()
}

fn checkpoint(sock: &Path) -> u64 {
    json(&["checkpoint", "--api-sock", s(sock), "--json"])["epoch"]
        .as_u64()
        .expect("an epoch number")
}

#[test]
fn api_and_tools_on_a_running_linux_guest() {
    require_kvm();
    let dir = TempDir::new("linux-api");
    let store = dir.join("vm.store");
    let sock = dir.join("api.sock");
    let mut run = StoreRun::start(
        "api",
        &[
            "--store",
            s(&store),
            "--vcpus",
            "1",
            "--mem",
            "256M",
            "--disk-size",
            "16M",
            "--interval",
            "1s",
            "--api-sock",
            s(&sock),
        ],
        &[],
    )
    .unwrap_or_else(fail);
    run.wait_ready(BOOT).unwrap_or_else(fail);
    let id = power::boot_id(&mut run);
    let (i, _) = run.wait_commit(0, COMMIT).unwrap_or_else(fail);
    run.wait_commit(i + 1, COMMIT).unwrap_or_else(fail);

    // Offline, on this machine, while the guest runs.
    let before = listed(&store);
    assert!(!before.is_empty(), "no committed epochs listed");
    for c in run.commits() {
        if let Some((_, freeze)) = before.iter().find(|(n, _)| *n == c.2.epoch) {
            assert_eq!(*freeze, c.2.freeze_us, "epoch {}", c.2.epoch);
        }
    }
    let st = json(&["status", "--api-sock", s(&sock), "--json"]);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["vcpus"], 1, "{st}");

    // Checkpoint now; the marker file's first contents are in it.
    run.run_cmd("echo one > /tmp/marker", CMD)
        .unwrap_or_else(fail);
    let first = checkpoint(&sock);
    assert!(
        first > before.last().map_or(0, |e| e.0),
        "checkpoint {first} after {before:?}"
    );
    assert!(
        listed(&store).iter().any(|(n, _)| *n == first),
        "evm epochs does not list the API's epoch {first}"
    );
    run.run_cmd("echo two > /tmp/marker", CMD)
        .unwrap_or_else(fail);
    let second = checkpoint(&sock);
    assert!(second > first);

    // Metrics through curl on this machine.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--unix-socket", s(&sock)])
        .arg("http://localhost/metrics")
        .output()
        .expect("curl (scripts/setup installs it)");
    assert!(out.status.success(), "curl: {out:?}");
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("# TYPE evm_last_committed_epoch gauge\n"),
        "{metrics}"
    );
    let last: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("evm_last_committed_epoch "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no evm_last_committed_epoch in\n{metrics}"));
    assert!(last >= second, "{metrics}");

    // Pause: the guest cannot answer until it is resumed.
    let v = json(&["pause", "--api-sock", s(&sock), "--json"]);
    assert_eq!(v["state"], "paused", "{v}");
    let mark = run.mark();
    run.send_line("echo paused-$((40+2))").unwrap_or_else(fail);
    std::thread::sleep(Duration::from_secs(3));
    let early = run
        .lines_from(mark)
        .into_iter()
        .find(|l| l.text.contains("paused-42"));
    assert!(early.is_none(), "a paused guest answered: {early:?}");
    json(&["resume", "--api-sock", s(&sock), "--json"]);
    run.wait_console(mark, "paused-42", CMD)
        .unwrap_or_else(fail);

    // Stop through the API: a final epoch, exit 0; the next run resumes.
    let v = json(&["stop", "--api-sock", s(&sock), "--json"]);
    let final_epoch = v["final_epoch"].as_u64().expect("a final epoch");
    assert!(final_epoch > second);
    let status = run.wait_exit(EXIT).unwrap_or_else(fail);
    assert!(status.success(), "scripts/run after stop: {status}");
    drop(run);
    let mut again =
        StoreRun::start("api-resume", &["--store", s(&store)], &[]).unwrap_or_else(fail);
    let (epoch, _) = again.wait_resumed(RESUME).unwrap_or_else(fail);
    assert_eq!(epoch, final_epoch);
    assert_eq!(power::boot_id(&mut again), id, "the guest rebooted");
    assert_eq!(
        again.run_cmd("cat /tmp/marker", CMD).unwrap_or_else(fail),
        "two"
    );
    again.signal(libc::SIGTERM).unwrap_or_else(fail);
    assert!(again.wait_exit(EXIT).unwrap_or_else(fail).success());
    drop(again);

    // The offline tools on the real store.
    let inspect = evm_ok(&[
        "inspect",
        "--store",
        s(&store),
        "--epoch",
        &first.to_string(),
    ]);
    assert!(inspect.contains("RIP"), "{inspect}");
    evm_ok(&["verify", "--store", s(&store)]);
    let diff = evm_ok(&[
        "diff",
        "--store",
        s(&store),
        &first.to_string(),
        &second.to_string(),
    ]);
    assert!(!diff.is_empty());

    // The guest memory image of an epoch: all of its 256 MiB of RAM.
    let image = dir.join("memory.raw");
    evm_ok(&[
        "export",
        "--store",
        s(&store),
        "--epoch",
        &first.to_string(),
        "--memory",
        s(&image),
    ]);
    let len = std::fs::metadata(&image).expect("memory image").len();
    assert_eq!(len, 256 << 20, "memory image of epoch {first}");
    std::fs::remove_file(&image).expect("remove the memory image");

    // Fork the epoch taken while /tmp/marker said "one": it runs that state.
    let fork = dir.join("fork.store");
    evm_ok(&[
        "fork",
        "--store",
        s(&store),
        "--epoch",
        &first.to_string(),
        s(&fork),
    ]);
    let mut forked = StoreRun::start("api-fork", &["--store", s(&fork)], &[]).unwrap_or_else(fail);
    forked.wait_resumed(RESUME).unwrap_or_else(fail);
    assert_eq!(power::boot_id(&mut forked), id, "the fork rebooted");
    assert_eq!(
        forked.run_cmd("cat /tmp/marker", CMD).unwrap_or_else(fail),
        "one",
        "the fork of epoch {first} does not hold that epoch's state"
    );
    forked.signal(libc::SIGTERM).unwrap_or_else(fail);
    assert!(forked.wait_exit(EXIT).unwrap_or_else(fail).success());
}
