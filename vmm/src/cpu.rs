//! Architectural set-up of a vCPU at power-on: CPUID, MSRs, FPU, LAPIC, and
//! the 64-bit register state in which Linux's 64-bit boot protocol starts.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use devices::GuestMem;

/// Errors setting a vCPU up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Ioctl {
        /// vCPU index.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

fn ioctl(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Ioctl {
        index,
        what,
        source,
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Set CPUID, boot MSRs, FPU and LAPIC LINT pins for any vCPU.
pub fn setup_common(vcpu: &VcpuFd, index: u8, cpuid: &kvm_bindings::CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(ioctl(index, "KVM_SET_CPUID2"))?;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::GuestMemory("MSR list"))?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl(index, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::debug!(
            "vCPU {index}: KVM accepted {set} of {} boot MSRs",
            entries.len()
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl(index, "KVM_SET_FPU"))?;
    setup_lint(vcpu, index)
}

/// LINT0 = ExtINT (the 8259 behind it), LINT1 = NMI, as firmware leaves them.
fn setup_lint(vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(ioctl(index, "KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = lapic.regs[reg..reg + 4]
            .iter()
            .map(|&b| b as u8)
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap_or([0; 4]);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(ioctl(index, "KVM_SET_LAPIC"))
}

/// Guest addresses of the boot structures in low memory.
pub mod layout {
    /// GDT.
    pub const GDT: u64 = 0x500;
    /// IDT (empty).
    pub const IDT: u64 = 0x520;
    /// Linux's zero page (boot_params).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Boot stack top.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// PML4.
    pub const PML4: u64 = 0x9000;
    /// PDPT.
    pub const PDPT: u64 = 0xa000;
    /// Four page directories (identity map of the first 4 GiB).
    pub const PD: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x20000;
    /// Most bytes of command line.
    pub const CMDLINE_MAX: usize = 4096;
    /// Start of the EBDA / reserved area below 1 MiB.
    pub const EBDA: u64 = 0x9fc00;
    /// ACPI tables (RSDP first), in the BIOS area Linux scans.
    pub const ACPI: u64 = 0xe0000;
    /// Where the protected-mode kernel is loaded.
    pub const HIMEM: u64 = 0x10_0000;
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Write the GDT, an empty IDT and identity page tables for the first 4 GiB,
/// and put the boot vCPU in 64-bit mode at `entry` with RSI = zero page, as
/// Linux's 64-bit boot protocol wants.
pub fn setup_linux_boot_cpu(mem: &GuestMem, vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    use layout::*;
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + i as u64 * 8))
            .map_err(|_| CpuError::GuestMemory("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))
        .map_err(|_| CpuError::GuestMemory("IDT"))?;
    // PML4[0] -> PDPT; PDPT[0..4] -> PD[0..4]; 2 MiB pages.
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| CpuError::GuestMemory("page tables"))
    };
    w(PDPT | 0x3, PML4)?;
    for i in 0..4u64 {
        w((PD + i * 0x1000) | 0x3, PDPT + i * 8)?;
        for j in 0..512u64 {
            let addr = ((i << 30) | (j << 21)) | 0x83;
            w(addr, PD + i * 0x1000 + j * 8)?;
        }
    }

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(ioctl(0, "KVM_GET_SREGS"))?;
    let code = segment(gdt[1], 0x08);
    let data = segment(gdt[2], 0x10);
    let tss = segment(gdt[3], 0x18);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(ioctl(0, "KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl(0, "KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 8);
        assert_eq!((code.l, code.db, code.dpl, code.type_), (1, 0, 0, 0xb));
        assert_eq!((code.present, code.s, code.g), (1, 1, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 0x18);
        assert_eq!((tss.s, tss.type_, tss.unusable), (0, 0xb, 0));
    }
}
