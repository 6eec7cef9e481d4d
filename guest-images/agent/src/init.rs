//! What the agent does because it is PID 1: give the console a shell (and
//! respawn it), reap every orphan, and turn busybox's `poweroff`/`reboot`
//! signals into the real thing. PID 1 must never exit; when it has to stop
//! it syncs and powers the machine off.

use crate::say;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// Terminals tried, in order, for the shell.
const TTYS: [&str; 2] = ["/dev/ttyS0", "/dev/console"];
/// A shell that lived shorter than this is respawned only after a pause.
const MIN_SHELL_LIFE: Duration = Duration::from_secs(2);

/// Signals busybox's `halt`, `poweroff` and `reboot` send to PID 1.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM];

/// Syncs the disks and powers off (`libc::RB_POWER_OFF`) or reboots
/// (`libc::RB_AUTOBOOT`). Never returns.
pub fn stop_machine(how: libc::c_int) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot takes a plain command and touches no memory of ours;
    // on success it does not return.
    unsafe { libc::reboot(how) };
    say!(
        "ERROR reboot({how:#x}) failed: {}",
        io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn stop_set() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised by sigemptyset just above.
    let mut set = unsafe { set.assume_init() };
    for sig in STOP_SIGNALS {
        // SAFETY: `set` is an initialised sigset and `sig` a valid signal.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the stop signals in this thread and so in every thread started
/// later (call before starting any); `wait_for_stop_signals` takes them.
/// Children get an empty mask back from `Command`.
pub fn block_stop_signals() {
    let set = stop_set();
    // SAFETY: `set` is a valid sigset; the old mask is not wanted (NULL).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Starts a thread that waits for a stop signal and acts on it.
pub fn wait_for_stop_signals() -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(|| {
            let set = stop_set();
            loop {
                let mut sig = 0;
                // SAFETY: `set` and `sig` are valid for the call.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let (what, how) = match sig {
                    libc::SIGTERM => ("rebooting", libc::RB_AUTOBOOT),
                    _ => ("powering off", libc::RB_POWER_OFF),
                };
                say!("signal {sig}: {what}");
                stop_machine(how);
            }
        })
        .map(drop)
}

fn open_tty() -> io::Result<File> {
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for path in TTYS {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// In the child, before exec: a new session whose controlling terminal is
/// the tty on fd 0, so the shell gets job control and Ctrl-C.
fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid is async-signal-safe and has no memory arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ioctl on fd 0 (already the tty) with an integer argument;
    // async-signal-safe. Argument 1 steals the tty from a dead session.
    // If it fails the shell still runs, only without job control.
    unsafe { libc::ioctl(0, libc::TIOCSCTTY, 1) };
    Ok(())
}

fn spawn_shell() -> io::Result<libc::pid_t> {
    let tty = open_tty()?;
    let mut cmd = Command::new("/bin/sh");
    cmd.env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .env("HOME", "/root")
        .env("TERM", "vt100")
        .env("PS1", "# ")
        .current_dir("/")
        .stdin(tty.try_clone()?)
        .stdout(tty.try_clone()?)
        .stderr(tty);
    // SAFETY: the hook runs between fork and exec and only calls the
    // async-signal-safe setsid and ioctl; it allocates nothing.
    unsafe { cmd.pre_exec(become_session_leader) };
    let child = cmd.spawn()?;
    // The main loop reaps it with waitpid(-1); the handle is not needed.
    libc::pid_t::try_from(child.id()).map_err(io::Error::other)
}

/// Runs the console shell forever, respawning it when it exits, and reaps
/// every child (orphans are re-parented to PID 1).
pub fn supervise() -> ! {
    let mut shell: Option<(libc::pid_t, Instant)> = None;
    let mut next_spawn = Instant::now();
    let mut spawn_failed = false;
    loop {
        if shell.is_none() && Instant::now() >= next_spawn {
            match spawn_shell() {
                Ok(pid) => {
                    shell = Some((pid, Instant::now()));
                    spawn_failed = false;
                }
                Err(e) => {
                    if !spawn_failed {
                        say!("ERROR cannot start /bin/sh on the console: {e}; retrying every 5 s");
                    }
                    spawn_failed = true;
                    next_spawn = Instant::now() + Duration::from_secs(5);
                }
            }
        }
        let flags = if shell.is_some() { 0 } else { libc::WNOHANG };
        let mut status = 0;
        // SAFETY: `status` is a valid int to store the exit status in.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        if pid == 0 || (pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
        {
            if shell.is_some() {
                // Someone else reaped it; start another.
                shell = None;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if let Some((shell_pid, started)) = shell
            && pid == shell_pid
        {
            say!("shell exited (status {status:#x}); starting a new one");
            shell = None;
            next_spawn = if started.elapsed() < MIN_SHELL_LIFE {
                Instant::now() + Duration::from_secs(1)
            } else {
                Instant::now()
            };
        }
    }
}
