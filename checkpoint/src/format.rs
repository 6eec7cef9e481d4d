//! The on-disk encoding: superblocks and log records. `README.md` in this
//! crate is the specification; keep the two in step.

use crate::crc::crc32c;

/// Every region, record and write is aligned to and a multiple of this.
pub const BLOCK: u64 = 4096;
/// Guest page size; a page record carries exactly one page.
pub const PAGE_SIZE: u64 = 4096;
/// Guest disk block size; a disk record entry carries exactly one block.
pub const DISK_BLOCK: u64 = 4096;
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"EVMSTORE";
/// Record magic ("EVMR" little-endian).
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"EVMR");
/// Smallest log ring accepted at creation.
pub const MIN_LOG_BYTES: u64 = 64 * 1024;
/// Largest VM config blob.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Size of each of the two home-state slots.
pub const STATE_SLOT_BYTES: u64 = 2 << 20;
/// Largest machine-state blob an epoch may carry.
pub const MAX_STATE_BYTES: u64 = STATE_SLOT_BYTES - BLOCK;
/// Entries in one page-chunk index block: (4096 - 64) / 16.
pub const CHUNK_ENTRIES: usize = 252;
/// Offset of the config region (after superblocks A and B).
pub const CONFIG_OFF: u64 = 2 * BLOCK;

/// Superblock flag: home holds the memory and machine state of `home_epoch`.
pub const FLAG_HOME_VALID: u64 = 1;
/// Superblock flag: the memory home must be zeroed before it is used (a
/// discard of the machine state was interrupted, or has just happened).
pub const FLAG_HOME_STALE: u64 = 2;
const KNOWN_FLAGS: u64 = FLAG_HOME_VALID | FLAG_HOME_STALE;

/// `home_state_slot` value meaning "no home state".
pub const NO_SLOT: u32 = u32::MAX;

/// Record kinds.
pub const K_HEADER: u32 = 1;
pub const K_PAGES: u32 = 2;
pub const K_STATE: u32 = 3;
/// Disk block records: the same layout as page records, the address being
/// a byte offset in the guest disk.
pub const K_DISK: u32 = 4;
pub const K_COMMIT: u32 = 5;
pub const K_WRAP: u32 = 6;
pub const K_HOME_STATE: u32 = 7;

/// Round `v` up to a multiple of [`BLOCK`] (saturating: callers bound `v`).
pub fn round_up(v: u64) -> u64 {
    v.div_ceil(BLOCK).saturating_mul(BLOCK)
}

pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A byte range of the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub off: u64,
    pub len: u64,
}

impl Region {
    pub fn end(&self) -> Option<u64> {
        self.off.checked_add(self.len)
    }
}

/// Where the machine state of `home_epoch` lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HomeState {
    pub slot: u32,
    pub crc: u32,
    pub len: u64,
    pub epoch: u64,
}

impl HomeState {
    pub const NONE: HomeState = HomeState {
        slot: NO_SLOT,
        crc: 0,
        len: 0,
        epoch: 0,
    };
}

/// One superblock (A at offset 0, B at 4096). Generation parity picks the
/// slot: even generations live in A, odd ones in B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub generation: u64,
    pub flags: u64,
    pub home_epoch: u64,
    pub log_head_pos: u64,
    pub log_head_epoch: u64,
    pub migrate_upto: u64,
    pub config: Region,
    pub config_crc: u32,
    pub mem: Region,
    pub disk: Region,
    /// Both home-state slots; each is `state.len / 2` bytes.
    pub state: Region,
    pub log: Region,
    pub total_len: u64,
    pub home_state: HomeState,
    pub created_ns: u64,
}

/// Why a superblock slot was not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SbProblem {
    /// No magic: blank or foreign bytes.
    NoMagic,
    /// Magic present, version not ours; `crc_ok` says whether the CRC at
    /// 4092 (where every version keeps it) matches.
    Version { found: u32, crc_ok: bool },
    /// Magic present but the block is damaged or inconsistent.
    Bad(String),
}

impl std::fmt::Display for SbProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SbProblem::NoMagic => write!(f, "no superblock magic"),
            SbProblem::Version { found, .. } => write!(f, "format version {found}"),
            SbProblem::Bad(s) => write!(f, "{s}"),
        }
    }
}

