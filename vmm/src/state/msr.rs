//! Which MSRs a vCPU's state includes, and reading and writing them.
//!
//! # The list
//!
//! [`msr_indices_to_save`] starts from `KVM_GET_MSR_INDEX_LIST` (the MSRs
//! KVM saves and restores for migration), adds [`EXTRA_MSRS`] (MSRs KVM
//! emulates but does not list), drops [`DENIED_MSRS`], and keeps only the
//! MSRs a vCPU with KVM's full supported CPUID can read: which MSRs a vCPU
//! has depends on its CPUID (PMU, MPX, …). `IA32_TSC` and the kvmclock
//! MSRs are always in it when KVM has them. `IA32_TSC_DEADLINE` is moved to
//! the end so that it is restored after `IA32_TSC`.
//!
//! Not here because other state carries them: EFER, FS/GS base and the
//! APIC base (`sregs`), XCR0 (`xcrs`), the x2APIC registers (the LAPIC
//! page), PKRU and XSS-managed state (the XSAVE image).
//!
//! # On this machine (PVM)
//!
//! The kvm_pvm host lists 41 MSRs; with the 27 MTRRs the list has 68, all
//! readable. Writing back values saved from a vCPU programmed as a Linux
//! guest programs it (syscall MSRs, PAT, MTRRs, kvmclock, steal time, PV
//! EOI, async PF, a TSC deadline) succeeds for every one, so
//! [`TOLERATED_MSR_FAILURES`] is empty. One write is accepted but has no
//! effect: `IA32_TSC`, because PVM cannot offset the guest TSC (its guests
//! read the host TSC). `restore_vcpu` reads the TSC back and warns when it
//! is a second or more away from the saved value. PVM does not list
//! `IA32_SPEC_CTRL`, `IA32_XSS` or any PMU MSR.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_msr_entry,
    kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{StateError, kvm};

/// The guest's time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's TSC deadline.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs KVM emulates and the guest can change, but
/// `KVM_GET_MSR_INDEX_LIST` does not name (QEMU saves them by name): the
/// MTRRs. evm's boot code enables them (default type write-back); losing
/// them would leave all memory uncacheable by the guest's MTRRs.
pub const EXTRA_MSRS: &[u32] = &[
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, // IA32_MTRR_FIX64K_00000
    0x258, // IA32_MTRR_FIX16K_80000
    0x259, // IA32_MTRR_FIX16K_A0000
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f, // IA32_MTRR_FIX4K_*
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // IA32_MTRR_PHYSBASE/MASK 0-3
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // IA32_MTRR_PHYSBASE/MASK 4-7
    MSR_IA32_TSC,
    0x11,        // MSR_KVM_WALL_CLOCK
    0x12,        // MSR_KVM_SYSTEM_TIME
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
];

/// MSRs never saved or restored, and why: they are commands, not state.
pub const DENIED_MSRS: &[(u32, &str)] = &[
    (0x49, "IA32_PRED_CMD: write-only command (IBPB), no state"),
    (
        0x10b,
        "IA32_FLUSH_CMD: write-only command (L1D flush), no state",
    ),
    (
        0x4b56_4d07,
        "MSR_KVM_ASYNC_PF_ACK: acknowledges an async page fault; reads 0, no state",
    ),
    (0x4000_0003, "HV_X64_MSR_RESET: a write resets the VM"),
];

/// MSRs whose refusal by `KVM_SET_MSRS` on restore is logged as a warning
/// and skipped, with the reason it is harmless. Any other refusal fails
/// the restore. Empty: no MSR has needed it on KVM or PVM so far.
pub const TOLERATED_MSR_FAILURES: &[(u32, &str)] = &[];

/// One saved MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// The MSR number.
    pub index: u32,
    /// Its value.
    pub value: u64,
}

fn denied(index: u32) -> bool {
    DENIED_MSRS.iter().any(|&(i, _)| i == index)
}

/// The MSRs to save for every vCPU of a VM on this host, in restore order;
/// compute it once per VMM. Creates (and drops) a scratch VM to find which
/// listed MSRs KVM lets a vCPU read.
pub fn msr_indices_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    let listed = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = Vec::new();
    for &index in listed.as_slice().iter().chain(EXTRA_MSRS) {
        if !denied(index) && !candidates.contains(&index) {
            candidates.push(index);
        }
    }

    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let mut keep = Vec::with_capacity(candidates.len());
    for index in candidates {
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut one = Msrs::from_entries(&[entry]).map_err(|_| StateError::TooManyMsrs {
            count: 1,
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        match vcpu.get_msrs(&mut one) {
            Ok(1) => keep.push(index),
            Ok(_) => log::debug!("MSR {index:#x} is listed but this host's KVM cannot read it"),
            Err(e) => {
                return Err(StateError::Kvm {
                    ioctl: "KVM_GET_MSRS",
                    source: e,
                });
            }
        }
    }
    // Restore IA32_TSC_DEADLINE after IA32_TSC.
    if let Some(at) = keep.iter().position(|&i| i == MSR_IA32_TSC_DEADLINE) {
        keep.remove(at);
        keep.push(MSR_IA32_TSC_DEADLINE);
    }
    Ok(keep)
}

fn msr_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|_| StateError::TooManyMsrs {
        count: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Reads `indices` with as few `KVM_GET_MSRS` calls as KVM's limit allows.
pub(super) fn read(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<Msr>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_buffer(&entries)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n < chunk.len() {
            return Err(StateError::MsrRead { index: chunk[n] });
        }
        out.extend(msrs.as_slice().iter().map(|e| Msr {
            index: e.index,
            value: e.data,
        }));
    }
    Ok(out)
}

/// Writes `msrs` in order. KVM stops at the first MSR it refuses; a refusal
/// listed in [`TOLERATED_MSR_FAILURES`] is logged and skipped, any other is
/// an error.
pub(super) fn write(vcpu: &VcpuFd, msrs: &[Msr]) -> Result<(), StateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let n = vcpu
            .set_msrs(&msr_buffer(&entries)?)
            .map_err(kvm("KVM_SET_MSRS"))?;
        if n >= chunk.len() {
            rest = &rest[chunk.len()..];
            continue;
        }
        let bad = chunk[n];
        match TOLERATED_MSR_FAILURES
            .iter()
            .find(|&&(i, _)| i == bad.index)
        {
            Some((_, why)) => log::warn!(
                "KVM_SET_MSRS refused MSR {:#x} = {:#x}; skipped ({why})",
                bad.index,
                bad.value
            ),
            None => {
                return Err(StateError::MsrWrite {
                    index: bad.index,
                    value: bad.value,
                });
            }
        }
        rest = &rest[n + 1..];
    }
    Ok(())
}
