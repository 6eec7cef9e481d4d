//! The guest disk in the store: disk block records, migration and discard
//! with a disk, the running VM's `DiskView`, export and import, bad input.

use super::*;
use crate::testing::CrashDevice;
use crate::{EpochMeta, Store, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

fn reopen(dev: &CrashDevice) -> Store {
    Store::open_with_io(label(), dev.io(), false).unwrap()
}

fn blocks(list: &[u64]) -> Vec<u64> {
    list.iter().map(|b| b * PAGE as u64).collect()
}

#[test]
fn disk_records_round_trip_through_reopen() {
    // 300 blocks in one epoch: two disk records (252 + 48 entries).
    let mem = 64 * 1024;
    let disk = 2 << 20;
    let mut o = opts(mem, 4 << 20);
    o.disk_bytes = disk;
    let dev = CrashDevice::new(o.store_bytes());
    let mut store = Store::create_with_io(label(), dev.io(), &o).unwrap();
    assert_eq!(store.disk_bytes(), disk);
    let mut model = Model::with_disk(mem, disk);
    let many: Vec<u64> = (0..300).map(|i| (i * 3 % 512) * PAGE as u64).collect();
    append_disk(&mut store, &mut model, 1, &[0], &many, 100).unwrap();
    append_disk(&mut store, &mut model, 1, &[], &blocks(&[7, 1, 511]), 0).unwrap();
    append_disk(&mut store, &mut model, 1, &[4096], &[], 10).unwrap();
    let infos = store.epochs().to_vec();
    assert_eq!(
        infos.iter().map(|i| i.disk_blocks).collect::<Vec<_>>(),
        [300, 3, 0]
    );
    assert_eq!(model.verify(&store), Some(3));
    let s = reopen(&dev);
    assert!(s.recovery_note().is_none(), "{:?}", s.recovery_note());
    assert_eq!(s.disk_bytes(), disk);
    assert_eq!(
        s.epochs(),
        &infos[..infos.len() - 1]
            .iter()
            .chain(
                // The newest epoch's commit latency is only known to the writer.
                std::iter::once(&crate::EpochInfo {
                    commit_latency_us: 0,
                    ..infos[2]
                })
            )
            .copied()
            .collect::<Vec<_>>()[..]
    );
    assert_eq!(model.verify(&s), Some(3));
    // Older epochs read their own disk.
    let mut b = [0u8; PAGE];
    s.read_disk_block(1, 7 * PAGE as u64, &mut b).unwrap();
    assert!(b[..] == model.epochs[&1].2[7 * PAGE..8 * PAGE]);
}

#[test]
fn a_block_given_twice_in_an_epoch_keeps_the_later_one() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let a = vec![0xaau8; PAGE];
    let b = vec![0xbbu8; PAGE];
    let mut pages = std::iter::empty();
    let mut disk = [(4096u64, &a[..]), (0, &a[..]), (4096, &b[..])].into_iter();
    store
        .append_epoch_with_disk(&EpochMeta::default(), &mut pages, &mut disk, b"s")
        .unwrap();
    let mut got = [0u8; PAGE];
    for s in [&store, &reopen(&dev)] {
        s.read_disk_block(1, 4096, &mut got).unwrap();
        assert_eq!(got, [0xbb; PAGE]);
        s.disk_view().read_block(4096, &mut got).unwrap();
        assert_eq!(got, [0xbb; PAGE]);
    }
    let mut store = reopen(&dev);
    store.migrate(1).unwrap();
    store.read_disk_block(1, 4096, &mut got).unwrap();
    assert_eq!(got, [0xbb; PAGE]);
    store.disk_view().read_block(0, &mut got).unwrap();
    assert_eq!(got, [0xaa; PAGE]);
}

