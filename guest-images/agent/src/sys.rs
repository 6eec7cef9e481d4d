//! Small wrappers around the system: boot id, uptime, CPUs, memory, and an
//! anonymous page-aligned mapping.

use std::io;
use std::ptr::NonNull;

/// The all-zero UUID, used when the boot id cannot be read.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// The kernel's random per-boot id (`/proc/sys/kernel/random/boot_id`).
/// A VM resumed from a checkpoint keeps it, a rebooted one does not.
pub fn boot_id() -> io::Result<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let id = text.trim().to_string();
    if parse_uuid(&id).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("boot_id '{id}' is not a UUID"),
        ));
    }
    Ok(id)
}

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` into its 16 bytes.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || text.len() != 36 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Formats 16 bytes as a lower-case UUID.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Seconds since boot (CLOCK_BOOTTIME, as /proc/uptime) with 2 decimals.
pub fn uptime() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return "0.00".to_string();
    }
    format!("{}.{:02}", ts.tv_sec, ts.tv_nsec / 10_000_000)
}

/// Online CPUs, as `nproc` counts them.
pub fn nproc() -> i64 {
    // SAFETY: sysconf only reads a system value; no pointers are involved.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1)
}

/// `MemAvailable` from /proc/meminfo, in bytes, if it can be read.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// This process's id.
pub fn pid() -> u32 {
    std::process::id()
}

/// An anonymous, private, page-aligned, pre-faulted mapping of 64-bit words.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u64>,
    words: usize,
}

// SAFETY: the mapping is owned exclusively by this value (nothing else holds
// the pointer), so moving it to another thread is like moving a Vec.
unsafe impl Send for Region {}

impl Region {
    /// Maps `bytes` (a positive multiple of 4096) of zeroed memory, faulting
    /// every page in (MAP_POPULATE).
    pub fn new(bytes: usize) -> io::Result<Self> {
        if bytes == 0 || !bytes.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mapping size {bytes} is not a positive multiple of 4096"),
            ));
        }
        // SAFETY: an anonymous private mapping at an address the kernel
        // chooses touches no existing memory; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u64>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Region {
            ptr,
            words: bytes / 8,
        })
    }

    pub fn words(&self) -> &[u64] {
        // SAFETY: `ptr` points to `words` initialised (zero-filled by the
        // kernel) u64s that live until `drop`; `&self` forbids writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `words`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.words) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.words * 8) }
    }

    /// The mapping's address (printed so tests can inspect the memory).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice borrowed
        // from it can outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let s = "6f1c2a8e-0b4d-4e3a-9a51-0c2b9d7e8f10";
        let b = parse_uuid(s).expect("valid uuid");
        assert_eq!(format_uuid(&b), s);
        assert_eq!(parse_uuid(NIL_UUID), Some([0; 16]));
        for bad in [
            "",
            "6f1c2a8e",
            "6f1c2a8e-0b4d-4e3a-9a51-0c2b9d7e8f1g",
            "6f1c2a8e0b4d4e3a9a510c2b9d7e8f10",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_values_are_sane() {
        assert!(boot_id().is_ok());
        assert!(nproc() >= 1);
        assert!(uptime().contains('.'));
        assert!(mem_available().is_some_and(|m| m > 0));
    }

    #[test]
    fn region_is_aligned_and_zeroed() {
        let mut r = Region::new(8192).expect("mmap");
        assert_eq!(r.addr() % 4096, 0);
        assert!(r.words().iter().all(|&w| w == 0));
        r.bytes_mut()[0] = 1;
        assert_eq!(r.words()[0], 1);
        assert!(Region::new(100).is_err());
        assert!(Region::new(0).is_err());
    }
}
