//! The host's KVM: opening it, the capabilities evm needs, and whether it can
//! run an unmodified guest kernel at all.

use std::path::{Path, PathBuf};

use std::os::fd::FromRawFd;

use kvm_ioctls::{Cap, Kvm};

/// Where evm opens KVM (env `EVM_KVM_DEVICE` overrides, for tests).
pub fn kvm_path() -> PathBuf {
    std::env::var_os("EVM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// Errors about the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No KVM device node.
    #[error("{0}: no such device; KVM is not available on this host (load kvm-intel or kvm-amd)")]
    NoKvm(PathBuf),
    /// Permission denied.
    #[error("{0}: permission denied; add your user to the 'kvm' group or run as root")]
    NoPermission(PathBuf),
    /// Another open error.
    #[error("{0}: cannot open KVM")]
    Open(PathBuf, #[source] std::io::Error),
    /// Wrong API version.
    #[error("{path}: KVM API version {found}, evm needs 12")]
    ApiVersion {
        /// The device.
        path: PathBuf,
        /// Its version.
        found: i32,
    },
    /// A capability evm cannot do without.
    #[error("{path}: KVM lacks {cap}, which evm needs")]
    MissingCap {
        /// The device.
        path: PathBuf,
        /// The capability.
        cap: &'static str,
    },
    /// PVM, asked to run a Linux kernel.
    #[error(
        "{kvm} is PVM (kvm_pvm, no VT-x/AMD-V): it cannot run the unmodified kernel {kernel} \
         at a usable speed; run it through scripts/run, which uses the test host \
         (QEMU TCG with nested KVM)"
    )]
    PvmCannotRunKernel {
        /// The device.
        kvm: PathBuf,
        /// The kernel the user gave.
        kernel: PathBuf,
    },
}

/// Open KVM and check that it has what evm uses.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let path = kvm_path();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| HostError::NoKvm(path.clone()))?;
    // SAFETY: `c` is a valid NUL-terminated path; open has no other
    // preconditions. The returned fd is checked before use.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => HostError::NoKvm(path),
            Some(libc::EACCES) | Some(libc::EPERM) => HostError::NoPermission(path),
            _ => HostError::Open(path, e),
        });
    }
    // SAFETY: `fd` is a freshly opened file descriptor that nothing else
    // owns; Kvm takes ownership and closes it on drop.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let found = kvm.get_api_version();
    if found != 12 {
        return Err(HostError::ApiVersion { path, found });
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCap { path, cap: name });
        }
    }
    Ok(kvm)
}

/// True when this host's KVM cannot run unmodified guest supervisor code at
/// a usable speed: PVM (`kvm_pvm`), or a CPU without VT-x/AMD-V. Env
/// `EVM_ASSUME_HW_VIRT=1` overrides (for experiments).
pub fn is_pvm() -> bool {
    if std::env::var_os("EVM_ASSUME_HW_VIRT").is_some_and(|v| v == "1") {
        return false;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(info) => !info
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm")),
        Err(_) => false,
    }
}
