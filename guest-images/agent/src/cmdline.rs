//! The agent's configuration, read from the kernel command line.
//!
//! Recognised parameters (anything else is ignored; the last occurrence of a
//! key wins):
//!
//! - `evm.workload=<w>`: `shell` (default), `counter`, `dirty:<MiB>:<MiB/s>`,
//!   `disk`, or several joined by commas (`counter,dirty:64:8,disk`).
//! - `evm.disk=<path>`: the disk workload's device (default `/dev/vda`).
//! - `evm.disk_rate=<n>`: disk records per second (default 10, 0 = unpaced).
//!
//! The command line comes from `/proc/cmdline`, or from the environment
//! variable `EVM_AGENT_CMDLINE` when it is set (tests).

use std::fmt;

/// The default disk workload device.
pub const DEFAULT_DISK: &str = "/dev/vda";
/// Default disk records per second.
pub const DEFAULT_DISK_RATE: u32 = 10;
/// Largest dirty buffer accepted (MiB).
const MAX_DIRTY_MIB: u64 = 1 << 20;

/// The `dirty:<MiB>:<MiB/s>` workload's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtySpec {
    /// Buffer size in MiB (at least 1).
    pub mib: u64,
    /// Rewrite rate in MiB/s; 0 means as fast as possible.
    pub rate_mib_s: u64,
}

/// The set of workloads to run; all off is the `shell` workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workloads {
    pub counter: bool,
    pub dirty: Option<DirtySpec>,
    pub disk: bool,
}

/// Everything the agent takes from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub workloads: Workloads,
    /// The workload as named on the command line (`shell` if none or bad).
    pub workload_name: String,
    pub disk_path: String,
    pub disk_rate: u32,
    /// Problems found while parsing, one console line each.
    pub errors: Vec<String>,
}

/// A bad `evm.workload` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadWorkload(pub String);

impl fmt::Display for BadWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad workload '{}'", self.0)
    }
}

impl std::error::Error for BadWorkload {}

impl Workloads {
    /// Parses `shell`, `counter`, `dirty:<MiB>:<MiB/s>`, `disk` or a comma
    /// separated combination (each at most once).
    pub fn parse(text: &str) -> Result<Self, BadWorkload> {
        let bad = || BadWorkload(text.to_string());
        let mut w = Workloads::default();
        let mut shell = false;
        for item in text.split(',') {
            match item {
                "shell" if !shell => shell = true,
                "counter" if !w.counter => w.counter = true,
                "disk" if !w.disk => w.disk = true,
                _ if item.starts_with("dirty:") && w.dirty.is_none() => {
                    w.dirty = Some(parse_dirty(item).ok_or_else(bad)?);
                }
                _ => return Err(bad()),
            }
        }
        Ok(w)
    }
}

fn parse_dirty(item: &str) -> Option<DirtySpec> {
    let mut parts = item.split(':');
    let (_, mib, rate) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let mib: u64 = parse_number(mib)?;
    let rate_mib_s: u64 = parse_number(rate)?;
    (1..=MAX_DIRTY_MIB)
        .contains(&mib)
        .then_some(DirtySpec { mib, rate_mib_s })
}

/// Decimal digits only: no sign, no spaces, no empty string.
fn parse_number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits a kernel command line into parameters, honouring double quotes
/// the way the kernel does (`key="a b"` is one parameter, quotes removed).
pub fn split_params(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    params.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        params.push(cur);
    }
    params
}

impl Config {
    /// Builds the configuration from a command line; never fails: bad values
    /// are reported in `errors` and replaced by defaults.
    pub fn parse(cmdline: &str) -> Self {
        let mut workload = None;
        let mut disk_path = DEFAULT_DISK.to_string();
        let mut disk_rate = None;
        for param in split_params(cmdline) {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            match key {
                "evm.workload" => workload = Some(value.to_string()),
                "evm.disk" => disk_path = value.to_string(),
                "evm.disk_rate" => disk_rate = Some(value.to_string()),
                _ => {}
            }
        }
        let mut errors = Vec::new();
        let (workloads, workload_name) = match workload {
            None => (Workloads::default(), "shell".to_string()),
            Some(w) => match Workloads::parse(&w) {
                Ok(parsed) => (parsed, w),
                Err(e) => {
                    errors.push(e.to_string());
                    (Workloads::default(), "shell".to_string())
                }
            },
        };
        let disk_rate = match disk_rate {
            None => DEFAULT_DISK_RATE,
            Some(r) => parse_number(&r).unwrap_or_else(|| {
                errors.push(format!(
                    "bad disk_rate '{r}' (want records per second); using {DEFAULT_DISK_RATE}"
                ));
                DEFAULT_DISK_RATE
            }),
        };
        if disk_path.is_empty() {
            errors.push(format!("empty evm.disk; using {DEFAULT_DISK}"));
            disk_path = DEFAULT_DISK.to_string();
        }
        Config {
            workloads,
            workload_name,
            disk_path,
            disk_rate,
            errors,
        }
    }

