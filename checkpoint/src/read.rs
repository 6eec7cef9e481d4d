//! Reading a committed epoch: guest memory (home + the epochs' newest
//! pages), one page, the machine state.

use crate::error::StoreError;
use crate::format::*;
use crate::migrate::page_runs;
use crate::store::{Store, read_superblocks};

/// Home is read into the caller's buffer in pieces of this size.
const HOME_READ: usize = 8 << 20;

/// What changed from one committed epoch to a later one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochDiff {
    /// Memory pages (byte offsets in the flat memory image) written by the
    /// epochs after the first, up to and including the second; sorted.
    pub pages: Vec<u64>,
    /// Disk blocks (byte offsets on the disk) written the same way; sorted.
    pub disk_blocks: Vec<u64>,
}

impl Store {
    /// Pages and disk blocks recorded by the epochs after `from` up to and
    /// including `to` (both retained, `from < to`): everything that can
    /// differ between the two (a page rewritten with the same bytes is
    /// listed too).
    pub fn changed_between(&self, from: u64, to: u64) -> Result<EpochDiff, StoreError> {
        let a = self.epochs_through(from)?;
        let b = self.epochs_through(to)?;
        let mut diff = EpochDiff::default();
        for e in self.log.get(a..b).unwrap_or_default() {
            diff.pages.extend(e.pages.iter().map(|p| p.addr));
            diff.disk_blocks.extend(e.disk.iter().map(|p| p.addr));
        }
        for list in [&mut diff.pages, &mut diff.disk_blocks] {
            list.sort_unstable();
            list.dedup();
        }
        Ok(diff)
    }

    /// How many retained log epochs make up `epoch` (0: home alone).
    pub(crate) fn epochs_through(&self, epoch: u64) -> Result<usize, StoreError> {
        if let Some(i) = self.log[self.readable_from..]
            .iter()
            .position(|e| e.epoch == epoch)
        {
            return Ok(self.readable_from + i + 1);
        }
        if epoch > 0 && epoch == self.sb.home_epoch && self.home_valid() {
            return Ok(0);
        }
        Err(self.not_retained(epoch))
    }

    pub(crate) fn not_retained(&self, epoch: u64) -> StoreError {
        let eps = self.epochs();
        let mut parts = Vec::new();
        if self.home_valid() && self.sb.home_epoch > 0 {
            parts.push(format!("home holds epoch {}", self.sb.home_epoch));
        }
        match (eps.first(), eps.last()) {
            (Some(a), Some(b)) => {
                parts.push(format!("the log holds epochs {}..={}", a.epoch, b.epoch))
            }
            _ => parts.push("the log holds no epochs".into()),
        }
        StoreError::EpochNotRetained {
            path: self.path.clone(),
            epoch,
            retained: parts.join(", "),
        }
    }

