//! Offline commands on a store (issue 5): `evm epochs` lists the retained
//! epochs, `evm diff` what changed between two, `evm export --memory`
//! writes an epoch's guest memory image and `evm fork` makes a new store
//! whose state is an older epoch. All of them
//! open the store read-only and unlocked, so they work while its VM runs.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use checkpoint::{CreateOptions, EpochMeta, Store, StoreError};

/// Guest page size, the unit of the store's memory records.
const PAGE: usize = 4096;

/// Errors of the offline commands.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The store (its errors name the path).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The asked-for epoch is not retained.
    #[error("--epoch {epoch}: not a retained committed epoch of {} (retained: {retained})", path.display())]
    NotRetained {
        /// The epoch asked for.
        epoch: u64,
        /// The store.
        path: PathBuf,
        /// What is retained.
        retained: String,
    },
    /// The store holds no machine state at all.
    #[error("--store {}: holds no committed epoch (fresh, or the guest powered off)", .0.display())]
    NoEpoch(PathBuf),
    /// An output file cannot be written.
    #[error("{flag} {}", path.display())]
    Output {
        /// Its flag.
        flag: &'static str,
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `evm diff` with epochs in the wrong order.
    #[error("evm diff {a} {b}: the first epoch must be older than the second")]
    DiffOrder {
        /// First.
        a: u64,
        /// Second.
        b: u64,
    },
    /// The fork's destination exists.
    #[error("{}: exists; evm fork makes a new store and never overwrites one", .0.display())]
    ForkExists(PathBuf),
}

/// Retained epochs of `store` for messages: `a..b`, `home N, a..b`, `none`.
pub fn retained(store: &Store) -> String {
    let mut all: Vec<u64> = store.epochs().iter().map(|e| e.epoch).collect();
    if store.resumable() && store.home_epoch() > 0 && !all.contains(&store.home_epoch()) {
        all.insert(0, store.home_epoch());
    }
    match (all.first(), all.last()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}..{b}"),
        _ => "none".into(),
    }
}

/// `epoch`, checked to be readable, or the newest one.
pub fn pick_epoch(store: &Store, path: &Path, epoch: Option<u64>) -> Result<u64, ToolError> {
    let newest = store
        .last_epoch()
        .ok_or_else(|| ToolError::NoEpoch(path.to_path_buf()))?;
    let Some(epoch) = epoch else {
        return Ok(newest);
    };
    let is_home = epoch > 0 && epoch == store.home_epoch() && store.resumable();
    if is_home || store.epochs().iter().any(|e| e.epoch == epoch) {
        Ok(epoch)
    } else {
        Err(ToolError::NotRetained {
            epoch,
            path: path.to_path_buf(),
            retained: retained(store),
        })
    }
}

/// Wall time (ns since the Unix epoch) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `evm epochs`: the table (or JSON) of the retained epochs on stdout.
pub fn epochs(path: &Path, json: bool) -> Result<(), ToolError> {
    let store = Store::open_read_only(path)?;
    let home = (store.home_epoch() > 0).then_some(store.home_epoch());
    let mut out = String::new();
    if json {
        let list: Vec<serde_json::Value> = store
            .epochs()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "epoch": e.epoch,
                    "wall_time": utc(e.wall_time_ns),
                    "wall_time_ns": e.wall_time_ns,
                    "freeze_us": e.freeze_us,
                    "dirty_pages": e.dirty_pages,
                    "disk_blocks": e.disk_blocks,
                    "bytes": e.bytes,
                    "commit_latency_us": e.commit_latency_us,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "store": path.display().to_string(),
            "home_epoch": home,
            "resumable": store.resumable(),
            "last_epoch": store.last_epoch(),
            "mem_bytes": store.mem_bytes(),
            "disk_bytes": store.disk_bytes(),
            "log_bytes": store.log_bytes(),
            "log_fill": store.log_fill(),
            "epochs": list,
        });
        out.push_str(&doc.to_string());
        out.push('\n');
    } else {
        out.push_str(&format!(
            "{:>8}  {:<24}  {:>9}  {:>11}  {:>11}  {:>9}  {:>9}\n",
            "epoch",
            "wall time (UTC)",
            "freeze µs",
            "dirty pages",
            "disk blocks",
            "MiB",
            "commit µs"
        ));
        for e in store.epochs() {
            let commit = match e.commit_latency_us {
                0 => "-".to_string(),
                us => us.to_string(),
            };
            out.push_str(&format!(
                "{:>8}  {:<24}  {:>9}  {:>11}  {:>11}  {:>9.2}  {:>9}\n",
                e.epoch,
                utc(e.wall_time_ns),
                e.freeze_us,
                e.dirty_pages,
                e.disk_blocks,
                e.bytes as f64 / (1u64 << 20) as f64,
                commit
            ));
        }
        let home = match home {
            Some(h) if store.resumable() => format!("home holds epoch {h}"),
            Some(h) => format!("home holds the memory of epoch {h}, discarded (guest powered off)"),
            None => "home holds no epoch yet".into(),
        };
        out.push_str(&format!(
            "{home}; {} epochs in the log, {:.0}% full\n",
            store.epochs().len(),
            store.log_fill() * 100.0
        ));
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .map_err(|source| ToolError::Output {
            flag: "stdout",
            path: "-".into(),
            source,
        })
}

