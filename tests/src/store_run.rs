//! One `scripts/run` of a Linux VM that has a store: the checkpoint and
//! resume tests start it, talk to the guest shell, watch evm's log
//! (`EVM_LOG=info`: `epoch N committed`, `resumed from epoch N`), and end
//! it with `SIGKILL` (a power cut for the store in the test host), `SIGTERM`
//! (a final epoch) or a guest power-off.
//!
//! Unlike [`crate::Guest`], it passes exactly the flags it is given (so
//! `scripts/run --store S` alone resumes what S holds) and keeps evm's
//! stderr as lines next to the console's, in arrival order, each with its
//! arrival time. Waits take an explicit starting index ([`StoreRun::mark`])
//! instead of a cursor, so a test can ask for "the next commit after this
//! command" while commands run in between.
//!
//! Shell commands use the same markers as [`crate::Guest::run_cmd`]; the
//! agent's own console lines (`EVM-AGENT counter ...`), which can land in
//! the middle of a command's output, are left out of the output returned.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::evm_process::{EpochLine, Stream, resumed_epoch};
use crate::guest::{HarnessError, Ready};
use crate::host::{KvmKind, evm_bin, kvm_kind, repo};
use crate::lock::GuestLock;

/// `EVM_TESTHOST_TIMEOUT` of each run: `scripts/run`'s own hard stop.
pub const RUN_HARD_TIMEOUT_SECS: u32 = 1200;
/// Lines shown in an error.
const TAIL_LINES: usize = 100;

/// One line of the console (stdout) or of evm's stderr.
#[derive(Debug, Clone)]
pub struct Line {
    pub stream: Stream,
    /// Without `\r` and `\n`.
    pub text: String,
    /// When the reader thread received it.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Lines {
    lines: Vec<Line>,
    /// Bytes of each stream after its last `\n` (e.g. the shell prompt).
    partial: [Vec<u8>; 2],
    /// Streams that reached EOF.
    closed: u8,
}

#[derive(Debug, Default)]
struct Shared {
    lines: Mutex<Lines>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn reader(shared: Arc<Shared>, mut from: impl Read, stream: Stream) {
    let mut buf = [0u8; 4096];
    loop {
        let n = from.read(&mut buf).unwrap_or(0);
        let mut l = shared.lock();
        if n == 0 {
            l.closed += 1;
            shared.changed.notify_all();
            return;
        }
        let at = Instant::now();
        for &b in &buf[..n] {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&l.partial[index(stream)]).replace('\r', "");
                l.partial[index(stream)].clear();
                l.lines.push(Line { stream, text, at });
            } else {
                l.partial[index(stream)].push(b);
            }
        }
        shared.changed.notify_all();
    }
}

/// Whether `scripts/run` runs evm inside the test host: the same rule as
/// `scripts/run` (`EVM_TESTHOST`, else the kind of `/dev/kvm`).
fn in_testhost() -> bool {
    match std::env::var("EVM_TESTHOST").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => kvm_kind() == KvmKind::Pvm,
    }
}

/// The counter value in an agent line: `EVM-AGENT counter <n>`, or the
/// `counter=<n>` field of a status or verify reply.
pub fn agent_counter(line: &str) -> Option<u64> {
    let at = line.find("EVM-AGENT ")?;
    let rest = &line[at + "EVM-AGENT ".len()..];
    if let Some(n) = rest.strip_prefix("counter ") {
        return n.split_whitespace().next()?.parse().ok();
    }
    agent_field(line, "counter")?.parse().ok()
}

/// The value of `key=<value>` in an agent reply line.
pub fn agent_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find("EVM-AGENT ")?;
    line[at..]
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A console line printed by the agent (PID 1) on its own, not by a command.
fn is_agent_chatter(line: &str) -> bool {
    [
        "EVM-AGENT counter ",
        "EVM-AGENT dirty ",
        "EVM-AGENT disk seq=",
    ]
    .iter()
    .any(|p| line.contains(p))
}

/// A `scripts/run` child and everything it printed so far. Holds the
/// real-guest lock for its life. On drop it kills the run if it still runs
/// (`SIGKILL` to its process group) and prints the transcript.
#[derive(Debug)]
pub struct StoreRun {
    name: String,
    args: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    marker: u32,
    status: Option<ExitStatus>,
    started: Instant,
    _lock: GuestLock,
}

