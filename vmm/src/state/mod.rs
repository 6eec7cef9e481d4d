//! Save and restore the complete architectural state of the vCPUs and of
//! the VM's in-kernel devices (PIC, IOAPIC, PIT, kvmclock), so that a
//! fresh KVM VM given the same guest memory continues exactly where the
//! old one stopped. Device state of evm's own (user-space) devices is an
//! opaque blob here ([`MachineState::devices`]); guest memory is not part
//! of this module at all.
//!
//! # Use
//!
//! ```text
//! once:    let msrs = msr_indices_to_save(&kvm)?;            // filtered list
//! freeze:  every vCPU parked (see below), then
//!          vcpus[i] = save_vcpu(&vcpu_fd[i], &msrs)?;  vm = save_vm(&vm_fd)?;
//!          bytes = encode(&MachineState::new(vcpus, vm, devices));
//! resume:  let s = decode(&bytes)?;  fresh VmFd with irqchip + PIT2, memory
//!          registered with the saved contents, vCPUs created with the same
//!          ids, then restore_vm(&vm_fd, &s.vm)?; restore_vcpu(&fd[i], &s.vcpus[i])?
//!          for each vCPU, then run.
//! ```
//!
//! # When a vCPU may be saved
//!
//! Not while it is inside `KVM_RUN`: its thread must be parked. And not
//! right after a `KVM_EXIT_IO` or `KVM_EXIT_MMIO`: KVM finishes such an
//! instruction (advances RIP past an `out`, stores the data of an `in`)
//! only when `KVM_RUN` is entered again, and that pending half is in no
//! state KVM reports. So park a vCPU only after a `KVM_RUN` that returned
//! `EINTR` (re-enter with `immediate_exit` set to complete a pending exit
//! without running guest code). All vCPUs must be parked before any is
//! saved: `KVM_GET_VCPU_EVENTS`, the LAPICs and the IOAPIC interact.
//!
//! None of these ioctls has to run on the vCPU's own thread; KVM takes
//! the vCPU's mutex for each. KVM's documentation only notes that the
//! first vCPU ioctl after a change of thread may be slower.
//!
//! # What is saved
//!
//! Per vCPU ([`VcpuState`]): CPUID as set (`KVM_GET_CPUID2`), TSC
//! frequency, general registers, segment/control/descriptor registers
//! with EFER and APIC base (`sregs`), the whole XSAVE image (x87, SSE,
//! AVX, AVX-512, PKRU …; `KVM_GET_XSAVE`, or `KVM_GET_XSAVE2` where the
//! host's XSAVE area exceeds 4 KiB), XCR0, debug registers, the LAPIC
//! register page, the MSRs of [`msr_indices_to_save`], pending
//! exception/interrupt/NMI/SMI events and the multiprocessing state.
//! `KVM_GET_FPU` is not needed: the XSAVE image contains x87 and SSE.
//!
//! Per VM ([`VmState`]): both 8259 PICs, the IOAPIC, the i8254 PIT and the
//! kvmclock.
//!
//! # Restore order
//!
//! [`restore_vcpu`] applies the state in this order; each step says why:
//!
//! 1. **CPUID** — KVM validates nearly everything else (MSRs, CR4 bits,
//!    XSAVE components, XCR0) against the vCPU's CPUID.
//! 2. **TSC frequency** — only if it differs; the TSC MSR write below is
//!    converted with the frequency ratio.
//! 3. **regs** — `KVM_SET_REGS` discards a pending exception, so it must
//!    come before the events that restore it.
//! 4. **sregs** — sets CR0/CR4/EFER (which XCR0 and the XSAVE image depend
//!    on) and the APIC base (whether the LAPIC is in x2APIC mode, which
//!    `KVM_SET_LAPIC` interprets); it can also change `mp_state` (KVM makes
//!    a BSP at the reset vector runnable), so it precedes `mp_state`.
//! 5. **XSAVE**, then **XCRs** (QEMU's order), then **debug registers**.
//! 6. **LAPIC** — after sregs (APIC base), before the MSRs: KVM accepts and
//!    arms `IA32_TSC_DEADLINE` only when the LAPIC timer is in TSC-deadline
//!    mode.
//! 7. **MSRs** — `IA32_TSC` before `IA32_TSC_DEADLINE` (KVM arms the
//!    deadline against the guest TSC at the moment of the write); the
//!    kvmclock MSRs re-register the guest's pvclock pages.
//! 8. **vCPU events** — after regs (which cleared pending exceptions),
//!    sregs and LAPIC: re-injects the pending exception, interrupt, NMI and
//!    the SMM state.
//! 9. **mp_state last** — sregs may have changed it and `KVM_SET_MP_STATE`
//!    checks it against the SMM/INIT state set by the events; nothing after
//!    it can overwrite it.
//!
//! [`restore_vm`] runs before the vCPUs are restored (QEMU restores device
//! state, then CPU state) and before any vCPU runs.
//!
//! # Time
//!
//! **kvmclock.** [`save_vm`] records `KVM_GET_CLOCK`; [`restore_vm`] sets it
//! back with `KVM_SET_CLOCK` with the `KVM_CLOCK_REALTIME` flag cleared, so
//! the guest's clock continues from the value it had at the freeze: time
//! during which the VM did not exist does not pass for the guest (as in
//! Firecracker). The guest's monotonic clocks therefore never jump; its
//! wall clock falls behind by the downtime until NTP (or the agent)
//! corrects it. Advancing it instead would fire every timer that came due
//! in the meantime at once and trigger the guest's soft-lockup detector.
//!
//! **TSC.** The saved `IA32_TSC` value is written back (a host-initiated
//! write: KVM computes a new offset, and when the vCPUs' values are within
//! a second of one another KVM gives them the same offset, so they stay
//! synchronised). The guest's TSC continues from its value at the freeze,
//! consistent with kvmclock. `KVM_VCPU_TSC_OFFSET` would keep the TSC
//! running through the downtime; that would contradict the kvmclock
//! choice, so it is not used. PVM cannot offset the TSC at all: there the
//! guest TSC is the host's, jumps forward by the downtime (and would go
//! back after a host reboot), and [`restore_vcpu`] logs a warning when it
//! finds the restored TSC a second or more from the saved one.
//!
//! `KVM_KVMCLOCK_CTRL` is not needed on resume: the guest's clock does not
//! jump, so its soft-lockup watchdog has nothing to see.
//!
//! # Not saved
//!
//! Nested virtualization state (`KVM_GET_NESTED_STATE`): a guest that ran
//! its own VMs through VMX/SVM would lose them. evm's CPUID should hide
//! VMX and SVM from the guest until this is added.
//!
//! # Versions
//!
//! [`STATE_VERSION`] names this layout; [`decode`] refuses any other. Change
//! the number whenever a field is added, removed or changes meaning.

