//! Append throughput of the store on a real file (with fdatasync).
//!
//! `cargo run --release -p checkpoint --example append_bench -- [DIR] [MiB]`
//! creates a store in DIR (default: the system temp dir), appends epochs of
//! MiB (default 64) of distinct pages, and reports MiB/s per epoch, then
//! the time to migrate them home and to read the memory back.
#![allow(clippy::print_stdout)]

use checkpoint::{CreateOptions, EpochMeta, Store};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    let mib: u64 = args.next().map_or(Ok(64), |s| s.parse())?;
    let path = dir.join(format!("append-bench-{}.evm", std::process::id()));
    let mem_bytes = (4 * mib) << 20;
    let opts = CreateOptions {
        mem_bytes,
        disk_bytes: 0,
        log_bytes: (8 * mib) << 20,
        config: b"bench".to_vec(),
    };
    let t = Instant::now();
    let mut store = Store::create(&path, &opts)?;
    println!(
        "create {} MiB store: {:.0} ms",
        opts.store_bytes() >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );
    let pages = (mib << 20) / 4096;
    let mem: Vec<u8> = (0..mem_bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let state = vec![7u8; 64 << 10];
    for round in 0..4u64 {
        let base = (round % 4) * pages;
        let mut it = (0..pages).map(|i| {
            let gpa = (base + i) * 4096;
            (gpa, &mem[gpa as usize..gpa as usize + 4096])
        });
        let meta = EpochMeta {
            wall_time_ns: 0,
            freeze_us: 0,
            dirty_pages: pages,
        };
        let t = Instant::now();
        let info = store.append_epoch(&meta, &mut it, &state)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "epoch {}: {} pages, {:.1} MiB in {:.0} ms incl. fdatasync: {:.0} MiB/s (log fill {:.0}%)",
            info.epoch,
            info.pages,
            info.bytes as f64 / 1048576.0,
            s * 1e3,
            info.bytes as f64 / 1048576.0 / s,
            store.log_fill() * 100.0
        );
    }
    let last = store.last_epoch().unwrap_or(0);
    let mut buf = vec![0u8; mem_bytes as usize];
    for _ in 0..2 {
        let t = Instant::now();
        store.read_memory(last, &mut buf)?;
        println!(
            "read_memory ({} MiB, log epochs applied): {:.0} ms",
            mem_bytes >> 20,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    store.migrate(last)?;
    println!(
        "migrate {} epochs home: {:.0} ms",
        4,
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    store.read_memory(last, &mut buf)?;
    println!(
        "read_memory (home only): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(buf == mem, "memory read back differs");
    drop(store);
    std::fs::remove_file(&path)?;
    Ok(())
}
