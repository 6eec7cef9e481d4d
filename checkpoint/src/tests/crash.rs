//! Power cuts at every write and sync of scripted epoch sequences, and at
//! random points of random sequences, checked against a model: recovery
//! must yield exactly one committed epoch's memory and state, never older
//! than the last epoch whose append returned Ok.

use super::*;
use crate::testing::{CrashDevice, PowerCut, Rng};
use crate::{CreateOptions, Store};

#[derive(Clone, Debug)]
enum Op {
    /// Pages, disk blocks (byte offsets), state length.
    Append(Vec<u64>, Vec<u64>, usize),
    /// Migrate through the n-th newest retained epoch (0 = newest).
    Migrate(usize),
    Discard,
    Reopen,
}

/// What may be recovered after a cut.
#[derive(Debug)]
struct Progress {
    created: bool,
    /// The newest epoch reported committed (None: none, or discarded since).
    floor: Option<u64>,
    /// Also acceptable because the operation in flight may have completed.
    in_flight: Option<Option<u64>>,
    ops_done: usize,
}

fn pages(list: &[u64]) -> Vec<u64> {
    list.iter().map(|p| p * PAGE as u64).collect()
}

/// The brief's script: create, 5 epochs with overlapping pages, a
/// migration, 3 more epochs; then a discard and one more epoch.
fn scripted() -> Vec<Op> {
    let a = |p: &[u64], d: &[u64], s| Op::Append(pages(p), pages(d), s);
    vec![
        a(&[0, 1, 2, 3], &[0, 1], 300),
        a(&[2, 3, 4], &[1, 15], 200),
        a(&[0, 4, 5, 6, 7, 8], &[], 5000),
        a(&[1, 8], &[2, 0], 0),
        a(&[9, 10, 3], &[1], 100),
        Op::Migrate(1),
        a(&[3, 11], &[3, 1], 100),
        a(&[12, 13, 14, 15, 0], &[], 100),
        a(&[11], &[4, 15], 100),
        Op::Reopen,
        Op::Discard,
        a(&[5], &[4], 50),
    ]
}