mod codec;
mod msr;
mod vcpu;
mod vm;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use codec::{DECODE_LIMIT, HEADER_LEN, MAGIC, decode, encode};
pub use msr::{
    DENIED_MSRS, EXTRA_MSRS, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, Msr, TOLERATED_MSR_FAILURES,
    msr_indices_to_save,
};
pub use vcpu::{CpuidEntry, VcpuState, restore_vcpu, save_vcpu};
pub use vm::{IoapicState, VmState, restore_vm, save_vm};

/// The version of the state layout this evm writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Everything needed, besides guest memory, to continue a machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`] when written by this evm.
    pub version: u32,
    /// One per vCPU, by vCPU index.
    pub vcpus: Vec<VcpuState>,
    /// The VM's in-kernel devices and clock.
    pub vm: VmState,
    /// evm's own device state, encoded by the VMM; opaque here.
    #[serde(with = "codec::bytes")]
    pub devices: Vec<u8>,
}

impl MachineState {
    /// A state of the current version.
    pub fn new(vcpus: Vec<VcpuState>, vm: VmState, devices: Vec<u8>) -> Self {
        Self {
            version: STATE_VERSION,
            vcpus,
            vm,
            devices,
        }
    }
}

/// What failed while saving, restoring, encoding or decoding state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("{ioctl} failed")]
    Kvm {
        /// The ioctl's name.
        ioctl: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_MSRS` stopped at an MSR the list says to save.
    #[error(
        "KVM_GET_MSRS cannot read MSR {index:#x} (is the MSR list from this host and this vCPU's CPUID?)"
    )]
    MsrRead {
        /// The MSR.
        index: u32,
    },
    /// `KVM_SET_MSRS` refused an MSR that is not known to be harmless.
    #[error("KVM_SET_MSRS refused MSR {index:#x} = {value:#x}")]
    MsrWrite {
        /// The MSR.
        index: u32,
        /// The value it was given.
        value: u64,
    },
    /// More MSRs than one `kvm_msrs` can carry.
    #[error("{count} MSRs do not fit in one KVM_GET/SET_MSRS call (at most {max})")]
    TooManyMsrs {
        /// How many were asked for.
        count: usize,
        /// KVM's limit as kvm-bindings knows it.
        max: usize,
    },
    /// The saved XSAVE image is larger than this host's XSAVE area.
    #[error("the saved XSAVE image is {saved} bytes; this host's XSAVE area holds {host}")]
    XsaveTooLarge {
        /// Bytes saved.
        saved: usize,
        /// Bytes this host has.
        host: usize,
    },
    /// The saved state has more CPUID entries than KVM accepts.
    #[error("the saved CPUID has {count} entries; KVM takes at most {max}")]
    TooManyCpuidEntries {
        /// Entries saved.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The host's TSC runs at another rate and KVM cannot scale it.
    #[error(
        "the guest's TSC ran at {saved} kHz; this host's runs at {host} kHz and KVM cannot scale it"
    )]
    TscFrequency {
        /// The saved rate.
        saved: u32,
        /// This host's rate.
        host: u32,
        /// KVM's refusal.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Shorter than the header.
    #[error("machine state is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated {
        /// The length given.
        len: usize,
    },
    /// Not an encoded machine state.
    #[error("not an evm machine state (no EVMSTATE magic)")]
    Magic,
    /// Written by an evm with another layout.
    #[error("machine state version {found}; this evm reads version {STATE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The body does not decode.
    #[error("machine state is corrupt: {reason}")]
    Corrupt {
        /// What the decoder found.
        reason: String,
    },
}

/// A `map_err` helper naming the ioctl.
fn kvm(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { ioctl, source }
}
