//! Recovery: walk the log ring from the head, accept each epoch whose every
//! record and whose commit record (with the CRC over the whole epoch) check
//! out, and stop at the first one that does not.

use crate::crc::crc32c_update;
use crate::error::StoreError;
use crate::format::*;
use crate::store::{EpochInfo, RecoveryNote, Store};

/// Where one page (or disk block) of a retained epoch lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageLoc {
    /// Guest-physical address (a disk block: byte offset in the disk).
    pub addr: u64,
    /// Ring offset of the 4 KiB of data.
    pub pos: u64,
    pub crc: u32,
}

/// A committed epoch retained in the log.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogEpoch {
    pub epoch: u64,
    /// Ring offset of its first record, and bytes it occupies (incl. wrap).
    pub start: u64,
    pub bytes: u64,
    pub pages: Vec<PageLoc>,
    /// Disk blocks, in record order (a later entry for the same offset wins).
    pub disk: Vec<PageLoc>,
    pub state_pos: u64,
    pub state_len: u64,
    pub state_crc: u32,
}

// Kind-specific field offsets (see README.md).
pub(crate) const H_WALL: usize = 48;
pub(crate) const H_DIRTY: usize = 56;
pub(crate) const H_FREEZE: usize = 64;
pub(crate) const H_PREV_LATENCY: usize = 68;
pub(crate) const H_STATE_LEN: usize = 72;
pub(crate) const S_LEN: usize = 48;
pub(crate) const S_CRC: usize = 56;
pub(crate) const C_BYTES: usize = 48;
pub(crate) const C_PAGES: usize = 56;
pub(crate) const C_CRC: usize = 64;
pub(crate) const C_STATE_LEN: usize = 72;
pub(crate) const C_DISK: usize = 80;

enum Stop {
    /// Nothing of the expected epoch here: the clean end of the log.
    End,
    /// The expected epoch is here but not acceptable.
    Bad(String),
    Io(StoreError),
}

struct Scanned {
    ep: LogEpoch,
    info: EpochInfo,
    end: u64,
    prev_latency: u32,
}

/// Fill `store.log`, `infos`, `tail`, `used` and the recovery note.
pub(crate) fn recover(store: &mut Store) -> Result<(), StoreError> {
    let log_len = store.sb.log.len;
    let mut pos = store.sb.log_head_pos;
    let mut expected = store.sb.log_head_epoch;
    let mut used = 0u64;
    let mut note = None;
    loop {
        match scan_epoch(store, pos, expected, log_len - used) {
            Ok(s) => {
                used += s.ep.bytes;
                pos = s.end;
                if let Some(prev) = store.infos.last_mut() {
                    prev.commit_latency_us = s.prev_latency;
                }
                store.log.push(s.ep);
                store.infos.push(s.info);
                expected += 1;
            }
            Err(Stop::End) => break,
            Err(Stop::Bad(reason)) => {
                note = Some((expected, reason));
                break;
            }
            Err(Stop::Io(e)) => return Err(e),
        }
    }
    store.tail = pos;
    store.used = used;
    if store.sb.migrate_upto != 0 {
        // Home may already hold pages of epochs up to `migrate_upto`: only
        // that epoch and later ones read correctly until the migration is
        // finished (a read-write open finishes it at once).
        store.readable_from = store
            .log
            .iter()
            .position(|e| e.epoch >= store.sb.migrate_upto)
            .unwrap_or(store.log.len());
    }
    if let Some((epoch, reason)) = note {
        let n = RecoveryNote {
            epoch,
            reason,
            fell_back_to: store.last_epoch(),
        };
        store.recovery = Some(n);
    }
    Ok(())
}

