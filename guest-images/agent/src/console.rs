//! Agent output: every line starts with `EVM-AGENT ` and goes out in one
//! write(2), so lines from several threads never interleave mid-line.
//!
//! As PID 1 the lines go to `/dev/console`; as a normal process to stdout.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

static CONSOLE: OnceLock<File> = OnceLock::new();

/// Chooses where lines go; later calls have no effect.
pub fn init(pid1: bool) {
    let file = if pid1 {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .ok()
    } else {
        None
    };
    // Fall back to stdout (for PID 1 the kernel made it the console).
    let file = file.or_else(stdout_file);
    if let Some(f) = file {
        let _ = CONSOLE.set(f);
    }
}

/// Writes `EVM-AGENT <text>\n` with a single write.
pub fn line(args: fmt::Arguments<'_>) {
    let text = format!("EVM-AGENT {args}\n");
    match CONSOLE.get() {
        Some(mut f) => {
            let _ = f.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
    }
}

/// `say!("READY ...")` prints one agent line on the console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::line(format_args!($($arg)*)) };
}

/// A `File` on a duplicate of fd 1, so writes bypass Rust's stdout buffer.
fn stdout_file() -> Option<File> {
    std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(File::from)
}

/// An error and its sources, joined with `: `, for one-line reports.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}
