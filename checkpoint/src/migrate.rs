//! Migration (folding committed epochs into home), discarding the machine
//! state, and finishing either after an interruption.
//!
//! Every step is crash-safe because home only ever receives pages of epochs
//! that stay in the log until the superblock that drops them is durable:
//! replaying the log over a partly updated home gives the same result.

use crate::error::StoreError;
use crate::format::*;
use crate::recovery::PageLoc;
use crate::store::Store;

/// Split `locs` into runs of consecutive log offsets (up to 1 MiB each), to
/// be read with one call each.
pub(crate) fn page_runs(locs: &[PageLoc]) -> impl Iterator<Item = &[PageLoc]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= locs.len() {
            return None;
        }
        let mut j = i + 1;
        while j < locs.len() && j - i < 256 && locs[j].pos == locs[j - 1].pos + PAGE_SIZE {
            j += 1;
        }
        let run = &locs[i..j];
        i = j;
        Some(run)
    })
}

/// Coalesces page writes to home into runs of consecutive addresses.
struct HomeWriter {
    what: &'static str,
    base: u64,
    start: u64,
    data: Vec<u8>,
}

impl HomeWriter {
    fn put(&mut self, store: &mut Store, addr: u64, page: &[u8]) -> Result<(), StoreError> {
        if !self.data.is_empty()
            && (self.start + self.data.len() as u64 != addr || self.data.len() >= 1 << 20)
        {
            self.flush(store)?;
        }
        if self.data.is_empty() {
            self.start = addr;
        }
        self.data.extend_from_slice(page);
        Ok(())
    }

    fn flush(&mut self, store: &mut Store) -> Result<(), StoreError> {
        if self.data.is_empty() {
            return Ok(());
        }
        let off = self.base + self.start;
        store.io.write_at(&self.data, off).map_err(|e| {
            StoreError::io(
                &store.path,
                format!(
                    "write {} bytes of the {} at {off}",
                    self.data.len(),
                    self.what
                ),
                e,
            )
        })?;
        self.data.clear();
        Ok(())
    }
}

impl Store {
    /// Fold committed epochs up to and including `upto` into home (newest
    /// version of each page wins) and release their log space. Epochs at or
    /// below `home_epoch` are already home: nothing to do.
    pub fn migrate(&mut self, upto: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.finish_pending()?;
        if upto <= self.sb.home_epoch {
            return Ok(());
        }
        if !self.log.iter().any(|e| e.epoch == upto) {
            return Err(self.not_retained(upto));
        }
        self.migrate_inner(upto)
    }

    /// Record the intent (so a crash mid-way is finished by the next open),
    /// then fold.
    pub(crate) fn migrate_inner(&mut self, upto: u64) -> Result<(), StoreError> {
        let mut sb = self.sb.clone();
        sb.migrate_upto = upto;
        self.write_superblock(sb)?;
        self.fold(upto)
    }

