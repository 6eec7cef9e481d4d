//! `evm inspect` and `evm verify` (issue 5). Inspect: what a store holds as of one committed epoch —
//! the VM configuration, each vCPU's mode, registers, pending events, the
//! code at its RIP and the words at its RSP (`pagewalk`), the devices in
//! brief, memory and disk figures — or, with `--page GPA`, a hex dump of
//! one guest page as of that epoch. Read-only and unlocked, like the other
//! offline commands (`tools`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use checkpoint::Store;

use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};
use crate::persist::StoredConfig;
use crate::state::VcpuState;
use crate::tools::{ToolError, pick_epoch};

/// Errors of `evm inspect` beyond the shared ones.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Store, epoch or output.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The stored configuration or machine state cannot be decoded.
    #[error("--store {}: {what}", path.display())]
    Decode {
        /// The store.
        path: std::path::PathBuf,
        /// What could not be read.
        what: String,
    },
    /// `evm verify` found damage.
    #[error(transparent)]
    Verify(VerifyFailed),
    /// `--page` outside guest RAM or not page-aligned.
    #[error("--page {gpa:#x}: {why} (guest RAM: {ram})")]
    BadPage {
        /// The address given.
        gpa: u64,
        /// Why it is refused.
        why: &'static str,
        /// The RAM ranges, for the message.
        ram: String,
    },
}

impl From<checkpoint::StoreError> for InspectError {
    fn from(e: checkpoint::StoreError) -> Self {
        InspectError::Tool(ToolError::Store(e))
    }
}

const PAGE: u64 = 4096;

/// The flat memory-image offset of guest-physical `gpa`, if it is RAM.
fn flat_offset(gpa: u64, mem_bytes: u64) -> Option<u64> {
    let below = mem_bytes.min(MMIO_GAP_START);
    if gpa < below {
        Some(gpa)
    } else if gpa >= MMIO_GAP_END && gpa - MMIO_GAP_END < mem_bytes - below {
        Some(gpa - MMIO_GAP_END + MMIO_GAP_START)
    } else {
        None
    }
}