fn run(dev: &CrashDevice, o: &CreateOptions, ops: &[Op], seed: u64, model: &mut Model) -> Progress {
    let mut p = Progress {
        created: false,
        floor: None,
        in_flight: None,
        ops_done: 0,
    };
    let Ok(mut store) = Store::create_with_io(label(), dev.io(), o) else {
        return p;
    };
    p.created = true;
    for op in ops {
        let r = match op {
            Op::Append(gpas, disk, state) => {
                p.in_flight = Some(Some(store.next_epoch()));
                match append_disk(&mut store, model, seed, gpas, disk, *state) {
                    Ok(e) => {
                        p.floor = Some(e);
                        Ok(())
                    }
                    Err(StoreError::LogFull { .. }) if !dev.is_cut() => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Op::Migrate(back) => {
                p.in_flight = None;
                let eps = store.epochs();
                match eps.len().checked_sub(1 + back) {
                    Some(i) => store.migrate(eps[i].epoch),
                    None => Ok(()),
                }
            }
            Op::Discard => {
                p.in_flight = Some(None);
                let r = store.discard_machine_state();
                if r.is_ok() {
                    p.floor = None;
                    model.mem.fill(0);
                }
                r
            }
            Op::Reopen => {
                p.in_flight = None;
                drop(store);
                match Store::open_with_io(label(), dev.io(), false) {
                    Ok(s) => {
                        store = s;
                        Ok(())
                    }
                    Err(e) => {
                        assert!(dev.is_cut(), "reopen failed without a cut: {e}");
                        return p;
                    }
                }
            }
        };
        if let Err(e) = r {
            assert!(dev.is_cut(), "operation {op:?} failed without a cut: {e}");
            return p;
        }
        p.ops_done += 1;
        p.in_flight = None;
    }
    p
}

/// Recover from `image` and check it against the model and the progress.
fn check(dev: CrashDevice, model: &Model, p: &Progress, seed: u64, what: &str) {
    // A read-only look first (it must not finish anything), then read-write.
    for read_only in [true, false] {
        let store = match Store::open_with_io(label(), dev.io(), read_only) {
            Ok(s) => s,
            Err(e) => {
                assert!(!p.created, "{what}: a created store does not open: {e}");
                return;
            }
        };
        let got = model.verify(&store);
        let ok = got == p.floor || p.in_flight == Some(got);
        assert!(
            ok,
            "{what} (read-only {read_only}): recovered {got:?}, expected {:?} or {:?}",
            p.floor, p.in_flight
        );
        if read_only {
            continue;
        }
        // The recovered store keeps working: one more epoch, then reopen.
        let mut store = store;
        let mut m2 = Model::with_disk(model.mem.len() as u64, model.disk.len() as u64);
        match got {
            Some(e) => {
                m2.mem = model.epochs[&e].0.clone();
                m2.disk = model.epochs[&e].2.clone();
            }
            // No epoch (never one, or discarded): the disk home is the
            // newest committed disk, which a discard keeps.
            None => m2.disk = model.disk.clone(),
        }
        Model::verify_view(&store, &m2.disk);
        let e = append_disk(
            &mut store,
            &mut m2,
            seed ^ 0xabc,
            &[0, 2 * PAGE as u64],
            &[PAGE as u64],
            70,
        )
        .unwrap();
        let store = Store::open_with_io(label(), dev.io(), true).unwrap();
        assert_eq!(
            store.last_epoch(),
            Some(e),
            "{what}: epoch after recovery lost"
        );
        let mut buf = vec![0u8; m2.mem.len()];
        store.read_memory(e, &mut buf).unwrap();
        assert!(
            buf == m2.mem,
            "{what}: epoch appended after recovery reads back wrong"
        );
        let mut disk = Vec::new();
        store.read_disk(e, &mut disk).unwrap();
        assert!(
            disk == m2.disk,
            "{what}: disk of the epoch appended after recovery reads back wrong"
        );
    }
}

const MODES: [PowerCut; 8] = [
    PowerCut::SyncedOnly,
    PowerCut::AllWritten,
    PowerCut::Subset(1),
    PowerCut::Subset(2),
    PowerCut::Subset(3),
    PowerCut::Torn(1),
    PowerCut::Torn(2),
    PowerCut::Torn(3),
];

fn exhaustive(o: &CreateOptions, ops: &[Op], seed: u64) -> u64 {
    let dry = CrashDevice::new(o.store_bytes());
    let mut model = Model::new(o.mem_bytes);
    let p = run(&dry, o, ops, seed, &mut model);
    assert_eq!(p.ops_done, ops.len(), "the script fails without a cut");
    let total = dry.ops();
    let mut cases = 0;
    for cut in 0..=total {
        for mode in MODES {
            let dev = CrashDevice::new(o.store_bytes());
            dev.cut_at(cut);
            let mut model = Model::new(o.mem_bytes);
            let p = run(&dev, o, ops, seed, &mut model);
            check(
                dev.after_power_cut(mode),
                &model,
                &p,
                seed,
                &format!("cut at op {cut}/{total}, {mode:?}"),
            );
            cases += 1;
            if mode != PowerCut::SyncedOnly {
                continue;
            }
            // The write in flight torn at every sector boundary (sampled
            // for large writes), everything before it written.
            let Some(len) = dev.cut_write_len() else {
                continue;
            };
            let sectors = len.div_ceil(crate::testing::SECTOR);
            let stride = (sectors / 24).max(1);
            for n in (0..sectors).step_by(stride) {
                let mode = PowerCut::TornLast(n);
                let what = format!("cut at op {cut}/{total}, {mode:?}");
                check(dev.after_power_cut(mode), &model, &p, seed, &what);
                cases += 1;
            }
        }
    }
    eprintln!("{total} write/sync points, {cases} power-cut cases");
    cases
}

#[test]
fn crash_at_every_write_and_sync_of_the_script() {
    // Roomy log: explicit migration only.
    let cases = exhaustive(&opts(64 * 1024, 1 << 20), &scripted(), 11);
    assert!(cases > 400, "only {cases} cases");
}

#[test]
fn crash_at_every_write_and_sync_with_a_small_ring() {
    // 16-block ring: wrap records and automatic migrations mid-sequence.
    let cases = exhaustive(&opts(64 * 1024, 64 * 1024), &scripted(), 12);
    assert!(cases > 400, "only {cases} cases");
}

fn random_ops(rng: &mut Rng, mem_pages: u64, max_pages: u64, disk_blocks: u64) -> Vec<Op> {
    let n = 4 + rng.below(14);
    (0..n)
        .map(|_| match rng.below(20) {
            0..=13 => {
                let k = rng.below(max_pages + 1);
                let mut g: Vec<u64> = (0..k).map(|_| rng.below(mem_pages) * PAGE as u64).collect();
                g.sort_unstable();
                g.dedup();
                // Disk blocks: unsorted, sometimes repeated (the later wins).
                let d: Vec<u64> = (0..rng.below(4))
                    .map(|_| rng.below(disk_blocks) * PAGE as u64)
                    .collect();
                Op::Append(g, d, rng.below(3 * PAGE as u64) as usize)
            }
            14..=16 => Op::Migrate(rng.below(3) as usize),
            17 => Op::Discard,
            _ => Op::Reopen,
        })
        .collect()
}

#[test]
fn random_sequences_and_cuts_against_the_model() {
    let cases = 1200u64;
    for case in 0..cases {
        let mut rng = Rng::new(0x5eed_0000 + case);
        let mem_pages = 16 + rng.below(48);
        let log_blocks = 16 + rng.below(48);
        let o = opts(mem_pages * PAGE as u64, log_blocks * PAGE as u64);
        // Mostly epochs that fit; sometimes ones that cannot (LogFull).
        let max_pages = if rng.chance(1, 8) {
            mem_pages
        } else {
            (log_blocks / 3).min(mem_pages)
        };
        let ops = random_ops(&mut rng, mem_pages, max_pages, DISK_BYTES / PAGE as u64);
        let dry = CrashDevice::new(o.store_bytes());
        let mut model = Model::new(o.mem_bytes);
        let p = run(&dry, &o, &ops, case, &mut model);
        assert_eq!(
            p.ops_done,
            ops.len(),
            "case {case}: script fails without a cut"
        );
        let cut = rng.below(dry.ops() + 1);
        let mode = match rng.below(4) {
            0 => PowerCut::SyncedOnly,
            1 => PowerCut::AllWritten,
            2 => PowerCut::Subset(rng.next_u64()),
            _ => PowerCut::Torn(rng.next_u64()),
        };
        let dev = CrashDevice::new(o.store_bytes());
        dev.cut_at(cut);
        let mut model = Model::new(o.mem_bytes);
        let p = run(&dev, &o, &ops, case, &mut model);
        check(
            dev.after_power_cut(mode),
            &model,
            &p,
            case,
            &format!("case {case}: cut at {cut}/{}, {mode:?}, {ops:?}", dry.ops()),
        );
    }
}

#[test]
fn injected_io_errors_leave_the_last_epoch_intact_and_retry_works() {
    // Issue 4's faults through the same layer: EIO/ENOSPC on any one
    // operation of an append or a migration; the store reports it, keeps
    // the last committed epoch, and the retried operation succeeds.
    let mut surfaced = 0;
    for errno in [libc::EIO, libc::ENOSPC] {
        for k in 0..40u64 {
            let (dev, mut store) = mem_store(64 * 1024, 64 * 1024);
            let mut model = Model::new(64 * 1024);
            append(&mut store, &mut model, 1, &pages(&[0, 1]), 100).unwrap();
            append(&mut store, &mut model, 1, &pages(&[1, 2]), 100).unwrap();
            dev.fail_at(dev.ops() + k, errno);
            let mut failed = false;
            let before = dev.ops();
            for round in 0..4u64 {
                let r = if round % 2 == 0 {
                    append(
                        &mut store,
                        &mut model,
                        1,
                        &pages(&[3 + round, 1, 5, 6, 7]),
                        3000,
                    )
                    .map(|_| ())
                } else {
                    match store.epochs().first().map(|e| e.epoch) {
                        Some(e) => store.migrate(e),
                        None => Ok(()),
                    }
                };
                if let Err(e) = r {
                    assert!(matches!(e, StoreError::Io { .. }), "{e}");
                    failed = true;
                    let s = Store::open_with_io(label(), dev.io(), true).unwrap();
                    assert!(s.last_epoch() >= Some(2));
                }
            }
            // (A fault on a mirror superblock write is absorbed by design.)
            assert!(
                dev.ops() > before + k,
                "errno {errno}: the fault at +{k} was never reached"
            );
            surfaced += u32::from(failed);
            let last = store.last_epoch();
            let s = Store::open_with_io(label(), dev.io(), false).unwrap();
            // A failed sync may still have made the epoch durable: it is a
            // whole epoch, and the next append rewrites it.
            let got = model.verify(&s);
            assert!(
                got == last || got == last.map(|l| l + 1),
                "errno {errno}, fault at +{k}: {got:?} vs {last:?}"
            );
        }
    }
    assert!(surfaced > 50, "only {surfaced} faults surfaced as errors");
}