const SB_CRC_OFF: usize = 4092;

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, BLOCK as u32);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b, 32, self.generation);
        put_u64(&mut b, 40, self.flags);
        put_u64(&mut b, 48, self.home_epoch);
        put_u64(&mut b, 56, self.log_head_pos);
        put_u64(&mut b, 64, self.log_head_epoch);
        put_u64(&mut b, 72, self.migrate_upto);
        put_u64(&mut b, 80, self.config.off);
        put_u64(&mut b, 88, self.config.len);
        put_u32(&mut b, 96, self.config_crc);
        put_u32(&mut b, 100, PAGE_SIZE as u32);
        put_u64(&mut b, 104, self.mem.off);
        put_u64(&mut b, 112, self.mem.len);
        put_u64(&mut b, 120, self.disk.off);
        put_u64(&mut b, 128, self.disk.len);
        put_u64(&mut b, 136, self.state.off);
        put_u64(&mut b, 144, self.state.len);
        put_u64(&mut b, 152, self.log.off);
        put_u64(&mut b, 160, self.log.len);
        put_u64(&mut b, 168, self.total_len);
        put_u32(&mut b, 176, self.home_state.slot);
        put_u32(&mut b, 180, self.home_state.crc);
        put_u64(&mut b, 184, self.home_state.len);
        put_u64(&mut b, 192, self.home_state.epoch);
        put_u64(&mut b, 200, self.created_ns);
        let crc = crc32c(&b[..SB_CRC_OFF]);
        put_u32(&mut b, SB_CRC_OFF, crc);
        b
    }

    /// Decode and validate the block found in `slot` (0 = A, 1 = B).
    pub fn decode(b: &[u8], slot: u64) -> Result<Superblock, SbProblem> {
        if b.len() < BLOCK as usize || b[0..8] != SB_MAGIC {
            return Err(SbProblem::NoMagic);
        }
        let crc_ok = get_u32(b, SB_CRC_OFF) == crc32c(&b[..SB_CRC_OFF]);
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(SbProblem::Version {
                found: version,
                crc_ok,
            });
        }
        if !crc_ok {
            return Err(SbProblem::Bad("CRC mismatch".into()));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            uuid,
            generation: get_u64(b, 32),
            flags: get_u64(b, 40),
            home_epoch: get_u64(b, 48),
            log_head_pos: get_u64(b, 56),
            log_head_epoch: get_u64(b, 64),
            migrate_upto: get_u64(b, 72),
            config: Region {
                off: get_u64(b, 80),
                len: get_u64(b, 88),
            },
            config_crc: get_u32(b, 96),
            mem: Region {
                off: get_u64(b, 104),
                len: get_u64(b, 112),
            },
            disk: Region {
                off: get_u64(b, 120),
                len: get_u64(b, 128),
            },
            state: Region {
                off: get_u64(b, 136),
                len: get_u64(b, 144),
            },
            log: Region {
                off: get_u64(b, 152),
                len: get_u64(b, 160),
            },
            total_len: get_u64(b, 168),
            home_state: HomeState {
                slot: get_u32(b, 176),
                crc: get_u32(b, 180),
                len: get_u64(b, 184),
                epoch: get_u64(b, 192),
            },
            created_ns: get_u64(b, 200),
        };
        if get_u32(b, 12) != BLOCK as u32 || get_u32(b, 100) != PAGE_SIZE as u32 {
            return Err(SbProblem::Bad("unsupported block or page size".into()));
        }
        if sb.generation % 2 != slot {
            return Err(SbProblem::Bad(format!(
                "generation {} does not belong in this slot",
                sb.generation
            )));
        }
        sb.check().map_err(SbProblem::Bad)?;
        Ok(sb)
    }

    /// Geometry and field consistency, so that nothing later can index out
    /// of bounds or overflow on a hostile superblock.
    fn check(&self) -> Result<(), String> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(format!("unknown flags {:#x}", self.flags));
        }
        let regions = [
            ("config", self.config, true),
            ("memory home", self.mem, false),
            ("disk home", self.disk, true),
            ("state slots", self.state, false),
            ("log", self.log, false),
        ];
        let mut spans: Vec<(u64, u64)> = vec![(0, CONFIG_OFF)];
        for (name, r, may_be_empty) in regions {
            let end = r.end().ok_or(format!("{name} region overflows"))?;
            if r.off % BLOCK != 0 || (r.len == 0 && !may_be_empty) || end > self.total_len {
                return Err(format!(
                    "{name} region {:#x}+{:#x} is invalid",
                    r.off, r.len
                ));
            }
            if name != "config" && r.len % BLOCK != 0 {
                return Err(format!(
                    "{name} region length {:#x} is not 4 KiB aligned",
                    r.len
                ));
            }
            let alloc = round_up(r.len);
            if alloc > 0 {
                spans.push((r.off, r.off + alloc));
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err("regions overlap".into());
            }
        }
        if self.config.len > MAX_CONFIG_BYTES as u64 {
            return Err("config region larger than 1 MiB".into());
        }
        if self.log.len < MIN_LOG_BYTES {
            return Err("log region too small".into());
        }
        if !self.state.len.is_multiple_of(2 * BLOCK) || self.state.len < 4 * BLOCK {
            return Err("state slots region is invalid".into());
        }
        if self.log_head_pos >= self.log.len || !self.log_head_pos.is_multiple_of(BLOCK) {
            return Err(format!("log head {:#x} outside the log", self.log_head_pos));
        }
        if Some(self.log_head_epoch) != self.home_epoch.checked_add(1) {
            return Err("log head epoch is not home epoch + 1".into());
        }
        if self.migrate_upto != 0 && self.migrate_upto < self.log_head_epoch {
            return Err("migration target precedes the log head".into());
        }
        let hs = self.home_state;
        if (hs.slot != NO_SLOT) != (self.flags & FLAG_HOME_VALID != 0) {
            return Err("home state reference and HOME_VALID disagree".into());
        }
        if hs.slot != NO_SLOT
            && (hs.slot > 1 || hs.len > self.state.len / 2 - BLOCK || hs.epoch != self.home_epoch)
        {
            return Err("home state reference is invalid".into());
        }
        Ok(())
    }

    /// Offset of home-state slot `slot`.
    pub fn slot_off(&self, slot: u32) -> u64 {
        self.state.off + u64::from(slot) * (self.state.len / 2)
    }
}

