//! A real Linux guest under `evm run`, started through `scripts/run` and
//! driven over its serial console.
//!
//! `scripts/run` runs evm directly on a VT-x/AMD-V host and inside the QEMU
//! TCG test host on a PVM host; either way the guest's console is the
//! child's stdin/stdout and evm's exit status is the child's. A reader
//! thread splits the console into lines; [`Guest::wait_until`] looks for a
//! line after the last one matched, so checks see the console in order.
//!
//! Shell commands are framed by markers: `run_cmd("nproc")` types
//! `echo __EVM_""B_7__; nproc; echo __EVM_""E_7__ $?`. The shell prints
//! `__EVM_B_7__`, the output, then `__EVM_E_7__ <status>`; the terminal's
//! echo of the typed line has `""` inside the markers, so it never matches.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::{evm_bin, guest_image, repo};
use crate::lock::GuestLock;

/// Time from launch to the agent's ready line (L1 and L2 boot under TCG on a
/// busy 2-core machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time for one shell command, or for evm to exit after power-off.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// `EVM_TESTHOST_TIMEOUT` given to `scripts/run`: its hard stop (status 124).
pub const HARD_TIMEOUT_SECS: u32 = 400;
/// Console lines shown in an error.
const TAIL_LINES: usize = 40;

/// Why a guest interaction failed. Every variant carries the end of the
/// console and of stderr, so a failed test shows what the guest did.
#[derive(thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to the guest console: {source}\n{tail}")]
    Send {
        #[source]
        source: std::io::Error,
        tail: String,
    },
    #[error("timed out after {after:?} waiting for {what}\n{tail}")]
    Timeout {
        what: String,
        after: Duration,
        tail: String,
    },
    #[error("evm ended ({status}) while waiting for {what}\n{tail}")]
    Exited {
        what: String,
        status: String,
        tail: String,
    },
    #[error("`{cmd}` exited with status {status}; output:\n{output}\n{tail}")]
    CommandFailed {
        cmd: String,
        status: i32,
        output: String,
        tail: String,
    },
    #[error("unexpected console line for {what}: '{line}'")]
    BadLine { what: String, line: String },
}

// `unwrap()` and `expect()` print Debug; show the readable text instead.
impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The agent's `EVM-AGENT READY ...` line, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    pub boot_id: String,
    pub uptime: f64,
    pub nproc: u32,
    pub workload: String,
    pub line: String,
}

impl Ready {
    /// Parses the ready line (anything before `EVM-AGENT READY` ignored).
    pub fn parse(line: &str) -> Result<Ready, HarnessError> {
        let bad = || HarnessError::BadLine {
            what: "the agent's ready line".into(),
            line: line.to_string(),
        };
        let at = line.find("EVM-AGENT READY ").ok_or_else(bad)?;
        let field = |key: &str| {
            line[at..]
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(bad)
        };
        Ok(Ready {
            boot_id: field("boot_id")?,
            uptime: field("uptime")?.parse().map_err(|_| bad())?,
            nproc: field("nproc")?.parse().map_err(|_| bad())?,
            workload: field("workload")?,
            line: line.to_string(),
        })
    }
}

/// What the reader threads collected.
#[derive(Debug, Default)]
struct Console {
    /// Complete console lines, without `\r` and `\n`.
    lines: Vec<String>,
    /// Bytes after the last `\n` (e.g. the shell prompt).
    partial: Vec<u8>,
    /// stdout reached EOF.
    eof: bool,
    /// evm's (and scripts/run's) stderr.
    stderr: String,
}

impl Console {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).replace('\r', "");
                self.lines.push(line);
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
    }

    fn tail(&self) -> String {
        let from = self.lines.len().saturating_sub(TAIL_LINES);
        let mut s = format!("--- last {} console lines ---\n", self.lines.len() - from);
        for l in &self.lines[from..] {
            s.push_str(l);
            s.push('\n');
        }
        if !self.partial.is_empty() {
            s.push_str(&String::from_utf8_lossy(&self.partial).replace('\r', ""));
            s.push_str("⏎(no newline yet)\n");
        }
        s.push_str("--- stderr ---\n");
        s.push_str(&self.stderr);
        s.push_str("--- end ---");
        s
    }
}

