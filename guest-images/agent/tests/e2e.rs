//! End to end: the agent binary as a normal process (not PID 1), driven
//! through its socket by the same binary in client mode, with its data
//! damaged from outside to see the checks fail.
//!
//! Waits poll with generous deadlines; nothing asserts on speed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_evm-agent");
/// Deadline for anything we wait for; a slow shared machine is fine.
const PATIENCE: Duration = Duration::from_secs(300);
const PAGE: usize = 4096;

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// In the child: die when the test thread that started us ends, even if
/// the test process is killed before `Drop` runs.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    Ok(())
}

/// A running agent; killed when dropped.
struct Agent {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    sock: PathBuf,
}

impl Agent {
    fn start(dir: &Path, cmdline: &str) -> Agent {
        let sock = dir.join("agent.sock");
        let mut cmd = Command::new(BIN);
        cmd.env("EVM_AGENT_CMDLINE", cmdline)
            .env("EVM_AGENT_SOCK", &sock)
            .stdout(Stdio::piped());
        // SAFETY: the hook only calls the async-signal-safe prctl.
        unsafe { cmd.pre_exec(die_with_parent) };
        let mut child = cmd.spawn().expect("spawn agent");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            seen: Vec::new(),
            sock,
        }
    }

    /// Waits for an output line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line '{prefix}...' in {PATIENCE:?}; saw {:#?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "agent output ended before '{prefix}...'; saw {:#?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Runs `evm-agent <request>`; returns (exit code, stdout line).
    fn ask(&self, request: &str) -> (i32, String) {
        let out = Command::new(BIN)
            .arg(request)
            .env("EVM_AGENT_SOCK", &self.sock)
            .output()
            .expect("run client");
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (out.status.code().unwrap_or(-1), text)
    }

    fn verify_ok(&self) -> String {
        let (code, line) = self.ask("verify");
        assert_eq!(code, 0, "verify failed: {line}");
        assert!(line.starts_with("EVM-AGENT VERIFY OK boot_id="), "{line}");
        line
    }

    fn verify_fail(&self) -> String {
        let (code, line) = self.ask("verify");
        assert_eq!(code, 1, "verify did not fail: {line}");
        assert!(line.starts_with("EVM-AGENT VERIFY FAIL "), "{line}");
        line
    }

    /// Polls `status` until `field` (a number) reaches `min`; returns it.
    fn wait_status(&self, field: &str, min: u64) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (code, line) = self.ask("status");
            assert_eq!(code, 0, "{line}");
            let v = field_value(&line, field)
                .split('/')
                .next()
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(v) = v.filter(|&v| v >= min) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{field} never reached {min}: {line}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field_value<'a>(line: &'a str, field: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {field}= in '{line}'"))
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open disk");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).expect("write byte");
}