#[test]
fn corrupt_disk_block_falls_back_to_the_previous_epoch() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let mut model = Model::new(64 * 1024);
    for k in 0..3u64 {
        append_disk(&mut store, &mut model, 4, &[0], &blocks(&[k, 9]), 20).unwrap();
    }
    drop(store);
    let (off, disk_off) = {
        let s = reopen(&dev);
        (s.sb.log.off + s.log[1].disk[1].pos + 77, s.sb.disk.off)
    };
    dev.corrupt(off, |b| b[0] ^= 1);
    let s = reopen(&dev);
    let note = s.recovery_note().expect("no recovery note");
    assert_eq!((note.epoch, note.fell_back_to), (2, Some(1)));
    assert!(note.reason.contains("disk block"), "{}", note.reason);
    assert_eq!(model.verify(&s), Some(1));
    // The disk home is untouched by all this (nothing was migrated).
    let mut b = vec![0u8; PAGE];
    dev.io()
        .read_at(&mut b, disk_off + 9 * PAGE as u64)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn migration_folds_the_disk_and_discard_keeps_it() {
    let mem = 64 * 1024;
    let (dev, mut store) = mem_store(mem, 1 << 20);
    let mut model = Model::new(mem);
    append_disk(
        &mut store,
        &mut model,
        2,
        &[0, 4096],
        &blocks(&[0, 1, 2]),
        30,
    )
    .unwrap();
    append_disk(&mut store, &mut model, 2, &[4096], &blocks(&[1, 15]), 30).unwrap();
    append_disk(&mut store, &mut model, 2, &[8192], &blocks(&[2]), 30).unwrap();
    store.migrate(2).unwrap();
    assert_eq!(store.home_epoch(), 2);
    assert_eq!(model.verify(&store), Some(3));
    // Home holds epoch 2's disk.
    let home = dev.image()[store.sb.disk.off as usize..][..DISK_BYTES as usize].to_vec();
    assert!(
        home == model.epochs[&2].2,
        "disk home is not epoch 2's disk"
    );
    assert_eq!(model.verify(&reopen(&dev)), Some(3));

    let disk3 = model.epochs[&3].2.clone();
    let mut store = reopen(&dev);
    store.discard_machine_state().unwrap();
    assert_eq!(store.last_epoch(), None);
    let img = dev.image();
    let home = &img[store.sb.disk.off as usize..][..DISK_BYTES as usize];
    assert!(*home == disk3, "discard lost the disk");
    let mem_home = &img[store.sb.mem.off as usize..][..mem as usize];
    assert!(mem_home.iter().all(|&b| b == 0), "memory home not zeroed");
    Model::verify_view(&store, &disk3);
    let mut exported = Vec::new();
    reopen(&dev).read_disk_home(&mut exported).unwrap();
    assert!(exported == disk3, "read_disk_home is not the kept disk");
    // The next epoch's disk is the kept disk plus its own blocks.
    let mut m2 = Model::new(mem);
    m2.disk = disk3;
    append_disk(&mut store, &mut m2, 5, &[0], &blocks(&[3]), 8).unwrap();
    assert_eq!(m2.verify(&reopen(&dev)), Some(4));
}

#[test]
fn a_failed_commit_is_never_seen_by_the_disk_view() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let mut model = Model::new(64 * 1024);
    append_disk(&mut store, &mut model, 3, &[0], &blocks(&[5]), 10).unwrap();
    let view = store.disk_view();
    let committed = model.disk.clone();
    // Fail the epoch's last operation (its commit sync): the append fails.
    let mut ops = None;
    for k in 0..20u64 {
        let probe = CrashDevice::from_sparse(dev.sparse_image());
        let mut s = Store::open_with_io(label(), probe.io(), false).unwrap();
        let before = probe.ops();
        append_disk(
            &mut s,
            &mut Model::new(64 * 1024),
            3,
            &[0],
            &blocks(&[5]),
            10,
        )
        .unwrap();
        if probe.ops() - before == k + 1 {
            ops = Some(k);
            break;
        }
    }
    let last = ops.expect("could not count the append's operations");
    dev.fail_at(dev.ops() + last, libc::EIO);
    let err = append_disk(&mut store, &mut model, 3, &[0], &blocks(&[5, 6]), 10).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    Model::verify_view(&store, &committed);
    let mut b = [0u8; PAGE];
    view.read_block(5 * PAGE as u64, &mut b).unwrap();
    assert!(b[..] == committed[5 * PAGE..6 * PAGE]);
}

/// Block `off` as written by epoch `e`: the epoch and offset, then a
/// pattern derived from both, so a torn or misplaced block is evident.
fn tagged(e: u64, off: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE];
    for (i, ch) in v.chunks_mut(8).enumerate() {
        let w = match i {
            0 => e,
            1 => off,
            _ => e.wrapping_mul(0x9E37_79B9).wrapping_add(off ^ i as u64),
        };
        ch.copy_from_slice(&w.to_le_bytes());
    }
    v
}

