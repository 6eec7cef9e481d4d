//! What a store remembers about its VM besides memory and state: the boot
//! configuration (so `evm run --store S` alone resumes or reboots it) and the
//! CPU features the guest saw (so a host that lacks them is refused).

use std::path::PathBuf;

use kvm_bindings::CpuId;

/// Version of the stored configuration's encoding.
pub const CONFIG_VERSION: u32 = 1;

/// The VM configuration kept in the store (JSON, versioned).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredConfig {
    /// Encoding version.
    pub version: u32,
    /// Kernel image (bzImage or probe), used to boot again after power-off.
    pub kernel: PathBuf,
    /// The kernel is evm's probe guest (not Linux).
    pub probe: bool,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line as given (`None`: the default for the image kind).
    pub cmdline: Option<String>,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Raw disk image used in place (only without a store; a store keeps
    /// its disk inside, see `disk_bytes`).
    pub disk: Option<PathBuf>,
    /// Size of the disk kept inside the store (0: none). Its contents are
    /// part of every epoch.
    #[serde(default)]
    pub disk_bytes: u64,
    /// The raw image the store's disk was imported from at creation
    /// (`--disk IMG`), if any; only for checking flags and for display.
    #[serde(default)]
    pub disk_import: Option<PathBuf>,
    /// Feature words of the CPUID the guest saw: (leaf, subleaf, register, bits).
    pub cpu_features: Vec<(u32, u32, char, u32)>,
}

/// Errors about stored configuration.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The config blob does not decode.
    #[error("the store's VM configuration is unreadable: {0}")]
    Decode(String),
    /// A newer encoding.
    #[error("the store's VM configuration is version {0}; this evm reads version {CONFIG_VERSION}")]
    Version(u32),
    /// Flags that contradict the store.
    #[error(
        "{flag} {given} contradicts the store, which has {stored} (use a new store, or leave the flag out)"
    )]
    Contradicts {
        /// The flag.
        flag: &'static str,
        /// What the user gave.
        given: String,
        /// What the store holds.
        stored: String,
    },
    /// The host lacks CPU features the guest saw.
    #[error(
        "this host's CPU lacks features the guest saw (CPUID leaf {leaf:#x}.{subleaf} {reg}: bits {missing:#x}); resuming here is refused"
    )]
    CpuFeatures {
        /// Leaf.
        leaf: u32,
        /// Subleaf.
        subleaf: u32,
        /// Register.
        reg: char,
        /// Missing bits.
        missing: u32,
    },
}

/// The CPUID registers that hold feature flags a guest may rely on.
const FEATURE_WORDS: [(u32, u32, char); 8] = [
    (0x1, 0, 'c'),
    (0x1, 0, 'd'),
    (0x7, 0, 'b'),
    (0x7, 0, 'c'),
    (0x7, 0, 'd'),
    (0xd, 1, 'a'),
    (0x8000_0001, 0, 'c'),
    (0x8000_0001, 0, 'd'),
];

/// Bits of leaf 1 that describe the vCPU, not the host (APIC ID lives in
/// EBX; hypervisor, TSC-deadline, HTT are set by evm).
const EVM_SET_BITS: [(u32, char, u32); 3] = [
    (0x1, 'c', (1 << 31) | (1 << 24)),
    (0x1, 'd', 1 << 28),
    (0x8000_0001, 'c', 1 << 1),
];

/// The feature words of `cpuid`.
pub fn cpu_features(cpuid: &CpuId) -> Vec<(u32, u32, char, u32)> {
    let mut out = Vec::new();
    for (leaf, sub, reg) in FEATURE_WORDS {
        if let Some(e) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
        {
            let mut v = match reg {
                'a' => e.eax,
                'b' => e.ebx,
                'c' => e.ecx,
                _ => e.edx,
            };
            for (l, r, bits) in EVM_SET_BITS {
                if l == leaf && r == reg {
                    v &= !bits;
                }
            }
            out.push((leaf, sub, reg, v));
        }
    }
    out
}

/// Refuse a host whose supported CPUID lacks a feature the guest saw.
pub fn check_cpu(stored: &[(u32, u32, char, u32)], host: &CpuId) -> Result<(), PersistError> {
    let here = cpu_features(host);
    for &(leaf, subleaf, reg, bits) in stored {
        let have = here
            .iter()
            .find(|(l, s, r, _)| (*l, *s, *r) == (leaf, subleaf, reg))
            .map(|t| t.3)
            .unwrap_or(0);
        let missing = bits & !have;
        if missing != 0 {
            return Err(PersistError::CpuFeatures {
                leaf,
                subleaf,
                reg,
                missing,
            });
        }
    }
    Ok(())
}

impl StoredConfig {
    /// Encode for the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Decode from the store.
    pub fn decode(b: &[u8]) -> Result<Self, PersistError> {
        #[derive(serde::Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version =
            serde_json::from_slice(b).map_err(|e| PersistError::Decode(e.to_string()))?;
        if v.version != CONFIG_VERSION {
            return Err(PersistError::Version(v.version));
        }
        serde_json::from_slice(b).map_err(|e| PersistError::Decode(e.to_string()))
    }
}

/// Boot flags as the user gave them (all optional when a store exists).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--mem` (parsed).
    pub mem: Option<(String, u64)>,
    /// `--vcpus`.
    pub vcpus: Option<u8>,
    /// `--disk`.
    pub disk: Option<PathBuf>,
    /// `--disk-size` (parsed).
    pub disk_size: Option<(String, u64)>,
}