    /// The durable superblock says a migration through `upto` is under way.
    fn fold(&mut self, upto: u64) -> Result<(), StoreError> {
        let Some(k) = self.log.iter().position(|e| e.epoch == upto) else {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                what: format!(
                    "a migration through epoch {upto} was interrupted, but that epoch is no longer in the log"
                ),
            });
        };
        let locs = self.newest_pages(k + 1);
        let mut hw = HomeWriter {
            what: "memory home",
            base: self.sb.mem.off,
            start: 0,
            data: Vec::with_capacity(1 << 20),
        };
        let mut scratch = Vec::new();
        for run in page_runs(&locs) {
            self.read_pages(run, &mut scratch)?;
            for (n, p) in run.iter().enumerate() {
                hw.put(
                    self,
                    p.addr,
                    &scratch[n * PAGE_SIZE as usize..(n + 1) * PAGE_SIZE as usize],
                )?;
            }
        }
        hw.flush(self)?;
        // Disk blocks the same way, into the disk home.
        let blocks = self.newest_blocks(k + 1);
        let mut hw = HomeWriter {
            what: "disk home",
            base: self.sb.disk.off,
            start: 0,
            data: Vec::with_capacity(1 << 20),
        };
        for run in page_runs(&blocks) {
            self.read_pages(run, &mut scratch)?;
            for (n, p) in run.iter().enumerate() {
                hw.put(
                    self,
                    p.addr,
                    &scratch[n * PAGE_SIZE as usize..(n + 1) * PAGE_SIZE as usize],
                )?;
            }
        }
        hw.flush(self)?;

        // The state of `upto` goes into the slot the durable superblock does
        // not reference.
        let state = self.read_state(upto)?;
        let slot = if self.sb.home_state.slot == 0 { 1 } else { 0 };
        let mut block = vec![0u8; (BLOCK + round_up(state.len() as u64)) as usize];
        write_head(
            &mut block,
            &self.sb.uuid,
            &Head {
                kind: K_HOME_STATE,
                epoch: upto,
                seq: 0,
                count: 0,
                payload_len: round_up(state.len() as u64) as u32,
            },
        );
        let crc = crate::crc::crc32c(&state);
        put_u64(&mut block, 48, state.len() as u64);
        put_u32(&mut block, 56, crc);
        seal(&mut block[..BLOCK as usize]);
        block[BLOCK as usize..BLOCK as usize + state.len()].copy_from_slice(&state);
        let off = self.sb.slot_off(slot);
        self.io.write_at(&block, off).map_err(|e| {
            StoreError::io(
                &self.path,
                format!("write home state slot {slot} at {off}"),
                e,
            )
        })?;
        self.io
            .sync()
            .map_err(|e| StoreError::io(&self.path, "sync the memory and disk homes", e))?;
        // Home is durable: the running VM reads these blocks from there
        // before their ring space can be reused (after the superblock below).
        self.disk_map.folded(self.sb.log.off, &blocks);

        let freed: u64 = self.log[..=k].iter().map(|e| e.bytes).sum();
        let mut sb = self.sb.clone();
        sb.home_epoch = upto;
        sb.log_head_epoch = upto + 1;
        sb.log_head_pos = self.log.get(k + 1).map_or(self.tail, |e| e.start);
        sb.migrate_upto = 0;
        sb.flags |= FLAG_HOME_VALID;
        sb.home_state = HomeState {
            slot,
            crc,
            len: state.len() as u64,
            epoch: upto,
        };
        self.write_superblock(sb)?;
        self.log.drain(..=k);
        self.infos.drain(..=k);
        self.readable_from = 0;
        self.used -= freed;
        log::debug!(
            "{}: migrated through epoch {upto} ({} pages, {} disk blocks, {freed} log bytes freed)",
            self.path.display(),
            locs.len(),
            blocks.len()
        );
        Ok(())
    }

    /// Keep the store but mark that there is no machine state to resume: all
    /// committed epochs are folded home first (so the disk home holds the
    /// newest disk, which is kept), then the memory home (only) is zeroed. The next appended epoch's memory is zero plus
    /// its own pages.
    pub fn discard_machine_state(&mut self) -> Result<(), StoreError> {
        self.check_writable()?;
        self.finish_pending()?;
        if let Some(last) = self.log.last().map(|e| e.epoch) {
            self.migrate_inner(last)?;
        }
        if self.sb.flags & FLAG_HOME_VALID == 0 {
            return Ok(());
        }
        let mut sb = self.sb.clone();
        sb.flags = (sb.flags & !FLAG_HOME_VALID) | FLAG_HOME_STALE;
        sb.home_state = HomeState::NONE;
        self.write_superblock(sb)?;
        self.finish_pending()
    }

    /// Finish what an interrupted discard or migration left: zero a stale
    /// memory home, complete a migration whose intent is durable.
    pub(crate) fn finish_pending(&mut self) -> Result<(), StoreError> {
        if self.sb.flags & FLAG_HOME_STALE != 0 {
            let mem = self.sb.mem;
            self.io
                .zero_range(mem.off, mem.len)
                .map_err(|e| StoreError::io(&self.path, "zero the memory home", e))?;
            self.io
                .sync()
                .map_err(|e| StoreError::io(&self.path, "sync the memory home", e))?;
            let mut sb = self.sb.clone();
            sb.flags &= !FLAG_HOME_STALE;
            self.write_superblock(sb)?;
        }
        if self.sb.migrate_upto != 0 {
            self.readable_from = 0;
            self.fold(self.sb.migrate_upto)?;
        }
        Ok(())
    }

    /// The newest version of every page written by the first `n` retained
    /// epochs, in log order (so reading them is sequential).
    pub(crate) fn newest_pages(&self, n: usize) -> Vec<PageLoc> {
        let pages = (self.sb.mem.len / PAGE_SIZE) as usize;
        let mut seen = vec![0u64; pages.div_ceil(64)];
        let mut out = Vec::new();
        for e in self.log[..n].iter().rev() {
            for p in e.pages.iter().rev() {
                let i = (p.addr / PAGE_SIZE) as usize;
                if seen[i / 64] & (1 << (i % 64)) == 0 {
                    seen[i / 64] |= 1 << (i % 64);
                    out.push(*p);
                }
            }
        }
        out.sort_unstable_by_key(|p| p.pos);
        out
    }

    /// Read a run of consecutive pages into `scratch` and verify them.
    pub(crate) fn read_pages(
        &self,
        run: &[PageLoc],
        scratch: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        scratch.resize(run.len() * PAGE_SIZE as usize, 0);
        let off = self.sb.log.off + run[0].pos;
        self.io.read_at(scratch, off).map_err(|e| {
            StoreError::io(
                &self.path,
                format!("read {} log pages at {off}", run.len()),
                e,
            )
        })?;
        for (n, p) in run.iter().enumerate() {
            let page = &scratch[n * PAGE_SIZE as usize..(n + 1) * PAGE_SIZE as usize];
            if crate::crc::crc32c(page) != p.crc {
                return Err(self.changed_or_corrupt(format!(
                    "page {:#x} of the log at ring offset {} fails its CRC",
                    p.addr, p.pos
                )));
            }
        }
        Ok(())
    }
}