impl StoreRun {
    /// Starts `scripts/run args...` with `EVM_LOG=info` and `env` added.
    /// Nothing is added to `args`: no kernel, no `--no-store`.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self, HarnessError> {
        evm_bin();
        let lock = GuestLock::acquire().map_err(|source| HarnessError::Spawn {
            what: format!("the real-guest lock {}", GuestLock::path().display()),
            source,
        })?;
        let script = repo().join("scripts/run");
        let mut cmd = Command::new(&script);
        cmd.args(args)
            .env("EVM_LOG", "info")
            .env("EVM_TESTHOST_TIMEOUT", RUN_HARD_TIMEOUT_SECS.to_string())
            .envs(crate::host::testhost_smp_for(args))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: script.display().to_string(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, out, Stream::Stdout));
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, err, Stream::Stderr));
        eprintln!(
            "run {name}: scripts/run {} (waited {:.1}s for the real-guest lock)",
            args.join(" "),
            lock.waited().as_secs_f64()
        );
        Ok(StoreRun {
            name: name.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: child.stdin.take(),
            child,
            shared,
            marker: 0,
            status: None,
            started: Instant::now(),
            _lock: lock,
        })
    }

    /// The run's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When `scripts/run` was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The number of lines received so far: a starting point for waits.
    pub fn mark(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// A copy of the lines from index `from` on.
    pub fn lines_from(&self, from: usize) -> Vec<Line> {
        let l = self.shared.lock();
        l.lines[from.min(l.lines.len())..].to_vec()
    }

    /// Every `epoch N committed` line received so far, with its index and
    /// arrival time.
    pub fn commits(&self) -> Vec<(usize, Instant, EpochLine)> {
        let l = self.shared.lock();
        l.lines
            .iter()
            .enumerate()
            .filter(|(_, x)| x.stream == Stream::Stderr)
            .filter_map(|(i, x)| EpochLine::parse(&x.text).map(|e| (i, x.at, e)))
            .collect()
    }

    /// The last lines of both streams, as shown in errors.
    pub fn tail(&self) -> String {
        let l = self.shared.lock();
        let from = l.lines.len().saturating_sub(TAIL_LINES);
        let mut s = format!(
            "--- run {} (scripts/run {}): last {} of {} lines (O console, E stderr) ---\n",
            self.name,
            self.args.join(" "),
            l.lines.len() - from,
            l.lines.len()
        );
        for x in &l.lines[from..] {
            push_line(&mut s, self.started, x);
        }
        for (i, p) in l.partial.iter().enumerate() {
            if !p.is_empty() {
                let _ = writeln!(
                    s,
                    "{} {}⏎(no newline yet)",
                    ["O", "E"][i],
                    String::from_utf8_lossy(p).replace('\r', "")
                );
            }
        }
        s.push_str("--- end ---");
        s
    }

    /// Waits for the first line at index `from` or later for which `pred`
    /// holds; returns its index and the line. Fails after `timeout`, or
    /// when `scripts/run` has ended, with the end of the transcript.
    pub fn wait_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Line) -> bool,
    ) -> Result<(usize, Line), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut at = from;
        let mut l = self.shared.lock();
        loop {
            if let Some(i) = l.lines.get(at..).and_then(|s| s.iter().position(&pred)) {
                let i = at + i;
                return Ok((i, l.lines[i].clone()));
            }
            at = at.max(l.lines.len());
            if l.closed == 2 {
                // evm's own words on why, e.g. a triple fault after a resume.
                let why: Vec<&str> = l
                    .lines
                    .iter()
                    .filter(|x| x.stream == Stream::Stderr)
                    .map(|x| x.text.as_str())
                    .filter(|t| {
                        t.contains("triple fault")
                            || t.contains("guest ended")
                            || t.starts_with("evm: error")
                            || (t.starts_with("evm: ") && !t.starts_with("evm: info: "))
                    })
                    .collect();
                let why = why.join("; ");
                drop(l);
                let status = self.wait_status(Duration::from_secs(10));
                return Err(HarnessError::Exited {
                    what: format!("{what} [evm said: {why}]"),
                    status: status.map_or_else(|| "still running".into(), |s| s.to_string()),
                    tail: self.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(l);
                self.dump_threads();
                return Err(HarnessError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            l = self
                .shared
                .changed
                .wait_timeout(l, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// In the test host, asks `scripts/run` (SIGUSR1) to print what evm's
    /// threads are doing in L1 (state, wait channel, system call, kernel
    /// stack) and L1's recent kernel log to stderr — or, if L1 does not
    /// answer, QEMU's CPU use and L1's registers — and waits for it, so that
    /// a timeout shows where a stuck run was stuck. Directly on the host
    /// (where `scripts/run` is evm itself) it does nothing.
    pub fn dump_threads(&mut self) {
        if !in_testhost() || self.wait_status(Duration::ZERO).is_some() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) takes two integers and touches no memory of
            // ours; `pid` is our unreaped child. scripts/run handles
            // SIGUSR1 (ignores it until the test host runs).
            unsafe { libc::kill(pid, libc::SIGUSR1) };
        }
        thread::sleep(Duration::from_secs(12));
    }

    /// Waits for a console line containing `needle` at index `from` or later.
    pub fn wait_console(
        &mut self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(usize, Line), HarnessError> {
        self.wait_from(from, &format!("console '{needle}'"), timeout, |l| {
            l.stream == Stream::Stdout && l.text.contains(needle)
        })
    }

    /// Waits for the agent's ready line (a boot, not a resume).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ready, HarnessError> {
        let (_, line) = self.wait_console(0, "EVM-AGENT READY ", timeout)?;
        let ready = Ready::parse(&line.text)?;
        eprintln!(
            "run {}: booted, ready after {:.1}s: {}",
            self.name,
            line.at.duration_since(self.started).as_secs_f64(),
            ready.line
        );
        Ok(ready)
    }

    /// Waits for evm's `resumed from epoch N` and returns N and the time
    /// from launch. A boot instead (the agent's ready line) fails at once.
    pub fn wait_resumed(&mut self, timeout: Duration) -> Result<(u64, Duration), HarnessError> {
        let (_, line) = self.wait_from(0, "evm's 'resumed from epoch'", timeout, |l| {
            (l.stream == Stream::Stderr && resumed_epoch(&l.text).is_some())
                || (l.stream == Stream::Stdout && l.text.contains("EVM-AGENT READY "))
        })?;
        match resumed_epoch(&line.text) {
            Some(epoch) => {
                let after = line.at.duration_since(self.started);
                eprintln!(
                    "run {}: resumed from epoch {epoch} after {:.1}s",
                    self.name,
                    after.as_secs_f64()
                );
                Ok((epoch, after))
            }
            None => Err(HarnessError::BadLine {
                what: format!("a resume (the guest booted instead)\n{}", self.tail()),
                line: line.text,
            }),
        }
    }

    /// Waits for the first `epoch N committed` line at index `from` or later.
    pub fn wait_commit(
        &mut self,
        from: usize,
        timeout: Duration,
    ) -> Result<(usize, EpochLine), HarnessError> {
        let (i, line) = self.wait_from(from, "an 'epoch N committed' line", timeout, |l| {
            l.stream == Stream::Stderr && EpochLine::parse(&l.text).is_some()
        })?;
        Ok((i, EpochLine::parse(&line.text).expect("matched")))
    }

    /// Writes raw bytes to the guest console.
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

    /// Runs `cmd` in the guest shell within `timeout`; returns its status,
    /// its output (agent chatter removed, no final newline) and the index of
    /// its end marker line.
    pub fn run_status(
        &mut self,
        cmd: &str,
        timeout: Duration,
    ) -> Result<(i32, String, usize), HarnessError> {
        self.marker += 1;
        let n = self.marker;
        let from = self.mark();
        // `""` keeps the echoed command line from matching the markers.
        self.send_line(&format!(
            "echo __EVM_\"\"B_{n}__; {cmd}; echo __EVM_\"\"E_{n}__ $?"
        ))?;
        let begin = format!("__EVM_B_{n}__");
        let end = format!("__EVM_E_{n}__ ");
        let (b, _) = self.wait_from(from, &format!("the start of `{cmd}`"), timeout, |l| {
            l.stream == Stream::Stdout && l.text.trim_end().ends_with(&begin)
        })?;
        let (e, last) = self.wait_from(b + 1, &format!("the end of `{cmd}`"), timeout, |l| {
            l.stream == Stream::Stdout && l.text.contains(&end)
        })?;
        let mut out: Vec<String> = self
            .lines_from(b + 1)
            .into_iter()
            .take(e - b - 1)
            .filter(|l| l.stream == Stream::Stdout && !is_agent_chatter(&l.text))
            .map(|l| l.text)
            .collect();
        let (before, after) = last.text.split_once(&end).expect("matched the end marker");
        if !before.is_empty() && !is_agent_chatter(before) {
            out.push(before.to_string());
        }
        let status = after.trim().parse().map_err(|_| HarnessError::BadLine {
            what: format!("the exit status of `{cmd}`"),
            line: last.text.clone(),
        })?;
        Ok((status, out.join("\n"), e))
    }

    /// Runs `cmd`; fails unless it exits 0. Returns its output.
    pub fn run_cmd(&mut self, cmd: &str, timeout: Duration) -> Result<String, HarnessError> {
        let (status, output, _) = self.run_status(cmd, timeout)?;
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

    /// Runs an `evm-agent` request (`status`, `verify`) and returns its
    /// reply line (`EVM-AGENT STATUS ...`) and the index of the command's
    /// end. A reply other than `EVM-AGENT <WORD>` fails.
    pub fn agent(
        &mut self,
        request: &str,
        word: &str,
        timeout: Duration,
    ) -> Result<(String, usize), HarnessError> {
        let (status, out, end) = self.run_status(&format!("evm-agent {request}"), timeout)?;
        let want = format!("EVM-AGENT {word}");
        match out.lines().find(|l| l.contains(&want)) {
            Some(line) if status == 0 => {
                let at = line.find(&want).expect("found");
                Ok((line[at..].to_string(), end))
            }
            _ => Err(HarnessError::CommandFailed {
                cmd: format!("evm-agent {request} (expecting {want})"),
                status,
                output: out,
                tail: self.tail(),
            }),
        }
    }

    /// Sends `signal` to the `scripts/run` process itself (not its group):
    /// `SIGKILL` kills the test host with it (a power cut), `SIGTERM` is
    /// forwarded to evm.
    pub fn signal(&mut self, signal: i32) -> Result<(), HarnessError> {
        if self.wait_status(Duration::ZERO).is_some() {
            return Err(HarnessError::Exited {
                what: format!("sending signal {signal}"),
                status: self.status.map(|s| s.to_string()).unwrap_or_default(),
                tail: self.tail(),
            });
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes two integers and touches no memory of ours;
        // `pid` is our own child, not reaped yet (checked above), so the
        // number cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(HarnessError::Spawn {
                what: format!("kill -{signal} {pid}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `kill -9` of `scripts/run` (QEMU dies with it), then reaps it.
    pub fn power_cut(&mut self) -> Result<ExitStatus, HarnessError> {
        self.signal(libc::SIGKILL)?;
        self.stdin = None;
        self.wait_exit(Duration::from_secs(60))
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
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `scripts/run` to exit, lets the readers drain, returns
    /// the status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let Some(status) = self.wait_status(timeout) else {
            self.dump_threads();
            return Err(HarnessError::Timeout {
                what: "scripts/run to exit".into(),
                after: timeout,
                tail: self.tail(),
            });
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut l = self.shared.lock();
        while l.closed < 2 && Instant::now() < deadline {
            l = self
                .shared
                .changed
                .wait_timeout(l, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(l);
        eprintln!(
            "run {}: exited ({status}) after {:.1}s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        Ok(status)
    }
}

fn push_line(s: &mut String, started: Instant, x: &Line) {
    let tag = match x.stream {
        Stream::Stdout => "O",
        Stream::Stderr => "E",
    };
    let _ = writeln!(
        s,
        "{:8.2} {tag} {}",
        x.at.saturating_duration_since(started).as_secs_f64(),
        x.text
    );
}

impl Drop for StoreRun {
    fn drop(&mut self) {
        if self.wait_status(Duration::ZERO).is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill takes no pointers; -pid names the process
                // group this run's child leads (process_group(0) at spawn),
                // and the child is not reaped yet, so the id is still ours.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = self.child.wait();
        }
        let l = self.shared.lock();
        let mut s = format!(
            "run {}: transcript (scripts/run {}), seconds since launch, O console, E stderr:\n",
            self.name,
            self.args.join(" ")
        );
        for x in &l.lines {
            push_line(&mut s, self.started, x);
        }
        let _ = write!(s, "--- end of run {} ---", self.name);
        eprintln!("{s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_lines_are_parsed() {
        assert_eq!(agent_counter("EVM-AGENT counter 120"), Some(120));
        assert_eq!(agent_counter("# EVM-AGENT counter 7"), Some(7));
        let status = "EVM-AGENT STATUS boot_id=ab-cd uptime=3.1 workload=counter counter=31 \
                      dirty_gen=- disk_seq=-/- paused=no";
        assert_eq!(agent_counter(status), Some(31));
        assert_eq!(agent_field(status, "boot_id"), Some("ab-cd"));
        assert_eq!(agent_field(status, "dirty_gen"), Some("-"));
        assert_eq!(agent_counter("EVM-AGENT STATUS counter=-"), None);
        assert_eq!(agent_counter("counter 5"), None);
        assert!(is_agent_chatter("# EVM-AGENT counter 5"));
        assert!(is_agent_chatter("EVM-AGENT dirty gen=5 rate=4"));
        assert!(!is_agent_chatter(status));
    }

    #[test]
    fn lines_keep_streams_apart_and_wait_from_an_index() {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        reader(s, &b"a\r\nb"[..], Stream::Stdout);
        let s = Arc::clone(&shared);
        reader(s, &b"evm: info: x\n"[..], Stream::Stderr);
        let l = shared.lock();
        let texts: Vec<(&str, Stream)> = l
            .lines
            .iter()
            .map(|x| (x.text.as_str(), x.stream))
            .collect();
        assert_eq!(
            texts,
            [("a", Stream::Stdout), ("evm: info: x", Stream::Stderr)]
        );
        assert_eq!(l.partial[0], b"b");
        assert_eq!(l.closed, 2);
    }
}
