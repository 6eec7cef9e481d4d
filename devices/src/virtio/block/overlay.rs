//! The epoch disk: a virtio-blk backing whose writes belong to the epoch
//! they were made in (issue 4, DESIGN.md "Run").
//!
//! The guest's writes never reach a host file directly. They land in the
//! *current* overlay, a map of 4 KiB blocks in memory. At a freeze the
//! current overlay is *sealed* (merged into the set of blocks that belong to
//! epochs not yet committed) and handed to the checkpoint writer, which puts
//! the blocks into that epoch's log records. Once the epoch is committed the
//! sealed blocks are dropped: the committed data is then served by the
//! [`CommittedBlocks`] source (the store's log, then its disk home), which
//! the vmm supplies. Reads see, newest first: the current overlay, the
//! sealed blocks, the committed source.
//!
//! A guest FLUSH does not wait for the host disk: durability is the
//! epoch's. After a crash the guest is rolled back together with its memory
//! of having flushed (DESIGN.md invariant 2).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMem;

/// Size of an overlay block (the store's block size).
pub const BLOCK_BYTES: usize = 4096;
const BLOCK: u64 = BLOCK_BYTES as u64;

/// One 4 KiB disk block.
pub type DiskBlock = [u8; BLOCK_BYTES];

/// The committed contents of the disk: blocks of committed epochs not yet
/// migrated, then the disk home. Implemented by the vmm over the store.
pub trait CommittedBlocks: Send + Sync + std::fmt::Debug {
    /// Fill `dst` with the newest committed version of the block at byte
    /// offset `off` (4 KiB aligned, below the disk's size).
    fn read_block(&self, off: u64, dst: &mut DiskBlock) -> io::Result<()>;
}

/// Blocks written since the last commit, keyed by byte offset.
pub type BlockMap = HashMap<u64, Arc<DiskBlock>>;

#[derive(Debug, Default)]
struct Overlays {
    /// Written since the last freeze.
    current: BlockMap,
    /// Written before the last freeze, in epochs not yet committed.
    sealed: Arc<BlockMap>,
}

/// A disk whose contents are committed source + sealed + current overlay.
#[derive(Debug)]
pub struct EpochDisk {
    committed: Arc<dyn CommittedBlocks>,
    size: u64,
    overlays: Mutex<Overlays>,
}