fn ram_ranges_text(mem_bytes: u64) -> String {
    crate::memory::ram_ranges(mem_bytes)
        .iter()
        .map(|(start, len)| format!("{start:#x}-{:#x}", start + len - 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CPU mode of a vCPU from CR0 and EFER.
fn mode(v: &VcpuState) -> &'static str {
    const CR0_PE: u64 = 1;
    const EFER_LMA: u64 = 1 << 10;
    let s = &v.sregs;
    match (s.cr0 & CR0_PE != 0, s.efer & EFER_LMA != 0, s.cs.l != 0) {
        (false, _, _) => "real mode",
        (true, true, true) => "64-bit long mode",
        (true, true, false) => "compatibility mode",
        (true, false, _) => "protected mode",
    }
}

fn mp_state(v: &VcpuState) -> String {
    match v.mp_state.mp_state {
        0 => "runnable".into(),
        1 => "uninitialized (waiting for INIT)".into(),
        2 => "INIT received".into(),
        3 => "halted".into(),
        4 => "SIPI received".into(),
        n => format!("mp_state {n}"),
    }
}

/// The vCPU's pending or injected exception, interrupt and NMI, and its
/// interrupt shadow (what `KVM_GET_VCPU_EVENTS` reported), or "none".
fn events(v: &VcpuState) -> String {
    let e = &v.vcpu_events;
    let mut parts = Vec::new();
    let ex = &e.exception;
    if ex.injected != 0 || ex.pending != 0 {
        let how = if ex.injected != 0 {
            "injected"
        } else {
            "pending"
        };
        let code = if ex.has_error_code != 0 {
            format!(" (error code {:#x})", ex.error_code)
        } else {
            String::new()
        };
        parts.push(format!("exception {} {how}{code}", ex.nr));
    }
    if e.exception_has_payload != 0 {
        parts.push(format!("exception payload {:#x}", e.exception_payload));
    }
    if e.interrupt.injected != 0 {
        let soft = if e.interrupt.soft != 0 { " (soft)" } else { "" };
        parts.push(format!("interrupt {:#x} injected{soft}", e.interrupt.nr));
    }
    if e.interrupt.shadow != 0 {
        parts.push(format!("interrupt shadow {:#x}", e.interrupt.shadow));
    }
    if e.nmi.injected != 0 {
        parts.push("NMI injected".into());
    }
    if e.nmi.pending != 0 {
        parts.push("NMI pending".into());
    }
    if e.nmi.masked != 0 {
        parts.push("NMIs masked".into());
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Little-endian 8-byte words.
fn hex_words(b: &[u8]) -> String {
    b.chunks_exact(8)
        .map(|w| {
            format!(
                "{:#018x}",
                u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn virtio_kind(t: u32) -> String {
    match t {
        2 => "virtio-blk".into(),
        4 => "virtio-rng".into(),
        n => format!("virtio device {n}"),
    }
}

fn write_out(text: &str) -> Result<(), InspectError> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|source| {
            InspectError::Tool(ToolError::Output {
                flag: "stdout",
                path: "-".into(),
                source,
            })
        })
}

/// `evm inspect`: a report of `epoch` (default: the newest) on stdout, or
/// the hex dump of the page at `page` (a guest-physical address).
pub fn inspect(path: &Path, epoch: Option<u64>, page: Option<u64>) -> Result<(), InspectError> {
    let store = Store::open_read_only(path)?;
    let epoch = pick_epoch(&store, path, epoch)?;
    let decode = |what: String| InspectError::Decode {
        path: path.to_path_buf(),
        what,
    };
    if let Some(gpa) = page {
        return dump_page(&store, epoch, gpa);
    }
    let config = StoredConfig::decode(store.config())
        .map_err(|e| decode(format!("the VM configuration: {e}")))?;
    let state = crate::state::decode(&store.read_state(epoch)?)
        .map_err(|e| decode(format!("the machine state of epoch {epoch}: {e}")))?;
    let mut out = String::new();
    let _ = writeln!(out, "store {} — epoch {epoch}", path.display());
    if let Some(e) = store.epochs().iter().find(|e| e.epoch == epoch) {
        let _ = writeln!(
            out,
            "  freeze {} µs, {} dirty pages, {} disk blocks, {:.2} MiB in the log, commit {}",
            e.freeze_us,
            e.dirty_pages,
            e.disk_blocks,
            e.bytes as f64 / (1u64 << 20) as f64,
            match e.commit_latency_us {
                0 => "-".to_string(),
                us => format!("{us} µs"),
            }
        );
    } else {
        let _ = writeln!(out, "  (the home epoch: folded from the log)");
    }
    let _ = writeln!(out, "config");
    let _ = writeln!(
        out,
        "  kernel {}{}",
        config.kernel.display(),
        if config.probe {
            " (evm probe guest)"
        } else {
            ""
        }
    );
    if let Some(i) = &config.initrd {
        let _ = writeln!(out, "  initrd {}", i.display());
    }
    let _ = writeln!(
        out,
        "  cmdline {}",
        config.cmdline.as_deref().unwrap_or("(the default)")
    );
    let _ = writeln!(
        out,
        "  memory {} MiB, {} vCPUs",
        config.mem_bytes >> 20,
        config.vcpus
    );
    let _ = writeln!(out, "vcpus");
    for (i, v) in state.vcpus.iter().enumerate() {
        let (r, s) = (&v.regs, &v.sregs);
        let _ = writeln!(out, "  vcpu{i}: {}, {}", mode(v), mp_state(v));
        let _ = writeln!(
            out,
            "    RIP {:#018x}  RSP {:#018x}  RFLAGS {:#x}",
            r.rip, r.rsp, r.rflags
        );
        let _ = writeln!(
            out,
            "    CR0 {:#x}  CR2 {:#x}  CR3 {:#x}  CR4 {:#x}  EFER {:#x}  CS {:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        );
        let _ = writeln!(
            out,
            "    RAX {:#x}  RBX {:#x}  RCX {:#x}  RDX {:#x}  RSI {:#x}  RDI {:#x}  RBP {:#x}",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
        let _ = writeln!(
            out,
            "    R8 {:#x}  R9 {:#x}  R10 {:#x}  R11 {:#x}  R12 {:#x}  R13 {:#x}  R14 {:#x}  R15 {:#x}",
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        );
        let _ = writeln!(out, "    events: {}", events(v));
        if mode(v) == "64-bit long mode" {
            let read_page = |gpa: u64| {
                let off = flat_offset(gpa, config.mem_bytes)?;
                let mut page = [0u8; PAGE as usize];
                store.read_page(epoch, off, &mut page).ok()?;
                Some(page)
            };
            let at = |va: u64, len: usize| {
                crate::pagewalk::read_virtual(read_page, s.cr3, s.cr4, va, len)
            };
            let _ = writeln!(
                out,
                "    code at RIP: {}",
                at(r.rip, 16).map_or("(not mapped)".into(), |b| hex_bytes(&b))
            );
            let _ = writeln!(
                out,
                "    stack at RSP: {}",
                at(r.rsp, 64).map_or("(not mapped)".into(), |b| hex_words(&b))
            );
            if flat_offset(s.cr3 & !0xfff, config.mem_bytes).is_none() {
                // Seen in the nested test host: a guest saved with the
                // registers of the host kernel's VMRUN (issue 4's notes).
                let _ = writeln!(
                    out,
                    "    CR3 is outside guest RAM: this vCPU cannot run these page tables"
                );
            }
        }
    }
    let _ = writeln!(out, "devices");
    match crate::freeze::decode_devices(&state.devices) {
        Ok(d) => {
            let _ = writeln!(
                out,
                "  COM1: IER {:#04x}, LCR {:#04x}, MCR {:#04x}",
                d.serial.interrupt_enable, d.serial.line_control, d.serial.modem_control
            );
            for (i, t) in d.virtio.iter().enumerate() {
                let ready = t.queues.iter().filter(|q| q.ready).count();
                let _ = writeln!(
                    out,
                    "  virtio-mmio {i}: {}, status {:#x}, features {:#x}, {ready}/{} queues ready",
                    virtio_kind(t.device_type),
                    t.status,
                    t.driver_features,
                    t.queues.len()
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (device state unreadable: {e})");
        }
    }
    let mut image = vec![0u8; store.mem_bytes() as usize];
    store.read_memory(epoch, &mut image)?;
    let nonzero = image
        .chunks(PAGE as usize)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count();
    let _ = writeln!(
        out,
        "memory {} MiB ({}): {nonzero} pages not zero",
        store.mem_bytes() >> 20,
        ram_ranges_text(store.mem_bytes())
    );
    if store.disk_bytes() > 0 {
        let source = config
            .disk_import
            .as_ref()
            .map(|p| format!(", imported from {}", p.display()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "disk {} MiB in the store{source}",
            store.disk_bytes() >> 20
        );
    } else if let Some(d) = &config.disk {
        let _ = writeln!(
            out,
            "disk {} (used in place, not in the store)",
            d.display()
        );
    }
    write_out(&out)
}

/// What `evm verify` found wrong first.
#[derive(Debug, thiserror::Error)]
#[error("--store {}: {problem}", path.display())]
pub struct VerifyFailed {
    /// The store.
    pub path: std::path::PathBuf,
    /// The first problem, naming the part of the store.
    pub problem: String,
}

/// `evm verify`: checks both superblocks, the configuration, the home's
/// machine state, and every record and CRC of every epoch in the log (the
/// read-only open walks them all: record CRCs, page and state payload
/// CRCs, each epoch's commit CRC), then decodes each epoch's machine state.
/// Prints what it checked on stdout; the first problem is the error. An
/// epoch cut off before its commit record (the one being written when the
/// VM stopped, or still being written by a running VM) is reported but is
/// not damage.
pub fn verify(path: &Path) -> Result<(), InspectError> {
    let fail = |problem: String| {
        InspectError::Verify(VerifyFailed {
            path: path.to_path_buf(),
            problem,
        })
    };
    let store = Store::open_read_only(path)?;
    let mut out = String::new();
    let mut first: Option<String> = None;
    match store.superblock_warning() {
        None => {
            let _ = writeln!(
                out,
                "superblocks: both valid (generation {})",
                store.generation()
            );
        }
        Some(w) => {
            let _ = writeln!(out, "superblocks: {w}");
            first.get_or_insert(w.to_string());
        }
    }
    match StoredConfig::decode(store.config()) {
        Ok(c) => {
            let _ = writeln!(
                out,
                "config: valid ({} MiB, {} vCPUs)",
                c.mem_bytes >> 20,
                c.vcpus
            );
        }
        Err(e) => {
            let _ = writeln!(out, "config: {e}");
            first.get_or_insert(format!("the VM configuration: {e}"));
        }
    }
    let home = store.home_epoch();
    let home_resumable =
        home > 0 && store.resumable() && !store.epochs().iter().any(|e| e.epoch == home);
    let mut check_state = |epoch: u64, what: &str, out: &mut String| match store
        .read_state(epoch)
        .map_err(|e| e.to_string())
        .and_then(|b| crate::state::decode(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => {
            let _ = writeln!(out, "{what}: machine state valid ({} vCPUs)", s.vcpus.len());
        }
        Err(e) => {
            let _ = writeln!(out, "{what}: {e}");
            first.get_or_insert(format!("{what}: machine state: {e}"));
        }
    };
    if home_resumable {
        check_state(home, &format!("home (epoch {home})"), &mut out);
    } else {
        let _ = writeln!(
            out,
            "home: holds epoch {home} (its machine state is in the log or discarded)"
        );
    }
    let epochs = store.epochs();
    match (epochs.first(), epochs.last()) {
        (Some(a), Some(b)) => {
            let _ = writeln!(
                out,
                "log: epochs {}..{} ({}), every record, payload and commit CRC valid",
                a.epoch,
                b.epoch,
                epochs.len()
            );
        }
        _ => {
            let _ = writeln!(out, "log: no committed epochs");
        }
    }
    for e in epochs {
        check_state(e.epoch, &format!("epoch {}", e.epoch), &mut out);
    }
    if let Some(n) = store.recovery_note() {
        let cut_off = n.reason.starts_with("no commit record");
        let _ = writeln!(
            out,
            "log: epoch {} after them {}: {}",
            n.epoch,
            if cut_off {
                "is incomplete (cut off or still being written; not damage)"
            } else {
                "is damaged"
            },
            n.reason
        );
        if !cut_off {
            first.get_or_insert(format!("log: epoch {}: {}", n.epoch, n.reason));
        }
    }
    write_out(&out)?;
    match first {
        Some(problem) => Err(fail(problem)),
        None => Ok(()),
    }
}

/// `--page`: 4096 bytes at `gpa` as of `epoch`, 16 bytes a line.
fn dump_page(store: &Store, epoch: u64, gpa: u64) -> Result<(), InspectError> {
    let mem = store.mem_bytes();
    let bad = |why| InspectError::BadPage {
        gpa,
        why,
        ram: ram_ranges_text(mem),
    };
    if !gpa.is_multiple_of(PAGE) {
        return Err(bad("not a multiple of 4096"));
    }
    let off = flat_offset(gpa, mem).ok_or_else(|| bad("outside guest RAM"))?;
    let mut page = [0u8; PAGE as usize];
    store.read_page(epoch, off, &mut page)?;
    let mut out = String::new();
    for (i, row) in page.chunks(16).enumerate() {
        let _ = write!(out, "{:016x}: ", gpa + (i * 16) as u64);
        for (j, b) in row.iter().enumerate() {
            let _ = write!(out, "{b:02x}{}", if j % 2 == 1 { " " } else { "" });
        }
        let text: String = row
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, " {text}");
    }
    write_out(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_physical_to_flat_offsets() {
        let small = 512 << 20;
        assert_eq!(flat_offset(0, small), Some(0));
        assert_eq!(flat_offset(small - PAGE, small), Some(small - PAGE));
        assert_eq!(flat_offset(small, small), None);
        let big = 5 << 30; // 3 GiB below the gap, 2 GiB above 4 GiB
        assert_eq!(
            flat_offset(MMIO_GAP_START - PAGE, big),
            Some(MMIO_GAP_START - PAGE)
        );
        assert_eq!(flat_offset(MMIO_GAP_START, big), None);
        assert_eq!(flat_offset(MMIO_GAP_END, big), Some(MMIO_GAP_START));
        assert_eq!(
            flat_offset(MMIO_GAP_END + (2 << 30) - PAGE, big),
            Some(big - PAGE)
        );
        assert_eq!(flat_offset(MMIO_GAP_END + (2 << 30), big), None);
    }
}
