//! The disk is part of the epoch (issue 4): real Linux guests through
//! `scripts/run` with the disk kept inside the store. In the test host a
//! `kill -9` of `scripts/run` kills L1 with evm in it: a power cut.
//!
//! - a blank store disk (`--disk-size`): raw bytes written and fsync'd to
//!   /dev/vda survive a power cut, read back with the page cache dropped;
//! - an imported ext4 image (`--disk IMG`): a file written and synced is
//!   there after a power cut, in the same boot; after a clean unmount and
//!   the final epoch, `evm export` writes the disk and `e2fsck -fn` finds
//!   it clean; the imported image itself is never written.
//!
//! Nothing here asserts timing; each wait fails with the transcript.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use evm_tests::power;
use evm_tests::store_run::StoreRun;
use evm_tests::{HarnessError, TempDir, evm_bin, guest_image, require_kvm};

const BOOT: Duration = Duration::from_secs(300);
const RESUME: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(90);
const COMMIT: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(180);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn fail<T>(e: HarnessError) -> T {
    panic!("{e}")
}

/// Wait for two commits after console line `from`, then cut the power;
/// returns the last epoch reported committed.
fn commit_twice_and_cut(run: &mut StoreRun, from: usize) -> u64 {
    let (i, _) = run.wait_commit(from, COMMIT).unwrap_or_else(fail);
    run.wait_commit(i + 1, COMMIT).unwrap_or_else(fail);
    run.power_cut().unwrap_or_else(fail);
    run.commits().last().map(|c| c.2.epoch).expect("a commit")
}

fn resume(name: &str, args: &[&str], last: u64) -> StoreRun {
    let mut b = StoreRun::start(name, args, &[]).unwrap_or_else(fail);
    let (epoch, _) = b.wait_resumed(RESUME).unwrap_or_else(fail);
    assert!(
        epoch >= last,
        "resumed from epoch {epoch}, but epoch {last} was reported committed\n{}",
        b.tail()
    );
    b
}

#[test]
fn raw_writes_to_a_store_disk_survive_a_power_cut() {
    require_kvm();
    let dir = TempDir::new("disk-raw");
    let store = dir.join("vm.store");
    let create = ["--store", s(&store), "--disk-size", "64M"];
    let mut a = StoreRun::start("disk-raw-boot", &create, &[]).unwrap_or_else(fail);
    a.wait_ready(BOOT).unwrap_or_else(fail);
    let id = power::boot_id(&mut a);
    assert_eq!(
        a.run_cmd("blockdev --getsize64 /dev/vda", CMD)
            .unwrap_or_else(fail),
        (64u64 << 20).to_string()
    );
    // One sector near the start, one straddling a 4 KiB block, one at the end.
    let (status, _, end) = a
        .run_status(
            "printf evm-disk-A | dd of=/dev/vda bs=512 seek=3 conv=notrunc,fsync 2>/dev/null \
             && printf evm-disk-B | dd of=/dev/vda bs=1 seek=4092 conv=notrunc,fsync 2>/dev/null \
             && printf evm-disk-C | dd of=/dev/vda bs=512 seek=131071 conv=notrunc,fsync 2>/dev/null",
            CMD,
        )
        .unwrap_or_else(fail);
    assert_eq!(status, 0, "{}", a.tail());
    let last = commit_twice_and_cut(&mut a, end + 1);
    drop(a);

    let args = ["--store", s(&store)];
    let mut b = resume("disk-raw-resume", &args, last);
    assert_eq!(power::boot_id(&mut b), id, "the guest rebooted");
    b.run_cmd("echo 3 > /proc/sys/vm/drop_caches", CMD)
        .unwrap_or_else(fail);
    let read = |b: &mut StoreRun, what: &str| b.run_cmd(what, CMD).unwrap_or_else(fail);
    assert_eq!(
        read(
            &mut b,
            "dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 10"
        ),
        "evm-disk-A"
    );
    assert_eq!(
        read(&mut b, "dd if=/dev/vda bs=1 skip=4092 count=10 2>/dev/null"),
        "evm-disk-B"
    );
    assert_eq!(
        read(
            &mut b,
            "dd if=/dev/vda bs=512 skip=131071 count=1 2>/dev/null | head -c 10"
        ),
        "evm-disk-C"
    );
    // Untouched sectors are still zero.
    assert_eq!(
        read(
            &mut b,
            "dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | tr -d '\\0' | wc -c"
        ),
        "0"
    );
    b.send(b"\x01x").unwrap_or_else(fail);
    let st = b.wait_exit(EXIT).unwrap_or_else(fail);
    assert_eq!(st.code(), Some(0), "evm after Ctrl-A x: {st}\n{}", b.tail());
}

#[test]
fn imported_ext4_survives_a_power_cut_and_exports_clean() {
    require_kvm();
    let dir = TempDir::new("disk-ext4");
    let store = dir.join("vm.store");
    let image = dir.copy(&guest_image("disk.ext4"), "disk.img", 0o644);
    let before = std::fs::read(&image).expect("read image");
    let create = ["--store", s(&store), "--disk", s(&image)];
    let mut a = StoreRun::start("disk-ext4-boot", &create, &[]).unwrap_or_else(fail);
    a.wait_ready(BOOT).unwrap_or_else(fail);
    let id = power::boot_id(&mut a);
    let (status, _, end) = a
        .run_status(
            "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo data > /mnt/f && sync",
            CMD,
        )
        .unwrap_or_else(fail);
    assert_eq!(status, 0, "{}", a.tail());
    let last = commit_twice_and_cut(&mut a, end + 1);
    drop(a);

    let args = ["--store", s(&store)];
    let mut b = resume("disk-ext4-resume", &args, last);
    assert_eq!(power::boot_id(&mut b), id, "the guest rebooted");
    b.run_cmd("echo 3 > /proc/sys/vm/drop_caches", CMD)
        .unwrap_or_else(fail);
    assert_eq!(b.run_cmd("cat /mnt/f", CMD).unwrap_or_else(fail), "data");
    assert_eq!(
        b.run_cmd("cat /mnt/hello", CMD).unwrap_or_else(fail),
        "hello from the evm guest disk"
    );
    let (status, _, _) = b.run_status("umount /mnt", CMD).unwrap_or_else(fail);
    assert_eq!(status, 0, "{}", b.tail());
    b.send(b"\x01x").unwrap_or_else(fail);
    let st = b.wait_exit(EXIT).unwrap_or_else(fail);
    assert_eq!(st.code(), Some(0), "evm after Ctrl-A x: {st}\n{}", b.tail());

    // The import was read, never written.
    assert!(
        std::fs::read(&image).expect("read image") == before,
        "evm wrote to the imported image"
    );
    let out = dir.join("export.img");
    let exp = Command::new(evm_bin())
        .args(["export", "--store", s(&store), "--disk", s(&out)])
        .output()
        .expect("run evm export");
    assert!(
        exp.status.success(),
        "evm export: {}",
        String::from_utf8_lossy(&exp.stderr)
    );
    assert_eq!(
        std::fs::metadata(&out).expect("export").len(),
        before.len() as u64
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn", s(&out)])
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the exported disk: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /f", s(&out)])
        .output()
        .expect("run debugfs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout).trim(), "data");
    // A second export to the same path is refused, the first kept.
    let again = Command::new(evm_bin())
        .args(["export", "--store", s(&store), "--disk", s(&out)])
        .output()
        .expect("run evm export");
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.lines().count() == 1 && err.contains(s(&out)),
        "stderr: {err}"
    );
}
