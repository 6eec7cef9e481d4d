//! Disk records of the `disk` workload and the check of a disk full of them.
//!
//! Record `seq` lives in 4 KiB block `seq` (byte offset `seq * 4096`), as
//! 512 little-endian 64-bit words:
//!
//! | word | content |
//! | --- | --- |
//! | 0 | magic `EVMDISK1` |
//! | 1 | sequence number (= block number) |
//! | 2..4 | boot id (16 bytes) of the boot that wrote it |
//! | 4 | CLOCK_REALTIME when written, ns |
//! | 5 | checksum (`sum64` of all 512 words with this one taken as 0) |
//! | 6..512 | filler derived from the sequence number |
//!
//! The checksum covers the whole block, so a block mixing sectors of two
//! writes fails it.

use crate::hash::{GOLDEN, mix64, sum64};
use crate::sys::format_uuid;
use std::fmt;
use std::io;

pub const BLOCK: usize = 4096;
const WORDS: usize = BLOCK / 8;
const SUM_WORD: usize = 5;
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"EVMDISK1");

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub boot_id: [u8; 16],
    pub time_ns: u64,
}

/// Why a block is not the record expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// No magic (never written, or past the end of the file).
    Empty,
    /// Only part of a block exists (a file cut short).
    Short {
        len: usize,
    },
    BadChecksum {
        stored: u64,
        computed: u64,
    },
    /// A well-formed record with another sequence number.
    WrongSeq {
        found: u64,
    },
}

impl Fault {
    pub fn is_empty(&self) -> bool {
        *self == Fault::Empty
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Empty => write!(f, "missing"),
            Fault::Short { len } => write!(f, "short block ({len} bytes)"),
            Fault::BadChecksum { stored, computed } => write!(
                f,
                "bad checksum (stored {stored:#018x}, computed {computed:#018x})"
            ),
            Fault::WrongSeq { found } => write!(f, "holds record {found}"),
        }
    }
}

fn block_sum(words: &[u64; WORDS]) -> u64 {
    let mut w = *words;
    w[SUM_WORD] = 0;
    sum64(&w)
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = [0u64; WORDS];
        let filler = mix64(self.seq ^ RECORD_MAGIC);
        for (k, word) in w.iter_mut().enumerate().skip(SUM_WORD + 1) {
            *word = filler.wrapping_add((k as u64).wrapping_mul(GOLDEN));
        }
        let (id_lo, id_hi) = self.boot_id.split_at(8);
        w[0] = RECORD_MAGIC;
        w[1] = self.seq;
        w[2] = u64::from_le_bytes(id_lo.try_into().unwrap_or_default());
        w[3] = u64::from_le_bytes(id_hi.try_into().unwrap_or_default());
        w[4] = self.time_ns;
        w[SUM_WORD] = block_sum(&w);
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Decodes `data` as the record that belongs in block `block`.
    pub fn decode(data: &[u8], block: u64) -> Result<Record, Fault> {
        if data.is_empty() {
            return Err(Fault::Empty);
        }
        if data.len() < BLOCK {
            return Err(Fault::Short { len: data.len() });
        }
        let mut w = [0u64; WORDS];
        for (word, bytes) in w.iter_mut().zip(data.chunks_exact(8)) {
            *word = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
        }
        if w[0] != RECORD_MAGIC {
            return Err(Fault::Empty);
        }
        let computed = block_sum(&w);
        if computed != w[SUM_WORD] {
            return Err(Fault::BadChecksum {
                stored: w[SUM_WORD],
                computed,
            });
        }
        if w[1] != block {
            return Err(Fault::WrongSeq { found: w[1] });
        }
        let mut boot_id = [0u8; 16];
        boot_id[..8].copy_from_slice(&w[2].to_le_bytes());
        boot_id[8..].copy_from_slice(&w[3].to_le_bytes());
        Ok(Record {
            seq: w[1],
            boot_id,
            time_ns: w[4],
        })
    }
}