    /// Reads `EVM_AGENT_CMDLINE`, else `/proc/cmdline`.
    pub fn load() -> Self {
        if let Some(text) = std::env::var_os("EVM_AGENT_CMDLINE") {
            return Self::parse(&text.to_string_lossy());
        }
        match std::fs::read("/proc/cmdline") {
            Ok(bytes) => Self::parse(&String::from_utf8_lossy(&bytes)),
            Err(e) => {
                let mut cfg = Self::parse("");
                cfg.errors
                    .push(format!("cannot read /proc/cmdline: {e}; using defaults"));
                cfg
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_shell() {
        let c = Config::parse("console=ttyS0 root=/dev/vda quiet");
        assert_eq!(c.workloads, Workloads::default());
        assert_eq!(c.workload_name, "shell");
        assert_eq!(c.disk_path, "/dev/vda");
        assert_eq!(c.disk_rate, 10);
        assert!(c.errors.is_empty());
    }

    #[test]
    fn parses_each_workload() {
        let c = Config::parse("evm.workload=counter");
        assert!(c.workloads.counter);
        let c = Config::parse("a=b evm.workload=dirty:64:8 panic=-1\n");
        assert_eq!(
            c.workloads.dirty,
            Some(DirtySpec {
                mib: 64,
                rate_mib_s: 8
            })
        );
        assert_eq!(c.workload_name, "dirty:64:8");
        let c = Config::parse("evm.workload=disk evm.disk=/tmp/x evm.disk_rate=50");
        assert!(c.workloads.disk);
        assert_eq!((c.disk_path.as_str(), c.disk_rate), ("/tmp/x", 50));
        let c = Config::parse("evm.workload=shell");
        assert_eq!(c.workloads, Workloads::default());
    }

    #[test]
    fn combines_workloads_and_last_wins() {
        let c = Config::parse("evm.workload=disk evm.workload=counter,dirty:1:0,disk");
        assert!(c.workloads.counter && c.workloads.disk);
        assert_eq!(c.workloads.dirty.map(|d| d.rate_mib_s), Some(0));
        assert!(c.errors.is_empty());
    }

    #[test]
    fn bad_workloads_fall_back_to_shell() {
        for bad in [
            "",
            "count",
            "dirty",
            "dirty:",
            "dirty:0:1",
            "dirty:4",
            "dirty:4:8:2",
            "dirty:-4:8",
            "dirty:4:+8",
            "dirty:99999999999999999999:1",
            "dirty:1048577:1",
            "disk,disk",
            "counter,",
            "DISK",
        ] {
            let c = Config::parse(&format!("evm.workload={bad}"));
            assert_eq!(c.workloads, Workloads::default(), "{bad:?}");
            assert_eq!(c.workload_name, "shell");
            assert_eq!(c.errors, vec![format!("bad workload '{bad}'")]);
        }
    }

    #[test]
    fn bad_disk_rate_is_reported() {
        let c = Config::parse("evm.disk_rate=fast evm.disk=");
        assert_eq!(c.disk_rate, DEFAULT_DISK_RATE);
        assert_eq!(c.disk_path, DEFAULT_DISK);
        assert_eq!(c.errors.len(), 2);
        assert!(c.errors[0].contains("'fast'"));
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            split_params(" a=\"x y\"  b \"c d\"=e f=\"\" "),
            vec!["a=x y", "b", "c d=e", "f="]
        );
        let c = Config::parse("evm.disk=\"/tmp/a b\" evm.workload=\"disk\"");
        assert_eq!(c.disk_path, "/tmp/a b");
        assert!(c.workloads.disk);
    }
}
