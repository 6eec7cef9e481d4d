//! One vCPU's architectural state: what [`save_vcpu`] reads and
//! [`restore_vcpu`] writes back (the order is explained in the module
//! documentation of `state`).

use std::sync::OnceLock;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Xsave, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::msr::{self, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, Msr};
use super::{StateError, codec, kvm};

/// Size of the classic `struct kvm_xsave` (`KVM_GET_XSAVE`).
const KVM_XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// TSC rates closer than this (parts per million) need no scaling: hosts
/// calibrate the same CPU slightly differently at each boot (QEMU's and
/// Firecracker's tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;
/// The LAPIC's LVT timer register, and its fields.
const APIC_LVTT: usize = 0x320;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE: u32 = 3 << 17;
const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;

/// One CPUID leaf as the vCPU had it (`struct kvm_cpuid_entry2` without
/// its padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input (leaf).
    pub function: u32,
    /// ECX input (subleaf), meaningful when `flags` says so.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// The complete architectural state of one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (`KVM_GET_CPUID2`).
    pub cpuid: Vec<CpuidEntry>,
    /// The guest TSC's rate in kHz (`KVM_GET_TSC_KHZ`); 0 if KVM cannot say.
    pub tsc_khz: u32,
    /// General-purpose registers, RIP, RFLAGS.
    #[serde(with = "codec::kvm")]
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base,
    /// and a pending external interrupt.
    #[serde(with = "codec::kvm")]
    pub sregs: kvm_sregs,
    /// The XSAVE image (`KVM_GET_XSAVE`/`KVM_GET_XSAVE2`: x87, SSE, AVX,
    /// AVX-512, PKRU, …), trailing zero bytes dropped; restore pads it back
    /// with zeros.
    #[serde(with = "codec::bytes")]
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    #[serde(with = "codec::kvm")]
    pub xcrs: kvm_xcrs,
    /// DR0-DR3, DR6, DR7.
    #[serde(with = "codec::kvm")]
    pub debug_regs: kvm_debugregs,
    /// The local APIC's 1 KiB register page.
    #[serde(with = "codec::kvm")]
    pub lapic: kvm_lapic_state,
    /// MSRs, in restore order (see `msr_indices_to_save`).
    pub msrs: Vec<Msr>,
    /// Pending or injected exception, interrupt, NMI, SMI; interrupt
    /// shadow; SMM state.
    #[serde(with = "codec::kvm")]
    pub vcpu_events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI, …
    #[serde(with = "codec::kvm")]
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.value)
    }

    /// The LAPIC register at byte `offset` of the register page.
    fn lapic_reg(&self, offset: usize) -> u32 {
        let b = |i: usize| self.lapic.regs.get(offset + i).map_or(0, |&v| v as u8);
        u32::from_le_bytes([b(0), b(1), b(2), b(3)])
    }
}

/// Bytes of a buffer that holds any XSAVE image KVM can hand out on this
/// host: the architectural maximum for every XSAVE feature the CPU has
/// (CPUID.(EAX=0DH,ECX=0):ECX), at least `struct kvm_xsave`. KVM copies
/// its vCPU's XSAVE size (never more than that maximum) in both directions.
pub(super) fn xsave_buffer_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let max_leaf = std::arch::x86_64::__cpuid(0).eax;
        let all_features = if max_leaf >= 0xd {
            std::arch::x86_64::__cpuid_count(0xd, 0).ecx as usize
        } else {
            0
        };
        all_features.max(KVM_XSAVE_BYTES).next_multiple_of(4)
    })
}

/// An `Xsave` (kvm_xsave plus its flexible tail) of `bytes` bytes.
fn xsave_with_tail(bytes: usize) -> Result<Xsave, StateError> {
    let tail = (bytes - KVM_XSAVE_BYTES) / 4;
    Xsave::new(tail).map_err(|_| StateError::XsaveTooLarge {
        saved: bytes,
        host: xsave_buffer_bytes(),
    })
}

fn get_xsave(vcpu: &VcpuFd) -> Result<Vec<u8>, StateError> {
    get_xsave_in(vcpu, xsave_buffer_bytes())
}

fn set_xsave(vcpu: &VcpuFd, image: &[u8]) -> Result<(), StateError> {
    set_xsave_in(vcpu, image, xsave_buffer_bytes())
}

/// Reads the XSAVE image through a buffer of `bytes` bytes (raised to
/// [`xsave_buffer_bytes`] if smaller, so that KVM never writes past it).
pub(super) fn get_xsave_in(vcpu: &VcpuFd, bytes: usize) -> Result<Vec<u8>, StateError> {
    let bytes = bytes.max(xsave_buffer_bytes()).next_multiple_of(4);
    let words: Vec<u32> = if bytes == KVM_XSAVE_BYTES {
        vcpu.get_xsave()
            .map_err(kvm("KVM_GET_XSAVE"))?
            .region
            .to_vec()
    } else {
        let mut xsave = xsave_with_tail(bytes)?;
        // SAFETY: `xsave` holds at least `xsave_buffer_bytes()` bytes, the
        // CPU's maximum XSAVE size for all its features, which bounds the
        // size KVM copies out for any vCPU on this host.
        unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
        let head = &xsave.as_fam_struct_ref().xsave.region;
        head.iter().chain(xsave.as_slice()).copied().collect()
    };
    let mut image: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let used = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    image.truncate(used);
    Ok(image)
}

