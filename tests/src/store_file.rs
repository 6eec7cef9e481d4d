//! Reading and damaging an evm store file from outside, for the bad-input
//! tests: superblocks, the config region and the log's records, decoded
//! from the on-disk format that `checkpoint/README.md` specifies (format
//! version 2), independently of the `checkpoint` crate, so the tests check
//! evm against the specification rather than against its own code.
//!
//! Every write here goes to a copy of a store that no evm has open.

use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Every region, record and superblock is a multiple of this.
pub const BLOCK: u64 = 4096;
/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"EVMSTORE";
/// Record magic (`EVMR` little-endian).
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"EVMR");
/// Where every superblock keeps its CRC (of bytes `0..4092`).
pub const SB_CRC_OFF: usize = 4092;
/// Offset of the format version in a superblock.
pub const SB_VERSION_OFF: usize = 8;
/// The format version this reader understands (README).
pub const FORMAT_VERSION: u32 = 2;
/// Offset of the CRC in a record head block (computed with it zeroed).
const REC_CRC_OFF: usize = 44;

/// Record kinds (README, "Log records").
pub const K_HEADER: u32 = 1;
pub const K_PAGES: u32 = 2;
pub const K_STATE: u32 = 3;
pub const K_COMMIT: u32 = 5;
pub const K_WRAP: u32 = 6;

/// What went wrong reading or patching a store file.
#[derive(Debug, thiserror::Error)]
pub enum StoreFileError {
    #[error("{path}: {what} failed", path = .path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}", path = .path.display())]
    Format { path: PathBuf, what: String },
}

fn io_err(path: &Path, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreFileError {
    let (path, what) = (path.to_path_buf(), what.into());
    move |source| StoreFileError::Io { path, what, source }
}

fn format_err(path: &Path, what: impl Into<String>) -> StoreFileError {
    StoreFileError::Format {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

const CRC32C_POLY: u32 = 0x82F6_3B78;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC32C (Castagnoli): reflected polynomial `0x82F63B78`, initial value
/// and final XOR `!0`.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads `len` bytes at `off`.
pub fn read_at(path: &Path, off: u64, len: usize) -> Result<Vec<u8>, StoreFileError> {
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off)
        .map_err(io_err(path, format!("read {len} bytes at {off}")))?;
    Ok(b)
}

/// Writes `bytes` at `off` (the file keeps its length unless this extends
/// it) and syncs.
pub fn write_at(path: &Path, off: u64, bytes: &[u8]) -> Result<(), StoreFileError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path, "open for writing"))?;
    f.write_all_at(bytes, off).map_err(io_err(
        path,
        format!("write {} bytes at {off}", bytes.len()),
    ))?;
    f.sync_all().map_err(io_err(path, "sync"))
}

/// Inverts every bit of the byte at `off`.
pub fn flip_byte(path: &Path, off: u64) -> Result<(), StoreFileError> {
    let b = read_at(path, off, 1)?;
    write_at(path, off, &[!b[0]])
}

/// The fields of one superblock the tests need (README, "Superblocks").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// 0 = A (offset 0), 1 = B (offset 4096).
    pub slot: u64,
    pub version: u32,
    pub uuid: [u8; 16],
    pub generation: u64,
    pub log_head_pos: u64,
    pub log_head_epoch: u64,
    pub config_off: u64,
    pub config_len: u64,
    pub config_crc: u32,
    pub state_off: u64,
    pub log_off: u64,
    pub log_len: u64,
    pub total_len: u64,
    /// The CRC at 4092 matches.
    pub crc_ok: bool,
}

impl Superblock {
    /// Decodes the block of `slot`; `None` without the magic.
    pub fn decode(b: &[u8], slot: u64) -> Option<Superblock> {
        if b.len() < BLOCK as usize || &b[0..8] != SB_MAGIC {
            return None;
        }
        Some(Superblock {
            slot,
            version: get_u32(b, SB_VERSION_OFF),
            uuid: b[16..32].try_into().expect("16 bytes"),
            generation: get_u64(b, 32),
            log_head_pos: get_u64(b, 56),
            log_head_epoch: get_u64(b, 64),
            config_off: get_u64(b, 80),
            config_len: get_u64(b, 88),
            config_crc: get_u32(b, 96),
            state_off: get_u64(b, 136),
            log_off: get_u64(b, 152),
            log_len: get_u64(b, 160),
            total_len: get_u64(b, 168),
            crc_ok: get_u32(b, SB_CRC_OFF) == crc32c(&b[..SB_CRC_OFF]),
        })
    }
}

/// Reads superblock `slot` (0 = A, 1 = B).
pub fn superblock(path: &Path, slot: u64) -> Result<Superblock, StoreFileError> {
    let b = read_at(path, slot * BLOCK, BLOCK as usize)?;
    Superblock::decode(&b, slot)
        .ok_or_else(|| format_err(path, format!("no superblock magic in slot {slot}")))
}

