//! Paths of the things the tests run, and the kind of `/dev/kvm` here.

use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `${EVM_CACHE:-<repo>/.cache}`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("EVM_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| repo().join(".cache"), PathBuf::from)
}

/// The `evm` binary: `$EVM_BIN` or `target/release/evm`. Panics, saying how
/// to build it, if it is missing.
pub fn evm_bin() -> PathBuf {
    let bin = std::env::var_os("EVM_BIN")
        .filter(|v| !v.is_empty())
        .map_or_else(|| repo().join("target/release/evm"), PathBuf::from);
    assert!(
        bin.is_file(),
        "missing evm binary {}: run scripts/setup (or `cargo build --release -p vmm`, or set EVM_BIN)",
        bin.display()
    );
    bin
}

/// A file of the Linux guest (`vmlinuz`, `initramfs.cpio.gz`, `disk.ext4`)
/// in `<cache>/guest/`. Panics, saying how to build it, if it is missing.
pub fn guest_image(name: &str) -> PathBuf {
    let path = cache_dir().join("guest").join(name);
    assert!(
        path.is_file(),
        "missing guest image {}: run scripts/setup (or guest-images/build.sh)",
        path.display()
    );
    path
}

/// Fails the calling test, with a clear message, unless `/dev/kvm` exists
/// and this user can open it read-write. Every test that needs KVM calls
/// it first: without KVM the suite fails, it never skips.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "no /dev/kvm on this host ({e}): evm's tests need KVM; load kvm-intel, kvm-amd or \
             kvm-pvm, and run the tests as a user that may open /dev/kvm (root or group kvm)"
        );
    }
}

/// What this machine's `/dev/kvm` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// VT-x or AMD-V: unmodified guest kernels run directly.
    Hardware,
    /// PVM (`kvm_pvm`, or no vmx/svm CPU flag): guest user mode runs
    /// natively, unmodified guest kernels do not; Linux guests need the
    /// test host.
    Pvm,
}

/// The same rule as `scripts/run` and evm: hardware virtualization when
/// `/proc/cpuinfo` has vmx or svm and no `kvm_pvm` module is loaded.
pub fn kvm_kind() -> KvmKind {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|f| f == "vmx" || f == "svm");
    if hw && !Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Hardware
    } else {
        KvmKind::Pvm
    }
}

/// `EVM_TESTHOST_SMP=1` for a guest of more than one vCPU, unless the
/// caller's environment already sets it. In the test host with two L1 CPUs
/// (its default), a 2-vCPU L2 guest dies of a triple fault on vCPU 1 in
/// about 1 of 6 runs under parallel disk reads, even without a store (QEMU
/// TCG's nested SVM: an L1 kernel was also seen to crash on corrupted GS
/// state); with one L1 CPU 0 of 12 such runs did. Real-guest tests that
/// need two vCPUs run so; see the issue 3 note.
pub fn testhost_smp_for(args: &[&str]) -> Vec<(&'static str, &'static str)> {
    let vcpus = args
        .iter()
        .position(|a| *a == "--vcpus")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(2); // evm's default
    if vcpus > 1 && std::env::var_os("EVM_TESTHOST_SMP").is_none() {
        vec![("EVM_TESTHOST_SMP", "1")]
    } else {
        Vec::new()
    }
}
