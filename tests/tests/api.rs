//! The control API (issue 5, items 2–4) against a running probe guest on
//! this machine's `/dev/kvm`: `evm status|checkpoint|pause|resume|stop
//! --api-sock` and the same requests with curl; a paused VM prints nothing
//! and still takes epochs; bad requests get a 400 and leave the VM running;
//! a stop commits a final epoch that the next run resumes; `evm top` under
//! a pseudo-terminal draws, survives a resize and quits on `q`. Bad input
//! to each command is refused in one line.
//!
//! Nothing here asserts on timing. Without `/dev/kvm` these tests fail.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evm_tests::evm_process::{EpochLine, EvmProcess, Seen, Stream, probe_elf, probe_failure};
use evm_tests::probe_run::{self, LOG, WAIT};
use evm_tests::refusal::{refused, s};
use evm_tests::{TempDir, evm_bin, require_kvm};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// `evm <argv>`: must succeed; returns stdout.
fn evm_ok(argv: &[&str]) -> String {
    evm_tests::evm_ok(argv, WAIT)
}

/// `evm <cmd> --api-sock SOCK --json`, parsed.
fn api_json(cmd: &str, sock: &Path) -> serde_json::Value {
    let out = evm_ok(&[cmd, "--api-sock", s(sock), "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("evm {cmd} --json: {e}: {out:?}"))
}

/// `curl --unix-socket SOCK -X METHOD [-d BODY] http://localhost/PATH`:
/// (HTTP status, body).
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "120",
        "--unix-socket",
        s(sock),
        "-X",
        method,
    ])
    .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("curl not runnable ({e}); scripts/setup installs it"));
    assert!(out.status.success(), "curl {method} {path}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl wrote the status");
    (
        code.trim().parse().expect("a status code"),
        body.to_string(),
    )
}

/// PROBE lines on stdout so far.
fn probe_lines(p: &mut EvmProcess) -> usize {
    p.poll();
    p.stream(Stream::Stdout)
        .filter(|l| l.text.starts_with("PROBE "))
        .count()
}

fn boot_args(store: &Path, sock: &Path) -> Vec<String> {
    args(&[
        "run",
        "--store",
        s(store),
        "--kernel",
        s(&probe_elf()),
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--cmdline",
        "dirty=4 rate=16 verify_every=1 report=1",
        "--interval",
        "200ms",
        "--api-sock",
        s(sock),
    ])
}