#[test]
fn disk_view_reads_committed_blocks_while_the_store_appends_and_migrates() {
    // A small ring: frequent wraps and automatic migrations while another
    // thread reads every block through the view.
    let (_dev, mut store) = mem_store(64 * 1024, 96 * 1024);
    let view = store.disk_view();
    let nblocks = DISK_BYTES / PAGE as u64;
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (view, committed, stop) = (view.clone(), committed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut newest = vec![0u64; nblocks as usize];
            let mut reads = 0u64;
            let mut b = [0u8; PAGE];
            while !stop.load(Ordering::Acquire) {
                for i in 0..nblocks {
                    let off = i * PAGE as u64;
                    view.read_block(off, &mut b).unwrap();
                    let e = u64::from_le_bytes(b[..8].try_into().unwrap());
                    let limit = committed.load(Ordering::Acquire) + 1;
                    if e == 0 {
                        assert!(b.iter().all(|&x| x == 0), "block {off:#x}: not zero");
                    } else {
                        assert!(b[..] == tagged(e, off), "block {off:#x}: torn or misplaced");
                    }
                    assert!(e <= limit, "block {off:#x}: epoch {e} not committed");
                    assert!(e >= newest[i as usize], "block {off:#x}: went back");
                    newest[i as usize] = e;
                    reads += 1;
                }
            }
            reads
        })
    };
    let mut rng = Rng::new(77);
    for _ in 0..300 {
        let e = store.next_epoch();
        let offs: Vec<u64> = (0..1 + rng.below(6))
            .map(|_| rng.below(nblocks) * PAGE as u64)
            .collect();
        let datas: Vec<(u64, Vec<u8>)> = offs.iter().map(|&o| (o, tagged(e, o))).collect();
        let mut disk = datas.iter().map(|(o, d)| (*o, d.as_slice()));
        let meta = EpochMeta::default();
        let info = store
            .append_epoch_with_disk(&meta, &mut std::iter::empty(), &mut disk, b"st")
            .unwrap();
        committed.store(info.epoch, Ordering::Release);
        if rng.chance(1, 10)
            && let Some(first) = store.epochs().first().map(|i| i.epoch)
        {
            store.migrate(first).unwrap();
        }
    }
    assert!(store.home_epoch() > 100, "too few migrations");
    stop.store(true, Ordering::Release);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    // Afterwards the view agrees with the export of the newest epoch.
    let mut disk = Vec::new();
    store
        .read_disk(store.last_epoch().unwrap(), &mut disk)
        .unwrap();
    Model::verify_view(&store, &disk);
}

#[test]
fn import_disk_fills_the_home_of_a_fresh_store_only() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let mut image = vec![0u8; DISK_BYTES as usize];
    for (i, ch) in image.chunks_mut(PAGE).enumerate() {
        if i % 3 != 0 {
            ch.copy_from_slice(&block_data(9, 0, i as u64));
        }
    }
    // Wrong size.
    let err = store
        .import_disk(&mut &image[..PAGE], PAGE as u64)
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    // A short reader is an I/O error.
    let err = store
        .import_disk(&mut &image[..PAGE], DISK_BYTES)
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    let (writes, _) = dev.counts();
    store.import_disk(&mut &image[..], DISK_BYTES).unwrap();
    let (writes2, _) = dev.counts();
    // Zero blocks skipped: runs of two non-zero blocks, 16 blocks.
    assert!(writes2 - writes <= 6, "{} writes", writes2 - writes);
    Model::verify_view(&store, &image);
    let mut model = Model::new(64 * 1024);
    model.disk = image.clone();
    append_disk(&mut store, &mut model, 9, &[0], &blocks(&[3]), 5).unwrap();
    assert_eq!(model.verify(&reopen(&dev)), Some(1));
    let err = store.import_disk(&mut &image[..], DISK_BYTES).unwrap_err();
    assert!(err.to_string().contains("new store"), "{err}");
    let Err(err) = Store::open_with_io(label(), dev.io(), true)
        .unwrap()
        .import_disk(&mut &image[..], DISK_BYTES)
    else {
        panic!("import through a read-only store");
    };
    assert!(matches!(err, StoreError::ReadOnly { .. }), "{err}");
}

