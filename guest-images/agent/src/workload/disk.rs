//! The `disk` workload: appends one record a block to a raw disk, each
//! written with pwrite and made durable with fdatasync, and remembers in
//! memory how far it got:
//!
//! - `issued`: the last record handed to pwrite (set *before* the write, so
//!   the disk can never hold a record past it);
//! - `durable`: the last record whose fdatasync returned.
//!
//! A VM rolled back to one consistent epoch has `durable <= K <= issued`,
//! K being the last record of the unbroken run on disk.
//!
//! On start it continues after the last valid record already on the disk
//! (from an earlier boot). When the device is full it stops appending.
//! Checks read the disk with O_DIRECT where the file system allows it, so
//! they see the device, not the guest's page cache.

use super::pace::{GATE_NAP, Gate, Pacer, lock};
use super::record::{self, BLOCK, BlockSource, DiskFault, Own, Record};
use crate::say;
use crate::sys::{Region, format_uuid};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long to wait for the device node to appear at boot.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(10);
/// Blocks per read when scanning (1 MiB).
const SCAN_BLOCKS: usize = 256;
/// Stored in the atomics for "no record".
const NONE: u64 = u64::MAX;

/// Why the disk workload could not start.
#[derive(Debug)]
pub enum DiskError {
    Open { path: String, source: io::Error },
    Scan { path: String, source: DiskFault },
    Map(io::Error),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Open { path, .. } => write!(f, "cannot open disk {path}"),
            DiskError::Scan { path, .. } => write!(f, "cannot scan disk {path}"),
            DiskError::Map(_) => write!(f, "cannot map the disk read buffer"),
        }
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiskError::Open { source, .. } | DiskError::Map(source) => Some(source),
            DiskError::Scan { source, .. } => Some(source),
        }
    }
}

/// Reads blocks with pread (from an O_DIRECT descriptor when possible).
#[derive(Debug)]
struct Reader(File);

