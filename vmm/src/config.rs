//! The VM's configuration as the user gave it, validated.

use std::path::PathBuf;

/// Fewest vCPUs.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs evm configures (MADT, CPUID topology and tests cover 1–8).
pub const MAX_VCPUS: u8 = 8;
/// Least guest memory a Linux guest can boot in.
pub const MIN_MEM: u64 = 32 << 20;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("--mem {0}: not a size (use e.g. 512M, 2G)")]
    BadSize(String),
    /// Too little memory.
    #[error("--mem {given}: too small; evm needs at least {} MiB", MIN_MEM >> 20)]
    MemTooSmall {
        /// What the user asked for.
        given: String,
    },
    /// More memory than the host has.
    #[error("--mem {given}: more than this host's {} MiB of RAM", host >> 20)]
    MemTooLarge {
        /// What the user asked for.
        given: String,
        /// The host's RAM in bytes.
        host: u64,
    },
    /// Memory not a whole number of pages.
    #[error("--mem {0}: not a multiple of 4 KiB")]
    MemUnaligned(String),
    /// vCPU count out of range.
    #[error("--vcpus {0}: evm runs {MIN_VCPUS} to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
}

/// Parse `512M`, `2G`, `1048576`, `64K`, `1T` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(ConfigError::BadSize(s.to_string())),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError::BadSize(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::BadSize(s.to_string()))
}

/// Validate a memory size against the host's RAM.
pub fn check_mem(given: &str, bytes: u64, host_ram: u64) -> Result<u64, ConfigError> {
    if bytes < MIN_MEM {
        return Err(ConfigError::MemTooSmall {
            given: given.to_string(),
        });
    }
    if bytes > host_ram {
        return Err(ConfigError::MemTooLarge {
            given: given.to_string(),
            host: host_ram,
        });
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemUnaligned(given.to_string()));
    }
    Ok(bytes)
}

/// Validate a vCPU count.
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    if (MIN_VCPUS as u64..=MAX_VCPUS as u64).contains(&n) {
        Ok(n as u8)
    } else {
        Err(ConfigError::VcpuCount(n))
    }
}

/// The host's RAM in bytes (from sysinfo).
pub fn host_ram() -> u64 {
    // SAFETY: sysinfo only writes into the struct we pass, which is a plain
    // C struct for which all-zero bytes are a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(info.mem_unit as u64)
}

/// Everything `evm run` needs to build the machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage or probe ELF.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` gives the default for the image kind
    /// (`boot::linux::DEFAULT_CMDLINE` for Linux, empty for the probe).
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Raw disk image (virtio-blk), if any.
    pub disk: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10T"), Ok(10 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn limits() {
        let host = 24u64 << 30;
        assert!(matches!(
            check_mem("0", 0, host),
            Err(ConfigError::MemTooSmall { .. })
        ));
        assert!(matches!(
            check_mem("10T", 10 << 40, host),
            Err(ConfigError::MemTooLarge { .. })
        ));
        assert!(check_mem("5000", 5000 << 20, host).is_ok());
        assert!(check_mem("x", (64 << 20) + 1, host).is_err());
        assert_eq!(check_vcpus(1), Ok(1));
        assert_eq!(check_vcpus(8), Ok(8));
        assert!(check_vcpus(0).is_err());
        assert!(check_vcpus(999).is_err());
    }
}
