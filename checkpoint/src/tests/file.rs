//! The store on real files: preallocation, locking, refusals, discard.

use super::*;
use crate::{CreateOptions, Store, StoreError};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "evm-checkpoint-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_opts() -> CreateOptions {
    opts(4 << 20, 2 << 20)
}

#[test]
fn create_preallocates_a_real_file_and_it_round_trips() {
    let dir = TempDir::new();
    let path = dir.path("vm.evm");
    assert!(Store::is_blank(&path).unwrap());
    let o = file_opts();
    let mut store = Store::create(&path, &o).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), o.store_bytes());
    assert!(
        meta.blocks() * 512 >= meta.len(),
        "sparse: {} blocks for {} bytes",
        meta.blocks(),
        meta.len()
    );
    assert!(!Store::is_blank(&path).unwrap());
    let mut model = Model::new(o.mem_bytes);
    for k in 0..12u64 {
        let gpas: Vec<u64> = (0..40)
            .map(|i| ((k * 37 + i * 11) % 1024) * PAGE as u64)
            .collect();
        append(&mut store, &mut model, 21, &gpas, 20_000).unwrap();
    }
    store.migrate(10).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(model.verify(&store), Some(12));
    assert_eq!(store.home_epoch(), 10);
}

#[test]
fn second_open_is_locked_read_only_works_alongside() {
    let dir = TempDir::new();
    let path = dir.path("vm.evm");
    let o = file_opts();
    let mut store = Store::create(&path, &o).unwrap();
    let mut model = Model::new(o.mem_bytes);
    append(&mut store, &mut model, 1, &[0, 4096], 10).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: locked by another evm (another process holds its advisory lock)",
            path.display()
        )
    );
    let ro = Store::open_read_only(&path).unwrap();
    assert_eq!(model.verify(&ro), Some(1));
    drop(store);
    let rw = Store::open(&path).unwrap();
    assert_eq!(rw.last_epoch(), Some(1));
    // A read-only opener notices when a running evm migrates under it.
    let mut rw = rw;
    append(&mut rw, &mut model, 1, &[8192], 10).unwrap();
    let ro = Store::open_read_only(&path).unwrap();
    rw.migrate(2).unwrap();
    let err = ro
        .read_memory(1, &mut vec![0u8; o.mem_bytes as usize])
        .unwrap_err();
    assert!(matches!(err, StoreError::Changed { .. }), "{err}");
}

#[test]
fn foreign_files_are_refused_and_left_alone() {
    let dir = TempDir::new();
    let path = dir.path("notes.txt");
    std::fs::write(&path, b"my precious notes\n").unwrap();
    let err = Store::create(&path, &file_opts()).unwrap_err();
    assert!(matches!(err, StoreError::NotBlank { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: exists and is not blank", path.display()))
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"my precious notes\n");
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(
        err.to_string().contains("notes.txt: not an evm store"),
        "{err}"
    );
    assert!(!Store::is_blank(&path).unwrap());
    let err = Store::create(&dir.path(""), &file_opts()).unwrap_err();
    assert!(matches!(err, StoreError::NotFileOrDevice { .. }), "{err}");
    let err = Store::open(&dir.path("missing")).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("missing: open read-write failed"),
        "{err}"
    );
}

#[test]
fn a_zeroed_file_is_formatted_in_place_and_extended() {
    let dir = TempDir::new();
    let path = dir.path("blank.img");
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    assert!(Store::is_blank(&path).unwrap());
    let o = file_opts();
    let mut store = Store::create(&path, &o).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), o.store_bytes());
    let mut model = Model::new(o.mem_bytes);
    append(&mut store, &mut model, 2, &[4096], 1).unwrap();
    drop(store);
    assert_eq!(model.verify(&Store::open(&path).unwrap()), Some(1));
}

#[test]
fn a_truncated_file_is_refused() {
    let dir = TempDir::new();
    let path = dir.path("vm.evm");
    let o = file_opts();
    drop(Store::create(&path, &o).unwrap());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(o.store_bytes() - 1 - (1 << 20)).unwrap();
    drop(f);
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Truncated { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("truncated: the superblock describes"),
        "{err}"
    );
}

#[test]
fn discard_zeroes_home_on_a_real_file() {
    let dir = TempDir::new();
    let path = dir.path("vm.evm");
    let o = file_opts();
    let mut store = Store::create(&path, &o).unwrap();
    let mut model = Model::new(o.mem_bytes);
    let gpas: Vec<u64> = (0..64).map(|i| i * PAGE as u64).collect();
    append(&mut store, &mut model, 3, &gpas, 10).unwrap();
    store.discard_machine_state().unwrap();
    assert!(!store.resumable());
    model.mem.fill(0);
    let e = append(&mut store, &mut model, 3, &[PAGE as u64 * 3], 10).unwrap();
    store.migrate(e).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(model.verify(&store), Some(2));
    let mut buf = vec![0u8; o.mem_bytes as usize];
    store.read_memory(2, &mut buf).unwrap();
    assert!(
        buf[..3 * PAGE].iter().all(|&b| b == 0),
        "home kept pages from before the discard"
    );
}

#[test]
fn a_file_that_only_starts_with_zeros_is_not_blank_and_is_left_alone() {
    let dir = TempDir::new();
    // Zeros first, then data far past the first 8 KiB (and after a hole).
    let path = dir.path("zero-prefixed.txt");
    let mut bytes = vec![0u8; 3 << 20];
    bytes.extend_from_slice(b"precious data after three zero MiB\n");
    std::fs::write(&path, &bytes).unwrap();
    assert!(!Store::is_blank(&path).unwrap());
    let err = Store::create(&path, &file_opts()).unwrap_err();
    assert!(matches!(err, StoreError::NotBlank { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    // A sparse file of any size (what a test host attaches) is blank.
    let sparse = dir.path("sparse.img");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(1 << 30).unwrap();
    assert!(Store::is_blank(&sparse).unwrap());
}

#[test]
fn disk_import_view_and_export_on_a_real_file() {
    let dir = TempDir::new();
    let path = dir.path("vm.evm");
    let img_path = dir.path("disk.img");
    let mut image = vec![0u8; DISK_BYTES as usize];
    image[5 * PAGE..6 * PAGE].copy_from_slice(&block_data(1, 0, 5));
    std::fs::write(&img_path, &image).unwrap();
    let o = file_opts();
    let mut store = Store::create(&path, &o).unwrap();
    let mut f = std::fs::File::open(&img_path).unwrap();
    store.import_disk(&mut f, DISK_BYTES).unwrap();
    let view = store.disk_view();
    let mut model = Model::new(o.mem_bytes);
    model.disk = image;
    let offs: Vec<u64> = (0..8).map(|i| i * 2 * PAGE as u64).collect();
    append_disk(&mut store, &mut model, 4, &[0], &offs, 10).unwrap();
    append_disk(&mut store, &mut model, 4, &[0], &offs[2..5], 10).unwrap();
    // The view works from another thread, before and after migration.
    let check = |disk: Vec<u8>| {
        let v = view.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; PAGE];
            for (i, want) in disk.chunks(PAGE).enumerate() {
                v.read_block((i * PAGE) as u64, &mut b).unwrap();
                assert!(b[..] == *want, "block {i} differs");
            }
        })
        .join()
        .unwrap()
    };
    check(model.disk.clone());
    store.migrate(1).unwrap();
    check(model.disk.clone());
    let mut out = Vec::new();
    store.read_disk(2, &mut out).unwrap();
    assert!(out == model.disk);
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(model.verify(&store), Some(2));
}