impl BlockSource for Reader {
    fn read_blocks(&mut self, first: u64, buf: &mut [u8]) -> io::Result<usize> {
        let offset = first
            .checked_mul(BLOCK as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

#[derive(Debug)]
struct Log {
    file: File,
    reader: Reader,
    buf: Region,
    /// Blocks the device holds.
    limit: u64,
    issued: Option<u64>,
    durable: Option<u64>,
    own: Own,
    full: bool,
}

impl Log {
    fn scan(&mut self, horizon: u64, own: Option<Own>) -> Result<record::Scan, DiskFault> {
        record::scan(
            &mut self.reader,
            self.buf.bytes_mut(),
            self.limit,
            horizon,
            own,
        )
    }

    /// Appends the next record; returns its sequence number.
    fn append(&mut self) -> io::Result<u64> {
        let seq = self.durable.map_or(0, |d| d + 1);
        self.issued = Some(self.issued.map_or(seq, |i| i.max(seq)));
        let rec = Record {
            seq,
            boot_id: self.own.boot_id,
            time_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        self.file.write_all_at(&rec.encode(), seq * BLOCK as u64)?;
        self.file.sync_data()?;
        self.durable = Some(seq);
        Ok(seq)
    }
}

/// The result of checking the disk against memory.
#[derive(Debug)]
pub struct DiskCheck {
    pub durable: Option<u64>,
    pub issued: Option<u64>,
    pub result: Result<Option<u64>, DiskFault>,
}

/// The running disk workload.
#[derive(Debug)]
pub struct Disk {
    log: Mutex<Log>,
    gate: Gate,
    rate: u32,
    durable_seen: AtomicU64,
    issued_seen: AtomicU64,
}

fn open_waiting(path: &str) -> io::Result<File> {
    let deadline = Instant::now() + APPEAR_TIMEOUT;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

impl Disk {
    /// Opens the disk and finds where earlier boots left off.
    pub fn new(path: &str, rate: u32, boot_id: [u8; 16]) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_string(),
            source,
        };
        let mut file = open_waiting(path).map_err(open_err)?;
        let limit = if file
            .metadata()
            .map_err(open_err)?
            .file_type()
            .is_block_device()
        {
            file.seek(SeekFrom::End(0)).map_err(open_err)? / BLOCK as u64
        } else {
            u64::MAX / BLOCK as u64
        };
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let buffered = || file.try_clone().map(Reader).map_err(open_err);
        let (reader, mut is_direct) = match direct {
            Ok(f) => (Reader(f), true),
            Err(_) => (buffered()?, false),
        };
        let mut log = Log {
            reader,
            buf: Region::new(SCAN_BLOCKS * BLOCK).map_err(DiskError::Map)?,
            limit,
            issued: None,
            durable: None,
            own: Own {
                first_seq: 0,
                boot_id,
            },
            full: false,
            file,
        };
        let mut found = log.scan(0, None);
        if matches!(&found, Err(DiskFault::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL))
            && is_direct
        {
            // The file system took O_DIRECT at open but not for reads.
            log.reader = Reader(log.file.try_clone().map_err(open_err)?);
            is_direct = false;
            found = log.scan(0, None);
        }
        let found = found.map_err(|source| DiskError::Scan {
            path: path.to_string(),
            source,
        })?;
        match &found.last {
            Some(r) => say!(
                "disk found seq={} boot_id={} time_ns={}",
                r.seq,
                format_uuid(&r.boot_id),
                r.time_ns
            ),
            None => say!("disk found no records"),
        }
        if let Some((block, fault)) = &found.end
            && !fault.is_empty()
        {
            say!("disk warning: block {block}: {fault}; appending from there");
        }
        let last = found.last.map(|r| r.seq);
        log.issued = last;
        log.durable = last;
        log.own.first_seq = last.map_or(0, |k| k + 1);
        say!(
            "disk start path={path} next_seq={} rate={rate} direct={}",
            log.own.first_seq,
            if is_direct { "yes" } else { "no" }
        );
        let seen = last.unwrap_or(NONE);
        Ok(Disk {
            log: Mutex::new(log),
            gate: Gate::default(),
            rate,
            durable_seen: AtomicU64::new(seen),
            issued_seen: AtomicU64::new(seen),
        })
    }

    fn seen(a: &AtomicU64) -> Option<u64> {
        Some(a.load(Ordering::Relaxed)).filter(|&v| v != NONE)
    }

    /// (durable, issued) as last published by the writer.
    pub fn seqs(&self) -> (Option<u64>, Option<u64>) {
        (
            Self::seen(&self.durable_seen),
            Self::seen(&self.issued_seen),
        )
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Waits until no append is in progress (see `Gate`).
    pub fn quiesce(&self) {
        drop(lock(&self.log));
    }

    /// The writer thread's body; never returns.
    pub fn run(&self) -> ! {
        let mut pacer = Pacer::new(u64::from(self.rate));
        let mut last_print = Instant::now();
        loop {
            if self.gate.is_closed() {
                std::thread::sleep(GATE_NAP);
                pacer.restart();
                continue;
            }
            let outcome = {
                let mut log = lock(&self.log);
                if self.gate.is_closed() {
                    continue;
                }
                if log.full {
                    None
                } else if log.durable.map_or(0, |d| d + 1) >= log.limit {
                    log.full = true;
                    say!("disk full seq={}", opt(log.durable));
                    None
                } else {
                    let r = log.append();
                    self.durable_seen
                        .store(log.durable.unwrap_or(NONE), Ordering::Relaxed);
                    self.issued_seen
                        .store(log.issued.unwrap_or(NONE), Ordering::Relaxed);
                    Some(r)
                }
            };
            match outcome {
                None => std::thread::sleep(Duration::from_secs(1)),
                Some(Err(e)) => {
                    say!("ERROR disk write: {e}; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Some(Ok(_)) => {
                    pacer.done(1);
                    if last_print.elapsed() >= Duration::from_secs(1) {
                        say!("disk seq={}", opt(self.seqs().0));
                        last_print = Instant::now();
                    }
                }
            }
        }
    }

    /// Reads the disk with the writer held off and checks it against
    /// `durable` and `issued`.
    pub fn verify(&self) -> DiskCheck {
        let _held = self.gate.hold();
        let mut log = lock(&self.log);
        let log = &mut *log;
        let (durable, issued) = (log.durable, log.issued);
        let result = record::verify(
            &mut log.reader,
            log.buf.bytes_mut(),
            log.limit,
            durable,
            issued,
            Some(log.own),
        );
        DiskCheck {
            durable,
            issued,
            result,
        }
    }
}

/// `-` for no record.
pub fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}
