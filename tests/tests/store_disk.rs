//! The disk kept in the store (issue 4, item 1) with the probe guest on
//! this machine's `/dev/kvm`: `--disk IMG` imported at store creation and
//! `evm export` of committed epochs equal to it, before and after a resume;
//! and every refusal of bad disk input (`--disk-size` without a store or of
//! a size the store cannot hold, an image of such a size, disk flags that
//! contradict the store, `evm export` of a file that is not a store, of a
//! store without a disk, of an epoch not retained, onto an existing file),
//! each leaving the store and the files it names byte for byte as they
//! were. The guest's own writes to that disk are tested with real Linux in
//! `linux_disk.rs`.
//!
//! Nothing here asserts on timing; waits are generous. Without `/dev/kvm`
//! these tests fail, never skip.

use std::path::{Path, PathBuf};

use evm_tests::evm_process::{SplitMix64, probe_elf};
use evm_tests::probe_run::{self, WAIT};
use evm_tests::refusal::{refused, s};
use evm_tests::store_file::fingerprint;
use evm_tests::{TempDir, evm_bin, require_kvm};

const MEM: &str = "64M";
const CMDLINE: &str = "dirty=4 rate=16 verify_every=1 report=1";
const INTERVAL: &str = "100ms";
/// The imported image: 6 MiB of seeded bytes with zero runs between.
const IMAGE_BYTES: usize = 6 << 20;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// A raw image whose every 4 KiB block says where it is and, in half of
/// them, holds seeded noise; the rest are zero (the import skips those).
fn image(dir: &TempDir) -> PathBuf {
    let mut rng = SplitMix64::new(0x5eed_d15c);
    let mut img = vec![0u8; IMAGE_BYTES];
    for (i, block) in img.chunks_mut(4096).enumerate() {
        if rng.chance(1, 2) {
            for word in block.chunks_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
    dir.write("import.img", &img, 0o644)
}

/// `evm run --store <store>` with the probe, a new store.
fn boot_args(store: &Path, extra: &[&str]) -> Vec<String> {
    let elf = probe_elf();
    let mut a = args(&[
        "run",
        "--store",
        s(store),
        "--kernel",
        s(&elf),
        "--vcpus",
        "1",
        "--mem",
        MEM,
        "--cmdline",
        CMDLINE,
        "--interval",
        INTERVAL,
    ]);
    a.extend(args(extra));
    a
}

/// `evm export` of `epoch` (None: the default) to `out`; must succeed and
/// say what it wrote on one stderr line.
fn export(store: &Path, out: &Path, epoch: Option<u64>) {
    let mut argv = vec!["export", "--store", s(store), "--disk", s(out)];
    let text;
    if let Some(e) = epoch {
        text = e.to_string();
        argv.extend(["--epoch", text.as_str()]);
    }
    let run = evm_tests::run_evm(&evm_bin(), &argv, &Default::default(), WAIT);
    assert!(
        run.status.success() && run.stderr.lines().count() == 1,
        "evm {argv:?}: {}\n{}",
        run.status,
        run.stderr
    );
    assert!(run.stderr.contains("exported"), "{}", run.stderr);
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} (block {})",
            a.display(),
            b.display(),
            i / 4096
        );
    }
}