#[derive(Debug, Default)]
struct Shared {
    console: Mutex<Console>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Console> {
        // A reader thread cannot panic while holding the lock, but never
        // lose the transcript over a poisoned mutex.
        self.console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn reader(shared: Arc<Shared>, mut from: impl Read, stdout: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut c = shared.lock();
        if n == 0 {
            if stdout {
                c.eof = true;
            }
            shared.changed.notify_all();
            return;
        }
        if stdout {
            c.push(&buf[..n]);
        } else {
            c.stderr.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        shared.changed.notify_all();
    }
}

/// A Linux guest under `scripts/run`. Holds the real-guest lock for its
/// whole life; on drop kills the run's process group if it is still running
/// and prints the console transcript (shown by the test runner on failure).
#[derive(Debug)]
pub struct Guest {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    /// Index of the first console line not yet matched.
    cursor: usize,
    marker: u32,
    status: Option<ExitStatus>,
    started: Instant,
    _lock: GuestLock,
}

impl Guest {
    /// Boots the default guest (Debian kernel + initramfs, agent shell)
    /// with extra `evm run` flags, e.g. `["--vcpus", "1"]`. Does not wait
    /// for the boot; see [`Guest::wait_ready`].
    pub fn start(name: &str, args: &[&str]) -> Result<Guest, HarnessError> {
        // Fail with "run scripts/setup" rather than in the middle of a boot.
        evm_bin();
        let kernel = guest_image("vmlinuz");
        let initrd = guest_image("initramfs.cpio.gz");
        let lock = GuestLock::acquire().map_err(|source| HarnessError::Spawn {
            what: format!("the real-guest lock {}", GuestLock::path().display()),
            source,
        })?;
        let script = repo().join("scripts/run");
        let mut cmd = Command::new(&script);
        cmd.arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(args)
            // Each test names its own store, or runs without one (the
            // default store would carry state from one test to the next).
            .args(if args.contains(&"--store") {
                &[][..]
            } else {
                &["--no-store"][..]
            })
            .env("EVM_TESTHOST_TIMEOUT", HARD_TIMEOUT_SECS.to_string())
            .envs(crate::host::testhost_smp_for(args))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that drop can kill all of it.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: script.display().to_string(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, out, true));
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, err, false));
        eprintln!(
            "guest {name}: scripts/run {} (waited {:?} for the real-guest lock)",
            args.join(" "),
            lock.waited()
        );
        Ok(Guest {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            shared,
            cursor: 0,
            marker: 0,
            status: None,
            started: Instant::now(),
            _lock: lock,
        })
    }

    /// Time since [`Guest::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The end of the console and stderr, as shown in errors.
    pub fn tail(&self) -> String {
        self.shared.lock().tail()
    }

    /// Waits for the next console line (after the last one matched) for
    /// which `pred` holds, and returns it. Fails after `timeout`, or when
    /// evm has ended, with the end of the console in the error.
    pub fn wait_until(
        &mut self,
        what: &str,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            if let Some(i) = c.lines[self.cursor..].iter().position(|l| pred(l)) {
                let at = self.cursor + i;
                self.cursor = at + 1;
                return Ok(c.lines[at].clone());
            }
            self.cursor = c.lines.len();
            if c.eof {
                drop(c);
                // stdout closed: evm (or scripts/run) is ending.
                let status = self.wait_status(Duration::from_secs(10));
                let c = self.shared.lock();
                return Err(HarnessError::Exited {
                    what: what.to_string(),
                    status: status.map_or_else(|| "still running".into(), |s| s.to_string()),
                    tail: c.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(HarnessError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    tail: c.tail(),
                });
            }
            c = self
                .shared
                .changed
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for the next console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, HarnessError> {
        self.wait_until(&format!("'{needle}'"), |l| l.contains(needle), timeout)
    }

    /// Waits (up to [`BOOT_TIMEOUT`]) for the agent's ready line.
    pub fn wait_ready(&mut self) -> Result<Ready, HarnessError> {
        let line = self.wait_for("EVM-AGENT READY ", BOOT_TIMEOUT)?;
        let ready = Ready::parse(&line)?;
        eprintln!(
            "guest {}: ready after {:.1}s: {}",
            self.name,
            self.elapsed().as_secs_f64(),
            ready.line
        );
        Ok(ready)
    }

    /// Writes raw bytes to the guest console (e.g. `b"\x01x"`, evm's escape).
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), HarnessError> {
        let res = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(bytes).and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin already closed")),
        };
        res.map_err(|source| HarnessError::Send {
            source,
            tail: self.tail(),
        })
    }

    /// Types `line` and Enter.
    pub fn send_line(&mut self, line: &str) -> Result<(), HarnessError> {
        self.send(format!("{line}\n").as_bytes())
    }

    /// Runs `cmd` in the guest shell (within [`CMD_TIMEOUT`]) and returns
    /// its exit status and output (stdout and stderr as the console shows
    /// them, `\r` removed, without the final newline).
    pub fn run_status(&mut self, cmd: &str) -> Result<(i32, String), HarnessError> {
        self.marker += 1;
        let n = self.marker;
        // `""` keeps the typed (echoed) line from matching the markers.
        self.send_line(&format!(
            "echo __EVM_\"\"B_{n}__; {cmd}; echo __EVM_\"\"E_{n}__ $?"
        ))?;
        let begin = format!("__EVM_B_{n}__");
        let end = format!("__EVM_E_{n}__ ");
        let what = format!("the start of `{cmd}`");
        self.wait_until(&what, |l| l.trim_end().ends_with(&begin), CMD_TIMEOUT)?;
        let from = self.cursor;
        let what = format!("the end of `{cmd}`");
        let last = self.wait_until(&what, |l| l.contains(&end), CMD_TIMEOUT)?;
        let c = self.shared.lock();
        let mut out: Vec<&str> = c.lines[from..self.cursor - 1]
            .iter()
            .map(String::as_str)
            .collect();
        // Output without a final newline shares a line with the end marker.
        let (before, after) = last.split_once(&end).expect("matched the end marker");
        if !before.is_empty() {
            out.push(before);
        }
        let status = after.trim().parse().map_err(|_| HarnessError::BadLine {
            what: format!("the exit status of `{cmd}`"),
            line: last.clone(),
        })?;
        Ok((status, out.join("\n")))
    }

    /// Runs `cmd` in the guest shell; fails unless it exits 0. Returns its
    /// output (see [`Guest::run_status`]).
    pub fn run_cmd(&mut self, cmd: &str) -> Result<String, HarnessError> {
        let (status, output) = self.run_status(cmd)?;
        if status != 0 {
            return Err(HarnessError::CommandFailed {
                cmd: cmd.to_string(),
                status,
                output,
                tail: self.tail(),
            });
        }
        Ok(output)
    }

    fn wait_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status.is_none() {
                self.status = self.child.try_wait().ok().flatten();
            }
            if self.status.is_some() || Instant::now() >= deadline {
                return self.status;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for evm (through `scripts/run`) to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        match self.wait_status(timeout) {
            Some(status) => {
                // Let the reader take the last output before the caller
                // looks at it (bounded: a leftover holder of the pipe must
                // not hang the test).
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut c = self.shared.lock();
                while !c.eof && Instant::now() < deadline {
                    c = self
                        .shared
                        .changed
                        .wait_timeout(c, Duration::from_millis(100))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                drop(c);
                eprintln!(
                    "guest {}: evm exited ({status}) after {:.1}s",
                    self.name,
                    self.elapsed().as_secs_f64()
                );
                Ok(status)
            }
            None => Err(HarnessError::Timeout {
                what: "evm to exit".into(),
                after: timeout,
                tail: self.tail(),
            }),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        if self.status.is_none() {
            // Still running (the test failed): kill scripts/run, QEMU and
            // anything else in the group, then reap.
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill takes no pointers; -pid names the process
                // group this guest's child leads (process_group(0) at spawn),
                // and the child is not reaped yet, so the id is still ours.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = self.child.wait();
        }
        let c = self.shared.lock();
        eprintln!(
            "guest {}: transcript ({:.1}s):\n{}\n{}\n--- stderr ---\n{}--- end of guest {} ---",
            self.name,
            self.elapsed().as_secs_f64(),
            c.lines.join("\n"),
            String::from_utf8_lossy(&c.partial),
            c.stderr,
            self.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_parsed() {
        let r = Ready::parse(
            "junk EVM-AGENT READY boot_id=1fedfce8-7e9e-4e43-af3b-81944173d765 uptime=5.54 nproc=2 workload=shell",
        )
        .unwrap();
        assert_eq!(r.boot_id, "1fedfce8-7e9e-4e43-af3b-81944173d765");
        assert_eq!((r.uptime, r.nproc, r.workload.as_str()), (5.54, 2, "shell"));
        assert!(
            Ready::parse("EVM-AGENT READY boot_id=x uptime=1 nproc=two workload=shell").is_err()
        );
        assert!(Ready::parse("EVM-AGENT READY boot_id=x uptime=1").is_err());
    }

    #[test]
    fn console_splits_lines_and_drops_carriage_returns() {
        let mut c = Console::default();
        c.push(b"a\r\nb");
        c.push(b"c\r\r\nd# ");
        assert_eq!(c.lines, ["a", "bc"]);
        assert_eq!(c.partial, b"d# ");
        assert!(c.tail().contains("d# ⏎(no newline yet)"));
    }
}