    /// A CRC failure: `Changed` if a read-only opener's store was rewritten
    /// meanwhile, `Corrupt` otherwise.
    pub(crate) fn changed_or_corrupt(&self, what: String) -> StoreError {
        if self.read_only && self.check_unchanged().is_err() {
            return StoreError::Changed {
                path: self.path.clone(),
            };
        }
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// For a read-only opener: fail if a running evm has rewritten the
    /// superblock (migrated) since we opened; what we read may be mixed.
    pub(crate) fn check_unchanged(&self) -> Result<(), StoreError> {
        if !self.read_only {
            return Ok(());
        }
        match read_superblocks(&self.path, self.io.as_ref()) {
            Ok((sb, _)) if sb.generation == self.sb.generation => Ok(()),
            _ => Err(StoreError::Changed {
                path: self.path.clone(),
            }),
        }
    }

    /// Guest memory as of `epoch` into `dst` (`len == mem_bytes`): home is
    /// read with large sequential reads straight into `dst`, then the newest
    /// version of each page the retained epochs through `epoch` wrote is
    /// read (in log order, runs of up to 1 MiB) and copied over it.
    pub fn read_memory(&self, epoch: u64, dst: &mut [u8]) -> Result<(), StoreError> {
        let n = self.epochs_through(epoch)?;
        if dst.len() as u64 != self.sb.mem.len {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!(
                    "memory buffer of {} bytes for a {}-byte memory",
                    dst.len(),
                    self.sb.mem.len
                ),
            });
        }
        if self.sb.flags & FLAG_HOME_STALE != 0 {
            dst.fill(0);
        } else {
            for (i, piece) in dst.chunks_mut(HOME_READ).enumerate() {
                let off = self.sb.mem.off + (i * HOME_READ) as u64;
                self.io.read_at(piece, off).map_err(|e| {
                    StoreError::io(&self.path, format!("read the memory home at {off}"), e)
                })?;
            }
        }
        let locs = self.newest_pages(n);
        let mut scratch = Vec::new();
        for run in page_runs(&locs) {
            self.read_pages(run, &mut scratch)?;
            for (k, p) in run.iter().enumerate() {
                let a = p.addr as usize;
                dst[a..a + PAGE_SIZE as usize].copy_from_slice(
                    &scratch[k * PAGE_SIZE as usize..(k + 1) * PAGE_SIZE as usize],
                );
            }
        }
        self.check_unchanged()
    }

    /// One page (at guest-physical `gpa`) as of `epoch`.
    pub fn read_page(&self, epoch: u64, gpa: u64, dst: &mut [u8; 4096]) -> Result<(), StoreError> {
        let n = self.epochs_through(epoch)?;
        if !gpa.is_multiple_of(PAGE_SIZE) || gpa >= self.sb.mem.len {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!(
                    "page address {gpa:#x} is not a page inside the {}-byte memory",
                    self.sb.mem.len
                ),
            });
        }
        let found = self.log[..n]
            .iter()
            .rev()
            .find_map(|e| e.pages.iter().rev().find(|p| p.addr == gpa));
        if let Some(p) = found {
            let mut scratch = Vec::new();
            self.read_pages(std::slice::from_ref(p), &mut scratch)?;
            dst.copy_from_slice(&scratch);
        } else if self.sb.flags & FLAG_HOME_STALE != 0 {
            dst.fill(0);
        } else {
            let off = self.sb.mem.off + gpa;
            self.io.read_at(dst, off).map_err(|e| {
                StoreError::io(&self.path, format!("read the memory home at {off}"), e)
            })?;
        }
        self.check_unchanged()
    }

    /// The machine state blob of `epoch`.
    pub fn read_state(&self, epoch: u64) -> Result<Vec<u8>, StoreError> {
        let n = self.epochs_through(epoch)?;
        let (off, len, crc, what) = if n > 0 {
            let e = &self.log[n - 1];
            (
                self.sb.log.off + e.state_pos,
                e.state_len,
                e.state_crc,
                format!("the state of epoch {epoch} in the log"),
            )
        } else {
            let hs = self.sb.home_state;
            let slot_off = self.sb.slot_off(hs.slot);
            let mut head = vec![0u8; BLOCK as usize];
            self.io.read_at(&mut head, slot_off).map_err(|e| {
                StoreError::io(&self.path, format!("read home state slot {}", hs.slot), e)
            })?;
            let ok = match parse_head(&head, &self.sb.uuid) {
                Ok(h) => {
                    h.kind == K_HOME_STATE
                        && h.epoch == epoch
                        && get_u64(&head, 48) == hs.len
                        && get_u32(&head, 56) == hs.crc
                }
                Err(_) => false,
            };
            if !ok {
                return Err(self.changed_or_corrupt(format!(
                    "home state slot {} does not hold epoch {epoch}'s state",
                    hs.slot
                )));
            }
            (
                slot_off + BLOCK,
                hs.len,
                hs.crc,
                format!("the home state of epoch {epoch}"),
            )
        };
        let mut state = vec![0u8; len as usize];
        self.io
            .read_at(&mut state, off)
            .map_err(|e| StoreError::io(&self.path, format!("read {what}"), e))?;
        if crate::crc::crc32c(&state) != crc {
            return Err(self.changed_or_corrupt(format!("{what} fails its CRC")));
        }
        self.check_unchanged()?;
        Ok(state)
    }
}
