//! Bad input to `evm run` (the binary itself, no guest boots): each case
//! must end evm with a non-zero status and exactly one line on stderr that
//! starts with `evm: `, names the input and says what is wrong, with no
//! panic. Runs as an unprivileged user where file modes matter (root
//! ignores them).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use evm_tests::host::{KvmKind, kvm_kind};
use evm_tests::lock::GuestLock;
use evm_tests::{
    EvmRun, NOBODY, RunOptions, TempDir, evm_bin, guest_image, is_root, require_kvm, run_evm,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `evm run <args>` with the default guest kernel added unless `args`
/// names one.
fn evm_run(args: &[&str], opts: &RunOptions<'_>) -> EvmRun {
    evm_run_with(&evm_bin(), args, opts)
}

fn evm_run_with(bin: &Path, args: &[&str], opts: &RunOptions<'_>) -> EvmRun {
    let kernel = guest_image("vmlinuz");
    // Hermetic: refusals must not depend on (or create) the default store.
    let mut all = vec!["run", "--no-store"];
    if !args.contains(&"--kernel") {
        all.extend(["--kernel", s(&kernel)]);
    }
    all.extend(args);
    run_evm(bin, &all, opts, TIMEOUT)
}

/// The contract for every refusal: non-zero exit (not a signal: a panic
/// aborts), nothing on stdout, one `evm: ` line on stderr naming every
/// string in `names` and containing `problem` (any case).
fn assert_refused(run: &EvmRun, names: &[&str], problem: &str) {
    let code = run.status.code();
    assert!(
        code.is_some_and(|c| c != 0),
        "want a non-zero exit code, got {}",
        run.status
    );
    assert!(run.stdout.is_empty(), "stdout: {:?}", run.stdout);
    let err = &run.stderr;
    assert!(
        err.ends_with('\n') && err.lines().count() == 1,
        "want exactly one line on stderr, got {err:?}"
    );
    assert!(
        err.starts_with("evm: "),
        "stderr does not start with 'evm: ': {err:?}"
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!err.contains(bad), "stderr looks like a panic: {err:?}");
    }
    for name in names {
        assert!(err.contains(name), "stderr does not name {name:?}: {err:?}");
    }
    assert!(
        err.to_lowercase().contains(&problem.to_lowercase()),
        "stderr does not say {problem:?}: {err:?}"
    );
}

/// Options to run as an unprivileged user: `nobody` with no groups when
/// the tests run as root, this user otherwise. `dir` must hold the copies
/// of the binary and files that user needs (see [`unprivileged_dir`]).
fn unprivileged(dir: &TempDir) -> RunOptions<'_> {
    RunOptions {
        user: is_root().then_some(NOBODY),
        cwd: Some(dir.path()),
        ..RunOptions::default()
    }
}

/// A temporary directory holding copies of evm (`evm`, 0755) and the
/// guest kernel (`vmlinuz`, 0644) that any user can run and read.
fn unprivileged_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    dir.copy(&evm_bin(), "evm", 0o755);
    dir.copy(&guest_image("vmlinuz"), "vmlinuz", 0o644);
    dir
}

#[test]
fn missing_kernel() {
    let run = evm_run(
        &["--kernel", "/nonexistent/bzImage"],
        &RunOptions::default(),
    );
    assert_refused(&run, &["/nonexistent/bzImage"], "no such file");
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = TempDir::new("notkernel");
    let text = dir.write("notes.txt", b"this is a text file, not a kernel\n", 0o644);
    let run = evm_run(&["--kernel", s(&text)], &RunOptions::default());
    assert_refused(&run, &[s(&text)], "not a kernel");
}

#[test]
fn memory_size_zero() {
    let run = evm_run(&["--mem", "0"], &RunOptions::default());
    assert_refused(&run, &["--mem 0"], "too small");
}

#[test]
fn memory_size_larger_than_the_host() {
    let run = evm_run(&["--mem", "10T"], &RunOptions::default());
    assert_refused(&run, &["--mem 10T"], "more than this host's");
}

