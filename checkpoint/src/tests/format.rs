//! Record and superblock round trips; refusals of bad stores.

use super::*;
use crate::format::*;
use crate::testing::CrashDevice;
use crate::{Store, StoreError};

fn reopen(dev: &CrashDevice) -> Store {
    Store::open_with_io(label(), dev.io(), false).unwrap()
}

fn sb_slot(dev: &CrashDevice, slot: u64) -> Result<Superblock, SbProblem> {
    let img = dev.image();
    Superblock::decode(
        &img[(slot * BLOCK) as usize..((slot + 1) * BLOCK) as usize],
        slot,
    )
}

#[test]
fn superblock_encoding_round_trips() {
    let mut sb = crate::store::layout(&opts(1 << 20, 1 << 20), [7; 16], 99);
    sb.generation = 6;
    sb.home_epoch = 41;
    sb.log_head_epoch = 42;
    sb.log_head_pos = 8192;
    sb.flags = FLAG_HOME_VALID;
    sb.home_state = HomeState {
        slot: 1,
        crc: 5,
        len: 300,
        epoch: 41,
    };
    let b = sb.encode();
    assert_eq!(Superblock::decode(&b, 0), Ok(sb.clone()));
    assert!(
        matches!(Superblock::decode(&b, 1), Err(SbProblem::Bad(_))),
        "even generation in slot B"
    );
    for i in [8usize, 33, 60, 150, 4000, 4093] {
        let mut c = b.clone();
        c[i] ^= 0x10;
        assert!(
            Superblock::decode(&c, 0).is_err(),
            "flipped byte {i} accepted"
        );
    }
}

#[test]
fn every_record_type_round_trips_through_reopen() {
    let mem = 256 * 1024;
    let (dev, mut store) = mem_store(mem, 128 * 1024);
    store.set_migrate_threshold(1.0);
    let mut model = Model::new(mem);
    // Header only (no pages, empty state); pages + state; a full chunk and
    // more (two index blocks); and enough to wrap the ring and migrate.
    append(&mut store, &mut model, 1, &[], 0).unwrap();
    append(&mut store, &mut model, 1, &[0, 4096, 0x3f000], 100).unwrap();
    let many: Vec<u64> = (0..20).map(|i| i * 4096).collect();
    append(&mut store, &mut model, 1, &many, 5000).unwrap();
    // Ten blocks per epoch in a 32-block ring: the state record of the
    // third one does not fit before the end, so a wrap record is written.
    let mut wraps = 0;
    for k in 0..6u64 {
        append(
            &mut store,
            &mut model,
            1,
            &[k * 4096, (k + 9) * 4096, (k + 20) * 4096],
            9000,
        )
        .unwrap();
        wraps += dev
            .image()
            .chunks(BLOCK as usize)
            .filter(|b| get_u32(b, 0) == REC_MAGIC && get_u32(b, 4) == K_WRAP)
            .count();
    }
    assert!(wraps > 0, "no wrap record was written");
    let infos = store.epochs().to_vec();
    assert_eq!(model.verify(&store), Some(9));
    let store2 = reopen(&dev);
    assert!(
        store2.recovery_note().is_none(),
        "{:?}",
        store2.recovery_note()
    );
    assert!(store2.superblock_warning().is_none());
    assert_eq!(store2.config(), b"{\"vm\":\"test\"}");
    assert_eq!(store2.uuid(), store.uuid());
    assert_eq!(store2.mem_bytes(), mem);
    assert_eq!(store2.home_epoch(), store.home_epoch());
    assert!(
        store.home_epoch() > 0,
        "the ring never filled: test does not exercise migration"
    );
    let infos2 = store2.epochs();
    assert_eq!(infos2.len(), infos.len());
    for (a, b) in infos.iter().zip(infos2) {
        assert_eq!(
            (
                a.epoch,
                a.wall_time_ns,
                a.freeze_us,
                a.dirty_pages,
                a.pages,
                a.bytes,
                a.state_bytes
            ),
            (
                b.epoch,
                b.wall_time_ns,
                b.freeze_us,
                b.dirty_pages,
                b.pages,
                b.bytes,
                b.state_bytes
            )
        );
    }
    // Commit latency travels in the next epoch's header.
    for w in infos.windows(2).zip(infos2.windows(2)) {
        assert_eq!(w.0[0].commit_latency_us, w.1[0].commit_latency_us);
    }
    assert_eq!(model.verify(&store2), Some(9));
}

