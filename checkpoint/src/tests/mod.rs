//! Tests of the store: format round trips and refusals (`format`), real
//! files (`file`), and power cuts against a model (`crash`).

mod crash;
mod disk;
mod file;
mod format;

use crate::testing::{CrashDevice, Rng};
use crate::{CreateOptions, EpochMeta, Store, StoreError};
use std::collections::BTreeMap;
use std::path::Path;

pub(crate) const PAGE: usize = 4096;

pub(crate) fn label() -> &'static Path {
    Path::new("/test/store")
}

/// Deterministic contents for page `gpa` of `epoch`.
pub(crate) fn page_data(seed: u64, epoch: u64, gpa: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x1000_0000_01B3) ^ gpa.rotate_left(17));
    let mut v = vec![0u8; PAGE];
    for ch in v.chunks_mut(8) {
        ch.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    v
}

pub(crate) fn state_blob(seed: u64, epoch: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed.wrapping_add(epoch));
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// What each committed epoch must read back as.
#[derive(Debug, Default)]
pub(crate) struct Model {
    pub mem: Vec<u8>,
    /// The disk as of the newest epoch whose append returned Ok (kept
    /// across a discard).
    pub disk: Vec<u8>,
    pub epochs: BTreeMap<u64, Snapshot>,
}

/// One committed epoch in the model: memory, state, disk.
pub(crate) type Snapshot = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Disk size of the stores made by [`opts`].
pub(crate) const DISK_BYTES: u64 = 64 * 1024;

impl Model {
    pub fn new(mem_bytes: u64) -> Model {
        Model::with_disk(mem_bytes, DISK_BYTES)
    }

    pub fn with_disk(mem_bytes: u64, disk_bytes: u64) -> Model {
        Model {
            mem: vec![0; mem_bytes as usize],
            disk: vec![0; disk_bytes as usize],
            epochs: BTreeMap::new(),
        }
    }

    /// Check the store's disk home (through an epoch-less store, e.g. after
    /// a discard) and its disk view against `disk`.
    pub fn verify_view(store: &Store, disk: &[u8]) {
        let view = store.disk_view();
        assert_eq!(view.disk_bytes(), disk.len() as u64);
        let mut b = [0u8; PAGE];
        for (i, want) in disk.chunks(PAGE).enumerate() {
            view.read_block((i * PAGE) as u64, &mut b).unwrap();
            assert!(b[..] == *want, "disk view: block {:#x} differs", i * PAGE);
        }
    }

    /// Check that `store` yields exactly the model's epoch for every epoch
    /// it offers, and return its newest.
    pub fn verify(&self, store: &Store) -> Option<u64> {
        let mut buf = vec![0u8; self.mem.len()];
        let mut offered: Vec<u64> = store.epochs().iter().map(|e| e.epoch).collect();
        if store.home_epoch() > 0 && store.home_valid() {
            offered.push(store.home_epoch());
        }
        for e in offered {
            let (mem, state, disk) = self
                .epochs
                .get(&e)
                .unwrap_or_else(|| panic!("store offers epoch {e} the model never committed"));
            let mut got = Vec::new();
            store.read_disk(e, &mut got).unwrap();
            assert!(got == *disk, "epoch {e}: disk differs from the model");
            if !disk.is_empty() {
                let off = (e * 5 % (disk.len() / PAGE) as u64) * PAGE as u64;
                let mut b = [0u8; PAGE];
                store.read_disk_block(e, off, &mut b).unwrap();
                assert!(
                    b[..] == disk[off as usize..off as usize + PAGE],
                    "epoch {e}: disk block {off:#x} differs"
                );
            }
            if Some(e) == store.last_epoch() {
                Model::verify_view(store, disk);
            }
            store.read_memory(e, &mut buf).unwrap();
            assert!(buf == *mem, "epoch {e}: memory differs from the model");
            assert_eq!(
                store.read_state(e).unwrap(),
                *state,
                "epoch {e}: state differs"
            );
            let mut page = [0u8; PAGE];
            let gpa = (e * 7 % (self.mem.len() / PAGE) as u64) * PAGE as u64;
            store.read_page(e, gpa, &mut page).unwrap();
            assert!(
                page[..] == mem[gpa as usize..gpa as usize + PAGE],
                "epoch {e}: page {gpa:#x} differs"
            );
        }
        store.last_epoch()
    }
}

/// Append an epoch writing `gpas` (data from `page_data`). The model learns
/// the epoch's contents before the append (a cut may still commit it); its
/// running memory advances only if the append returns Ok.
pub(crate) fn append(
    store: &mut Store,
    model: &mut Model,
    seed: u64,
    gpas: &[u64],
    state_len: usize,
) -> Result<u64, StoreError> {
    append_disk(store, model, seed, gpas, &[], state_len)
}

/// Deterministic contents for disk block `off` of `epoch`.
pub(crate) fn block_data(seed: u64, epoch: u64, off: u64) -> Vec<u8> {
    page_data(seed ^ 0xd15c_0000_0000, epoch, off)
}

/// [`append`], with disk blocks at `disk` (data from `block_data`).
pub(crate) fn append_disk(
    store: &mut Store,
    model: &mut Model,
    seed: u64,
    gpas: &[u64],
    disk: &[u64],
    state_len: usize,
) -> Result<u64, StoreError> {
    let epoch = store.next_epoch();
    let blocks: Vec<(u64, Vec<u8>)> = disk
        .iter()
        .map(|&o| (o, block_data(seed, epoch, o)))
        .collect();
    let mut dsk = model.disk.clone();
    for (o, d) in &blocks {
        dsk[*o as usize..*o as usize + PAGE].copy_from_slice(d);
    }
    let datas: Vec<(u64, Vec<u8>)> = gpas
        .iter()
        .map(|&g| (g, page_data(seed, epoch, g)))
        .collect();
    let state = state_blob(seed, epoch, state_len);
    let meta = EpochMeta {
        wall_time_ns: epoch * 1000,
        freeze_us: epoch as u32,
        dirty_pages: gpas.len() as u64,
    };
    let mut mem = model.mem.clone();
    for (g, d) in &datas {
        mem[*g as usize..*g as usize + PAGE].copy_from_slice(d);
    }
    model
        .epochs
        .insert(epoch, (mem.clone(), state.clone(), dsk.clone()));
    let mut it = datas.iter().map(|(g, d)| (*g, d.as_slice()));
    let mut dit = blocks.iter().map(|(o, d)| (*o, d.as_slice()));
    let info = store.append_epoch_with_disk(&meta, &mut it, &mut dit, &state)?;
    assert_eq!(info.epoch, epoch);
    assert_eq!(info.disk_blocks, disk.len() as u64);
    model.mem = mem;
    model.disk = dsk;
    Ok(epoch)
}

pub(crate) fn opts(mem: u64, log: u64) -> CreateOptions {
    CreateOptions {
        mem_bytes: mem,
        disk_bytes: DISK_BYTES,
        log_bytes: log,
        config: b"{\"vm\":\"test\"}".to_vec(),
    }
}

/// A store on a fresh in-memory device.
pub(crate) fn mem_store(mem: u64, log: u64) -> (CrashDevice, Store) {
    let o = opts(mem, log);
    let dev = CrashDevice::new(o.store_bytes());
    let store = Store::create_with_io(label(), dev.io(), &o).unwrap();
    (dev, store)
}