fn scan_epoch(store: &Store, start: u64, expected: u64, budget: u64) -> Result<Scanned, Stop> {
    let sb = &store.sb;
    let log_len = sb.log.len;
    let mut pos = start;
    let mut consumed = 0u64;
    let mut seq = 0u32;
    let mut crc = 0u32;
    let mut head = vec![0u8; BLOCK as usize];
    let mut payload = Vec::new();
    let mut ep = LogEpoch {
        epoch: expected,
        start,
        ..LogEpoch::default()
    };
    let mut info = EpochInfo {
        epoch: expected,
        ..EpochInfo::default()
    };
    let mut prev_latency = 0;
    let mut have_header = false;
    let mut have_state = false;
    let mut have_disk = false;
    // Nothing of this epoch found yet: the clean end of the log.
    let stop = |seq: u32, why: String| if seq == 0 { Stop::End } else { Stop::Bad(why) };
    loop {
        if consumed + BLOCK > budget {
            return Err(stop(
                seq,
                "no commit record before the oldest retained epoch".into(),
            ));
        }
        store.io.read_at(&mut head, sb.log.off + pos).map_err(|e| {
            Stop::Io(StoreError::io(
                &store.path,
                format!("read log record at ring offset {pos}"),
                e,
            ))
        })?;
        let h = match parse_head(&head, &sb.uuid) {
            Ok(h) => h,
            Err(HeadProblem::Foreign) => {
                return Err(stop(
                    seq,
                    format!(
                        "no commit record (the log ends after {seq} of its records; it was being written when the store was last used)"
                    ),
                ));
            }
            Err(HeadProblem::Crc) => {
                let same_epoch = get_u64(&head, 8) == expected;
                return Err(if seq == 0 && !same_epoch {
                    Stop::End
                } else {
                    Stop::Bad(format!(
                        "record {seq} at ring offset {pos} is corrupt (CRC mismatch)"
                    ))
                });
            }
        };
        if h.epoch != expected || h.seq != seq {
            return Err(stop(
                seq,
                format!(
                    "no commit record (the log ends after {seq} of its records; it was being written when the store was last used)"
                ),
            ));
        }
        let plen = u64::from(h.payload_len);
        let max_payload = match h.kind {
            K_PAGES | K_DISK => CHUNK_ENTRIES as u64 * PAGE_SIZE,
            K_STATE => round_up(MAX_STATE_BYTES),
            _ => 0,
        };
        if plen % BLOCK != 0
            || plen > max_payload
            || pos + BLOCK + plen > log_len
            || consumed + BLOCK + plen > budget
        {
            return Err(Stop::Bad(format!(
                "record {seq} has an impossible length {plen}"
            )));
        }
        if h.kind == K_WRAP {
            if plen != 0 {
                return Err(Stop::Bad(format!("wrap record {seq} has a payload")));
            }
            crc = crc32c_update(crc, &head);
            consumed += log_len - pos;
            pos = 0;
            seq += 1;
            continue;
        }
        if (h.kind == K_HEADER) == have_header {
            return Err(stop(
                seq,
                format!("record {seq} is out of order (kind {})", h.kind),
            ));
        }
        payload.resize(plen as usize, 0);
        store
            .io
            .read_at(&mut payload, sb.log.off + pos + BLOCK)
            .map_err(|e| {
                Stop::Io(StoreError::io(
                    &store.path,
                    format!("read log payload at ring offset {}", pos + BLOCK),
                    e,
                ))
            })?;
        let data_pos = pos + BLOCK;
        match h.kind {
            K_HEADER => {
                have_header = true;
                info.wall_time_ns = get_u64(&head, H_WALL);
                info.dirty_pages = get_u64(&head, H_DIRTY);
                info.freeze_us = get_u32(&head, H_FREEZE);
                prev_latency = get_u32(&head, H_PREV_LATENCY);
                info.state_bytes = get_u64(&head, H_STATE_LEN);
            }
            K_PAGES | K_DISK => {
                let disk = h.kind == K_DISK;
                let (what, limit) = if disk {
                    ("disk", sb.disk.len)
                } else {
                    ("page", sb.mem.len)
                };
                if have_state || (!disk && have_disk) {
                    return Err(Stop::Bad(format!("{what} record {seq} is out of order")));
                }
                have_disk |= disk;
                let n = h.count as usize;
                if n > CHUNK_ENTRIES || plen != n as u64 * PAGE_SIZE {
                    return Err(Stop::Bad(format!(
                        "{what} record {seq} has a bad count {n}"
                    )));
                }
                for i in 0..n {
                    let (addr, pcrc) = entry(&head, i);
                    if addr % PAGE_SIZE != 0 || addr >= limit {
                        return Err(Stop::Bad(format!(
                            "{what} record {seq} names address {addr:#x} outside its {limit}-byte space"
                        )));
                    }
                    let data = &payload[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
                    if crate::crc::crc32c(data) != pcrc {
                        return Err(Stop::Bad(format!(
                            "{what} block {addr:#x} in record {seq} is corrupt (CRC mismatch)"
                        )));
                    }
                    let loc = PageLoc {
                        addr,
                        pos: data_pos + i as u64 * PAGE_SIZE,
                        crc: pcrc,
                    };
                    if disk {
                        ep.disk.push(loc);
                    } else {
                        ep.pages.push(loc);
                    }
                }
            }
            K_STATE => {
                let len = get_u64(&head, S_LEN);
                if have_state
                    || len > MAX_STATE_BYTES
                    || round_up(len) != plen
                    || len != info.state_bytes
                {
                    return Err(Stop::Bad(format!("state record {seq} is inconsistent")));
                }
                ep.state_crc = get_u32(&head, S_CRC);
                if crate::crc::crc32c(&payload[..len as usize]) != ep.state_crc {
                    return Err(Stop::Bad(format!(
                        "state record {seq} is corrupt (CRC mismatch)"
                    )));
                }
                have_state = true;
                ep.state_pos = data_pos;
                ep.state_len = len;
            }
            K_COMMIT => {
                let bytes = consumed + BLOCK;
                let ok = have_state
                    && plen == 0
                    && get_u64(&head, C_BYTES) == bytes
                    && get_u64(&head, C_PAGES) == ep.pages.len() as u64
                    && get_u64(&head, C_STATE_LEN) == ep.state_len
                    && get_u64(&head, C_DISK) == ep.disk.len() as u64;
                if !ok {
                    return Err(Stop::Bad(
                        "commit record disagrees with the epoch's records".into(),
                    ));
                }
                if get_u32(&head, C_CRC) != crc {
                    return Err(Stop::Bad(
                        "commit record's CRC over the epoch does not match".into(),
                    ));
                }
                ep.bytes = bytes;
                info.pages = ep.pages.len() as u64;
                info.disk_blocks = ep.disk.len() as u64;
                info.bytes = bytes;
                let mut end = pos + BLOCK;
                if end == log_len {
                    end = 0;
                }
                return Ok(Scanned {
                    ep,
                    info,
                    end,
                    prev_latency,
                });
            }
            k => return Err(Stop::Bad(format!("record {seq} has unknown kind {k}"))),
        }
        crc = crc32c_update(crc, &head);
        crc = crc32c_update(crc, &payload);
        consumed += BLOCK + plen;
        pos += BLOCK + plen;
        if pos == log_len {
            pos = 0;
        }
        seq += 1;
    }
}
