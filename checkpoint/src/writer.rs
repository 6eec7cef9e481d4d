//! Appending an epoch: header, page chunks, state, commit record; large
//! sequential writes, optional pacing; migration when the ring fills.

use crate::crc::{crc32c, crc32c_update};
use crate::error::StoreError;
use crate::format::*;
use crate::recovery::*;
use crate::store::{EpochInfo, EpochMeta, Store};
use std::time::{Duration, Instant};

/// The epoch being written.
struct Pending {
    epoch: u64,
    start: u64,
    /// Ring offset of the next record, and bytes consumed so far.
    pos: u64,
    consumed: u64,
    seq: u32,
    crc: u32,
    /// Ring offset of `store.buf[0]`.
    buf_pos: u64,
    pages: Vec<PageLoc>,
    disk: Vec<PageLoc>,
    state_pos: u64,
    t0: Instant,
    flushed: u64,
}

fn head_block(uuid: &[u8; 16], h: Head) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    write_head(&mut b, uuid, &h);
    b
}

impl Store {
    /// The number the next appended epoch gets.
    pub fn next_epoch(&self) -> u64 {
        self.log
            .last()
            .map_or(self.sb.home_epoch + 1, |e| e.epoch + 1)
    }

    /// Append and commit one epoch with no disk blocks (see
    /// [`Store::append_epoch_with_disk`]).
    pub fn append_epoch(
        &mut self,
        meta: &EpochMeta,
        pages: &mut dyn Iterator<Item = (u64, &[u8])>,
        state: &[u8],
    ) -> Result<EpochInfo, StoreError> {
        self.append_epoch_with_disk(meta, pages, &mut std::iter::empty(), state)
    }

    /// Append and commit one epoch: its pages (guest-physical address,
    /// 4096 bytes), its disk blocks (disk byte offset, 4096 bytes; an
    /// offset given twice: the later block wins) and its machine state.
    /// Returns after the epoch is durable. On error (a bad page or block,
    /// log full, I/O) nothing committed changes and the same epoch number
    /// is used by the next call. The disk iterator's `size_hint` lower
    /// bound is used to make room before writing.
    pub fn append_epoch_with_disk(
        &mut self,
        meta: &EpochMeta,
        pages: &mut dyn Iterator<Item = (u64, &[u8])>,
        disk: &mut dyn Iterator<Item = (u64, &[u8])>,
        state: &[u8],
    ) -> Result<EpochInfo, StoreError> {
        self.check_writable()?;
        self.finish_pending()?;
        if state.len() as u64 > MAX_STATE_BYTES {
            return Err(StoreError::StateTooLarge {
                path: self.path.clone(),
                len: state.len(),
                max: MAX_STATE_BYTES,
            });
        }
        let t0 = Instant::now();
        let disk_hint = disk.size_hint().0 as u64;
        self.make_room(meta.dirty_pages, disk_hint, state.len() as u64)?;
        let mut w = Pending {
            epoch: self.next_epoch(),
            start: self.tail,
            pos: self.tail,
            consumed: 0,
            seq: 0,
            crc: 0,
            buf_pos: self.tail,
            pages: Vec::with_capacity(meta.dirty_pages.min(1 << 22) as usize),
            disk: Vec::with_capacity(disk_hint.min(1 << 22) as usize),
            state_pos: 0,
            t0,
            flushed: 0,
        };
        self.buf.clear();
        let r = self.write_epoch(&mut w, meta, pages, disk, state);
        self.buf.clear();
        r?;
        self.io
            .sync()
            .map_err(|e| StoreError::io(&self.path, format!("sync epoch {}", w.epoch), e))?;
        let latency = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let info = EpochInfo {
            epoch: w.epoch,
            wall_time_ns: meta.wall_time_ns,
            freeze_us: meta.freeze_us,
            dirty_pages: meta.dirty_pages,
            pages: w.pages.len() as u64,
            disk_blocks: w.disk.len() as u64,
            state_bytes: state.len() as u64,
            bytes: w.consumed,
            commit_latency_us: latency,
        };
        self.log.push(LogEpoch {
            epoch: w.epoch,
            start: w.start,
            bytes: w.consumed,
            pages: std::mem::take(&mut w.pages),
            disk: std::mem::take(&mut w.disk),
            state_pos: w.state_pos,
            state_len: state.len() as u64,
            state_crc: crc32c(state),
        });
        if let Some(e) = self.log.last() {
            self.disk_map.committed(self.sb.log.off, &e.disk);
        }
        self.infos.push(info);
        self.tail = w.pos;
        self.used += w.consumed;
        self.last_commit_latency_us = latency;
        log::debug!(
            "{}: epoch {} committed: {} pages, {} disk blocks, {} bytes, {} µs",
            self.path.display(),
            info.epoch,
            info.pages,
            info.disk_blocks,
            info.bytes,
            latency
        );
        Ok(info)
    }

