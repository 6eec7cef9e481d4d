//! A machine-wide lock around real-guest runs. Each boot of a Linux guest
//! takes most of a 2-core machine (QEMU TCG plus nested KVM here), so tests
//! that boot one run one at a time even when the runner starts them in
//! parallel (nextest runs each test in its own process; `cargo test` in
//! threads of one process; `flock` serialises both).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::host::cache_dir;

/// Holds `<cache>/tests.lock` exclusively until dropped.
#[derive(Debug)]
pub struct GuestLock {
    _file: File,
    waited: Duration,
}

impl GuestLock {
    /// Blocks until no other real-guest test holds the lock.
    pub fn acquire() -> std::io::Result<GuestLock> {
        let path = Self::path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let start = Instant::now();
        loop {
            // SAFETY: flock only reads the descriptor number, which `file`
            // keeps open for the duration of the call; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(GuestLock {
            _file: file,
            waited: start.elapsed(),
        })
    }

    /// How long [`GuestLock::acquire`] waited for other tests.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The lock file's path.
    pub fn path() -> PathBuf {
        cache_dir().join("tests.lock")
    }
}