/// A probe with a store and an API socket, once it has committed an epoch.
fn start_probe(store: &Path, sock: &Path) -> EvmProcess {
    let mut p = EvmProcess::spawn(&evm_bin(), &boot_args(store, sock), LOG).expect("start evm");
    p.wait_for("a commit", WAIT, |l| {
        if EpochLine::parse(&l.text).is_some() {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("the probe commits");
    p
}

#[test]
fn api_checkpoints_pauses_resumes_and_stops_a_running_probe() {
    require_kvm();
    let dir = TempDir::new("api");
    let store = dir.join("vm.store");
    let sock = dir.join("api.sock");
    let mut p = EvmProcess::spawn(&evm_bin(), &boot_args(&store, &sock), LOG).expect("start evm");
    let mut commits = 0;
    p.wait_for("two commits", WAIT, |l| {
        if let Some(bad) = probe_failure(l, false) {
            return Seen::Bad(bad);
        }
        commits += usize::from(EpochLine::parse(&l.text).is_some());
        if commits >= 2 { Seen::Yes } else { Seen::No }
    })
    .expect("the probe commits epochs");

    let st = api_json("status", &sock);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["vcpus"], 2, "{st}");
    assert_eq!(st["store"].as_str(), Some(s(&store)), "{st}");
    let last = st["last_committed_epoch"]
        .as_u64()
        .expect("a committed epoch");
    assert!(last >= 2, "{st}");
    assert_eq!(st["current_epoch"].as_u64(), Some(last + 1), "{st}");
    let text = evm_ok(&["status", "--api-sock", s(&sock)]);
    assert!(text.starts_with("state            running\n"), "{text}");

    // Checkpoint now: a new epoch, listed by the offline reader too.
    let out = evm_ok(&["checkpoint", "--api-sock", s(&sock)]);
    let n: u64 = out
        .strip_prefix("epoch ")
        .and_then(|r| r.strip_suffix(" committed\n"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("evm checkpoint printed {out:?}"));
    assert!(n > last, "checkpoint {n} after {last}");
    let listed: serde_json::Value =
        serde_json::from_str(&evm_ok(&["epochs", "--store", s(&store), "--json"])).expect("JSON");
    assert!(
        listed["epochs"]
            .as_array()
            .expect("epochs")
            .iter()
            .any(|e| e["epoch"] == n),
        "epoch {n} not in {listed}"
    );
    let (code, body) = curl(&sock, "GET", "/epochs", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("\"epoch\":{n},")), "{body}");

    // Metrics in the Prometheus text format, through curl.
    let (code, metrics) = curl(&sock, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("# TYPE evm_epochs_committed_total counter\n"),
        "{metrics}"
    );
    let last_line = metrics
        .lines()
        .find_map(|l| l.strip_prefix("evm_last_committed_epoch "))
        .expect("evm_last_committed_epoch");
    assert!(
        last_line.parse::<u64>().expect("a number") >= n,
        "{metrics}"
    );

    // Pause: once the vCPUs are parked the probe prints nothing more, and
    // an epoch can still be taken (of the paused machine).
    let v = api_json("pause", &sock);
    assert_eq!(
        (v["state"].as_str(), v["changed"].as_bool()),
        (Some("paused"), Some(true))
    );
    std::thread::sleep(Duration::from_millis(500)); // lines already in the pipe arrive
    let before = probe_lines(&mut p);
    let paused_epoch = api_json("checkpoint", &sock)["epoch"]
        .as_u64()
        .expect("epoch");
    assert!(paused_epoch > n);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        probe_lines(&mut p),
        before,
        "a paused probe printed\n{}",
        p.tail()
    );
    assert_eq!(api_json("status", &sock)["state"], "paused");
    let (code, body) = curl(&sock, "PATCH", "/vm", Some("{\"state\": \"running\"}"));
    assert_eq!(code, 200, "{body}");
    p.wait_for("a PROBE line after the resume", WAIT, |l| {
        if l.text.starts_with("PROBE ") {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("the probe runs again after resume");

    // Bad requests: 400 with a message, and the VM goes on committing.
    for (method, path, body, status, says) in [
        ("PUT", "/pause", Some("{not json"), 400, "malformed JSON"),
        (
            "PATCH",
            "/vm",
            Some("{\"state\": \"asleep\"}"),
            400,
            "asleep",
        ),
        (
            "PUT",
            "/checkpoint",
            Some("{\"now\": 1}"),
            400,
            "unknown field",
        ),
        ("DELETE", "/status", None, 405, "use GET"),
        ("GET", "/nothing", None, 404, "no such resource"),
    ] {
        let (code, text) = curl(&sock, method, path, body);
        assert_eq!(code, status, "{method} {path}: {text}");
        assert!(text.contains(says), "{method} {path}: {text}");
    }
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    std::io::Write::write_all(&mut raw, b"NOT HTTP AT ALL\r\n\r\n").expect("send");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut raw, &mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("malformed HTTP request"), "{answer}");
    assert_eq!(api_json("status", &sock)["state"], "running");
    let after = api_json("checkpoint", &sock)["epoch"]
        .as_u64()
        .expect("epoch");
    assert!(after > paused_epoch);

    // Stop: a final epoch, exit 0, the socket gone; the next run resumes it.
    let out = evm_ok(&["stop", "--api-sock", s(&sock)]);
    let final_epoch: u64 = out
        .strip_prefix("stopped; final epoch ")
        .and_then(|r| r.strip_suffix(" committed\n"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("evm stop printed {out:?}"));
    assert!(final_epoch > after);
    let status = p.wait_exit(WAIT).expect("evm exits after stop");
    assert!(status.success(), "{status}\n{}", p.tail());
    assert!(!sock.exists(), "the API socket outlived evm");
    let resume = args(&["run", "--store", s(&store)]);
    let (first, _) = probe_run::three_epochs(&resume, true);
    assert_eq!(
        first,
        final_epoch + 1,
        "the resumed run continues the epochs"
    );
}

#[test]
fn api_bad_input_is_refused_in_one_line() {
    require_kvm();
    let dir = TempDir::new("api-bad");
    let missing = dir.join("missing.sock");
    for cmd in ["status", "checkpoint", "pause", "resume", "stop", "top"] {
        refused(
            &[cmd, "--api-sock", s(&missing)],
            &[s(&missing)],
            "no such socket",
        );
    }
    // A socket file whose server is gone.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    refused(
        &["status", "--api-sock", s(&stale)],
        &[s(&stale)],
        "nobody is listening",
    );
    // Something that is not a socket, and a socket another evm serves.
    let file = dir.write("notasocket", b"keep me", 0o644);
    let probe = probe_elf();
    refused(
        &[
            "run",
            "--no-store",
            "--kernel",
            s(&probe),
            "--api-sock",
            s(&file),
        ],
        &[s(&file)],
        "not a socket",
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    let store = dir.join("vm.store");
    let sock = dir.join("api.sock");
    let mut p = start_probe(&store, &sock);
    refused(
        &[
            "run",
            "--no-store",
            "--kernel",
            s(&probe),
            "--api-sock",
            s(&sock),
        ],
        &[s(&sock)],
        "another process is listening",
    );
    // The first evm still serves, and `evm top` refuses a pipe for a screen.
    assert_eq!(api_json("status", &sock)["state"], "running");
    refused(
        &["top", "--api-sock", s(&sock)],
        &[s(&sock)],
        "needs a terminal",
    );
    probe_run::stop(&mut p);
    // Without a store there is nothing to checkpoint: a clear API error.
    let sock2 = dir.join("api2.sock");
    let mut q = EvmProcess::spawn(
        &evm_bin(),
        &args(&[
            "run",
            "--no-store",
            "--kernel",
            s(&probe),
            "--cmdline",
            "dirty=4 rate=16 seconds=600",
            "--mem",
            "64M",
            "--api-sock",
            s(&sock2),
        ]),
        LOG,
    )
    .expect("start evm");
    q.wait_for("the API", WAIT, |l| {
        if l.text.contains("control API on") {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .expect("the API starts");
    refused(
        &["checkpoint", "--api-sock", s(&sock2)],
        &[s(&sock2), "--no-store"],
        "nothing to checkpoint",
    );
    let out = evm_ok(&["stop", "--api-sock", s(&sock2)]);
    assert_eq!(out, "stopped (no store)\n");
    assert!(q.wait_exit(WAIT).expect("exit").success());
}

/// A pseudo-terminal pair: (master, slave).
fn openpty(cols: u16, rows: u16) -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the out-pointers, which
    // point at live locals; name and termios may be null; `ws` is a valid
    // winsize that it only reads.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: the descriptor was just opened by openpty and is owned by
    // nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: as for the master.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    (master, slave)
}

fn set_size(fd: &OwnedFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

/// Read from the pty master until `want` has appeared in `seen` after
/// byte `from` (or panic after WAIT).
fn read_until(master: &OwnedFd, want: &str, seen: &mut String, mut from: usize) {
    let start = Instant::now();
    loop {
        if seen[from..].contains(want) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "evm top never drew {want:?}; it drew:\n{}",
            &seen[seen.len().saturating_sub(4000)..]
        );
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a live local.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 8192];
        // SAFETY: reads at most buf.len() bytes into the live buffer.
        let r = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            panic!("the pty closed before {want:?}:\n{seen}");
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..r as usize]));
        // Keep the buffer bounded; the match looks at new text only.
        if seen.len() > 1 << 20 {
            let cut = seen.len() - (1 << 16);
            let cut = (cut..seen.len())
                .find(|i| seen.is_char_boundary(*i))
                .unwrap_or(cut);
            seen.drain(..cut);
            from = 0;
        }
    }
}

#[test]
fn top_draws_survives_a_resize_and_quits_on_q() {
    require_kvm();
    let dir = TempDir::new("api-top");
    let store = dir.join("vm.store");
    let sock = dir.join("api.sock");
    let mut p = start_probe(&store, &sock);

    let (master, slave) = openpty(100, 30);
    let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
    let mut cmd = Command::new(evm_bin());
    cmd.args(["top", "--api-sock", s(&sock), "--refresh-ms", "200"])
        .env("TERM", "xterm")
        .stdin(io(&slave))
        .stdout(io(&slave))
        .stderr(io(&slave));
    // The child becomes a session leader whose controlling terminal is the
    // pty (its stdin), as under a real terminal, so /dev/tty is the pty too.
    let make_tty = || {
        // SAFETY: setsid takes no arguments.
        let sid = unsafe { libc::setsid() };
        // SAFETY: TIOCSCTTY takes an int argument, no pointer.
        if sid < 0 || unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec the hook calls only setsid and ioctl,
    // both async-signal-safe, and touches no memory of the parent.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, make_tty) };
    let mut top = cmd.spawn().expect("start evm top");
    drop(slave);
    let mut seen = String::new();
    // ratatui sends only the cells that differ from the last frame (a
    // blank cell of the first frame is skipped too), so look for words.
    read_until(&master, "freeze", &mut seen, 0);
    read_until(&master, "accumulating", &mut seen, 0);
    // A resize makes ratatui clear and draw everything again, titles
    // included, for the new size; the view keeps updating.
    let mark = seen.len();
    set_size(&master, 60, 20);
    read_until(&master, "migration", &mut seen, mark);
    let mark = seen.len();
    set_size(&master, 140, 45);
    read_until(&master, "bandwidth", &mut seen, mark);
    // SAFETY: writes one byte from a static buffer to the open master.
    let w = unsafe { libc::write(master.as_raw_fd(), b"q".as_ptr().cast(), 1) };
    assert_eq!(w, 1);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = top.try_wait().expect("wait for evm top") {
            break st;
        }
        if start.elapsed() > WAIT {
            let _ = top.kill();
            panic!("evm top did not quit on q");
        }
        // Keep the pty drained so top never blocks writing.
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a live local.
        if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
            let mut buf = [0u8; 8192];
            // SAFETY: reads at most buf.len() bytes into the live buffer.
            unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
    };
    assert!(status.success(), "evm top exited with {status}");
    // The VM is untouched by its viewer.
    assert_eq!(api_json("status", &sock)["state"], "running");
    probe_run::stop(&mut p);
}