#[test]
fn maximum_state_and_too_large_state() {
    let (dev, mut store) = mem_store(64 * 1024, 4 << 20);
    let mut model = Model::new(64 * 1024);
    append(&mut store, &mut model, 3, &[0], MAX_STATE_BYTES as usize).unwrap();
    let err = append(
        &mut store,
        &mut model,
        3,
        &[0],
        MAX_STATE_BYTES as usize + 1,
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::StateTooLarge { .. }), "{err}");
    store.migrate(1).unwrap();
    assert_eq!(model.verify(&reopen(&dev)), Some(1));
}

#[test]
fn superblocks_alternate_and_mirror() {
    let (dev, mut store) = mem_store(64 * 1024, 64 * 1024);
    let mut model = Model::new(64 * 1024);
    assert_eq!(
        (
            sb_slot(&dev, 0).unwrap().generation,
            sb_slot(&dev, 1).unwrap().generation
        ),
        (2, 1)
    );
    append(&mut store, &mut model, 2, &[0, 8192], 10).unwrap();
    append(&mut store, &mut model, 2, &[8192], 10).unwrap();
    store.migrate(1).unwrap();
    // Intent (3 in B, mirror 4 in A) then final (5 in B, mirror 6 in A).
    let (a, b) = (sb_slot(&dev, 0).unwrap(), sb_slot(&dev, 1).unwrap());
    assert_eq!((a.generation, b.generation), (6, 5));
    assert_eq!((a.home_epoch, b.home_epoch), (1, 1));
    assert_eq!(store.generation(), 6);
    store.discard_machine_state().unwrap();
    let (a, b) = (sb_slot(&dev, 0).unwrap(), sb_slot(&dev, 1).unwrap());
    assert_eq!(a.generation % 2, 0);
    assert_eq!(b.generation + 1, a.generation);
    assert_eq!(a.flags & (FLAG_HOME_VALID | FLAG_HOME_STALE), 0);
    assert_eq!(a.home_epoch, 2);
    let s = reopen(&dev);
    assert!(!s.resumable());
    assert_eq!(s.last_epoch(), None);
    assert_eq!(s.next_epoch(), 3);
}

#[test]
fn one_corrupt_superblock_uses_the_other_and_says_so() {
    for slot in [0u64, 1] {
        let (dev, mut store) = mem_store(64 * 1024, 64 * 1024);
        let mut model = Model::new(64 * 1024);
        append(&mut store, &mut model, 4, &[4096], 10).unwrap();
        store.migrate(1).unwrap();
        append(&mut store, &mut model, 4, &[0], 10).unwrap();
        drop(store);
        dev.corrupt(slot * BLOCK + 50, |b| b[0] ^= 0xff);
        let s = reopen(&dev);
        let w = s.superblock_warning().expect("no warning");
        assert!(
            w.contains(if slot == 0 {
                "superblock A"
            } else {
                "superblock B"
            }),
            "{w}"
        );
        assert_eq!(model.verify(&s), Some(2));
        assert_eq!(s.home_epoch(), 1);
    }
}