fn same<T: PartialEq + std::fmt::Debug>(
    flag: &'static str,
    given: Option<&T>,
    stored: &T,
    show: impl Fn(&T) -> String,
) -> Result<(), PersistError> {
    match given {
        Some(g) if g != stored => Err(PersistError::Contradicts {
            flag,
            given: show(g),
            stored: show(stored),
        }),
        _ => Ok(()),
    }
}

/// Check `flags` against the stored config: every flag given must agree.
pub fn check_flags(flags: &Flags, stored: &StoredConfig) -> Result<(), PersistError> {
    let path = |p: &PathBuf| p.display().to_string();
    let opt_path = |p: &Option<PathBuf>| p.as_ref().map(path).unwrap_or_else(|| "none".into());
    same("--kernel", flags.kernel.as_ref(), &stored.kernel, path)?;
    same(
        "--initrd",
        flags.initrd.as_ref().map(|p| Some(p.clone())).as_ref(),
        &stored.initrd,
        opt_path,
    )?;
    same(
        "--cmdline",
        flags.cmdline.as_ref().map(|c| Some(c.clone())).as_ref(),
        &stored.cmdline,
        |c| format!("{:?}", c.as_deref().unwrap_or("(default)")),
    )?;
    if let Some((text, bytes)) = &flags.mem
        && *bytes != stored.mem_bytes
    {
        return Err(PersistError::Contradicts {
            flag: "--mem",
            given: text.clone(),
            stored: format!("{}M", stored.mem_bytes >> 20),
        });
    }
    same("--vcpus", flags.vcpus.as_ref(), &stored.vcpus, |v| {
        v.to_string()
    })?;
    let stored_disk = if stored.disk_bytes > 0 {
        &stored.disk_import
    } else {
        &stored.disk
    };
    same(
        "--disk",
        flags.disk.as_ref().map(|p| Some(p.clone())).as_ref(),
        stored_disk,
        opt_path,
    )?;
    if let Some((text, bytes)) = &flags.disk_size
        && *bytes != stored.disk_bytes
    {
        return Err(PersistError::Contradicts {
            flag: "--disk-size",
            given: text.clone(),
            stored: if stored.disk_bytes == 0 {
                "no disk".into()
            } else {
                format!("{}M", stored.disk_bytes >> 20)
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StoredConfig {
        StoredConfig {
            version: CONFIG_VERSION,
            kernel: "/k".into(),
            probe: false,
            initrd: None,
            cmdline: None,
            mem_bytes: 512 << 20,
            vcpus: 2,
            disk: None,
            disk_bytes: 0,
            disk_import: None,
            cpu_features: vec![(1, 0, 'c', 0b1010)],
        }
    }

    #[test]
    fn config_round_trips_and_versions_are_checked() {
        let c = cfg();
        assert_eq!(StoredConfig::decode(&c.encode()).unwrap(), c);
        let mut newer = c.clone();
        newer.version = 9;
        assert!(matches!(
            StoredConfig::decode(&newer.encode()),
            Err(PersistError::Version(9))
        ));
        assert!(StoredConfig::decode(b"\x00garbage").is_err());
    }

    #[test]
    fn contradicting_flags_name_the_difference() {
        let c = cfg();
        assert!(check_flags(&Flags::default(), &c).is_ok());
        let f = Flags {
            vcpus: Some(2),
            kernel: Some("/k".into()),
            ..Default::default()
        };
        assert!(check_flags(&f, &c).is_ok());
        let f = Flags {
            mem: Some(("1G".into(), 1 << 30)),
            ..Default::default()
        };
        let e = check_flags(&f, &c).unwrap_err().to_string();
        assert!(e.contains("--mem 1G") && e.contains("512M"), "{e}");
        let f = Flags {
            disk: Some("/d".into()),
            ..Default::default()
        };
        assert!(
            check_flags(&f, &c)
                .unwrap_err()
                .to_string()
                .contains("--disk /d")
        );
    }

    #[test]
    fn store_disk_flags_are_checked_against_the_store() {
        let mut c = cfg();
        c.disk_bytes = 64 << 20;
        c.disk_import = Some("/img".into());
        let f = Flags {
            disk: Some("/img".into()),
            disk_size: None,
            ..Default::default()
        };
        assert!(check_flags(&f, &c).is_ok());
        let f = Flags {
            disk_size: Some(("64M".into(), 64 << 20)),
            ..Default::default()
        };
        assert!(check_flags(&f, &c).is_ok());
        let f = Flags {
            disk_size: Some(("1G".into(), 1 << 30)),
            ..Default::default()
        };
        let e = check_flags(&f, &c).unwrap_err().to_string();
        assert!(e.contains("--disk-size 1G") && e.contains("64M"), "{e}");
        let f = Flags {
            disk: Some("/other".into()),
            ..Default::default()
        };
        let e = check_flags(&f, &c).unwrap_err().to_string();
        assert!(e.contains("--disk /other") && e.contains("/img"), "{e}");
        let e = check_flags(
            &Flags {
                disk_size: Some(("4M".into(), 4 << 20)),
                ..Default::default()
            },
            &cfg(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no disk"), "{e}");
    }

    #[test]
    fn missing_cpu_features_are_refused() {
        let host = CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ecx: 0b0010,
            ..Default::default()
        }])
        .unwrap();
        let e = check_cpu(&[(1, 0, 'c', 0b1010)], &host).unwrap_err();
        assert!(e.to_string().contains("0x8"), "{e}");
        assert!(check_cpu(&[(1, 0, 'c', 0b0010)], &host).is_ok());
    }
}
