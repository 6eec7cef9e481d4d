//! Loader for evm's probe guest (`guest-images/probe/`): a tiny static
//! x86-64 ELF whose work runs in guest *user* mode (CPL3), so it runs at
//! native speed on a `/dev/kvm` (such as PVM) that crawls through guest
//! supervisor code. There is no guest supervisor code at all: evm starts
//! every vCPU directly in 64-bit user mode through `KVM_SET_SREGS` and
//! `KVM_SET_REGS`.
//!
//! # Recognising the image
//!
//! A probe image is an ELF64 x86-64 `ET_EXEC` file with a `PT_NOTE` in its
//! first 4 KiB holding a note named `EVMPROBE`, type 1, whose 4-byte
//! descriptor is the entry ABI version ([`PROBE_ABI_VERSION`]).
//! [`is_probe_image`] looks for that note; [`load`] insists on the version.
//!
//! # Entry contract (ABI version 1)
//!
//! Every vCPU starts at the ELF entry point in 64-bit mode at CPL3 with:
//!
//! | register | value |
//! | --- | --- |
//! | RDI | vCPU index (0-based) |
//! | RSI | vCPU count |
//! | RDX | guest address of the NUL-terminated command line |
//! | RCX | TSC frequency in kHz (`KVM_GET_TSC_KHZ`), 0 if unknown |
//! | R8 | end of the RAM the probe may use (RAM is contiguous from 0) |
//! | R9 | first free byte (page aligned): `[R9, R8)` is the probe's to use |
//! | RSP | top of this vCPU's own 16 KiB stack (16-byte aligned) |
//! | RFLAGS | IOPL=3, IF=0 |
//!
//! These are the System V argument registers, so a C `main(index, count,
//! cmdline, tsc_khz, ram_end, free)` receives them as arguments. Paging
//! identity-maps all guest memory with 2 MiB user-writable pages; CR0 has
//! PE, MP, ET, NE, WP, PG (EM clear); CR4 has PAE, OSFXSR, OSXMMEXCPT; EFER
//! has LME and LMA. There is no IDT: any exception triple-faults, which KVM
//! reports as a shutdown exit. The guest talks to evm only through evm's
//! ordinary devices (COM1 at 0x3f8, the ACPI power port 0x600) and must
//! never be sent an interrupt (evm's serial raises none while IER is 0):
//! PVM runs guest user mode with interrupts enabled whatever RFLAGS.IF says,
//! and the probe has nowhere to take one.
//!
//! Port I/O at CPL3 is allowed twice over: by IOPL 3 (enough under VT-x or
//! AMD-V) and by the TSS I/O permission bitmap, which allows every port.
//! The bitmap is what works under PVM: PVM runs guest user mode in host
//! ring 3 with the real IOPL forced to 0, so `out` raises #GP there, and
//! KVM's instruction emulator then checks the guest TSS bitmap before it
//! turns the access into a `KVM_EXIT_IO`.
//!
//! The selectors follow Linux's x86-64 GDT layout (user data 0x2b, user
//! code 0x33), which PVM expects: it loads the guest's data selectors into
//! the host's own segment registers.
//!
//! # Guest-physical layout
//!
//! | address | contents |
//! | --- | --- |
//! | `0x1000` | GDT: user data (selector 0x2b), user code64 (0x33), busy TSS (0x40) |
//! | `0x2000` | command line, at most 4095 bytes plus NUL |
//! | `0x3000` | the TSS with an I/O bitmap allowing all ports (8,297 bytes) |
//! | `0x10000` | PML4, PDPT, then one page directory per GiB |
//! | `0x400000`.. | the image's `PT_LOAD` segments (must lie at or above 4 MiB) |
//! | after the image | one 16 KiB stack per vCPU |
//! | then .. RAM end | free for the probe (its workload buffers) |
//!
//! Only the RAM region that starts at guest address 0 is given to the
//! probe; page tables still map every guest address below the end of the
//! highest region.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use devices::GuestMem;
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The entry ABI version this loader implements (the note's descriptor).
pub const PROBE_ABI_VERSION: u32 = 1;
/// Largest probe image file accepted.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Longest command line (without its NUL).
pub const MAX_CMDLINE: usize = 4095;
/// Lowest guest address an image segment may occupy.
pub const IMAGE_MIN: u64 = 0x40_0000;
/// Stack bytes per vCPU.
pub const STACK_SIZE: u64 = 16 << 10;

const GDT_ADDR: u64 = 0x1000;
const GDT_ENTRIES: u16 = 10;
const CMDLINE_ADDR: u64 = 0x2000;
const TSS_ADDR: u64 = 0x3000;
/// The 64-bit TSS proper; the I/O permission bitmap follows it.
const TSS_HEADER: u64 = 104;
/// One bit per port (0 = allowed) plus the all-ones byte the CPU requires.
const TSS_SIZE: u64 = TSS_HEADER + 0x1_0000 / 8 + 1;
const PML4_ADDR: u64 = 0x1_0000;
const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PDPT_ADDR + 0x1000;
/// Guest memory the page tables can map: one PDPT, 512 GiB.
const MAX_MAPPED: u64 = 512 << 30;

const SEL_DATA: u16 = 0x28 | 3;
const SEL_CODE: u16 = 0x30 | 3;
const SEL_TSS: u16 = 0x40;

const PTE_P: u64 = 1;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const NOTE_NAME: &[u8] = b"EVMPROBE\0";
const NOTE_TYPE: u32 = 1;

/// What went wrong loading or starting the probe guest.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot read the probe image")]
    Read(#[source] std::io::Error),
    #[error("probe image is {size} bytes; at most {MAX_IMAGE_BYTES} are accepted")]
    TooLarge { size: u64 },
    #[error("not a valid probe ELF: {0}")]
    Elf(String),
    #[error(
        "probe image speaks entry ABI version {found}; this evm implements {PROBE_ABI_VERSION}"
    )]
    AbiVersion { found: u32 },
    #[error("guest memory has no RAM region at address 0")]
    NoLowRam,
    #[error("guest memory ends at {end:#x}; the probe's page tables map at most {MAX_MAPPED:#x}")]
    MemoryTooLarge { end: u64 },
    #[error("the probe needs at least one vCPU")]
    NoVcpus,
    #[error(
        "probe image, stacks and tables need RAM up to {need:#x}, but RAM ends at {ram_end:#x}"
    )]
    NotEnoughMemory { need: u64, ram_end: u64 },
    #[error("command line is {len} bytes; the probe accepts at most {MAX_CMDLINE}")]
    CmdlineTooLong { len: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write the probe's {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("vCPU index {index} is out of range for {vcpus} vCPUs")]
    VcpuIndex { index: u8, vcpus: u8 },
    #[error("{ioctl} failed for probe vCPU {index}")]
    Kvm {
        ioctl: &'static str,
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Where [`load`] put things; what [`setup_vcpu`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeBoot {
    /// ELF entry point (guest virtual = physical).
    pub entry: u64,
    /// Guest address of the PML4 (the value of CR3).
    pub cr3: u64,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_gpa: u64,
    /// First byte of the per-vCPU stacks.
    pub stacks_base: u64,
    /// Number of vCPUs the stacks were laid out for.
    pub vcpus: u8,
    /// End of the RAM given to the probe (R8).
    pub ram_end: u64,
    /// First free byte after image and stacks (R9).
    pub free_start: u64,
}

impl ProbeBoot {
    /// Initial RSP of vCPU `index` (the top of its stack).
    pub fn stack_top(&self, index: u8) -> u64 {
        self.stacks_base + (u64::from(index) + 1) * STACK_SIZE
    }
}

fn elf_err(msg: impl Into<String>) -> ProbeError {
    ProbeError::Elf(msg.into())
}

fn bytes_at<const N: usize>(data: &[u8], off: u64) -> Option<[u8; N]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(N)?;
    data.get(start..end)?.try_into().ok()
}

fn u16_at(data: &[u8], off: u64) -> Option<u16> {
    bytes_at(data, off).map(u16::from_le_bytes)
}

fn u32_at(data: &[u8], off: u64) -> Option<u32> {
    bytes_at(data, off).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], off: u64) -> Option<u64> {
    bytes_at(data, off).map(u64::from_le_bytes)
}

#[derive(Debug, Clone, Copy)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

#[derive(Debug)]
struct ElfHeader {
    entry: u64,
    phdrs: Vec<Phdr>,
}

/// Parses the ELF header and the program headers that lie inside `data`.
fn parse_elf(data: &[u8]) -> Result<ElfHeader, ProbeError> {
    if data.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(elf_err("no ELF magic"));
    }
    let ident = data
        .get(4..7)
        .ok_or_else(|| elf_err("truncated ELF header"))?;
    if ident[0] != 2 {
        return Err(elf_err("not a 64-bit ELF (EI_CLASS is not ELFCLASS64)"));
    }
    if ident[1] != 1 {
        return Err(elf_err("not little-endian (EI_DATA is not ELFDATA2LSB)"));
    }
    let short = || elf_err("truncated ELF header");
    let e_type = u16_at(data, 16).ok_or_else(short)?;
    let machine = u16_at(data, 18).ok_or_else(short)?;
    let entry = u64_at(data, 24).ok_or_else(short)?;
    let phoff = u64_at(data, 32).ok_or_else(short)?;
    let phentsize = u16_at(data, 54).ok_or_else(short)?;
    let phnum = u16_at(data, 56).ok_or_else(short)?;
    if machine != 62 {
        return Err(elf_err(format!("e_machine is {machine}, not x86-64 (62)")));
    }
    if e_type != 2 {
        return Err(elf_err(format!(
            "e_type is {e_type}, not ET_EXEC (2): the probe must be static and non-PIE"
        )));
    }
    if phentsize != 56 {
        return Err(elf_err(format!("e_phentsize is {phentsize}, not 56")));
    }
    if phnum == 0 || phnum > 64 {
        return Err(elf_err(format!(
            "{phnum} program headers (expected 1 to 64)"
        )));
    }
    let mut phdrs = Vec::with_capacity(usize::from(phnum));
    for i in 0..u64::from(phnum) {
        let at = i
            .checked_mul(56)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| elf_err("program header offset overflows"))?;
        let field = |o: u64| -> Result<u64, ProbeError> {
            u64_at(data, at + o)
                .ok_or_else(|| elf_err(format!("program header {i} lies outside the file")))
        };
        let word = |o: u64| -> Result<u32, ProbeError> {
            u32_at(data, at + o)
                .ok_or_else(|| elf_err(format!("program header {i} lies outside the file")))
        };
        phdrs.push(Phdr {
            kind: word(0)?,
            flags: word(4)?,
            offset: field(8)?,
            vaddr: field(16)?,
            paddr: field(24)?,
            filesz: field(32)?,
            memsz: field(40)?,
        });
    }
    Ok(ElfHeader { entry, phdrs })
}

