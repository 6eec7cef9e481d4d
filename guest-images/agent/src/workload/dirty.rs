//! The `dirty:<MiB>:<MiB/s>` workload: rewrites whole stamped pages of a
//! buffer at a set rate and remembers, in a separate table, the generation
//! it last wrote to each page.
//!
//! The generation of a write is the global count of page writes so far
//! (the initial fill writes pages 0..n as generations 1..=n), so every
//! write has a distinct generation and `generation` in the progress line is the
//! total number of pages written. Pages are chosen at random.

use super::pace::{GATE_NAP, Gate, Pacer, lock};
use super::page::{self, PAGE_BYTES, PAGE_WORDS, PageError};
use crate::cmdline::DirtySpec;
use crate::hash::Rng;
use crate::say;
use crate::sys::{self, Region};
use std::fmt;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the progress line is printed.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Pages written per lock when unpaced.
const UNPACED_BATCH: u64 = 64;
/// Memory left to the rest of the guest when sizing the buffer.
const MEM_RESERVE: u64 = 16 << 20;

/// Why the dirty workload could not start.
#[derive(Debug)]
pub enum DirtyError {
    TooBig { mib: u64, available: u64 },
    Map { mib: u64, source: io::Error },
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyError::TooBig { mib, available } => write!(
                f,
                "dirty buffer of {mib} MiB does not fit: {} MiB available",
                available >> 20
            ),
            DirtyError::Map { mib, .. } => write!(f, "cannot map a dirty buffer of {mib} MiB"),
        }
    }
}

impl std::error::Error for DirtyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DirtyError::Map { source, .. } => Some(source),
            DirtyError::TooBig { .. } => None,
        }
    }
}

/// The buffer and its table; always locked together.
#[derive(Debug)]
struct Area {
    buf: Region,
    /// Generation last written to each page.
    table: Vec<u64>,
    /// Generation of the last write (= pages written so far).
    generation: u64,
    rng: Rng,
}

impl Area {
    fn pages(&self) -> u64 {
        self.table.len() as u64
    }

    fn write_page(&mut self, index: u64) {
        self.generation += 1;
        let i = index as usize;
        page::stamp(
            &mut self.buf.words_mut()[i * PAGE_WORDS..(i + 1) * PAGE_WORDS],
            index,
            self.generation,
        );
        self.table[i] = self.generation;
    }
}

/// Result of checking the whole buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyCheck {
    pub pages: u64,
    /// The first bad page, if any, and how many are bad in all.
    pub first_bad: Option<PageError>,
    pub bad: u64,
}

/// The running dirty workload.
#[derive(Debug)]
pub struct Dirty {
    spec: DirtySpec,
    area: Mutex<Area>,
    gate: Gate,
    gen_seen: AtomicU64,
    addr: usize,
}

impl Dirty {
    /// Maps and stamps the whole buffer (every page written once).
    pub fn new(spec: DirtySpec) -> Result<Self, DirtyError> {
        let bytes = spec.mib << 20;
        if let Some(available) = sys::mem_available()
            && bytes.saturating_add(MEM_RESERVE) > available
        {
            return Err(DirtyError::TooBig {
                mib: spec.mib,
                available,
            });
        }
        let map_err = |source| DirtyError::Map {
            mib: spec.mib,
            source,
        };
        let size = usize::try_from(bytes)
            .map_err(|_| map_err(io::Error::from(io::ErrorKind::OutOfMemory)))?;
        let buf = Region::new(size).map_err(map_err)?;
        let pages = size / PAGE_BYTES;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut area = Area {
            buf,
            table: vec![0; pages],
            generation: 0,
            rng: Rng::new(seed),
        };
        for i in 0..area.pages() {
            area.write_page(i);
        }
        let addr = area.buf.addr();
        Ok(Dirty {
            spec,
            gen_seen: AtomicU64::new(area.generation),
            area: Mutex::new(area),
            gate: Gate::default(),
            addr,
        })
    }

    /// Address of the buffer in the agent's memory (for tests).
    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn pages(&self) -> u64 {
        self.spec.mib << 8
    }

