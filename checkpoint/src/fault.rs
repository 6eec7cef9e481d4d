//! Injected I/O errors on a live store (issue 4, item 5): a [`StoreIo`]
//! wrapper that makes chosen writes or syncs fail with EIO or ENOSPC, so
//! the whole VMM's response to a failing store can be tested on a real
//! file. `evm` installs it when `EVM_INJECT_FAULT` is set (see the vmm's
//! README); the store's own crash and fault tests use
//! `testing::CrashDevice`, which also models power cuts.
//!
//! A plan reads `<op>:<errno>:<skip>[:<count>]`: after `skip` successful
//! operations of kind `op` (`write` or `sync`), the next `count` (default
//! 1; `inf` for all) fail with `errno` (`eio` or `enospc`). A failed write
//! writes nothing; a failed sync makes nothing durable that was not
//! already (the file itself is not touched).

use std::io;
use std::sync::Arc;

use crate::io::{ReadAt, StoreIo};

/// Which operations a plan fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `write_at` (and the zeroing of ranges, made of writes).
    Write,
    /// `sync` (fdatasync).
    Sync,
}

/// When and how store I/O fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The kind of operation that fails.
    pub op: FaultOp,
    /// The error number it fails with.
    pub errno: i32,
    /// Operations of that kind that succeed first.
    pub skip: u64,
    /// Operations that then fail (`u64::MAX`: every one).
    pub count: u64,
}

/// A plan that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("fault plan {plan:?}: {why} (want <write|sync>:<eio|enospc>:<skip>[:<count>|inf])")]
pub struct FaultPlanError {
    plan: String,
    why: String,
}

impl std::str::FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(text: &str) -> Result<FaultPlan, FaultPlanError> {
        let err = |why: &str| FaultPlanError {
            plan: text.to_string(),
            why: why.to_string(),
        };
        let parts: Vec<&str> = text.trim().split(':').collect();
        if !(3..=4).contains(&parts.len()) {
            return Err(err("wrong number of fields"));
        }
        let op = match parts[0] {
            "write" => FaultOp::Write,
            "sync" => FaultOp::Sync,
            _ => return Err(err("unknown operation")),
        };
        let errno = match parts[1] {
            "eio" => libc::EIO,
            "enospc" => libc::ENOSPC,
            _ => return Err(err("unknown error")),
        };
        let skip = parts[2].parse().map_err(|_| err("bad skip count"))?;
        let count = match parts.get(3) {
            None => 1,
            Some(&"inf") => u64::MAX,
            Some(n) => match n.parse() {
                Ok(0) | Err(_) => return Err(err("bad fault count")),
                Ok(n) => n,
            },
        };
        Ok(FaultPlan {
            op,
            errno,
            skip,
            count,
        })
    }
}

/// A [`StoreIo`] that fails operations as its [`FaultPlan`] says.
#[derive(Debug)]
pub struct FaultyIo {
    inner: Box<dyn StoreIo>,
    plan: FaultPlan,
    /// Operations of the plan's kind seen so far.
    seen: u64,
}

impl FaultyIo {
    /// Wraps `inner`; counting starts now.
    pub fn new(inner: Box<dyn StoreIo>, plan: FaultPlan) -> FaultyIo {
        FaultyIo {
            inner,
            plan,
            seen: 0,
        }
    }

    /// Whether this operation of kind `op` fails.
    fn fails(&mut self, op: FaultOp) -> Option<io::Error> {
        if op != self.plan.op {
            return None;
        }
        let n = self.seen;
        self.seen += 1;
        let failing = n >= self.plan.skip && n - self.plan.skip < self.plan.count;
        failing.then(|| io::Error::from_raw_os_error(self.plan.errno))
    }
}

impl StoreIo for FaultyIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.fails(FaultOp::Write) {
            Some(e) => Err(e),
            None => self.inner.write_at(buf, off),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self.fails(FaultOp::Sync) {
            Some(e) => Err(e),
            None => self.inner.sync(),
        }
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn reader(&self) -> Arc<dyn ReadAt> {
        self.inner.reader()
    }
}

/// What the store holds for the instant its I/O is being wrapped.
#[derive(Debug)]
struct Detached;

impl StoreIo for Detached {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("store I/O detached"))
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("store I/O detached"))
    }
    fn sync(&mut self) -> io::Result<()> {
        Err(io::Error::other("store I/O detached"))
    }
    fn size(&self) -> u64 {
        0
    }
    fn reader(&self) -> Arc<dyn ReadAt> {
        Arc::new(Detached)
    }
}

impl ReadAt for Detached {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("store I/O detached"))
    }
}

impl crate::Store {
    /// From now on, fail this store's writes or syncs as `plan` says
    /// (fault-injection tests of the VMM; reads are never failed).
    pub fn inject_faults(&mut self, plan: FaultPlan) {
        let inner = std::mem::replace(&mut self.io, Box::new(Detached));
        self.io = Box::new(FaultyIo::new(inner, plan));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CrashDevice;

    #[test]
    fn plans_parse_and_bad_ones_say_why() {
        let p: FaultPlan = "sync:eio:3:2".parse().unwrap();
        assert_eq!(
            p,
            FaultPlan {
                op: FaultOp::Sync,
                errno: libc::EIO,
                skip: 3,
                count: 2
            }
        );
        let p: FaultPlan = "write:enospc:0:inf".parse().unwrap();
        assert_eq!(
            (p.op, p.errno, p.count),
            (FaultOp::Write, libc::ENOSPC, u64::MAX)
        );
        assert_eq!("write:eio:7".parse::<FaultPlan>().unwrap().count, 1);
        for bad in [
            "",
            "sync",
            "read:eio:1",
            "sync:eperm:1",
            "sync:eio:x",
            "sync:eio:1:0",
            "a:b:c:d:e",
        ] {
            let e = bad.parse::<FaultPlan>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("want"), "{e}");
        }
    }

    #[test]
    fn the_planned_operations_fail_and_no_others() {
        let dev = CrashDevice::new(1 << 16);
        let plan = "write:enospc:2:2".parse().unwrap();
        let mut io = FaultyIo::new(dev.io(), plan);
        let results: Vec<bool> = (0..6u64)
            .map(|i| io.write_at(&[i as u8 + 1; 512], i * 512).is_ok())
            .collect();
        assert_eq!(results, [true, true, false, false, true, true]);
        io.sync().unwrap();
        let img = dev.image();
        // The failed writes wrote nothing.
        assert_eq!(img[2 * 512], 0);
        assert_eq!(img[3 * 512], 0);
        assert_eq!(img[4 * 512], 5);
        let err = FaultyIo::new(dev.io(), "sync:eio:0".parse().unwrap())
            .sync()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
}