/// A flat memory-image offset as a guest-physical address (RAM above the
/// MMIO gap follows RAM below it in the image).
fn gpa(off: u64) -> u64 {
    use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};
    if off < MMIO_GAP_START {
        off
    } else {
        off + (MMIO_GAP_END - MMIO_GAP_START)
    }
}

/// Sorted 4 KiB-unit addresses as `first-last (n)` runs, one per line.
fn runs(addrs: &[u64], out: &mut String) {
    let mut i = 0;
    while i < addrs.len() {
        let mut j = i;
        while j + 1 < addrs.len() && addrs[j + 1] == addrs[j] + PAGE as u64 {
            j += 1;
        }
        let last = addrs[j] + PAGE as u64 - 1;
        out.push_str(&format!("  {:#x}-{last:#x} ({})\n", addrs[i], j - i + 1));
        i = j + 1;
    }
}

/// `evm diff`: the pages and disk blocks written after epoch `a` up to
/// epoch `b`, as runs of guest-physical addresses and disk offsets.
pub fn diff(path: &Path, a: u64, b: u64) -> Result<(), ToolError> {
    if a >= b {
        return Err(ToolError::DiffOrder { a, b });
    }
    let store = Store::open_read_only(path)?;
    for e in [a, b] {
        pick_epoch(&store, path, Some(e))?;
    }
    let d = store.changed_between(a, b)?;
    let pages: Vec<u64> = d.pages.iter().map(|&o| gpa(o)).collect();
    let mut out = format!(
        "epoch {a} -> {b}: {} pages ({:.1} MiB) and {} disk blocks written\n",
        pages.len(),
        (pages.len() * PAGE) as f64 / (1u64 << 20) as f64,
        d.disk_blocks.len()
    );
    out.push_str("pages (guest-physical):\n");
    runs(&pages, &mut out);
    if store.disk_bytes() > 0 {
        out.push_str("disk blocks (byte offsets):\n");
        runs(&d.disk_blocks, &mut out);
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .map_err(|source| ToolError::Output {
            flag: "stdout",
            path: "-".into(),
            source,
        })
}

/// Creates `out` (never an existing file) and writes `fill`'s bytes into
/// it, fdatasync'd; a failure removes the partial file.
fn write_new(
    flag: &'static str,
    out: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), ToolError>,
) -> Result<(), ToolError> {
    let output = |source| ToolError::Output {
        flag,
        path: out.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(output)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let written = fill(&mut w).and_then(|()| w.flush().map_err(output));
    let synced = written.and_then(|()| w.get_ref().sync_data().map_err(output));
    if synced.is_err() {
        let _ = std::fs::remove_file(out);
    }
    synced
}

/// `evm export --memory`: the flat guest memory image of `epoch` (default:
/// the newest) of the store at `path`, as a new file `out`. Returns the epoch.
pub fn export_memory(path: &Path, out: &Path, epoch: Option<u64>) -> Result<u64, ToolError> {
    let store = Store::open_read_only(path)?;
    let epoch = pick_epoch(&store, path, epoch)?;
    let mut image = vec![0u8; store.mem_bytes() as usize];
    store.read_memory(epoch, &mut image)?;
    write_new("--memory", out, |w| {
        w.write_all(&image).map_err(|source| ToolError::Output {
            flag: "--memory",
            path: out.to_path_buf(),
            source,
        })
    })?;
    eprintln!(
        "evm: exported the memory of epoch {epoch} of {} to {} ({} bytes, RAM above the 3 GiB gap follows RAM below it)",
        path.display(),
        out.display(),
        image.len()
    );
    Ok(epoch)
}

/// `evm fork`: a new store at `dst` whose only epoch (1) is epoch `epoch`
/// of `src`: the same configuration, that epoch's memory, machine state and
/// disk. The source is only read. Returns the source epoch.
pub fn fork(src: &Path, epoch: u64, dst: &Path) -> Result<u64, ToolError> {
    let from = Store::open_read_only(src)?;
    let epoch = pick_epoch(&from, src, Some(epoch))?;
    if dst.exists() {
        return Err(ToolError::ForkExists(dst.to_path_buf()));
    }
    let wall_time_ns = from
        .epochs()
        .iter()
        .find(|e| e.epoch == epoch)
        .map_or(0, |e| e.wall_time_ns);
    let mut memory = vec![0u8; from.mem_bytes() as usize];
    from.read_memory(epoch, &mut memory)?;
    let state = from.read_state(epoch)?;
    let opts = CreateOptions {
        mem_bytes: from.mem_bytes(),
        disk_bytes: from.disk_bytes(),
        log_bytes: from.log_bytes(),
        config: from.config().to_vec(),
    };
    let result = (|| {
        let mut to = Store::create(dst, &opts)?;
        if from.disk_bytes() > 0 {
            copy_disk(src, epoch, &mut to)?;
        }
        let nonzero: Vec<usize> = (0..memory.len() / PAGE)
            .filter(|&i| memory[i * PAGE..(i + 1) * PAGE].iter().any(|&b| b != 0))
            .collect();
        let meta = EpochMeta {
            wall_time_ns,
            freeze_us: 0,
            dirty_pages: nonzero.len() as u64,
        };
        let mut pages = nonzero
            .iter()
            .map(|&i| ((i * PAGE) as u64, &memory[i * PAGE..(i + 1) * PAGE]));
        to.append_epoch_with_disk(&meta, &mut pages, &mut std::iter::empty(), &state)?;
        Ok::<(), ToolError>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(dst);
        return Err(e);
    }
    eprintln!(
        "evm: forked epoch {epoch} of {} into the new store {} (its epoch 1); run it with evm run --store {}",
        src.display(),
        dst.display(),
        dst.display()
    );
    Ok(epoch)
}

/// The disk of `epoch` of the store at `src` into the (fresh) disk home of
/// `to`, streamed through a pipe so that memory use does not grow with the
/// disk (the reading side opens the source again: a `Store` is not `Sync`).
fn copy_disk(src: &Path, epoch: u64, to: &mut Store) -> Result<(), ToolError> {
    let (mut reader, mut writer) = std::io::pipe().map_err(|source| ToolError::Output {
        flag: "fork",
        path: to.path().to_path_buf(),
        source,
    })?;
    let from = Store::open_read_only(src)?;
    let len = from.disk_bytes();
    let feeder = std::thread::spawn(move || {
        let r = from.read_disk(epoch, &mut writer);
        drop(writer);
        r
    });
    let imported = to.import_disk(&mut reader, len);
    drop(reader);
    let fed = feeder
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    fed.and(imported).map_err(ToolError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_gpas() {
        let mut out = String::new();
        runs(&[0, 4096, 8192, 20480], &mut out);
        assert_eq!(out, "  0x0-0x2fff (3)\n  0x5000-0x5fff (1)\n");
        assert_eq!(gpa(0xbfff_f000), 0xbfff_f000);
        assert_eq!(gpa(0xc000_0000), 0x1_0000_0000);
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123_000_000), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_515_200_000_000_000), "2026-12-06T00:00:00.000Z");
    }
}
