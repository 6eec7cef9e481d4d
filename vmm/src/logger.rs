//! A minimal `log` backend writing to stderr. `EVM_LOG=debug` (or error,
//! warn, info, trace) sets the level; the default is `warn`.

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            // One write per line so lines from threads do not interleave.
            let line = format!(
                "evm: {}: {}\r\n",
                r.level().as_str().to_lowercase(),
                r.args()
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Install the logger (once; later calls do nothing).
pub fn init() {
    let level = std::env::var("EVM_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
