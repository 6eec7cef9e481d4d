//! Real Linux guests (the Debian cloud kernel and the project's initramfs
//! with the agent) under `evm run`, through `scripts/run`: directly on a
//! VT-x/AMD-V host, inside the QEMU TCG test host on a PVM host. Each boot
//! costs ~25 s or more here, so each test combines its checks per boot
//! (three boots in all), and the harness runs one guest at a time.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use evm_tests::{Guest, TempDir, guest_image, require_kvm};

/// From `poweroff -f`, `reboot -f` or the console escape to evm's exit
/// (the test host shuts down too).
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes the disk test writes with each method.
const BLOCK: usize = 4096;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Bytes from `xxd -p` output (hex digits, line breaks ignored).
fn unhex(hex: &str) -> Vec<u8> {
    let digits: String = hex.split_whitespace().collect();
    assert!(
        digits.len().is_multiple_of(2) && digits.bytes().all(|c| c.is_ascii_hexdigit()),
        "not xxd -p output: {hex:?}"
    );
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("two hex digits"))
        .collect()
}

fn looks_like_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// One vCPU: the agent's ready line and `nproc` agree, commands run and
/// their output and status come back, the kernel is the Debian 6.1 one,
/// virtio-rng is the guest's hwrng and gives bytes, no disk without
/// `--disk`, and `poweroff -f` ends evm with 0.
#[test]
fn one_vcpu_runs_commands_has_hwrng_and_powers_off() {
    require_kvm();
    let mut g = Guest::start("1-vcpu", &["--vcpus", "1"]).unwrap();
    let ready = g.wait_ready().unwrap();
    assert_eq!(ready.nproc, 1, "{}", ready.line);
    assert_eq!(ready.workload, "shell", "{}", ready.line);
    assert!(looks_like_uuid(&ready.boot_id), "{}", ready.line);
    assert!(ready.uptime > 0.0, "{}", ready.line);

    assert_eq!(g.run_cmd("nproc").unwrap(), "1");
    assert_eq!(g.run_cmd("echo hi-$((6*7))").unwrap(), "hi-42");
    let (status, out) = g.run_status("(echo to-stderr >&2; exit 3)").unwrap();
    assert_eq!((status, out.as_str()), (3, "to-stderr"));

    let release = std::fs::read_to_string(guest_image("kernel-release")).unwrap();
    let uname = g.run_cmd("uname -r").unwrap();
    assert!(uname.starts_with("6.1.0"), "uname -r: {uname}");
    assert_eq!(uname, release.trim());
    let cmdline = g.run_cmd("cat /proc/cmdline").unwrap();
    assert!(
        cmdline.contains("console=ttyS0"),
        "/proc/cmdline: {cmdline}"
    );

    let rng = g
        .run_cmd("cat /sys/class/misc/hw_random/rng_current")
        .unwrap();
    assert_eq!(rng, "virtio_rng.0");
    // Two reads of the device give 32 bytes each, and not the same ones.
    let a = unhex(&g.run_cmd("head -c 32 /dev/hwrng | xxd -p").unwrap());
    let b = unhex(&g.run_cmd("head -c 32 /dev/hwrng | xxd -p").unwrap());
    assert_eq!((a.len(), b.len()), (32, 32));
    assert_ne!(a, b, "virtio-rng gave the same bytes twice");

    let (status, _) = g.run_status("test -e /dev/vda").unwrap();
    assert_eq!(status, 1, "a /dev/vda without --disk");

    g.send_line("poweroff -f").unwrap();
    let status = g.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "evm after poweroff -f: {status}");
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open the disk image");
    f.seek(SeekFrom::Start(offset))
        .expect("seek in the disk image");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read the disk image");
    buf
}

