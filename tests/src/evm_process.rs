//! One `evm run` as a long-lived child process that a test drives from
//! outside: start it, read its stdout (the guest's console) and stderr
//! (evm's log) line by line as they come, wait for a line, send it any
//! signal (`SIGKILL` at a random instant, `SIGTERM` for a final epoch), and
//! reap it. Used by the kill tests with the probe guest, which need no
//! test host: the probe runs on this machine's own `/dev/kvm`.
//!
//! Also here: the probe image ([`probe_elf`]), a small seeded generator for
//! reproducible kill instants ([`SplitMix64`], [`seed_from_env`]), the
//! parsers of evm's checkpoint log lines ([`EpochLine`], [`resumed_epoch`])
//! and of the probe's lines ([`probe_failure`], [`verified_vcpu`],
//! [`last_counts`]).

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::{cache_dir, repo};

/// Lines of each stream shown in an error.
const TAIL_LINES: usize = 30;

/// Which of evm's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The guest's console (COM1).
    Stdout,
    /// evm's own messages and log.
    Stderr,
}

/// One line of output, without its `\r\n`.
#[derive(Debug, Clone)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
    /// When the reader thread received it.
    pub at: Instant,
    /// The stream ended before a `\n` (the process died mid-line).
    pub partial: bool,
}

/// What a [`EvmProcess::wait_for`] predicate says about one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not the line waited for; keep reading.
    No,
    /// The line waited for.
    Yes,
    /// A line that fails the wait at once (e.g. `PROBE VERIFY FAIL`).
    Bad(String),
}

/// Why driving an evm process failed. Each variant carries the ends of both
/// streams, so a failed test shows what evm and the guest said.
#[derive(thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd}: nothing matching {what} after {after:?}\n{tail}")]
    Timeout {
        cmd: String,
        what: String,
        after: Duration,
        tail: String,
    },
    #[error("{cmd}: evm ended ({status}) while waiting for {what}\n{tail}")]
    Exited {
        cmd: String,
        what: String,
        status: String,
        tail: String,
    },
    #[error("{cmd}: while waiting for {what}: {reason}\n{tail}")]
    Bad {
        cmd: String,
        what: String,
        reason: String,
        tail: String,
    },
    #[error("{cmd}: cannot send signal {signal}: {source}")]
    Signal {
        cmd: String,
        signal: i32,
        #[source]
        source: std::io::Error,
    },
}

// `unwrap()` and `expect()` print Debug; show the readable text instead.
impl fmt::Debug for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

enum Msg {
    Line(Line),
    Eof,
}