    fn write_epoch(
        &mut self,
        w: &mut Pending,
        meta: &EpochMeta,
        pages: &mut dyn Iterator<Item = (u64, &[u8])>,
        disk: &mut dyn Iterator<Item = (u64, &[u8])>,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let uuid = self.sb.uuid;
        let mut h = head_block(
            &uuid,
            Head {
                kind: K_HEADER,
                epoch: w.epoch,
                seq: 0,
                count: 0,
                payload_len: 0,
            },
        );
        put_u64(&mut h, H_WALL, meta.wall_time_ns);
        put_u64(&mut h, H_DIRTY, meta.dirty_pages);
        put_u32(&mut h, H_FREEZE, meta.freeze_us);
        put_u32(&mut h, H_PREV_LATENCY, self.last_commit_latency_us);
        put_u64(&mut h, H_STATE_LEN, state.len() as u64);
        self.push_record(w, h, &[])?;

        let mut next = pages.next();
        while next.is_some() {
            next = self.write_chunk(w, K_PAGES, next, pages)?;
        }
        let mut next = disk.next();
        while next.is_some() {
            next = self.write_chunk(w, K_DISK, next, disk)?;
        }

        let mut h = head_block(
            &uuid,
            Head {
                kind: K_STATE,
                epoch: w.epoch,
                seq: 0,
                count: 0,
                payload_len: round_up(state.len() as u64) as u32,
            },
        );
        put_u64(&mut h, S_LEN, state.len() as u64);
        put_u32(&mut h, S_CRC, crc32c(state));
        let state_pos = self.push_record(w, h, state)?;
        w.state_pos = state_pos + BLOCK;

        self.reserve(w, BLOCK)?;
        let mut h = head_block(
            &uuid,
            Head {
                kind: K_COMMIT,
                epoch: w.epoch,
                seq: w.seq,
                count: 0,
                payload_len: 0,
            },
        );
        put_u64(&mut h, C_BYTES, w.consumed + BLOCK);
        put_u64(&mut h, C_PAGES, w.pages.len() as u64);
        put_u32(&mut h, C_CRC, w.crc);
        put_u64(&mut h, C_STATE_LEN, state.len() as u64);
        put_u64(&mut h, C_DISK, w.disk.len() as u64);
        self.push_record(w, h, &[])?;
        self.flush(w)
    }