/// The ABI version in the image's `EVMPROBE` note, if it has one inside `data`.
fn probe_note_version(data: &[u8], phdrs: &[Phdr]) -> Option<u32> {
    for ph in phdrs.iter().filter(|p| p.kind == PT_NOTE) {
        let mut at = ph.offset;
        let end = ph.offset.checked_add(ph.filesz)?;
        while at.checked_add(12)? <= end {
            let namesz = u64::from(u32_at(data, at)?);
            let descsz = u64::from(u32_at(data, at + 4)?);
            let kind = u32_at(data, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            let next = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
            if next > end {
                break;
            }
            let name = data.get(usize::try_from(name_at).ok()?..usize::try_from(desc_at).ok()?)?;
            if kind == NOTE_TYPE && descsz == 4 && name.starts_with(NOTE_NAME) {
                return u32_at(data, desc_at);
            }
            at = next;
        }
    }
    None
}

/// Whether `head` (the first bytes of a `--kernel` file; pass at least
/// 4 KiB) is a probe image: an x86-64 ELF executable with an `EVMPROBE`
/// note. A true answer does not promise that [`load`] will accept it.
pub fn is_probe_image(head: &[u8]) -> bool {
    parse_elf(head).is_ok_and(|h| probe_note_version(head, &h.phdrs).is_some())
}

fn write(mem: &GuestMem, what: &'static str, buf: &[u8], gpa: u64) -> Result<(), ProbeError> {
    mem.write_slice(buf, GuestAddress(gpa))
        .map_err(|source| ProbeError::GuestMemory { what, source })
}

/// Checks every loadable segment against the RAM given to the probe and
/// against each other; returns the end of the highest one.
fn check_segments(h: &ElfHeader, file_len: u64, ram_end: u64) -> Result<u64, ProbeError> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut entry_ok = false;
    for (i, ph) in h.phdrs.iter().enumerate() {
        if ph.kind != PT_LOAD || ph.memsz == 0 {
            continue;
        }
        if ph.filesz > ph.memsz {
            return Err(elf_err(format!("segment {i}: p_filesz exceeds p_memsz")));
        }
        if ph
            .offset
            .checked_add(ph.filesz)
            .is_none_or(|e| e > file_len)
        {
            return Err(elf_err(format!(
                "segment {i}: file bytes lie outside the file"
            )));
        }
        if ph.vaddr != ph.paddr {
            return Err(elf_err(format!(
                "segment {i}: p_vaddr {:#x} differs from p_paddr {:#x} (the probe is identity-mapped)",
                ph.vaddr, ph.paddr
            )));
        }
        let end = ph.paddr.checked_add(ph.memsz).filter(|&e| e <= ram_end);
        let Some(end) = end.filter(|_| ph.paddr >= IMAGE_MIN) else {
            return Err(elf_err(format!(
                "segment {i} at {:#x} (+{:#x} bytes) is outside guest RAM [{IMAGE_MIN:#x}, {ram_end:#x})",
                ph.paddr, ph.memsz
            )));
        };
        if let Some(&(s, e)) = spans.iter().find(|&&(s, e)| ph.paddr < e && s < end) {
            return Err(elf_err(format!(
                "segment {i} [{:#x}, {end:#x}) overlaps another segment [{s:#x}, {e:#x})",
                ph.paddr
            )));
        }
        spans.push((ph.paddr, end));
        entry_ok |= ph.flags & PF_X != 0 && (ph.paddr..end).contains(&h.entry);
    }
    if spans.is_empty() {
        return Err(elf_err("no loadable segment"));
    }
    if !entry_ok {
        return Err(elf_err(format!(
            "entry point {:#x} is not inside an executable segment",
            h.entry
        )));
    }
    Ok(spans.iter().map(|s| s.1).max().unwrap_or(IMAGE_MIN))
}