fn reader(from: impl Read, stream: Stream, to: Sender<Msg>) {
    let mut from = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match from.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let partial = buf.last() != Some(&b'\n');
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = Line {
                    stream,
                    text: String::from_utf8_lossy(&buf).into_owned(),
                    at: Instant::now(),
                    partial,
                };
                if to.send(Msg::Line(line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.send(Msg::Eof);
}

/// A running (or ended) `evm` process and everything it printed so far.
#[derive(Debug)]
pub struct EvmProcess {
    cmd: String,
    child: Child,
    /// Held open while evm runs: EOF on stdin is not an instruction to evm.
    stdin: Option<ChildStdin>,
    rx: Receiver<Msg>,
    lines: Vec<Line>,
    /// Index of the first line no wait has looked at yet.
    cursor: usize,
    open_streams: u8,
    status: Option<ExitStatus>,
    started: Instant,
}

impl EvmProcess {
    /// Starts `bin args...` with `env` added, stdin a pipe held open,
    /// stdout and stderr read by two threads.
    pub fn spawn(bin: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Self, ProcessError> {
        let cmd = format!("{} {}", bin.display(), shell_words(args));
        let mut command = Command::new(bin);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
        let (tx, rx) = channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        thread::spawn(move || reader(out, Stream::Stdout, tx));
        thread::spawn(move || reader(err, Stream::Stderr, tx2));
        Ok(EvmProcess {
            cmd,
            stdin: child.stdin.take(),
            child,
            rx,
            lines: Vec::new(),
            cursor: 0,
            open_streams: 2,
            status: None,
            started: Instant::now(),
        })
    }

    /// The command line, for messages.
    pub fn cmd(&self) -> &str {
        &self.cmd
    }

    /// Time since the process was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Every line received so far, both streams in arrival order.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// The lines of one stream received so far.
    pub fn stream(&self, stream: Stream) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(move |l| l.stream == stream)
    }

    /// The last lines of both streams, for error messages.
    pub fn tail(&self) -> String {
        let mut s = String::new();
        for (name, stream) in [("stdout", Stream::Stdout), ("stderr", Stream::Stderr)] {
            let all: Vec<&Line> = self.stream(stream).collect();
            let skip = all.len().saturating_sub(TAIL_LINES);
            s.push_str(&format!(
                "--- {name} of `{}` (last {} of {} lines)\n",
                self.cmd,
                all.len() - skip,
                all.len()
            ));
            for l in &all[skip..] {
                s.push_str(&l.text);
                s.push_str(if l.partial { "⏎(cut)\n" } else { "\n" });
            }
        }
        if let Some(status) = self.status {
            s.push_str(&format!("--- {status}\n"));
        }
        s
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(l) => self.lines.push(l),
            Msg::Eof => self.open_streams = self.open_streams.saturating_sub(1),
        }
    }

    /// Moves every line already received into `lines`, without blocking.
    pub fn poll(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.take(msg);
        }
    }

    /// Reads lines until `pred` says [`Seen::Yes`] to one that no earlier
    /// wait has looked at; returns it. Fails if `pred` says [`Seen::Bad`],
    /// if both streams end first, or after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Line) -> Seen,
    ) -> Result<Line, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            while self.cursor < self.lines.len() {
                let i = self.cursor;
                self.cursor += 1;
                match pred(&self.lines[i]) {
                    Seen::No => {}
                    Seen::Yes => return Ok(self.lines[i].clone()),
                    Seen::Bad(reason) => {
                        self.poll();
                        return Err(ProcessError::Bad {
                            cmd: self.cmd.clone(),
                            what: what.to_string(),
                            reason,
                            tail: self.tail(),
                        });
                    }
                }
            }
            if self.open_streams == 0 {
                let status = self.reap_blocking(Duration::from_secs(10));
                return Err(ProcessError::Exited {
                    cmd: self.cmd.clone(),
                    what: what.to_string(),
                    status,
                    tail: self.tail(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProcessError::Timeout {
                    cmd: self.cmd.clone(),
                    what: what.to_string(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.open_streams = 0,
            }
        }
    }

    /// [`EvmProcess::wait_for`], but running out of time is not an error:
    /// `Ok(None)`.
    pub fn wait_maybe(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&Line) -> Seen,
    ) -> Result<Option<Line>, ProcessError> {
        match self.wait_for(what, timeout, pred) {
            Ok(l) => Ok(Some(l)),
            Err(ProcessError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `signal` to evm (nothing if it has already been reaped).
    pub fn signal(&mut self, signal: i32) -> Result<(), ProcessError> {
        if self.status.is_some() || self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes two integers and touches no memory of ours;
        // `pid` is our own child, not yet reaped (try_wait above), so the
        // number cannot have been reused by another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(ProcessError::Signal {
                cmd: self.cmd.clone(),
                signal,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for evm to exit, then for both streams to end;
    /// returns the status as text (or says it is still running).
    fn reap_blocking(&mut self, timeout: Duration) -> String {
        match self.wait_exit(timeout) {
            Ok(status) => status.to_string(),
            Err(_) => format!("still running after {timeout:?}"),
        }
    }

    /// Waits up to `timeout` for evm to exit by itself and for its output
    /// to end; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.status {
                break status;
            }
            if let Some(status) = self.child.try_wait().expect("wait for evm") {
                self.status = Some(status);
                break status;
            }
            if Instant::now() >= deadline {
                self.poll();
                return Err(ProcessError::Timeout {
                    cmd: self.cmd.clone(),
                    what: "evm to exit".into(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.open_streams = 0,
            }
        };
        self.stdin = None;
        // evm has exited: its pipes end as soon as the readers drain them.
        let drain_until = Instant::now() + Duration::from_secs(10);
        while self.open_streams > 0 {
            let left = drain_until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.take(msg),
                Err(_) => break,
            }
        }
        Ok(status)
    }

    /// `SIGKILL`, then reap and collect every line it printed.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        self.signal(libc::SIGKILL)?;
        self.wait_exit(Duration::from_secs(60))
    }

    /// The exit status, once reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }
}

impl Drop for EvmProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the probe guest with `guest-images/probe/build.sh` (once per
/// test process; the script itself rebuilds only on change) and returns
/// `<cache>/probe/probe.elf`.
pub fn probe_elf() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let script = repo().join("guest-images/probe/build.sh");
        let out = Command::new("sh")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    cache_dir().join("probe/probe.elf")
}

/// splitmix64: a tiny, well-mixed generator, so that a seed gives the same
/// kill instants and choices on every machine.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        // Multiply-shift: bias below 2^-64 * n, irrelevant here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[lo, hi)` with microsecond resolution.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros().max(1);
        lo + Duration::from_micros(self.below(u64::try_from(span).unwrap_or(u64::MAX)))
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// An independent generator for sub-task `index`.
    pub fn fork(&self, index: u64) -> SplitMix64 {
        let mut g = SplitMix64(self.0 ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        SplitMix64(g.next_u64())
    }
}

/// The seed in env `var` (decimal or `0x` hex), else `default`. Panics on
/// a value that is neither, naming it.
pub fn seed_from_env(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => {
            let t = v.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{var}={v}: not a decimal or 0x-hex u64"))
        }
        _ => default,
    }
}

/// A number in env `var`, else `default`. Panics on a value that is not.
pub fn number_from_env(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v}: not a number")),
        _ => default,
    }
}