    /// Write one page (or disk, by `kind`) chunk starting with `first`;
    /// returns the page after it.
    fn write_chunk<'a>(
        &mut self,
        w: &mut Pending,
        kind: u32,
        first: Option<(u64, &'a [u8])>,
        pages: &mut dyn Iterator<Item = (u64, &'a [u8])>,
    ) -> Result<Option<(u64, &'a [u8])>, StoreError> {
        let log_len = self.sb.log.len;
        let mut cap = 0u64;
        for _ in 0..3 {
            let room_end = log_len - w.pos;
            let avail = log_len - self.used - w.consumed;
            cap = (room_end.min(avail) / BLOCK)
                .saturating_sub(1)
                .min(CHUNK_ENTRIES as u64);
            if cap >= 1 {
                break;
            }
            self.reserve(w, 2 * BLOCK)?;
        }
        if cap == 0 {
            return Err(StoreError::LogFull {
                path: self.path.clone(),
                epoch: w.epoch,
                log_bytes: log_len,
            });
        }
        let total = BLOCK + cap * PAGE_SIZE;
        self.make_contiguous(w, total)?;
        let idx = self.buf.len();
        self.buf.resize(idx + BLOCK as usize, 0);
        let data_pos = w.pos + BLOCK;
        let mut entries: Vec<(u64, u32)> = Vec::with_capacity(cap as usize);
        let mut cur = first;
        while let Some((addr, data)) = cur {
            if entries.len() as u64 == cap {
                break;
            }
            let (limit, what) = if kind == K_DISK {
                (self.sb.disk.len, "disk block")
            } else {
                (self.sb.mem.len, "page")
            };
            if addr % PAGE_SIZE != 0 || addr >= limit || data.len() != PAGE_SIZE as usize {
                return Err(StoreError::Invalid {
                    path: self.path.clone(),
                    what: format!(
                        "{what} at {addr:#x} ({} bytes) is not a 4 KiB block inside the {limit}-byte {}",
                        data.len(),
                        if kind == K_DISK { "disk" } else { "memory" }
                    ),
                });
            }
            let crc = crc32c(data);
            self.buf.extend_from_slice(data);
            let loc = PageLoc {
                addr,
                pos: data_pos + entries.len() as u64 * PAGE_SIZE,
                crc,
            };
            if kind == K_DISK {
                w.disk.push(loc);
            } else {
                w.pages.push(loc);
            }
            entries.push((addr, crc));
            cur = pages.next();
        }
        let n = entries.len() as u32;
        let block = &mut self.buf[idx..idx + BLOCK as usize];
        write_head(
            block,
            &self.sb.uuid,
            &Head {
                kind,
                epoch: w.epoch,
                seq: w.seq,
                count: n,
                payload_len: n * PAGE_SIZE as u32,
            },
        );
        for (i, (addr, crc)) in entries.iter().enumerate() {
            put_entry(block, i, *addr, *crc);
        }
        seal(block);
        let len = BLOCK + u64::from(n) * PAGE_SIZE;
        w.crc = crc32c_update(w.crc, &self.buf[idx..]);
        self.advance(w, len);
        Ok(cur)
    }

    /// Add a record (sealed here) with its payload; returns its ring offset.
    fn push_record(
        &mut self,
        w: &mut Pending,
        mut head: Vec<u8>,
        payload: &[u8],
    ) -> Result<u64, StoreError> {
        let plen = round_up(payload.len() as u64);
        let total = BLOCK + plen;
        self.reserve(w, total)?;
        self.make_contiguous(w, total)?;
        put_u32(&mut head, 32, w.seq);
        seal(&mut head);
        let at = self.buf.len();
        self.buf.extend_from_slice(&head);
        self.buf.extend_from_slice(payload);
        self.buf.resize(at + total as usize, 0);
        w.crc = crc32c_update(w.crc, &self.buf[at..]);
        let pos = w.pos;
        self.advance(w, total);
        Ok(pos)
    }

    fn advance(&mut self, w: &mut Pending, len: u64) {
        w.pos += len;
        w.consumed += len;
        w.seq += 1;
        if w.pos == self.sb.log.len {
            w.pos = 0;
        }
    }

    /// Make the buffer end at `w.pos` with room for `len` more bytes.
    fn make_contiguous(&mut self, w: &mut Pending, len: u64) -> Result<(), StoreError> {
        let end = w.buf_pos + self.buf.len() as u64;
        if !self.buf.is_empty()
            && (end != w.pos || self.buf.len() as u64 + len > self.batch_bytes as u64)
        {
            self.flush(w)?;
        }
        if self.buf.is_empty() {
            w.buf_pos = w.pos;
        }
        Ok(())
    }

    /// Ensure the next `need` bytes can be written at `w.pos` without
    /// crossing the end of the ring (else write a wrap record) or reaching
    /// retained epochs (else migrate every committed epoch; else LogFull).
    fn reserve(&mut self, w: &mut Pending, need: u64) -> Result<(), StoreError> {
        let log_len = self.sb.log.len;
        loop {
            let room_end = log_len - w.pos;
            let avail = log_len - self.used - w.consumed;
            if need <= room_end && need <= avail {
                return Ok(());
            }
            if need > room_end && room_end + need <= avail {
                self.write_wrap(w)?;
                continue;
            }
            match self.log.last() {
                Some(last) if need <= log_len => {
                    let last = last.epoch;
                    self.flush(w)?;
                    log::info!(
                        "{}: log full while writing epoch {}: migrating through epoch {last}",
                        self.path.display(),
                        w.epoch
                    );
                    self.migrate_inner(last)?;
                }
                _ => {
                    return Err(StoreError::LogFull {
                        path: self.path.clone(),
                        epoch: w.epoch,
                        log_bytes: log_len,
                    });
                }
            }
        }
    }

    /// A wrap record at `w.pos`: the rest of the ring is skipped.
    fn write_wrap(&mut self, w: &mut Pending) -> Result<(), StoreError> {
        self.make_contiguous(w, BLOCK)?;
        let mut h = head_block(
            &self.sb.uuid,
            Head {
                kind: K_WRAP,
                epoch: w.epoch,
                seq: w.seq,
                count: 0,
                payload_len: 0,
            },
        );
        seal(&mut h);
        w.crc = crc32c_update(w.crc, &h);
        self.buf.extend_from_slice(&h);
        let skip = self.sb.log.len - w.pos;
        w.consumed += skip;
        w.seq += 1;
        w.pos = 0;
        self.flush(w)
    }

    /// Write out the buffer, then pace.
    fn flush(&mut self, w: &mut Pending) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let off = self.sb.log.off + w.buf_pos;
        self.io.write_at(&self.buf, off).map_err(|e| {
            StoreError::io(
                &self.path,
                format!(
                    "write {} bytes of epoch {} at {off}",
                    self.buf.len(),
                    w.epoch
                ),
                e,
            )
        })?;
        w.flushed += self.buf.len() as u64;
        w.buf_pos += self.buf.len() as u64;
        self.buf.clear();
        if let Some(rate) = self.rate_limit {
            let due = Duration::from_secs_f64(w.flushed as f64 / rate as f64);
            let spent = w.t0.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
        Ok(())
    }

    /// Before an epoch: if the log is past the threshold, or the epoch (as
    /// estimated from its dirty page and disk block counts) would not fit,
    /// migrate the oldest epochs.
    fn make_room(
        &mut self,
        dirty_pages: u64,
        disk_blocks: u64,
        state_len: u64,
    ) -> Result<(), StoreError> {
        if self.log.is_empty() {
            return Ok(());
        }
        let log_len = self.sb.log.len;
        let chunks =
            dirty_pages.div_ceil(CHUNK_ENTRIES as u64) + disk_blocks.div_ceil(CHUNK_ENTRIES as u64);
        let dirty_pages = dirty_pages.saturating_add(disk_blocks);
        let wrap_slack = (BLOCK * (CHUNK_ENTRIES as u64 + 1)).min(log_len / 8);
        let est = (3 * BLOCK + round_up(state_len))
            .saturating_add(dirty_pages.saturating_mul(PAGE_SIZE))
            .saturating_add(chunks * BLOCK)
            .saturating_add(wrap_slack);
        let over = self.used as f64 > log_len as f64 * self.migrate_threshold;
        if !over && self.used.saturating_add(est) <= log_len {
            return Ok(());
        }
        let keep = ((log_len as f64 * self.migrate_threshold / 2.0) as u64)
            .min(log_len.saturating_sub(est));
        let mut kept = self.used;
        let mut k = 0;
        while k < self.log.len() && kept > keep {
            kept -= self.log[k].bytes;
            k += 1;
        }
        if k > 0 {
            let upto = self.log[k - 1].epoch;
            log::debug!(
                "{}: log {:.0}% full: migrating through epoch {upto}",
                self.path.display(),
                self.log_fill() * 100.0
            );
            self.migrate_inner(upto)?;
        }
        Ok(())
    }
}