/// What the disk check found wrong.
#[derive(Debug)]
pub enum DiskFault {
    /// Block `missing` holds no record but record `next` follows it.
    Gap {
        missing: u64,
        next: u64,
    },
    /// Block `seq` holds a damaged record where one was expected.
    Corrupt {
        seq: u64,
        fault: Fault,
    },
    /// Memory knows record `durable` reached the disk; the disk ends before.
    Behind {
        durable: u64,
        last: Option<u64>,
    },
    /// The disk holds record `last`, which memory never issued.
    Ahead {
        issued: Option<u64>,
        last: u64,
    },
    /// A record this boot wrote carries another boot's id.
    OtherBoot {
        seq: u64,
        found: [u8; 16],
        expected: [u8; 16],
    },
    Io {
        block: u64,
        source: io::Error,
    },
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

impl fmt::Display for DiskFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskFault::Gap { missing, next } => write!(
                f,
                "disk gap: record {missing} missing but record {next} present"
            ),
            DiskFault::Corrupt { seq, fault } => write!(f, "disk record {seq}: {fault}"),
            DiskFault::Behind { durable, last } => write!(
                f,
                "disk behind memory: record {durable} was durable but the disk's last record is {}",
                opt(*last)
            ),
            DiskFault::Ahead { issued, last } => write!(
                f,
                "disk ahead of memory: the disk holds record {last} but memory issued only up to {}",
                opt(*issued)
            ),
            DiskFault::OtherBoot {
                seq,
                found,
                expected,
            } => write!(
                f,
                "disk record {seq} is from boot {} but this boot ({}) wrote it",
                format_uuid(found),
                format_uuid(expected)
            ),
            DiskFault::Io { block, .. } => write!(f, "cannot read disk block {block}"),
        }
    }
}