/// GDT descriptor for a code or data segment as KVM describes it.
fn descriptor(s: &kvm_segment) -> u64 {
    let limit = if s.g != 0 { s.limit >> 12 } else { s.limit };
    let (base, limit) = (s.base, u64::from(limit));
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(s.type_ & 0xf) << 40)
        | (u64::from(s.s & 1) << 44)
        | (u64::from(s.dpl & 3) << 45)
        | (u64::from(s.present & 1) << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(s.avl & 1) << 52)
        | (u64::from(s.l & 1) << 53)
        | (u64::from(s.db & 1) << 54)
        | (u64::from(s.g & 1) << 55)
        | (((base >> 24) & 0xff) << 56)
}

fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_CODE,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_DATA,
        type_: 0x3, // read/write, accessed
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    }
}

fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: SEL_TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    }
}

/// Writes the GDT and TSS, the command line and the page tables.
fn write_tables(mem: &GuestMem, cmdline: &str, map_end: u64) -> Result<(), ProbeError> {
    let tss = tss_segment();
    let tss_low = descriptor(&tss);
    let mut gdt = [0u64; GDT_ENTRIES as usize];
    gdt[usize::from(SEL_DATA >> 3)] = descriptor(&data_segment());
    gdt[usize::from(SEL_CODE >> 3)] = descriptor(&code_segment());
    gdt[usize::from(SEL_TSS >> 3)] = tss_low;
    gdt[usize::from(SEL_TSS >> 3) + 1] = TSS_ADDR >> 32;
    let gdt: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "GDT", &gdt, GDT_ADDR)?;
    // I/O bitmap right after the header, all ports allowed, then 0xff.
    let mut tss_bytes = vec![0u8; TSS_SIZE as usize];
    tss_bytes[102..104].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    tss_bytes[TSS_SIZE as usize - 1] = 0xff;
    write(mem, "TSS", &tss_bytes, TSS_ADDR)?;

    let mut line = Vec::with_capacity(cmdline.len() + 1);
    line.extend_from_slice(cmdline.as_bytes());
    line.push(0);
    write(mem, "command line", &line, CMDLINE_ADDR)?;

    let gib = map_end.div_ceil(1 << 30);
    let table_flags = PTE_P | PTE_W | PTE_U | PTE_A;
    write(
        mem,
        "PML4",
        &(PDPT_ADDR | table_flags).to_le_bytes(),
        PML4_ADDR,
    )?;
    let pdpt: Vec<u8> = (0..gib)
        .flat_map(|g| ((PD_ADDR + g * 0x1000) | table_flags).to_le_bytes())
        .collect();
    write(mem, "PDPT", &pdpt, PDPT_ADDR)?;
    let leaf = PTE_P | PTE_W | PTE_U | PTE_A | PTE_D | PTE_PS;
    let pds: Vec<u8> = (0..gib * 512)
        .flat_map(|i| ((i << 21) | leaf).to_le_bytes())
        .collect();
    write(mem, "page directories", &pds, PD_ADDR)
}

