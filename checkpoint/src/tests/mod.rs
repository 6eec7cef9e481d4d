//! Tests of the store: format round trips and refusals (`format`), real
//! files (`file`), and power cuts against a model (`crash`).

mod crash;
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
    pub epochs: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
}

impl Model {
    pub fn new(mem_bytes: u64) -> Model {
        Model {
            mem: vec![0; mem_bytes as usize],
            epochs: BTreeMap::new(),
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
            let (mem, state) = self
                .epochs
                .get(&e)
                .unwrap_or_else(|| panic!("store offers epoch {e} the model never committed"));
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
    let epoch = store.next_epoch();
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
    model.epochs.insert(epoch, (mem.clone(), state.clone()));
    let mut it = datas.iter().map(|(g, d)| (*g, d.as_slice()));
    let info = store.append_epoch(&meta, &mut it, &state)?;
    assert_eq!(info.epoch, epoch);
    model.mem = mem;
    Ok(epoch)
}

pub(crate) fn opts(mem: u64, log: u64) -> CreateOptions {
    CreateOptions {
        mem_bytes: mem,
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