#[test]
fn disk_workload_verifies_continues_and_catches_damage() {
    let dir = scratch("disk");
    let disk = dir.join("disk.img");
    File::create(&disk).expect("create disk");
    let cmdline = format!(
        "console=ttyS0 evm.workload=disk evm.disk={}",
        disk.display()
    );

    let mut a = Agent::start(&dir, &cmdline);
    let ready = a.wait_line("EVM-AGENT READY ");
    assert_eq!(field_value(&ready, "workload"), "disk");
    let boot_id = field_value(&ready, "boot_id").to_string();
    a.wait_status("disk_seq", 3);
    let ok = a.verify_ok();
    assert_eq!(field_value(&ok, "boot_id"), boot_id);
    let (durable, issued) = field_value(&ok, "disk_seq").split_once('/').expect("d/i");
    assert_eq!(durable, issued, "{ok}");
    drop(a);

    // A new agent (a reboot) continues after the last record on the disk.
    let mut a = Agent::start(&dir, &cmdline);
    let found = a.wait_line("EVM-AGENT disk found seq=");
    let last: u64 = field_value(&found, "seq").parse().expect("seq");
    assert!(last >= 3, "{found}");
    a.wait_line("EVM-AGENT READY ");
    a.wait_status("disk_seq", last + 3);
    a.verify_ok();

    // A flipped byte in an old record: bad checksum.
    flip_byte(&disk, PAGE as u64 + 100);
    let fail = a.verify_fail();
    assert!(fail.contains("disk record 1: bad checksum"), "{fail}");
    flip_byte(&disk, PAGE as u64 + 100);
    a.verify_ok();

    // Records memory knows are durable cut off the disk: disk behind.
    assert_eq!(a.ask("pause"), (0, "EVM-AGENT PAUSED".to_string()));
    let f = OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open disk");
    f.set_len(2 * PAGE as u64).expect("truncate");
    let fail = a.verify_fail();
    assert!(fail.contains("disk behind memory"), "{fail}");
    assert!(fail.contains("disk's last record is 1"), "{fail}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's dirty buffer, read and written through /proc/<pid>/mem.
struct Mem {
    file: File,
    addr: u64,
    pages: usize,
}

impl Mem {
    fn read_all(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.pages * PAGE];
        self.file
            .read_exact_at(&mut buf, self.addr)
            .expect("read agent memory");
        buf
    }

    fn write_page(&self, index: usize, data: &[u8]) {
        self.file
            .write_all_at(data, self.addr + (index * PAGE) as u64)
            .expect("write agent memory");
    }
}

#[test]
fn dirty_workload_verifies_and_catches_stale_and_torn_pages() {
    let dir = scratch("dirty");
    let mut a = Agent::start(&dir, "evm.workload=dirty:4:8");
    let start = a.wait_line("EVM-AGENT dirty start ");
    assert_eq!(field_value(&start, "pages"), "1024");
    let addr = u64::from_str_radix(field_value(&start, "addr").trim_start_matches("0x"), 16)
        .expect("addr");
    let ready = a.wait_line("EVM-AGENT READY ");
    assert_eq!(field_value(&ready, "workload"), "dirty:4:8");
    let mem = Mem {
        file: OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/mem", a.child.id()))
            .expect("open agent memory"),
        addr,
        pages: 1024,
    };

    let gen0 = a.wait_status("dirty_gen", 1024 + 500);
    let ok = a.verify_ok();
    assert_eq!(field_value(&ok, "dirty_pages"), "1024");

    // Snapshot the buffer, let the writer go on, and put back an old copy
    // of a page it has rewritten since: a stale page.
    a.ask("pause");
    let old = a.wait_status("dirty_gen", gen0);
    let before = mem.read_all();
    a.ask("resume");
    a.wait_status("dirty_gen", old + 5000);
    assert_eq!(a.ask("pause").0, 0);
    let now = mem.read_all();
    let page = |buf: &[u8], p: usize| buf[p * PAGE..(p + 1) * PAGE].to_vec();
    let changed: Vec<usize> = (0..1024)
        .filter(|&p| page(&before, p) != page(&now, p))
        .collect();
    assert!(
        changed.len() >= 3,
        "5000 random writes changed only {changed:?}"
    );
    let (p, q, r) = (changed[0], changed[1], changed[2]);
    mem.write_page(p, &page(&before, p));
    let fail = a.verify_fail();
    assert!(
        fail.contains(&format!("dirty page {p}: stale: expected gen ")),
        "{fail}"
    );
    assert!(fail.contains("(1 of 1024 pages bad)"), "{fail}");
    mem.write_page(p, &page(&now, p));
    a.verify_ok();

    // Page q: second half from its previous write (torn); page r: one
    // flipped bit in word 100.
    let mut torn = page(&now, q);
    torn[2048..].copy_from_slice(&page(&before, q)[2048..]);
    mem.write_page(q, &torn);
    let mut flipped = page(&now, r);
    flipped[800] ^= 4;
    mem.write_page(r, &flipped);
    let fail = a.verify_fail();
    assert!(
        fail.contains(&format!("dirty page {q}: torn at word 256")),
        "{fail}"
    );
    assert!(fail.contains("(2 of 1024 pages bad)"), "{fail}");
    mem.write_page(q, &page(&now, q));
    let fail = a.verify_fail();
    assert!(
        fail.contains(&format!("dirty page {r}: torn at word 100")),
        "{fail}"
    );
    mem.write_page(r, &page(&now, r));
    a.verify_ok();

    // Running again, it stays consistent.
    a.ask("resume");
    let g = a.wait_status("dirty_gen", old + 6000);
    a.wait_status("dirty_gen", g + 1000);
    a.verify_ok();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn counter_and_bad_input() {
    let dir = scratch("counter");
    let mut a = Agent::start(&dir, "evm.workload=counter");
    a.wait_line("EVM-AGENT READY ");
    a.wait_line("EVM-AGENT counter 10");
    let ok = a.verify_ok();
    let n: u64 = field_value(&ok, "counter").parse().expect("counter");
    assert!(n >= 10, "{ok}");
    let ok = a.verify_ok();
    assert!(field_value(&ok, "counter").parse::<u64>().expect("counter") >= n);
    drop(a);

    let mut a = Agent::start(&dir, "evm.workload=dirty:lots:8");
    assert_eq!(
        a.wait_line("EVM-AGENT ERROR"),
        "EVM-AGENT ERROR bad workload 'dirty:lots:8'"
    );
    let ready = a.wait_line("EVM-AGENT READY ");
    assert_eq!(field_value(&ready, "workload"), "shell");
    let ok = a.verify_ok();
    assert!(
        ok.ends_with(" counter=- dirty_pages=0 disk_seq=-/-"),
        "{ok}"
    );

    // A second agent on the same socket refuses to start.
    let second = Command::new(BIN)
        .env("EVM_AGENT_CMDLINE", "")
        .env("EVM_AGENT_SOCK", &a.sock)
        .output()
        .expect("run second agent");
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another agent already answers"));

    // A disk that does not exist: reported, and verification says so.
    drop(a);
    let missing = dir.join("no-such-disk");
    let mut a = Agent::start(
        &dir,
        &format!("evm.workload=disk evm.disk={}", missing.display()),
    );
    let err = a.wait_line("EVM-AGENT ERROR disk workload: cannot open disk");
    assert!(err.contains("No such file"), "{err}");
    a.wait_line("EVM-AGENT READY ");
    let fail = a.verify_fail();
    assert!(fail.contains("disk workload not running"), "{fail}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_bad_input() {
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown command 'frobnicate'"), "{err}");

    let out = Command::new(BIN)
        .args(["verify", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));

    let dir = scratch("client");
    let out = Command::new(BIN)
        .arg("verify")
        .env("EVM_AGENT_SOCK", dir.join("nobody.sock"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot ask the agent at"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