#[test]
fn bad_disk_blocks_are_errors_and_commit_nothing() {
    let (dev, mut store) = mem_store(64 * 1024, 256 * 1024);
    let mut model = Model::new(64 * 1024);
    append_disk(&mut store, &mut model, 1, &[0], &blocks(&[1]), 5).unwrap();
    let good = vec![7u8; PAGE];
    for (off, len) in [
        (DISK_BYTES, PAGE),
        (100, PAGE),
        (u64::MAX - 4095, PAGE),
        (0, 512),
    ] {
        let mut pages = std::iter::once((0u64, &good[..]));
        let mut disk = [(4096u64, &good[..]), (off, &good[..len])].into_iter();
        let err = store
            .append_epoch_with_disk(&EpochMeta::default(), &mut pages, &mut disk, b"x")
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("disk"), "{err}");
        assert_eq!(store.next_epoch(), 2);
        assert_eq!(model.verify(&store), Some(1));
    }
    assert_eq!(model.verify(&reopen(&dev)), Some(1));
    let mut b = [0u8; PAGE];
    for off in [DISK_BYTES, 100] {
        let err = store.read_disk_block(1, off, &mut b).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        assert!(store.disk_view().read_block(off, &mut b).is_err());
    }
    assert!(matches!(
        store.read_disk_block(9, 0, &mut b),
        Err(StoreError::EpochNotRetained { .. })
    ));
    assert!(matches!(
        store.read_disk(9, &mut Vec::new()),
        Err(StoreError::EpochNotRetained { .. })
    ));
    // Still usable.
    append_disk(&mut store, &mut model, 1, &[0], &blocks(&[2]), 5).unwrap();
    assert_eq!(model.verify(&reopen(&dev)), Some(2));
}

#[test]
fn a_store_without_a_disk() {
    let mut o = opts(64 * 1024, 128 * 1024);
    o.disk_bytes = 0;
    let dev = CrashDevice::new(o.store_bytes());
    let mut store = Store::create_with_io(label(), dev.io(), &o).unwrap();
    let mut model = Model::with_disk(64 * 1024, 0);
    append(&mut store, &mut model, 1, &[0], 5).unwrap();
    assert_eq!(model.verify(&reopen(&dev)), Some(1));
    let mut b = [0u8; PAGE];
    assert!(store.disk_view().read_block(0, &mut b).is_err());
    let mut out = Vec::new();
    store.read_disk(1, &mut out).unwrap();
    assert!(out.is_empty());
    o.disk_bytes = 100;
    assert!(matches!(
        Store::create_with_io(label(), CrashDevice::new(1 << 23).io(), &o),
        Err(StoreError::Invalid { .. })
    ));
}

#[test]
fn store_bytes_accounts_for_the_disk() {
    let mut o = opts(64 * 1024, 128 * 1024);
    o.disk_bytes = 0;
    let without = o.store_bytes();
    o.disk_bytes = 1 << 20;
    assert_eq!(o.store_bytes(), without + (1 << 20));
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    send_sync_clone::<crate::DiskView>();
}

#[test]
fn changed_between_lists_the_pages_and_blocks_of_the_later_epochs() {
    let mem = 64 * 1024;
    let (_dev, mut store) = mem_store(mem, 1 << 20);
    let mut model = Model::new(mem);
    append_disk(&mut store, &mut model, 3, &[0, 4096], &blocks(&[0]), 30).unwrap();
    append_disk(
        &mut store,
        &mut model,
        3,
        &[8192, 4096],
        &blocks(&[2, 1]),
        30,
    )
    .unwrap();
    append_disk(&mut store, &mut model, 3, &[12288], &blocks(&[2]), 30).unwrap();
    let d = store.changed_between(1, 3).unwrap();
    assert_eq!(d.pages, [4096, 8192, 12288]);
    assert_eq!(d.disk_blocks, blocks(&[1, 2]));
    let d = store.changed_between(2, 3).unwrap();
    assert_eq!((d.pages, d.disk_blocks), (vec![12288], blocks(&[2])));
    assert!(matches!(
        store.changed_between(1, 9),
        Err(StoreError::EpochNotRetained { epoch: 9, .. })
    ));
    // After migration the home epoch is a valid starting point.
    store.migrate(2).unwrap();
    let d = store.changed_between(2, 3).unwrap();
    assert_eq!(d.pages, [12288]);
    assert!(
        store.changed_between(1, 3).is_err(),
        "epoch 1 was folded into home"
    );
}