/// The superblock in force: the valid one (CRC, version 2, generation in
/// its slot) with the higher generation.
pub fn current_superblock(path: &Path) -> Result<Superblock, StoreFileError> {
    [0, 1]
        .into_iter()
        .filter_map(|slot| superblock(path, slot).ok())
        .filter(|s| s.crc_ok && s.version == FORMAT_VERSION && s.generation % 2 == s.slot)
        .max_by_key(|s| s.generation)
        .ok_or_else(|| format_err(path, "no valid superblock"))
}

/// Reads superblock block `slot`, lets `edit` change its bytes, writes it
/// back with its CRC recomputed (`fix_crc`) or as edited.
pub fn patch_superblock(
    path: &Path,
    slot: u64,
    fix_crc: bool,
    edit: impl FnOnce(&mut [u8]),
) -> Result<(), StoreFileError> {
    let mut b = read_at(path, slot * BLOCK, BLOCK as usize)?;
    edit(&mut b);
    if fix_crc {
        let crc = crc32c(&b[..SB_CRC_OFF]);
        put_u32(&mut b, SB_CRC_OFF, crc);
    }
    write_at(path, slot * BLOCK, &b)
}

/// The stored VM config (the vmm's JSON) of the superblock in force.
pub fn read_config(path: &Path) -> Result<Vec<u8>, StoreFileError> {
    let sb = current_superblock(path)?;
    read_at(path, sb.config_off, sb.config_len as usize)
}

/// Replaces the stored config with `config` (which must fit in the space
/// the region occupies, up to the home-state slots), zero-padded, and sets
/// `config_len` and `config_crc` in both superblocks, with their CRCs.
pub fn write_config(path: &Path, config: &[u8]) -> Result<(), StoreFileError> {
    let sb = current_superblock(path)?;
    let room = sb.state_off - sb.config_off;
    if config.len() as u64 > room {
        return Err(format_err(
            path,
            format!(
                "a {}-byte config does not fit the {room}-byte region",
                config.len()
            ),
        ));
    }
    let mut padded = config.to_vec();
    padded.resize(config.len().div_ceil(BLOCK as usize) * BLOCK as usize, 0);
    write_at(path, sb.config_off, &padded)?;
    let crc = crc32c(config);
    for slot in [0, 1] {
        patch_superblock(path, slot, true, |b| {
            put_u64(b, 88, config.len() as u64);
            put_u32(b, 96, crc);
        })?;
    }
    Ok(())
}

/// One record of the log ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub epoch: u64,
    pub kind: u32,
    pub seq: u32,
    /// Ring offset of its head block (from `log_off`).
    pub ring_pos: u64,
    pub count: u32,
    pub payload_len: u32,
}

impl Record {
    /// Store offset of the first payload byte.
    pub fn payload_off(&self, sb: &Superblock) -> u64 {
        sb.log_off + self.ring_pos + BLOCK
    }
}

/// Walks the log of the superblock in force from its head, record by
/// record, as long as each head block belongs to this store, has a valid
/// CRC and is the next record expected (epoch and seq). Returns every such
/// record: the complete epochs (ending in a COMMIT) and whatever follows
/// the last of them. Page and epoch CRCs are not checked.
pub fn log_records(path: &Path) -> Result<(Superblock, Vec<Record>), StoreFileError> {
    let sb = current_superblock(path)?;
    let mut out = Vec::new();
    let mut pos = sb.log_head_pos;
    let mut epoch = sb.log_head_epoch;
    let mut seq = 0u32;
    let mut walked = 0u64;
    while walked < sb.log_len {
        let mut head = read_at(path, sb.log_off + pos, BLOCK as usize)?;
        let crc = get_u32(&head, REC_CRC_OFF);
        put_u32(&mut head, REC_CRC_OFF, 0);
        let rec = Record {
            epoch: get_u64(&head, 8),
            kind: get_u32(&head, 4),
            seq: get_u32(&head, 32),
            ring_pos: pos,
            count: get_u32(&head, 36),
            payload_len: get_u32(&head, 40),
        };
        if get_u32(&head, 0) != REC_MAGIC
            || head[16..32] != sb.uuid
            || crc != crc32c(&head)
            || rec.epoch != epoch
            || rec.seq != seq
        {
            break;
        }
        out.push(rec);
        seq += 1;
        if rec.kind == K_WRAP {
            walked += sb.log_len - pos;
            pos = 0;
            continue;
        }
        let len = BLOCK + u64::from(rec.payload_len);
        walked += len;
        pos += len;
        if pos >= sb.log_len {
            pos = 0;
        }
        if rec.kind == K_COMMIT {
            epoch += 1;
            seq = 0;
        }
    }
    Ok((sb, out))
}

/// Length and a 64-bit hash of the whole file: equal fingerprints mean
/// the file was not changed (short of a hash collision).
pub fn fingerprint(path: &Path) -> Result<(u64, u64), StoreFileError> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path, "read"))?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
        len += n as u64;
    }
    Ok((len, h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
