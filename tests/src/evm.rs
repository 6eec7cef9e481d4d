//! One run of the `evm` binary itself (not through `scripts/run`), for
//! tests that need no guest: bad input, refusals.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The user unprivileged runs switch to when the tests run as root.
pub const NOBODY: u32 = 65534;

/// How one `evm` run ended.
#[derive(Debug)]
pub struct EvmRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Options of [`run_evm`].
#[derive(Debug, Default)]
pub struct RunOptions<'a> {
    /// Extra environment variables.
    pub env: Vec<(&'a str, &'a str)>,
    /// Bytes written to stdin (then stdin is left open until evm exits).
    pub stdin: Option<&'a [u8]>,
    /// Run as this uid and gid with no supplementary groups (needs root).
    pub user: Option<u32>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
}

fn drain(mut from: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `bin args...`, killing it after `timeout` (then panics with what it
/// printed). Prints the outcome to stderr (shown by the runner on failure).
pub fn run_evm(bin: &Path, args: &[&str], opts: &RunOptions<'_>, timeout: Duration) -> EvmRun {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    if let Some(dir) = opts.cwd {
        cmd.current_dir(dir);
    }
    if let Some(id) = opts.user {
        // std drops the supplementary groups when root sets a uid.
        cmd.uid(id).gid(id);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    // Keep stdin open while evm runs: EOF is not an instruction to evm.
    let mut stdin = child.stdin.take();
    if let (Some(input), Some(pipe)) = (opts.stdin, stdin.as_mut()) {
        // evm may refuse its input and exit before reading: ignore EPIPE.
        let _ = pipe.write_all(input);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for evm") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                bin.display(),
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    let run = EvmRun {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    eprintln!(
        "--- {} {args:?}: {status} after {:?}\nstdout:\n{}\nstderr:\n{}---",
        bin.display(),
        start.elapsed(),
        run.stdout,
        run.stderr
    );
    run
}

/// `evm <argv>` (the built binary) within `timeout`: it must succeed;
/// returns its stdout.
pub fn evm_ok(argv: &[&str], timeout: Duration) -> String {
    let run = run_evm(&crate::evm_bin(), argv, &RunOptions::default(), timeout);
    assert!(
        run.status.success(),
        "evm {argv:?}: {}\n{}",
        run.status,
        run.stderr
    );
    run.stdout
}

/// True when this process runs as root (and so can switch user, and is not
/// stopped by file modes).
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory under the system temporary directory, mode 0755 (so
/// an unprivileged user can reach files put in it), removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "evm-tests-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let dir = TempDir { path };
        dir.chmod("", 0o755);
        dir
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside this directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Copies `from` to `name` in this directory with `mode`; returns it.
    pub fn copy(&self, from: &Path, name: &str, mode: u32) -> PathBuf {
        let to = self.join(name);
        std::fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
        self.chmod(name, mode);
        to
    }

    /// Writes `name` in this directory with `mode`; returns it.
    pub fn write(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let to = self.join(name);
        std::fs::write(&to, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", to.display()));
        self.chmod(name, mode);
        to
    }

    /// Sets the mode of `name` (`""`: the directory itself).
    pub fn chmod(&self, name: &str, mode: u32) {
        let path = if name.is_empty() {
            self.path.clone()
        } else {
            self.join(name)
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
