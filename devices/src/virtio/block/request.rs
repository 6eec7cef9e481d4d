//! One virtio-blk request: parse a descriptor chain as a hostile driver may
//! have built it, serve it, and write the status byte.
//!
//! A request is a device-readable stream (16-byte header, then data for
//! writes) followed by a device-writable stream (data for reads and GET_ID,
//! then the 1-byte status). Framing across descriptors is free (virtio 1.x
//! devices must not assume a layout), so both streams are handled as lists
//! of guest segments.

use std::fmt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use super::disk::{Disk, SECTOR_SIZE};
use super::{MAX_DESCRIPTORS, MAX_REQUEST_BYTES};
use crate::GuestMem;
use crate::virtio::GuestWarnings;

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const HEADER_LEN: u64 = 16;
/// Descriptors walked in one chain before it is dropped unanswered.
const MAX_WALK: usize = 1024;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// The buffers of a chain, split by direction.
#[derive(Debug, Default)]
struct Buffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    /// The last byte of the writable stream, where the status goes.
    status: Option<GuestAddress>,
    /// Why the chain cannot be served, if it cannot.
    malformed: Option<&'static str>,
}

impl Buffers {
    fn collect(chain: impl Iterator<Item = Descriptor>) -> Self {
        let mut b = Self::default();
        let mut count = 0usize;
        let mut seen_writable = false;
        for desc in chain {
            count += 1;
            if count > MAX_WALK {
                // An indirect table may hold 65535 descriptors: do not
                // spend the event loop on it. Drop the request.
                b.status = None;
                b.malformed = Some("far too many descriptors");
                break;
            }
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if seg.addr.checked_add(seg.len - 1).is_none() {
                b.malformed
                    .get_or_insert("a buffer wraps around the address space");
            }
            if desc.is_write_only() {
                seen_writable = true;
                b.status = seg.addr.checked_add(seg.len - 1);
            } else if seen_writable {
                b.malformed
                    .get_or_insert("a device-readable buffer follows a device-writable one");
            }
            if count > MAX_DESCRIPTORS {
                // Keep walking (the chain is bounded by the queue or the
                // indirect table) only to find the real status byte.
                b.malformed.get_or_insert("too many descriptors");
                continue;
            }
            // At most MAX_DESCRIPTORS lengths below 2^32 each: no overflow.
            if desc.is_write_only() {
                b.writable.push(seg);
                b.writable_len += seg.len;
            } else {
                b.readable.push(seg);
                b.readable_len += seg.len;
            }
        }
        b
    }
}

/// Why a request is answered with an error status.
enum Failure {
    /// Answer VIRTIO_BLK_S_IOERR; the text says why.
    IoErr(String),
    /// Answer VIRTIO_BLK_S_UNSUPP for this request type.
    Unsupported(u32),
}

fn ioerr(what: fmt::Arguments<'_>) -> Failure {
    Failure::IoErr(what.to_string())
}