/// Loads a probe image into fresh guest memory for `vcpus` vCPUs: validates
/// the ELF, copies its segments (zeroing bss), writes the command line, the
/// descriptor tables and identity-mapping page tables, and lays out a stack
/// per vCPU. `image` is read from its start.
pub fn load(
    mem: &GuestMem,
    image: &mut File,
    cmdline: &str,
    vcpus: u8,
) -> Result<ProbeBoot, ProbeError> {
    if vcpus == 0 {
        return Err(ProbeError::NoVcpus);
    }
    if cmdline.len() > MAX_CMDLINE {
        return Err(ProbeError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(ProbeError::CmdlineNul);
    }
    let size = image.metadata().map_err(ProbeError::Read)?.len();
    if size > MAX_IMAGE_BYTES {
        return Err(ProbeError::TooLarge { size });
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    image.seek(SeekFrom::Start(0)).map_err(ProbeError::Read)?;
    image
        .take(MAX_IMAGE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(ProbeError::Read)?;
    let file_len = data.len() as u64;
    if file_len > MAX_IMAGE_BYTES {
        return Err(ProbeError::TooLarge { size: file_len });
    }

    let header = parse_elf(&data)?;
    match probe_note_version(&data, &header.phdrs) {
        None => return Err(elf_err("no EVMPROBE note (not a probe image)")),
        Some(PROBE_ABI_VERSION) => {}
        Some(found) => return Err(ProbeError::AbiVersion { found }),
    }

    let ram_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .ok_or(ProbeError::NoLowRam)?;
    let map_end = mem
        .last_addr()
        .0
        .saturating_add(1)
        .next_multiple_of(2 << 20);
    if map_end > MAX_MAPPED {
        return Err(ProbeError::MemoryTooLarge { end: map_end });
    }
    let image_end = check_segments(&header, file_len, ram_end)?;
    let stacks_base = image_end.next_multiple_of(0x1000);
    let free_start = stacks_base + u64::from(vcpus) * STACK_SIZE;
    if free_start > ram_end {
        return Err(ProbeError::NotEnoughMemory {
            need: free_start,
            ram_end,
        });
    }

    write_tables(mem, cmdline, map_end)?;
    for ph in header
        .phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD && p.memsz > 0)
    {
        // check_segments proved offset + filesz <= data.len() and the sizes fit.
        let from = ph.offset as usize;
        write(
            mem,
            "image",
            &data[from..from + ph.filesz as usize],
            ph.paddr,
        )?;
        let bss = vec![0u8; (ph.memsz - ph.filesz) as usize];
        write(mem, "image bss", &bss, ph.paddr + ph.filesz)?;
    }
    let stacks = vec![0u8; (free_start - stacks_base) as usize];
    write(mem, "stacks", &stacks, stacks_base)?;

    Ok(ProbeBoot {
        entry: header.entry,
        cr3: PML4_ADDR,
        cmdline_gpa: CMDLINE_ADDR,
        stacks_base,
        vcpus,
        ram_end,
        free_start,
    })
}

/// Puts vCPU `index` at the probe's entry in 64-bit user mode (see the
/// module documentation for the register contract) and makes it runnable.
/// Call after the vCPU's CPUID is set (if evm sets one) and before its
/// first `KVM_RUN`.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    boot: &ProbeBoot,
    index: u8,
    tsc_khz: u32,
) -> Result<(), ProbeError> {
    if index >= boot.vcpus {
        return Err(ProbeError::VcpuIndex {
            index,
            vcpus: boot.vcpus,
        });
    }
    let kvm = |ioctl| {
        move |source| ProbeError::Kvm {
            ioctl,
            index,
            source,
        }
    };

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs = code_segment();
    let data = data_segment();
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss_segment();
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = boot.cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: boot.entry,
        rsp: boot.stack_top(index),
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        rdi: u64::from(index),
        rsi: u64::from(boot.vcpus),
        rdx: boot.cmdline_gpa,
        rcx: u64::from(tsc_khz),
        r8: boot.ram_end,
        r9: boot.free_start,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    // With an in-kernel irqchip KVM parks every vCPU but the first waiting
    // for INIT/SIPI; the probe has no bring-up code, so start them all.
    let runnable = kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    };
    vcpu.set_mp_state(runnable).map_err(kvm("KVM_SET_MP_STATE"))
}

#[cfg(test)]
mod tests;