#[test]
fn imported_disk_exports_unchanged_from_every_epoch_and_after_resume() {
    require_kvm();
    let dir = TempDir::new("store-disk-import");
    let img = image(&dir);
    let before = fingerprint(&img).expect("fingerprint");
    let store = dir.join("vm.store");
    let (first, last) = probe_run::three_epochs(&boot_args(&store, &["--disk", s(&img)]), false);
    assert_eq!(
        fingerprint(&img).expect("fingerprint"),
        before,
        "the imported image was written"
    );

    let out_first = dir.join("first.img");
    export(&store, &out_first, Some(first));
    same_bytes(&img, &out_first);
    let out_last = dir.join("last.img");
    export(&store, &out_last, None);
    same_bytes(&img, &out_last);

    // Resume without the flag: the disk is the store's.
    let (_, again) = probe_run::three_epochs(
        &args(&["run", "--store", s(&store), "--interval", INTERVAL]),
        true,
    );
    assert!(again > last, "resumed run's final epoch {again} <= {last}");
    let out_again = dir.join("again.img");
    export(&store, &out_again, Some(again));
    same_bytes(&img, &out_again);

    // Repeating the same --disk on the existing store is accepted (it names
    // the import); a different image is not, and nothing changes.
    let other = dir.write("other.img", &[0u8; 8192], 0o644);
    let store_before = fingerprint(&store).expect("fingerprint");
    refused(
        &["run", "--store", s(&store), "--disk", s(&other)],
        &[s(&other), s(&img)],
        "contradicts",
    );
    refused(
        &["run", "--store", s(&store), "--disk-size", "1G"],
        &["--disk-size", "1G"],
        "contradicts",
    );
    assert_eq!(
        fingerprint(&store).expect("fingerprint"),
        store_before,
        "a refusal changed the store"
    );

    // Export refusals: an epoch not retained, an output that exists.
    refused(
        &[
            "export",
            "--store",
            s(&store),
            "--disk",
            s(&dir.join("x.img")),
            "--epoch",
            "99999",
        ],
        &["99999", s(&store)],
        "not a retained",
    );
    assert!(!dir.join("x.img").exists(), "a refused export left a file");
    let out_before = fingerprint(&out_last).expect("fingerprint");
    refused(
        &["export", "--store", s(&store), "--disk", s(&out_last)],
        &[s(&out_last)],
        "exists",
    );
    assert_eq!(
        fingerprint(&out_last).expect("fingerprint"),
        out_before,
        "a refused export wrote its output"
    );
    assert_eq!(
        fingerprint(&store).expect("fingerprint"),
        store_before,
        "a refusal changed the store"
    );
}

#[test]
fn store_without_a_disk_and_bad_disk_sizes_are_refused() {
    require_kvm();
    let dir = TempDir::new("store-disk-refusals");
    let elf = probe_elf();
    let k = s(&elf);

    // --disk-size needs a store, and a size the store can hold.
    refused(
        &["run", "--no-store", "--kernel", k, "--disk-size", "64M"],
        &["--disk-size 64M"],
        "needs a store",
    );
    let store = dir.join("bad.store");
    refused(
        &[
            "run",
            "--store",
            s(&store),
            "--kernel",
            k,
            "--disk-size",
            "1000",
        ],
        &["--disk-size 1000"],
        "multiple of 4096",
    );
    refused(
        &[
            "run",
            "--store",
            s(&store),
            "--kernel",
            k,
            "--disk-size",
            "0",
        ],
        &["--disk-size 0"],
        "positive multiple",
    );
    let odd = dir.write("odd.img", &[7u8; 5000], 0o644);
    refused(
        &[
            "run",
            "--store",
            s(&store),
            "--kernel",
            k,
            "--disk",
            s(&odd),
        ],
        &[s(&odd)],
        "multiple of 512",
    );
    let sectors = dir.write("sectors.img", &[7u8; 4608], 0o644);
    refused(
        &[
            "run",
            "--store",
            s(&store),
            "--kernel",
            k,
            "--disk",
            s(&sectors),
        ],
        &[s(&sectors)],
        "multiple of 4096",
    );
    refused(
        &[
            "run",
            "--store",
            s(&store),
            "--kernel",
            k,
            "--disk",
            s(&odd),
            "--disk-size",
            "8M",
        ],
        &["--disk-size", "--disk"],
        "cannot be used with",
    );
    assert!(
        !store.exists(),
        "a refused creation left {}",
        store.display()
    );

    // Export from a file that is not a store: refused, file untouched.
    let junk = dir.write("junk.store", &[0x55u8; 1 << 16], 0o644);
    let junk_before = fingerprint(&junk).expect("fingerprint");
    refused(
        &[
            "export",
            "--store",
            s(&junk),
            "--disk",
            s(&dir.join("j.img")),
        ],
        &[s(&junk)],
        "",
    );
    assert_eq!(fingerprint(&junk).expect("fingerprint"), junk_before);
    assert!(!dir.join("j.img").exists());

    // A store made without a disk has none to export.
    let plain = dir.join("plain.store");
    probe_run::three_epochs(&boot_args(&plain, &[]), false);
    let plain_before = fingerprint(&plain).expect("fingerprint");
    refused(
        &[
            "export",
            "--store",
            s(&plain),
            "--disk",
            s(&dir.join("p.img")),
        ],
        &[s(&plain)],
        "holds no disk",
    );
    assert!(!dir.join("p.img").exists());
    // Nor can one be added to it later.
    refused(
        &["run", "--store", s(&plain), "--disk-size", "8M"],
        &["--disk-size"],
        "no disk",
    );
    assert_eq!(
        fingerprint(&plain).expect("fingerprint"),
        plain_before,
        "a refusal changed the store"
    );
}