/// Serve one chain and return the used length: the bytes written into the
/// chain's device-writable buffers (data plus the status byte), or 0 if the
/// chain has no writable byte for the status (the request is dropped).
pub fn serve(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMem,
    disk: &Disk,
    id: &[u8; ID_LEN],
    warnings: &mut GuestWarnings,
) -> u32 {
    let b = Buffers::collect(chain);
    let Some(status_addr) = b.status else {
        warnings.warn(
            "block",
            format_args!("request without a device-writable status byte, dropped"),
        );
        return 0;
    };
    let result = match b.malformed {
        Some(why) => Err(Failure::IoErr(format!("malformed request: {why}"))),
        None => execute(&b, mem, disk, id),
    };
    let (status, written) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err(Failure::IoErr(why)) => {
            warnings.warn("block", format_args!("{why}"));
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Failure::Unsupported(t)) => {
            log::debug!("virtio block: unsupported request type {t}");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    };
    if let Err(e) = mem.write_slice(&[status as u8], status_addr) {
        warnings.warn(
            "block",
            format_args!("cannot write the status byte at {:#x}: {e}", status_addr.0),
        );
        return 0;
    }
    // `written` is at most MAX_REQUEST_BYTES.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Check the request, do it, and return the number of data bytes written
/// into guest memory.
fn execute(b: &Buffers, mem: &GuestMem, disk: &Disk, id: &[u8; ID_LEN]) -> Result<u64, Failure> {
    if b.readable_len < HEADER_LEN {
        return Err(ioerr(format_args!(
            "request header is {} bytes, needs {HEADER_LEN}",
            b.readable_len
        )));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    walk(&b.readable, 0, HEADER_LEN, |addr, len, at| {
        let at = at as usize;
        mem.read_slice(&mut header[at..at + len], addr)
    })?;
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes(s);
    // Data the driver supplies / room for data it expects (minus status).
    let data_out = b.readable_len - HEADER_LEN;
    let data_in = b.writable_len - 1;
    match req_type {
        VIRTIO_BLK_T_IN => {
            if data_out != 0 {
                return Err(ioerr(format_args!(
                    "read request carries {data_out} device-readable data bytes"
                )));
            }
            let offset = byte_range(disk, sector, data_in)?;
            walk(&b.writable, 0, data_in, |addr, len, at| {
                disk.read_to_guest(mem, addr, len, offset + at)
            })?;
            Ok(data_in)
        }
        VIRTIO_BLK_T_OUT => {
            if data_in != 0 {
                return Err(ioerr(format_args!(
                    "write request carries {data_in} device-writable data bytes"
                )));
            }
            if disk.read_only() {
                return Err(ioerr(format_args!(
                    "write to sector {sector} of read-only disk {}",
                    disk.path().display()
                )));
            }
            let offset = byte_range(disk, sector, data_out)?;
            walk(&b.readable, HEADER_LEN, data_out, |addr, len, at| {
                disk.write_from_guest(mem, addr, len, offset + at)
            })?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if data_in != 0 || data_out != 0 {
                return Err(ioerr(format_args!("flush request carries data")));
            }
            if !disk.read_only() {
                disk.flush().map_err(|e| {
                    ioerr(format_args!(
                        "fdatasync of {} failed: {e}",
                        disk.path().display()
                    ))
                })?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if data_out != 0 {
                return Err(ioerr(format_args!("GET_ID request carries readable data")));
            }
            let n = data_in.min(ID_LEN as u64);
            walk(&b.writable, 0, n, |addr, len, at| {
                let at = at as usize;
                mem.write_slice(&id[at..at + len], addr)
            })?;
            Ok(n)
        }
        t => Err(Failure::Unsupported(t)),
    }
}

/// Check a transfer of `len` bytes at `sector` and return its byte offset.
fn byte_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, Failure> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ioerr(format_args!(
            "transfer of {len} bytes is not a multiple of {SECTOR_SIZE}"
        )));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(ioerr(format_args!(
            "transfer of {len} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit"
        )));
    }
    let capacity = disk.capacity_sectors();
    match sector.checked_add(len / SECTOR_SIZE) {
        // sector <= capacity < 2^64 / 512: the multiplication cannot overflow.
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(ioerr(format_args!(
            "transfer of {len} bytes at sector {sector} is beyond the disk's {capacity} sectors"
        ))),
    }
}

/// Call `f(addr, len, at)` for each piece of bytes `[skip, skip + len)` of
/// the stream formed by `segs`, `at` being the piece's offset from `skip`.
fn walk<E: fmt::Display>(
    segs: &[Segment],
    skip: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), E>,
) -> Result<(), Failure> {
    let end = skip
        .checked_add(len)
        .ok_or_else(|| ioerr(format_args!("buffer length overflow")))?;
    let mut pos = 0u64;
    for seg in segs {
        if pos >= end {
            break;
        }
        let seg_end = pos + seg.len;
        let from = pos.max(skip);
        let to = seg_end.min(end);
        if from < to {
            // Cannot overflow: `collect` rejects segments that wrap around.
            let addr = GuestAddress(seg.addr.0 + (from - pos));
            let piece =
                usize::try_from(to - from).map_err(|_| ioerr(format_args!("buffer too large")))?;
            f(addr, piece, from - skip)
                .map_err(|e| ioerr(format_args!("guest buffer {:#x}+{piece:#x}: {e}", addr.0)))?;
        }
        pos = seg_end;
    }
    if pos < end {
        return Err(ioerr(format_args!(
            "request buffers are shorter than needed"
        )));
    }
    Ok(())
}