/// Two vCPUs and a disk: ready line and `nproc` say 2; /dev/vda has evm's
/// serial and the image's size and file system. Random bytes written to a
/// file on the ext4 and to the raw device's last 4 KiB, flushed, survive
/// `reboot -f` (evm exits 0): they are in the image file here, and a second
/// boot on the same image reads the same bytes back. The second boot ends
/// with the console escape Ctrl-A x (evm exits 0).
#[test]
fn two_vcpus_disk_write_flush_reboot_read_back() {
    require_kvm();
    let dir = TempDir::new("linux-disk");
    let disk = dir.copy(&guest_image("disk.ext4"), "disk.img", 0o644);
    let size = std::fs::metadata(&disk).unwrap().len();
    let raw_block = size / BLOCK as u64 - 1;
    let raw_offset = raw_block * BLOCK as u64;
    let args = ["--vcpus", "2", "--mem", "512M", "--disk", s(&disk)];

    let mut g = Guest::start("2-vcpus-disk-boot-1", &args).unwrap();
    let first = g.wait_ready().unwrap();
    assert_eq!(first.nproc, 2, "{}", first.line);
    assert_eq!(g.run_cmd("nproc").unwrap(), "2");
    assert_eq!(g.run_cmd("cat /sys/block/vda/serial").unwrap(), "evm-disk0");
    assert_eq!(
        g.run_cmd("blockdev --getsize64 /dev/vda").unwrap(),
        size.to_string()
    );
    g.run_cmd("mount -t ext4 /dev/vda /mnt").unwrap();
    assert_eq!(
        g.run_cmd("cat /mnt/hello").unwrap(),
        "hello from the evm guest disk"
    );
    // A file on the file system...
    g.run_cmd("head -c 4096 /dev/urandom > /mnt/evm-test.bin")
        .unwrap();
    let file_bytes = unhex(&g.run_cmd("xxd -p /mnt/evm-test.bin").unwrap());
    g.run_cmd("sync /mnt/evm-test.bin && umount /mnt").unwrap();
    // ...and the raw device's last block, beyond what ext4 uses.
    g.run_cmd("head -c 4096 /dev/urandom > /tmp/blk").unwrap();
    let raw_bytes = unhex(&g.run_cmd("xxd -p /tmp/blk").unwrap());
    assert_eq!((file_bytes.len(), raw_bytes.len()), (BLOCK, BLOCK));
    assert_ne!(
        read_at(&disk, raw_offset, BLOCK),
        raw_bytes,
        "the image already held the bytes"
    );
    g.run_cmd(&format!(
        "dd if=/tmp/blk of=/dev/vda bs=4096 seek={raw_block} count=1 conv=notrunc 2>/dev/null"
    ))
    .unwrap();
    g.run_cmd("sync && blockdev --flushbufs /dev/vda").unwrap();
    g.send_line("reboot -f").unwrap();
    let status = g.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "evm after reboot -f: {status}");
    drop(g);

    // In the image file on this machine.
    assert_eq!(
        read_at(&disk, raw_offset, BLOCK),
        raw_bytes,
        "raw block not in the image"
    );
    let image = std::fs::read(&disk).unwrap();
    assert!(
        image
            .windows(BLOCK)
            .step_by(1024)
            .any(|w| w == file_bytes.as_slice()),
        "the file's bytes are not in the image"
    );

    // Read back by a new boot on the same image.
    let mut g = Guest::start("2-vcpus-disk-boot-2", &args).unwrap();
    let second = g.wait_ready().unwrap();
    assert_eq!(second.nproc, 2, "{}", second.line);
    assert_ne!(
        second.boot_id, first.boot_id,
        "the reboot was not a new boot"
    );
    let back = unhex(
        &g.run_cmd(&format!(
            "dd if=/dev/vda bs=4096 skip={raw_block} count=1 2>/dev/null | xxd -p"
        ))
        .unwrap(),
    );
    assert_eq!(back, raw_bytes, "raw block read back differs");
    g.run_cmd("mount -t ext4 -o ro /dev/vda /mnt").unwrap();
    let back = unhex(&g.run_cmd("xxd -p /mnt/evm-test.bin").unwrap());
    assert_eq!(back, file_bytes, "file read back differs");
    g.run_cmd("umount /mnt").unwrap();

    g.send(b"\x01x").unwrap();
    let status = g.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "evm after Ctrl-A x: {status}");
}
