//! The agent as PID 1, the way the guest runs it, but on this host: in new
//! user, PID and mount namespaces (`unshare`, no root needed where user
//! namespaces are allowed), with a pseudo-terminal bind-mounted over
//! /dev/console and /dev/ttyS0 and a tmpfs on /run. Checks the console
//! shell (a controlling terminal, Ctrl-C, respawn after `exit`), reaping
//! of orphans, `evm-agent verify` on the default socket, and power-off by
//! busybox's signal (in a PID namespace, reboot(2) ends the namespace).

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_evm-agent");
const PATIENCE: Duration = Duration::from_secs(300);

/// Opens a pseudo-terminal pair: (master, path of the slave).
fn open_pty() -> (File, String) {
    // SAFETY: posix_openpt takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: `fd` is an open pty master.
    assert_eq!(unsafe { libc::grantpt(fd) }, 0, "grantpt");
    // SAFETY: `fd` is an open pty master.
    assert_eq!(unsafe { libc::unlockpt(fd) }, 0, "unlockpt");
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is writable for its whole length, which we pass.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0, "ptsname_r");
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    (master, path.to_string_lossy().into_owned())
}

fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    Ok(())
}

/// The namespace with the agent as PID 1, seen through the pty master.
struct Guest {
    child: Child,
    master: File,
    bytes: Receiver<Vec<u8>>,
    buf: String,
    commands: u32,
}

impl Guest {
    /// Starts the agent; it reads this host's real /proc/cmdline (no
    /// `evm.` parameters there: the `shell` workload).
    fn start() -> Guest {
        let (master, slave) = open_pty();
        let script = format!(
            "set -e
             mount --make-rprivate /
             mount -t proc proc /proc
             mount -t tmpfs tmpfs /run
             mount --bind {slave} /dev/console
             mount --bind {slave} /dev/ttyS0
             exec {BIN}"
        );
        let tty = || {
            File::options()
                .read(true)
                .write(true)
                .open(&slave)
                .expect("open pty slave")
        };
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount",
            "sh",
            "-c",
            &script,
        ])
        .env_remove("EVM_AGENT_CMDLINE")
        .env_remove("EVM_AGENT_SOCK")
        .stdin(Stdio::from(tty()))
        .stdout(Stdio::from(tty()))
        .stderr(Stdio::from(tty()));
        // SAFETY: the hook only calls the async-signal-safe prctl.
        unsafe { cmd.pre_exec(die_with_parent) };
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs unshare(1) from util-linux: {e}"));
        let mut reader = master.try_clone().expect("clone master");
        let (tx, bytes) = channel();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut chunk) {
                if tx.send(chunk[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            master,
            bytes,
            buf: String::new(),
            commands: 0,
        }
    }

    /// Waits for `pat`; returns the output up to and including it.
    fn expect(&mut self, pat: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        while !self.buf.contains(pat) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.bytes.recv_timeout(left) {
                Ok(b) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Err(e) => panic!("waiting for {pat:?}: {e}; output so far:\n{}", self.buf),
            }
        }
        let end = self.buf.find(pat).map_or(0, |i| i + pat.len());
        let seen = self.buf[..end].to_string();
        self.buf.drain(..end);
        seen
    }

    /// Runs `cmd` in the console shell; returns its output (without the
    /// terminal's echo of the command line).
    fn run(&mut self, cmd: &str) -> String {
        self.commands += 1;
        let n = self.commands;
        // The echo shows `$((n+1000))`, only the output shows the number.
        self.send(&format!("{cmd}; echo END$(({n}+1000))\n"));
        let marker = format!("END{}", n + 1000);
        let all = self.expect(&marker);
        self.expect("# ");
        let out = all.split_once('\n').map_or("", |(_, out)| out);
        out.trim_end_matches(&marker).to_string()
    }

    fn send(&mut self, text: &str) {
        self.master
            .write_all(text.as_bytes())
            .expect("write to pty");
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Is a `sleep 4242` running anywhere (this host sees the namespace's
/// processes too)?
fn sleep_4242_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x004242\x00"))
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn as_pid1_keeps_a_shell_reaps_and_powers_off() {
    let mut g = Guest::start();
    let ready = g.expect("EVM-AGENT READY ");
    assert!(!ready.contains("ERROR"), "{ready}");
    let ready = g.expect("\n");
    assert!(ready.contains(" workload=shell"), "{ready}");
    g.expect("# ");

    // The shell runs on the console tty as a session leader.
    let out = g.run("echo hi-$((6*7)) $$ $(cut -d' ' -f6 /proc/$$/stat); tty");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"hi-42"), "{out}");
    assert_eq!(
        words.get(1),
        words.get(2),
        "the shell leads its session: {out}"
    );
    assert_eq!(words.get(3), Some(&"/dev/ttyS0"), "{out}");

    // Ctrl-C interrupts the foreground job, not the shell.
    g.send("sleep 4242\n");
    wait_for(sleep_4242_running, "sleep 4242 to start");
    g.send("\x03");
    g.expect("# ");
    wait_for(|| !sleep_4242_running(), "sleep 4242 to end");
    assert!(g.run("echo still-$((1+1))").contains("still-2"));

    // An orphan (its parent subshell exits first) is reaped by PID 1.
    let out = g.run("(true &); sleep 2; grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l");
    assert_eq!(out.trim(), "0", "zombies left: {out}");

    // The CLI reaches the agent on the default socket.
    let out = g.run(&format!("{BIN} verify; echo rc=$?"));
    assert!(out.contains("EVM-AGENT VERIFY OK boot_id="), "{out}");
    assert!(out.contains("rc=0"), "{out}");

    // `exit` does not end the machine: a new shell comes.
    g.send("exit\n");
    g.expect("EVM-AGENT shell exited");
    g.expect("# ");
    assert!(g.run("echo again-$((2*3))").contains("again-6"));

    // busybox `poweroff` signals PID 1, which syncs and powers off.
    g.send("kill -USR2 1\n");
    g.expect("EVM-AGENT signal 12: powering off");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = g.child.try_wait().expect("wait") {
            // unshare reports its child's death by SIGINT (reboot(2) in a
            // PID namespace) as exit code 128 + 2, or dies by it.
            use std::os::unix::process::ExitStatusExt;
            assert!(
                status.code() == Some(130) || status.signal() == Some(libc::SIGINT),
                "{status:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the namespace did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}