    /// Total pages written so far.
    pub fn generation(&self) -> u64 {
        self.gen_seen.load(Ordering::Relaxed)
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Waits until no write is in progress; with the gate closed, none
    /// starts until it opens.
    pub fn quiesce(&self) {
        drop(lock(&self.area));
    }

    /// The writer thread's body; never returns.
    pub fn run(&self) -> ! {
        let pages_per_sec = self
            .spec
            .rate_mib_s
            .saturating_mul((1 << 20) / PAGE_BYTES as u64);
        // About a hundred locked steps a second when paced.
        let batch = match pages_per_sec {
            0 => UNPACED_BATCH,
            n => (n / 100).clamp(1, 256),
        };
        let mut pacer = Pacer::new(pages_per_sec);
        let mut last_report = (Instant::now(), self.generation());
        loop {
            if self.gate.is_closed() {
                std::thread::sleep(GATE_NAP);
                pacer.restart();
                continue;
            }
            {
                let mut area = lock(&self.area);
                if self.gate.is_closed() {
                    continue;
                }
                for _ in 0..batch {
                    let pages = area.pages();
                    let index = area.rng.below(pages);
                    area.write_page(index);
                }
                self.gen_seen.store(area.generation, Ordering::Relaxed);
            }
            pacer.done(batch);
            let elapsed = last_report.0.elapsed();
            if elapsed >= REPORT_EVERY {
                let generation = self.generation();
                let mib =
                    (generation - last_report.1) as f64 * PAGE_BYTES as f64 / f64::from(1 << 20);
                say!(
                    "dirty gen={generation} rate={:.1}",
                    mib / elapsed.as_secs_f64()
                );
                last_report = (Instant::now(), generation);
            }
        }
    }

    /// Checks every page against the table, with the writer held off.
    pub fn verify(&self) -> DirtyCheck {
        let _held = self.gate.hold();
        let area = lock(&self.area);
        check_area(area.buf.words(), &area.table)
    }
}

/// Checks each page of `words` against its generation in `table`.
fn check_area(words: &[u64], table: &[u64]) -> DirtyCheck {
    let mut result = DirtyCheck {
        pages: table.len() as u64,
        first_bad: None,
        bad: 0,
    };
    for (i, (page_words, &expected)) in words.chunks_exact(PAGE_WORDS).zip(table).enumerate() {
        if let Err(e) = page::check(page_words, i as u64, expected) {
            result.bad += 1;
            result.first_bad.get_or_insert(e);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fresh_buffer_verifies() {
        let d = Dirty::new(DirtySpec {
            mib: 1,
            rate_mib_s: 0,
        })
        .expect("1 MiB buffer");
        assert_eq!(d.pages(), 256);
        assert_eq!(d.generation(), 256);
        let c = d.verify();
        assert_eq!((c.pages, c.bad, c.first_bad), (256, 0, None));
    }

    #[test]
    fn verify_while_writing_never_fails_and_finds_damage() {
        let d = Arc::new(
            Dirty::new(DirtySpec {
                mib: 1,
                rate_mib_s: 64,
            })
            .expect("1 MiB buffer"),
        );
        let writer = Arc::clone(&d);
        std::thread::spawn(move || writer.run());
        let start = d.generation();
        for _ in 0..20 {
            assert_eq!(d.verify().bad, 0);
        }
        // The unpaced writer makes progress while not held off.
        let deadline = Instant::now() + Duration::from_secs(120);
        while d.generation() < start + 1000 {
            assert!(Instant::now() < deadline, "writer made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Damage one page with the writer held off.
        let held = d.gate().hold();
        d.quiesce();
        let mut area = lock(&d.area);
        area.buf.words_mut()[7 * PAGE_WORDS + 100] ^= 1;
        let table = area.table.clone();
        let c = check_area(area.buf.words(), &table);
        assert_eq!(c.bad, 1);
        assert!(matches!(
            c.first_bad,
            Some(PageError::Torn {
                index: 7,
                word: 100,
                ..
            })
        ));
        // A table that remembers an older write sees a page from the future.
        let mut table = table;
        table[9] -= 1;
        let c = check_area(area.buf.words(), &table);
        assert_eq!(c.bad, 2);
        let page9 = &area.buf.words()[9 * PAGE_WORDS..10 * PAGE_WORDS];
        assert!(matches!(
            page::check(page9, 9, table[9]),
            Err(PageError::Future { .. })
        ));
        // Leave the writer held off for the rest of the test run.
        drop(area);
        std::mem::forget(held);
    }

    #[test]
    fn refuses_more_than_memory() {
        let e = Dirty::new(DirtySpec {
            mib: 1 << 20,
            rate_mib_s: 1,
        })
        .expect_err("1 TiB does not fit");
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