#[test]
fn zero_vcpus() {
    let run = evm_run(&["--vcpus", "0"], &RunOptions::default());
    assert_refused(&run, &["--vcpus 0"], "1 to 8");
}

#[test]
fn too_many_vcpus() {
    let run = evm_run(&["--vcpus", "999"], &RunOptions::default());
    assert_refused(&run, &["--vcpus 999"], "1 to 8");
}

#[test]
fn missing_disk() {
    let disk = "/nonexistent/disk.img";
    let run = evm_run(&["--disk", disk], &RunOptions::default());
    assert_refused(&run, &[disk], "no such file");
}

#[test]
fn disk_that_is_a_directory() {
    let dir = TempDir::new("diskdir");
    let run = evm_run(&["--disk", s(dir.path())], &RunOptions::default());
    assert_refused(&run, &[s(dir.path())], "is a directory");
}

#[test]
fn unreadable_disk() {
    let dir = unprivileged_dir("unreadable");
    let disk = dir.write("disk.img", &[0u8; 4096], 0o000);
    let run = evm_run_with(
        &dir.join("evm"),
        &["--kernel", "vmlinuz", "--disk", s(&disk)],
        &unprivileged(&dir),
    );
    assert_refused(&run, &[s(&disk)], "permission denied");
}

#[test]
fn no_kvm_device() {
    let run = evm_run(
        &[],
        &RunOptions {
            env: vec![("EVM_KVM_DEVICE", "/nonexistent/kvm")],
            ..RunOptions::default()
        },
    );
    assert_refused(&run, &["/nonexistent/kvm"], "no such device");
}

#[test]
fn no_permission_on_the_kvm_device() {
    let dir = unprivileged_dir("kvmperm");
    // The real /dev/kvm where the unprivileged user may not open it (mode
    // 0600 or 0660 here); where anyone may (mode 0666), a root-owned 0600
    // file stands in for it (as root; as another user, a file of mode 0).
    let others_rw = std::fs::metadata("/dev/kvm").map(|m| m.mode() & 0o006 == 0o006);
    let device = match others_rw {
        Ok(false) if is_root() => "/dev/kvm".to_string(),
        _ => {
            let f = dir.write("kvm", b"", 0o600);
            if !is_root() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000))
                    .expect("chmod 0 the stand-in KVM device");
            }
            f.to_str().expect("UTF-8 path").to_string()
        }
    };
    let mut opts = unprivileged(&dir);
    opts.env.push(("EVM_KVM_DEVICE", &device));
    let run = evm_run_with(&dir.join("evm"), &["--kernel", "vmlinuz"], &opts);
    assert_refused(&run, &[&device], "permission denied");
}

/// On a PVM `/dev/kvm` evm refuses an unmodified Linux kernel at once,
/// naming it and pointing to `scripts/run`; on VT-x/AMD-V the same command
/// boots the guest to the agent and `poweroff -f` ends it with 0.
#[test]
fn linux_kernel_is_refused_on_pvm_and_boots_on_hardware_kvm() {
    require_kvm();
    let kernel = guest_image("vmlinuz");
    match kvm_kind() {
        KvmKind::Pvm => {
            let run = evm_run(&["--kernel", s(&kernel)], &RunOptions::default());
            assert_refused(&run, &[s(&kernel), "scripts/run"], "PVM");
        }
        KvmKind::Hardware => {
            let _lock = GuestLock::acquire().expect("real-guest lock");
            let initrd = guest_image("initramfs.cpio.gz");
            let run = run_evm(
                &evm_bin(),
                &["run", "--kernel", s(&kernel), "--initrd", s(&initrd)],
                &RunOptions {
                    stdin: Some(b"poweroff -f\n"),
                    ..RunOptions::default()
                },
                Duration::from_secs(120),
            );
            assert!(run.status.success(), "evm exited with {}", run.status);
            assert!(run.stdout.contains("EVM-AGENT READY "), "no ready line");
        }
    }
}
