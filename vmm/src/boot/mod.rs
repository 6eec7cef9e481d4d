//! What `--kernel` names, and how to start it: a Linux bzImage (64-bit boot
//! protocol) or evm's own probe guest (an ELF that runs in guest user mode).

pub mod linux;
pub mod probe;

use std::io::Read;
use std::path::{Path, PathBuf};

/// The kinds of image evm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A Linux bzImage.
    Linux,
    /// evm's probe guest.
    Probe,
}

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read.
    #[error("{0}: cannot read")]
    Io(PathBuf, #[source] std::io::Error),
    /// Not something evm can boot.
    #[error("{0}: not a kernel evm can boot (neither a Linux bzImage nor an evm probe image)")]
    NotAKernel(PathBuf),
    /// A bzImage that failed to load.
    #[error("{path}: cannot load kernel: {reason}")]
    Kernel {
        /// The kernel.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The initramfs does not fit.
    #[error("{path}: initramfs of {size} bytes does not fit in guest memory")]
    InitrdTooLarge {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Bad command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The probe loader failed.
    #[error("{path}: {source}")]
    Probe {
        /// The probe image.
        path: PathBuf,
        /// Why.
        #[source]
        source: probe::ProbeError,
    },
    /// Guest memory layout problem.
    #[error("guest memory layout: {0}")]
    Layout(&'static str),
}

/// Look at the first bytes of `path` and say what it is.
pub fn detect(path: &Path) -> Result<ImageKind, BootError> {
    let mut f = std::fs::File::open(path).map_err(|e| BootError::Io(path.to_path_buf(), e))?;
    let mut head = vec![0u8; 8192];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BootError::Io(path.to_path_buf(), e)),
        }
    }
    head.truncate(n);
    if probe::is_probe_image(&head) {
        return Ok(ImageKind::Probe);
    }
    // bzImage: "HdrS" at 0x202 and the boot flag 0xaa55 at 0x1fe.
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Ok(ImageKind::Linux);
    }
    Err(BootError::NotAKernel(path.to_path_buf()))
}