/// evm's per-epoch log line (`EVM_LOG=info`):
/// `evm: info: epoch <n> committed: freeze <µs> µs, <pages> dirty pages,
/// [<blocks> disk blocks,] <MiB> MiB, commit <µs> µs`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochLine {
    pub epoch: u64,
    pub freeze_us: u64,
    pub dirty_pages: u64,
    /// Disk blocks in the epoch (0 when the line does not say).
    pub disk_blocks: u64,
    pub mib: f64,
    pub commit_us: u64,
}

impl EpochLine {
    /// Parses the line, or `None` if it is not one.
    pub fn parse(line: &str) -> Option<EpochLine> {
        let rest = line.strip_prefix("evm: info: epoch ")?;
        let (epoch, rest) = rest.split_once(" committed: ")?;
        let mut freeze_us = None;
        let mut dirty_pages = None;
        let mut disk_blocks = 0;
        let mut mib = None;
        let mut commit_us = None;
        for part in rest.split(", ") {
            let words: Vec<&str> = part.split_whitespace().collect();
            match words.as_slice() {
                ["freeze", n, "µs" | "us"] => freeze_us = n.parse().ok(),
                [n, "dirty", "pages"] => dirty_pages = n.parse().ok(),
                [n, "disk", "blocks"] => disk_blocks = n.parse().ok()?,
                [n, "MiB"] => mib = n.parse().ok(),
                ["commit", n, "µs" | "us"] => commit_us = n.parse().ok(),
                _ => {}
            }
        }
        Some(EpochLine {
            epoch: epoch.parse().ok()?,
            freeze_us: freeze_us?,
            dirty_pages: dirty_pages?,
            disk_blocks,
            mib: mib?,
            commit_us: commit_us?,
        })
    }
}