impl std::error::Error for DiskFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiskFault::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Something records can be read from, a run of blocks at a time.
pub trait BlockSource {
    /// Reads blocks from block `first` into `buf` (a whole number of
    /// blocks); returns the bytes read, short only at the end.
    fn read_blocks(&mut self, first: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl BlockSource for &[u8] {
    fn read_blocks(&mut self, first: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(first)
            .ok()
            .and_then(|b| b.checked_mul(BLOCK))
            .map_or(self.len(), |s| s.min(self.len()));
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// Records this boot wrote: from `first_seq` on, with this boot id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    pub first_seq: u64,
    pub boot_id: [u8; 16],
}

/// The valid prefix of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The highest record of the unbroken run from record 0 (K).
    pub last: Option<Record>,
    /// The first block that holds no valid record, and why.
    pub end: Option<(u64, Fault)>,
}

/// Reads records from block 0 up. Stops at the first invalid block at or
/// past `horizon`; an invalid block below `horizon` followed by a valid
/// record is a gap (or corruption). `limit` bounds the blocks read; `buf`
/// (a whole number of blocks) is the read buffer.
pub fn scan(
    src: &mut impl BlockSource,
    buf: &mut [u8],
    limit: u64,
    horizon: u64,
    own: Option<Own>,
) -> Result<Scan, DiskFault> {
    let per_read = (buf.len() / BLOCK).max(1) as u64;
    let mut result = Scan {
        last: None,
        end: None,
    };
    let mut first = 0;
    while first < limit {
        let n = per_read.min(limit - first);
        let want = n as usize * BLOCK;
        let got = src
            .read_blocks(first, &mut buf[..want])
            .map_err(|source| DiskFault::Io {
                block: first,
                source,
            })?;
        for (i, chunk) in buf[..want].chunks(BLOCK).enumerate() {
            let block = first + i as u64;
            let start = (i * BLOCK).min(got);
            let data = &chunk[..(got - start).min(BLOCK)];
            match Record::decode(data, block) {
                Ok(rec) => {
                    if let Some((missing, fault)) = result.end.take() {
                        return Err(if fault.is_empty() {
                            DiskFault::Gap {
                                missing,
                                next: block,
                            }
                        } else {
                            DiskFault::Corrupt {
                                seq: missing,
                                fault,
                            }
                        });
                    }
                    if let Some(own) = own
                        && block >= own.first_seq
                        && rec.boot_id != own.boot_id
                    {
                        return Err(DiskFault::OtherBoot {
                            seq: block,
                            found: rec.boot_id,
                            expected: own.boot_id,
                        });
                    }
                    result.last = Some(rec);
                }
                Err(fault) => {
                    if result.end.is_none() {
                        result.end = Some((block, fault));
                    }
                    if block >= horizon {
                        return Ok(result);
                    }
                }
            }
        }
        first += n;
    }
    Ok(result)
}

/// Checks `durable <= K <= issued`: the disk is neither behind what memory
/// knows reached it nor ahead of what memory ever wrote.
pub fn judge(scan: Scan, durable: Option<u64>, issued: Option<u64>) -> Result<(), DiskFault> {
    let last = scan.last.map(|r| r.seq);
    if let Some(durable) = durable
        && last.is_none_or(|k| k < durable)
    {
        return Err(match scan.end {
            Some((seq, fault)) if !fault.is_empty() => DiskFault::Corrupt { seq, fault },
            _ => DiskFault::Behind { durable, last },
        });
    }
    if let Some(last) = last
        && issued.is_none_or(|i| last > i)
    {
        return Err(DiskFault::Ahead { issued, last });
    }
    Ok(())
}

/// The full check: scan up to `issued` (and past it while records go on),
/// then judge against `durable` and `issued`. Returns K.
pub fn verify(
    src: &mut impl BlockSource,
    buf: &mut [u8],
    limit: u64,
    durable: Option<u64>,
    issued: Option<u64>,
    own: Option<Own>,
) -> Result<Option<u64>, DiskFault> {
    let horizon = issued.map_or(0, |i| i.saturating_add(1));
    let s = scan(src, buf, limit, horizon, own)?;
    let last = s.last.as_ref().map(|r| r.seq);
    judge(s, durable, issued)?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 16] = [7; 16];
    const OLD: [u8; 16] = [3; 16];

    fn rec(seq: u64, boot_id: [u8; 16]) -> Vec<u8> {
        Record {
            seq,
            boot_id,
            time_ns: 1_000 + seq,
        }
        .encode()
    }

    /// A disk with records `0..n` (the first `mine_from` from an old boot).
    fn disk(n: u64, mine_from: u64) -> Vec<u8> {
        (0..n)
            .flat_map(|s| rec(s, if s < mine_from { OLD } else { ME }))
            .collect()
    }

    fn check(
        d: &[u8],
        durable: Option<u64>,
        issued: Option<u64>,
    ) -> Result<Option<u64>, DiskFault> {
        let mut buf = vec![0u8; 3 * BLOCK]; // small reads cross many chunk edges
        let own = Own {
            first_seq: 2,
            boot_id: ME,
        };
        verify(&mut &d[..], &mut buf, u64::MAX, durable, issued, Some(own))
    }

    #[test]
    fn record_round_trip() {
        let b = rec(42, ME);
        assert_eq!(b.len(), BLOCK);
        let r = Record::decode(&b, 42).expect("valid");
        assert_eq!((r.seq, r.boot_id, r.time_ns), (42, ME, 1042));
        assert_eq!(Record::decode(&b, 41), Err(Fault::WrongSeq { found: 42 }));
        assert_eq!(
            Record::decode(&b[..100], 42),
            Err(Fault::Short { len: 100 })
        );
        assert_eq!(Record::decode(&[], 42), Err(Fault::Empty));
        assert_eq!(Record::decode(&[0; BLOCK], 42), Err(Fault::Empty));
    }

    #[test]
    fn every_word_is_covered_by_the_checksum() {
        let good = rec(5, ME);
        for word in 1..WORDS {
            let mut b = good.clone();
            b[word * 8 + 3] ^= 0x10;
            assert!(
                matches!(Record::decode(&b, 5), Err(Fault::BadChecksum { .. })),
                "word {word}"
            );
        }
        // A sector of another record (a torn 4 KiB write).
        let mut b = good.clone();
        b[1024..1536].copy_from_slice(&rec(6, ME)[1024..1536]);
        assert!(matches!(
            Record::decode(&b, 5),
            Err(Fault::BadChecksum { .. })
        ));
    }

    #[test]
    fn consistent_disks_pass() {
        let d = disk(10, 2);
        assert_eq!(check(&d, Some(9), Some(9)).expect("ok"), Some(9));
        // A write issued but not yet synced may or may not be there.
        assert_eq!(check(&d, Some(8), Some(10)).expect("ok"), Some(9));
        assert_eq!(check(&d, Some(9), Some(11)).expect("ok"), Some(9));
        // Nothing written, nothing issued.
        assert_eq!(check(&[], None, None).expect("ok"), None);
        assert_eq!(check(&[0; 4 * BLOCK], None, None).expect("ok"), None);
        // Zeroed tail after the records.
        let mut d = disk(10, 2);
        d.extend(vec![0; 5 * BLOCK]);
        assert_eq!(check(&d, Some(9), Some(9)).expect("ok"), Some(9));
    }

    #[test]
    fn catches_a_gap() {
        let mut d = disk(10, 2);
        d[4 * BLOCK..5 * BLOCK].fill(0);
        let e = check(&d, Some(9), Some(9)).expect_err("gap");
        assert!(
            matches!(
                e,
                DiskFault::Gap {
                    missing: 4,
                    next: 5
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "disk gap: record 4 missing but record 5 present"
        );
        // The gap is found even when it is past what memory calls durable.
        let e = check(&d, Some(2), Some(9)).expect_err("gap");
        assert!(
            matches!(
                e,
                DiskFault::Gap {
                    missing: 4,
                    next: 5
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn catches_a_bad_checksum() {
        let mut d = disk(10, 2);
        d[6 * BLOCK + 2000] ^= 1;
        let e = check(&d, Some(9), Some(9)).expect_err("checksum");
        assert!(
            matches!(
                e,
                DiskFault::Corrupt {
                    seq: 6,
                    fault: Fault::BadChecksum { .. }
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("disk record 6: bad checksum"),
            "{e}"
        );
        // Also in the last record.
        let mut d = disk(10, 2);
        d[9 * BLOCK + 8] ^= 1;
        assert!(matches!(
            check(&d, Some(9), Some(9)),
            Err(DiskFault::Corrupt { seq: 9, .. })
        ));
    }

    #[test]
    fn catches_disk_behind_memory() {
        let d = disk(8, 2);
        let e = check(&d, Some(9), Some(9)).expect_err("behind");
        assert!(
            matches!(
                e,
                DiskFault::Behind {
                    durable: 9,
                    last: Some(7)
                }
            ),
            "{e}"
        );
        let e = check(&[], Some(0), Some(0)).expect_err("behind");
        assert!(
            matches!(
                e,
                DiskFault::Behind {
                    durable: 0,
                    last: None
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn catches_disk_ahead_of_memory() {
        let d = disk(12, 2);
        let e = check(&d, Some(9), Some(9)).expect_err("ahead");
        assert!(
            matches!(
                e,
                DiskFault::Ahead {
                    issued: Some(9),
                    last: 11
                }
            ),
            "{e}"
        );
        let e = check(&d[..BLOCK], None, None).expect_err("ahead");
        assert!(
            matches!(
                e,
                DiskFault::Ahead {
                    issued: None,
                    last: 0
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn catches_a_record_of_another_boot() {
        let mut d = disk(10, 2);
        d[5 * BLOCK..6 * BLOCK].copy_from_slice(&rec(5, OLD));
        let e = check(&d, Some(9), Some(9)).expect_err("other boot");
        assert!(matches!(e, DiskFault::OtherBoot { seq: 5, .. }), "{e}");
    }

    #[test]
    fn a_moved_record_is_corrupt() {
        let mut d = disk(10, 2);
        d[3 * BLOCK..4 * BLOCK].copy_from_slice(&rec(7, ME));
        let e = check(&d, Some(9), Some(9)).expect_err("moved");
        assert!(
            matches!(
                e,
                DiskFault::Corrupt {
                    seq: 3,
                    fault: Fault::WrongSeq { found: 7 }
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn startup_scan_finds_the_last_record_and_respects_limit() {
        let mut d = disk(6, 6);
        d.extend(vec![0; BLOCK]);
        d.extend(rec(7, ME)); // beyond a hole past the horizon: not looked at
        let mut buf = vec![0u8; 2 * BLOCK];
        let s = scan(&mut &d[..], &mut buf, u64::MAX, 0, None).expect("scan");
        assert_eq!(s.last.map(|r| r.seq), Some(5));
        assert_eq!(s.end, Some((6, Fault::Empty)));
        let s = scan(&mut &d[..], &mut buf, 3, 0, None).expect("scan");
        assert_eq!((s.last.map(|r| r.seq), s.end), (Some(2), None));
    }

    #[test]
    fn io_errors_are_reported() {
        struct Broken;
        impl BlockSource for Broken {
            fn read_blocks(&mut self, _: u64, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("boom"))
            }
        }
        let mut buf = vec![0u8; BLOCK];
        let e = verify(&mut Broken, &mut buf, 10, None, None, None).expect_err("io");
        assert!(matches!(e, DiskFault::Io { block: 0, .. }));
    }
}