impl EpochDisk {
    /// A disk of `size` bytes (a multiple of 4096) over `committed`.
    pub fn new(committed: Arc<dyn CommittedBlocks>, size: u64) -> io::Result<Self> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("epoch disk size {size} is not a positive multiple of {BLOCK}"),
            ));
        }
        Ok(Self {
            committed,
            size,
            overlays: Mutex::default(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, Overlays> {
        // A panic while holding the lock leaves whole blocks behind (every
        // insert is of a complete block), so the data is still consistent.
        self.overlays.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seal the blocks written since the last freeze into the uncommitted
    /// set and return that whole set: everything the epoch being marked must
    /// carry (including blocks of an earlier epoch whose commit failed).
    /// Call it during the freeze, when no request is in flight.
    pub fn seal(&self) -> Arc<BlockMap> {
        let mut o = self.lock();
        let current = std::mem::take(&mut o.current);
        if !current.is_empty() {
            Arc::make_mut(&mut o.sealed).extend(current);
        }
        Arc::clone(&o.sealed)
    }

    /// The epoch that carried the sealed blocks is committed and the
    /// committed source now serves them: drop them.
    pub fn committed(&self) {
        self.lock().sealed = Arc::default();
    }

    /// Blocks in memory (current and sealed), for statistics.
    pub fn overlay_blocks(&self) -> (usize, usize) {
        let o = self.lock();
        (o.current.len(), o.sealed.len())
    }

    /// The newest version of the block at `off` into `dst`.
    fn read_block(&self, o: &Overlays, off: u64, dst: &mut DiskBlock) -> io::Result<()> {
        if let Some(b) = o.current.get(&off).or_else(|| o.sealed.get(&off)) {
            dst.copy_from_slice(&b[..]);
            Ok(())
        } else {
            self.committed.read_block(off, dst)
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are beyond the {}-byte disk",
                    self.size
                ),
            )),
        }
    }

    /// Read `buf.len()` bytes at byte `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let o = self.lock();
        let mut block = [0u8; BLOCK_BYTES];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let base = pos - pos % BLOCK;
            let within = (pos - base) as usize;
            let n = (BLOCK_BYTES - within).min(buf.len() - done);
            self.read_block(&o, base, &mut block)?;
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Write `data` at byte `offset` into the current overlay (a partial
    /// block is completed from its newest version first).
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len())?;
        let mut o = self.lock();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let base = pos - pos % BLOCK;
            let within = (pos - base) as usize;
            let n = (BLOCK_BYTES - within).min(data.len() - done);
            let mut block = [0u8; BLOCK_BYTES];
            if n != BLOCK_BYTES {
                self.read_block(&o, base, &mut block)?;
            }
            block[within..within + n].copy_from_slice(&data[done..done + n]);
            o.current.insert(base, Arc::new(block));
            done += n;
        }
        Ok(())
    }

    /// Fill guest memory `[addr, addr + len)` from the disk at `offset`;
    /// the write goes through `GuestMem`, so its dirty bitmap records it.
    pub fn read_to_guest(
        &self,
        mem: &GuestMem,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut buf = vec![0u8; len];
        self.read(offset, &mut buf)
            .map_err(vm_memory::GuestMemoryError::IOError)?;
        mem.write_slice(&buf, addr)
    }

    /// Write guest memory `[addr, addr + len)` to the disk at `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMem,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, addr)?;
        self.write(offset, &buf)
            .map_err(vm_memory::GuestMemoryError::IOError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A committed source: block `i` filled with byte `i`, and whether reads
    /// should fail.
    #[derive(Debug, Default)]
    struct Committed {
        blocks: Mutex<HashMap<u64, DiskBlock>>,
        fail: AtomicBool,
    }

    impl CommittedBlocks for Committed {
        fn read_block(&self, off: u64, dst: &mut DiskBlock) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            match self.blocks.lock().unwrap().get(&off) {
                Some(b) => dst.copy_from_slice(b),
                None => dst.fill((off / BLOCK) as u8),
            }
            Ok(())
        }
    }

    fn disk() -> (Arc<Committed>, EpochDisk) {
        let c = Arc::new(Committed::default());
        let d = EpochDisk::new(c.clone(), 16 * BLOCK).unwrap();
        (c, d)
    }

    fn read(d: &EpochDisk, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read(off, &mut b).unwrap();
        b
    }

    #[test]
    fn reads_fall_through_to_committed() {
        let (_, d) = disk();
        assert_eq!(read(&d, 3 * BLOCK + 100, 10), vec![3u8; 10]);
        // Across a block boundary.
        let b = read(&d, 2 * BLOCK - 2, 4);
        assert_eq!(b, vec![1, 1, 2, 2]);
    }

    #[test]
    fn partial_writes_merge_with_the_newest_version() {
        let (_, d) = disk();
        d.write(BLOCK + 510, &[0xaa; 4]).unwrap();
        let b = read(&d, BLOCK + 508, 8);
        assert_eq!(b, vec![1, 1, 0xaa, 0xaa, 0xaa, 0xaa, 1, 1]);
        // Sealed, then written again: the new write sees the sealed version.
        let sealed = d.seal();
        assert_eq!(sealed.len(), 1);
        d.write(BLOCK, &[0xbb; 2]).unwrap();
        let b = read(&d, BLOCK, 4);
        assert_eq!(b, vec![0xbb, 0xbb, 1, 1]);
        assert_eq!(read(&d, BLOCK + 510, 2), vec![0xaa, 0xaa]);
        // The sealed set the writer holds is not changed by later writes.
        assert_eq!(sealed[&BLOCK][0], 1);
        assert_eq!(sealed[&BLOCK][510], 0xaa);
    }

    #[test]
    fn seal_carries_uncommitted_blocks_until_committed() {
        let (c, d) = disk();
        d.write(0, &[1u8; BLOCK_BYTES]).unwrap();
        let first = d.seal();
        assert_eq!(first.len(), 1);
        // The commit of that epoch failed: the next seal carries both.
        d.write(2 * BLOCK, &[2u8; BLOCK_BYTES]).unwrap();
        drop(first);
        let second = d.seal();
        assert_eq!(second.len(), 2);
        // Committed: the store serves them now.
        for (off, b) in second.iter() {
            c.blocks.lock().unwrap().insert(*off, **b);
        }
        d.committed();
        assert_eq!(d.overlay_blocks(), (0, 0));
        assert_eq!(read(&d, 0, 2), vec![1, 1]);
        assert_eq!(read(&d, 2 * BLOCK, 2), vec![2, 2]);
        // An empty epoch seals nothing.
        assert!(d.seal().is_empty());
    }

    #[test]
    fn whole_block_writes_do_not_read_and_errors_propagate() {
        let (c, d) = disk();
        c.fail.store(true, Ordering::SeqCst);
        d.write(BLOCK, &[7u8; 2 * BLOCK_BYTES]).unwrap();
        assert_eq!(read(&d, BLOCK, 3), vec![7, 7, 7]);
        let e = d.write(5 * BLOCK + 1, &[1]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let mut b = [0u8; 1];
        assert!(d.read(6 * BLOCK, &mut b).is_err());
    }

    #[test]
    fn out_of_range_is_refused() {
        let (_, d) = disk();
        assert!(d.write(16 * BLOCK - 1, &[0, 0]).is_err());
        let mut b = [0u8; 2];
        assert!(d.read(u64::MAX, &mut b).is_err());
        assert!(EpochDisk::new(Arc::new(Committed::default()), 100).is_err());
        assert!(EpochDisk::new(Arc::new(Committed::default()), 0).is_err());
    }
}