/// `N` from evm's `evm: info: resumed from epoch N`.
pub fn resumed_epoch(line: &str) -> Option<u64> {
    line.strip_prefix("evm: info: resumed from epoch ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `N` from evm's `evm: info: final epoch N committed`.
pub fn final_epoch(line: &str) -> Option<u64> {
    line.strip_prefix("evm: info: final epoch ")?
        .strip_suffix(" committed")?
        .parse()
        .ok()
}

/// The numeric value of `key=<n>` in a probe line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Why a line ends a probe kill test at once, wherever it is seen: a
/// failed verify or a probe error; the probe ending (it dirties until
/// stopped); a boot instead of a resume (`resumed`); an error from evm.
pub fn probe_failure(l: &Line, resumed: bool) -> Option<String> {
    if l.stream == Stream::Stdout {
        if l.text.contains("VERIFY FAIL") || l.text.contains("PROBE ERROR") {
            return Some(format!("the probe says: {}", l.text));
        }
        if !l.partial && l.text.starts_with("PROBE DONE") {
            return Some("the probe ended (it dirties until stopped)".into());
        }
        if resumed && !l.partial && l.text.starts_with("PROBE READY") {
            return Some("the guest booted again instead of resuming".into());
        }
    } else if l.text.starts_with("evm: error:") {
        return Some(format!("evm logged an error: {}", l.text));
    }
    None
}

/// `Some(vcpu)` for a whole periodic-verify line `PROBE VERIFY OK pages=n vcpu=i`.
pub fn verified_vcpu(l: &Line) -> Option<u64> {
    if l.stream == Stream::Stdout && !l.partial && l.text.starts_with("PROBE VERIFY OK ") {
        field(&l.text, "vcpu")
    } else {
        None
    }
}

/// The latest `PROBE count vcpu=<i> at=<c>` per vCPU among `lines`.
pub fn last_counts(lines: &[Line], vcpus: u64) -> Vec<Option<u64>> {
    let mut at = vec![None; vcpus as usize];
    for l in lines {
        if l.stream == Stream::Stdout
            && !l.partial
            && l.text.starts_with("PROBE count vcpu=")
            && let (Some(v), Some(c)) = (field(&l.text, "vcpu"), field(&l.text, "at"))
            && let Some(slot) = at.get_mut(v as usize)
        {
            *slot = Some(c);
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_lines_are_parsed() {
        let l = EpochLine::parse(
            "evm: info: epoch 42 committed: freeze 310 µs, 77 dirty pages, 1.2 MiB, commit 5120 µs",
        )
        .unwrap();
        assert_eq!(
            l,
            EpochLine {
                epoch: 42,
                freeze_us: 310,
                dirty_pages: 77,
                disk_blocks: 0,
                mib: 1.2,
                commit_us: 5120
            }
        );
        let l = EpochLine::parse(
            "evm: info: epoch 7 committed: freeze 9 µs, 3 dirty pages, 12 disk blocks, 0.1 MiB, commit 50 µs",
        )
        .unwrap();
        assert_eq!((l.epoch, l.disk_blocks, l.commit_us), (7, 12, 50));
        assert!(EpochLine::parse("evm: info: epoch 42 committed").is_none());
        assert!(EpochLine::parse("evm: debug: /s: epoch 3 committed: 3 pages, 9 bytes").is_none());
        assert_eq!(resumed_epoch("evm: info: resumed from epoch 17"), Some(17));
        assert_eq!(final_epoch("evm: info: final epoch 9 committed"), Some(9));
        assert_eq!(field("PROBE dirty vcpu=1 gen=33 rate=64", "gen"), Some(33));
    }

    #[test]
    fn generator_is_reproducible_and_bounded() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..1000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            assert!(x < 10);
        }
        let d = a.duration(Duration::from_millis(5), Duration::from_millis(6));
        assert!(d >= Duration::from_millis(5) && d < Duration::from_millis(6));
        assert_ne!(a.fork(1).next_u64(), a.fork(2).next_u64());
    }

    #[test]
    fn process_lines_and_signals() {
        let sh = Path::new("/bin/sh");
        let args = vec![
            "-c".to_string(),
            "echo one; printf 'cut'; echo two >&2; exec sleep 60".to_string(),
        ];
        let mut p = EvmProcess::spawn(sh, &args, &[]).unwrap();
        let l = p
            .wait_for("two", Duration::from_secs(30), |l| {
                if l.stream == Stream::Stderr && l.text == "two" {
                    Seen::Yes
                } else {
                    Seen::No
                }
            })
            .unwrap();
        assert_eq!(l.text, "two");
        let status = p.kill().unwrap();
        assert!(!status.success());
        let out: Vec<_> = p
            .stream(Stream::Stdout)
            .map(|l| (l.text.as_str(), l.partial))
            .collect();
        assert_eq!(out, [("one", false), ("cut", true)]);
        let err = p
            .wait_for("more", Duration::from_secs(5), |_| Seen::No)
            .unwrap_err();
        assert!(matches!(err, ProcessError::Exited { .. }), "{err}");
    }
}