#[test]
fn both_superblocks_corrupt_is_refused() {
    let (dev, store) = mem_store(64 * 1024, 64 * 1024);
    drop(store);
    dev.corrupt(100, |b| b[0] ^= 1);
    dev.corrupt(BLOCK + 100, |b| b[0] ^= 1);
    let err = Store::open_with_io(label(), dev.io(), false).unwrap_err();
    assert!(
        matches!(err, StoreError::BothSuperblocksCorrupt { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("/test/store: both superblocks are corrupt"),
        "{err}"
    );
}

#[test]
fn unknown_version_is_refused() {
    let (dev, store) = mem_store(64 * 1024, 64 * 1024);
    drop(store);
    // A newer evm rewrote one superblock (valid CRC, version 3); or an
    // older one wrote it (version 1, before the disk was in the store).
    for v in [FORMAT_VERSION + 1, 1] {
        let dev = dev.after_power_cut(crate::testing::PowerCut::AllWritten);
        dev.corrupt(0, |b| {
            put_u32(b, 8, v);
            let crc = crate::crc32c(&b[..4092]);
            put_u32(b, 4092, crc);
        });
        let Err(err) = Store::open_with_io(label(), dev.io(), true) else {
            panic!("version {v} accepted");
        };
        assert!(
            matches!(
                err,
                StoreError::UnknownVersion { found, supported: 2, .. } if found == v
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("/test/store: store format version {v}; this evm reads version 2")
        );
    }
    // A damaged version field (CRC wrong) next to a good superblock is just
    // a corrupt superblock.
    dev.corrupt(0, |b| put_u32(b, 8, 7));
    let s = Store::open_with_io(label(), dev.io(), true).unwrap();
    assert!(s.superblock_warning().unwrap().contains("format version 7"));
}

#[test]
fn foreign_and_blank_devices_are_not_stores() {
    let mut rng = Rng::new(5);
    let junk: Vec<u8> = (0..1 << 20).map(|_| rng.next_u64() as u8).collect();
    let err =
        Store::open_with_io(label(), CrashDevice::from_image(junk.clone()).io(), true).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(err.to_string().starts_with("/test/store: not an evm store"));
    let err = Store::open_with_io(label(), CrashDevice::new(1 << 20).io(), true).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    // create refuses a device that is not blank, and leaves it alone.
    let dev = CrashDevice::from_image(junk.clone());
    let err = Store::create_with_io(label(), dev.io(), &opts(64 * 1024, 64 * 1024)).unwrap_err();
    assert!(matches!(err, StoreError::NotBlank { .. }), "{err}");
    assert!(dev.image() == junk);
    assert_eq!(dev.ops(), 0);
}

#[test]
fn truncated_store_is_refused() {
    let (dev, store) = mem_store(64 * 1024, 64 * 1024);
    let total = store.store_bytes() as usize;
    drop(store);
    for keep in [total - 4096, 3 * 4096, 6000] {
        let img = dev.sparse_image().resized(keep as u64);
        let err =
            Store::open_with_io(label(), CrashDevice::from_sparse(img).io(), true).unwrap_err();
        assert!(matches!(err, StoreError::Truncated { .. }), "{keep}: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn random_bytes_never_panic_the_reader() {
    // Random byte damage anywhere in a populated store (superblocks, config,
    // records, pages) must give a clean error or a clean result, never a
    // panic. Damage is aimed at the written blocks, where it matters.
    let (dev, mut store) = mem_store(64 * 1024, 128 * 1024);
    let mut model = Model::new(64 * 1024);
    for k in 0..6u64 {
        append(&mut store, &mut model, 9, &[k * 4096, 0x8000], 64).unwrap();
    }
    drop(store);
    let img = dev.sparse_image();
    let written: Vec<u64> = (0..img.size() / 4096)
        .filter(|b| {
            let mut x = vec![0u8; 4096];
            img.read(b * 4096, &mut x);
            x.iter().any(|&v| v != 0)
        })
        .collect();
    let mut rng = Rng::new(77);
    for _ in 0..300 {
        let mut m = img.clone();
        for _ in 0..1 + rng.below(4) {
            let b = written[rng.below(written.len() as u64) as usize];
            m.write(b * 4096 + rng.below(4096), &[rng.next_u64() as u8]);
        }
        if let Ok(s) = Store::open_with_io(label(), CrashDevice::from_sparse(m).io(), true) {
            let mut buf = vec![0u8; 64 * 1024];
            if let Some(e) = s.last_epoch() {
                let _ = s.read_memory(e, &mut buf);
                let _ = s.read_state(e);
            }
        }
    }
}

#[test]
fn corrupt_epoch_falls_back_to_the_previous_one() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let mut model = Model::new(64 * 1024);
    for k in 0..4u64 {
        append(&mut store, &mut model, 6, &[k * 4096, 0x4000], 32).unwrap();
    }
    let third = store.epochs()[2];
    drop(store);
    // Flip one byte of epoch 3's second page (its data, not a header).
    let loc = {
        let s = reopen(&dev);
        s.log[2].pages[1]
    };
    let off = reopen(&dev).sb.log.off + loc.pos + 123;
    dev.corrupt(off, |b| b[0] ^= 0x40);
    let s = reopen(&dev);
    let note = s.recovery_note().expect("no recovery note");
    assert_eq!((note.epoch, note.fell_back_to), (third.epoch, Some(2)));
    assert!(note.reason.contains("CRC"), "{}", note.reason);
    assert_eq!(
        note.to_string().split(':').next().unwrap(),
        "fell back from epoch 3 to 2"
    );
    assert_eq!(s.last_epoch(), Some(2));
    assert_eq!(
        s.epochs().len(),
        2,
        "epoch 4 (after the bad one) must be unreachable"
    );
    assert_eq!(model.verify(&s), Some(2));
    let err = s.read_memory(4, &mut vec![0u8; 64 * 1024]).unwrap_err();
    assert!(
        matches!(err, StoreError::EpochNotRetained { epoch: 4, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("the log holds epochs 1..=2"),
        "{err}"
    );
    // Appending continues from epoch 3 over the bad one.
    let mut s = s;
    let mut model2 = Model::new(64 * 1024);
    model2.mem = model.epochs[&2].0.clone();
    model2.disk = model.epochs[&2].2.clone();
    model2.epochs.insert(2, model.epochs[&2].clone());
    model2.epochs.insert(1, model.epochs[&1].clone());
    append(&mut s, &mut model2, 8, &[0x1000], 5).unwrap();
    assert_eq!(model2.verify(&reopen(&dev)), Some(3));
}

#[test]
fn bad_arguments_are_errors() {
    let (_dev, mut store) = mem_store(64 * 1024, 64 * 1024);
    let page = vec![1u8; 4096];
    let meta = crate::EpochMeta::default();
    for (gpa, len) in [(64 * 1024, 4096), (100, 4096), (0, 100)] {
        let mut it = std::iter::once((gpa as u64, &page[..len]));
        let err = store.append_epoch(&meta, &mut it, b"").unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
    assert_eq!(store.next_epoch(), 1);
    assert!(store.read_memory(1, &mut [0u8; 10]).is_err());
    assert!(matches!(
        store.migrate(5),
        Err(StoreError::EpochNotRetained { .. })
    ));
    let o = opts(1000, 64 * 1024);
    assert!(matches!(
        Store::create_with_io(label(), CrashDevice::new(1 << 22).io(), &o),
        Err(StoreError::Invalid { .. })
    ));
    let o = opts(4096, 4096);
    assert!(matches!(
        Store::create_with_io(label(), CrashDevice::new(1 << 22).io(), &o),
        Err(StoreError::Invalid { .. })
    ));
    let mut it = std::iter::empty();
    let ro = Store::open_with_io(label(), _dev.io(), true).unwrap();
    let mut ro = ro;
    assert!(matches!(
        ro.append_epoch(&meta, &mut it, b""),
        Err(StoreError::ReadOnly { .. })
    ));
}

#[test]
fn log_full_when_an_epoch_cannot_fit() {
    let mem = 512 * 1024;
    let (dev, mut store) = mem_store(mem, 64 * 1024);
    let mut model = Model::new(mem);
    append(&mut store, &mut model, 1, &[0], 8).unwrap();
    let all: Vec<u64> = (0..64).map(|i| i * 4096).collect();
    let err = append(&mut store, &mut model, 1, &all, 8).unwrap_err();
    assert!(matches!(err, StoreError::LogFull { epoch: 2, .. }), "{err}");
    assert!(err.to_string().contains("log full"), "{err}");
    // Still usable, and epoch 1 is intact (migrated home).
    append(&mut store, &mut model, 1, &[4096], 8).unwrap();
    assert_eq!(model.verify(&reopen(&dev)), Some(2));
}

#[test]
fn store_is_send_and_a_full_memory_epoch_fits_the_recommended_log() {
    fn send<T: Send>() {}
    send::<Store>();
    let mem = 1 << 20;
    let log = crate::CreateOptions::log_bytes_for(mem);
    let (dev, mut store) = mem_store(mem, log);
    store.set_rate_limit(Some(1 << 40));
    let mut model = Model::new(mem);
    let all: Vec<u64> = (0..mem / 4096).map(|i| i * 4096).collect();
    for _ in 0..3 {
        append(&mut store, &mut model, 5, &all, MAX_STATE_BYTES as usize).unwrap();
    }
    assert_eq!(model.verify(&reopen(&dev)), Some(3));
}