/// Writes `image` zero-padded to `bytes` bytes (raised to
/// [`xsave_buffer_bytes`] if smaller, so that KVM never reads past it).
pub(super) fn set_xsave_in(vcpu: &VcpuFd, image: &[u8], bytes: usize) -> Result<(), StateError> {
    let bytes = bytes.max(xsave_buffer_bytes()).next_multiple_of(4);
    if image.len() > bytes {
        return Err(StateError::XsaveTooLarge {
            saved: image.len(),
            host: bytes,
        });
    }
    let mut words = vec![0u32; bytes / 4];
    for (w, c) in words.iter_mut().zip(image.chunks(4)) {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        *w = u32::from_le_bytes(b);
    }
    let (head, tail) = words.split_at(KVM_XSAVE_BYTES / 4);
    if tail.is_empty() {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(head);
        // SAFETY: KVM's XSAVE size is at most `xsave_buffer_bytes()`, which
        // `bytes` (here the size of `struct kvm_xsave`) is not below, so KVM
        // reads no byte past `xsave`.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))
    } else {
        let mut xsave = xsave_with_tail(bytes)?;
        // SAFETY: only the fixed head is written; the length field, which
        // says how many tail entries follow, is left as `Xsave::new` set it.
        unsafe { xsave.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(head);
        xsave.as_mut_slice().copy_from_slice(tail);
        // SAFETY: `xsave` holds at least `xsave_buffer_bytes()` bytes, which
        // bounds the size KVM reads for any vCPU on this host.
        unsafe { vcpu.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))
    }
}

/// Saves everything about `vcpu` that a fresh vCPU needs to continue it,
/// reading the MSRs in `msr_indices` (from [`msr::msr_indices_to_save`]).
/// The vCPU must be parked as the `state` module documentation describes.
///
/// `KVM_GET_MP_STATE` comes first: it lets KVM accept pending INIT/SIPI
/// events, which can change the registers and the LAPIC read after it.
/// The events come last, after every other read that might touch them.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = get_xsave(vcpu)?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .iter()
        .map(CpuidEntry::from)
        .collect();
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let msrs = msr::read(vcpu, msr_indices)?;
    let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        mp_state,
    })
}

/// Sets the guest TSC's rate to `saved` kHz unless this host's is within
/// [`TSC_KHZ_TOLERANCE_PPM`] of it.
fn restore_tsc_khz(vcpu: &VcpuFd, saved: u32) -> Result<(), StateError> {
    let host = match vcpu.get_tsc_khz() {
        Ok(host) => host,
        Err(e) => {
            if saved != 0 {
                log::warn!(
                    "KVM_GET_TSC_KHZ failed ({e}): cannot check that this host's TSC runs at the saved {saved} kHz"
                );
            }
            return Ok(());
        }
    };
    if saved == 0
        || u64::from(host.abs_diff(saved)) * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM
    {
        return Ok(());
    }
    vcpu.set_tsc_khz(saved)
        .map_err(|source| StateError::TscFrequency {
            saved,
            host,
            source,
        })
}

/// The MSRs to write, with one correction: a TSC deadline of 0 while the
/// LAPIC timer is unmasked in TSC-deadline mode becomes the saved TSC (due
/// at once). KVM zeroes the deadline when the timer fires but keeps the
/// interrupt in a counter outside the LAPIC page until the vCPU next runs;
/// a freeze in between would lose that interrupt, and a Linux guest would
/// never program its tick again. An extra early timer interrupt is
/// harmless (the guest finds nothing due and re-arms). Firecracker fixes
/// the same loss the same way.
fn msrs_to_write(s: &VcpuState) -> Vec<Msr> {
    let lvtt = s.lapic_reg(APIC_LVTT);
    let armed = lvtt & LVT_MASKED == 0 && lvtt & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE;
    let tsc = s.msr(MSR_IA32_TSC);
    s.msrs
        .iter()
        .map(|&m| match (m, tsc) {
            (Msr { index, value: 0 }, Some(tsc)) if armed && index == MSR_IA32_TSC_DEADLINE => {
                log::debug!("TSC deadline 0 with the LAPIC timer armed: due at once ({tsc:#x})");
                Msr { index, value: tsc }
            }
            _ => m,
        })
        .collect()
}

/// Warns when KVM did not take the saved TSC: PVM cannot offset the guest
/// TSC (the guest reads the host's and KVM ignores the write), so there the
/// guest's TSC moves by the time the VM was down, and goes back if the host
/// rebooted. Silent otherwise; a gap under a second is not reported.
fn check_tsc(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let Some(saved) = s.msr(MSR_IA32_TSC) else {
        return Ok(());
    };
    let now = msr::read(vcpu, &[MSR_IA32_TSC])?
        .first()
        .map_or(saved, |m| m.value);
    let per_ms = u64::from(s.tsc_khz).max(1);
    if now.abs_diff(saved) / per_ms >= 1000 {
        let direction = if now > saved { "ahead of" } else { "behind" };
        let ms = now.abs_diff(saved) / per_ms;
        log::debug!("guest TSC {now:#x} is {ms} ms {direction} the saved {saved:#x}");
        WARNED.call_once(|| {
            log::warn!(
                "KVM did not restore the guest TSC: it is {ms} ms {direction} the saved value \
                 (this /dev/kvm cannot offset the TSC, e.g. PVM, whose guests read the host TSC); \
                 the guest's TSC jumps across the resume while its kvmclock does not"
            )
        });
    }
    Ok(())
}

/// Puts `s` into `vcpu`, a vCPU that has not run (freshly created with
/// the saved vCPU's id, in a VM whose state [`super::restore_vm`] set).
/// The order, and why, is in the `state` module documentation.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let entries: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(Into::into).collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|_| StateError::TooManyCpuidEntries {
        count: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    restore_tsc_khz(vcpu, s.tsc_khz)?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    set_xsave(vcpu, &s.xsave)?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    msr::write(vcpu, &msrs_to_write(s))?;
    check_tsc(vcpu, s)?;
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))
}