/// The common head of every log record (first 64 bytes of its head block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub kind: u32,
    pub epoch: u64,
    pub seq: u32,
    pub count: u32,
    pub payload_len: u32,
}

const HEAD_CRC_OFF: usize = 44;
/// First byte after the common head: kind-specific fields or index entries.
pub const HEAD_LEN: usize = 64;

/// Write the common head into the 4 KiB block `b` (not yet sealed).
pub fn write_head(b: &mut [u8], uuid: &[u8; 16], h: &Head) {
    put_u32(b, 0, REC_MAGIC);
    put_u32(b, 4, h.kind);
    put_u64(b, 8, h.epoch);
    b[16..32].copy_from_slice(uuid);
    put_u32(b, 32, h.seq);
    put_u32(b, 36, h.count);
    put_u32(b, 40, h.payload_len);
}

/// Compute and store the head block's CRC (over the block with the CRC
/// field taken as zero).
pub fn seal(b: &mut [u8]) {
    put_u32(b, HEAD_CRC_OFF, 0);
    let crc = crc32c(&b[..BLOCK as usize]);
    put_u32(b, HEAD_CRC_OFF, crc);
}

/// Why a head block was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadProblem {
    /// Not a record of this store (other magic or UUID): end of the log.
    Foreign,
    /// Looks like one of ours but its CRC does not match.
    Crc,
}

/// Parse and verify a head block of this store.
pub fn parse_head(b: &[u8], uuid: &[u8; 16]) -> Result<Head, HeadProblem> {
    if b.len() < BLOCK as usize || get_u32(b, 0) != REC_MAGIC || &b[16..32] != uuid {
        return Err(HeadProblem::Foreign);
    }
    let stored = get_u32(b, HEAD_CRC_OFF);
    let mut copy = [0u8; BLOCK as usize];
    copy.copy_from_slice(&b[..BLOCK as usize]);
    put_u32(&mut copy, HEAD_CRC_OFF, 0);
    if crc32c(&copy) != stored {
        return Err(HeadProblem::Crc);
    }
    Ok(Head {
        kind: get_u32(b, 4),
        epoch: get_u64(b, 8),
        seq: get_u32(b, 32),
        count: get_u32(b, 36),
        payload_len: get_u32(b, 40),
    })
}

/// Page-chunk index entry `i`: (address, data CRC).
pub fn entry(b: &[u8], i: usize) -> (u64, u32) {
    let o = HEAD_LEN + 16 * i;
    (get_u64(b, o), get_u32(b, o + 8))
}

pub fn put_entry(b: &mut [u8], i: usize, addr: u64, crc: u32) {
    let o = HEAD_LEN + 16 * i;
    put_u64(b, o, addr);
    put_u32(b, o + 8, crc);
    put_u32(b, o + 12, 0);
}
