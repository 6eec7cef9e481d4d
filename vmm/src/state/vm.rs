//! The VM-wide state KVM keeps in the kernel: the two 8259 PICs, the
//! IOAPIC, the i8254 PIT and the kvmclock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data,
    kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{StateError, codec, kvm};

/// Pins of KVM's IOAPIC.
pub const IOAPIC_PINS: usize = 24;

/// KVM's IOAPIC (`struct kvm_ioapic_state`, redirection entries as raw
/// 64-bit words).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// MMIO base address.
    pub base_address: u64,
    /// The index register (IOREGSEL).
    pub ioregsel: u32,
    /// The IOAPIC ID.
    pub id: u32,
    /// Pins whose interrupt is pending.
    pub irr: u32,
    /// The redirection table.
    pub redirtbl: [u64; IOAPIC_PINS],
}

impl From<&kvm_ioapic_state> for IoapicState {
    fn from(s: &kvm_ioapic_state) -> Self {
        Self {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            // SAFETY: each entry is a union of a u64 and a bitfield struct
            // of the same 8 bytes; every bit pattern is a valid u64.
            redirtbl: s.redirtbl.map(|e| unsafe { e.bits }),
        }
    }
}

impl From<&IoapicState> for kvm_ioapic_state {
    fn from(s: &IoapicState) -> Self {
        let mut k = kvm_ioapic_state {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            ..Default::default()
        };
        for (e, &bits) in k.redirtbl.iter_mut().zip(&s.redirtbl) {
            e.bits = bits;
        }
        k
    }
}

/// Field-wise serde form of `struct kvm_pic_state` (one 8259), which
/// kvm-bindings does not serialize itself.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_pic_state")]
struct PicStateDef {
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_reg_select: u8,
    poll: u8,
    special_mask: u8,
    init_state: u8,
    auto_eoi: u8,
    rotate_on_auto_eoi: u8,
    special_fully_nested_mode: u8,
    init4: u8,
    elcr: u8,
    elcr_mask: u8,
}

/// The VM's in-kernel devices and clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 (IRQs 0-7).
    #[serde(with = "PicStateDef")]
    pub pic_master: kvm_pic_state,
    /// The slave 8259 (IRQs 8-15).
    #[serde(with = "PicStateDef")]
    pub pic_slave: kvm_pic_state,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The i8254 PIT's three channels (`KVM_GET_PIT2`).
    #[serde(with = "codec::kvm")]
    pub pit: kvm_pit_state2,
    /// The kvmclock (`KVM_GET_CLOCK`): nanoseconds, and flags saying what
    /// else KVM filled in.
    #[serde(with = "codec::kvm")]
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

fn get_pic(vm: &VmFd, chip_id: u32) -> Result<kvm_pic_state, StateError> {
    let chip = get_chip(vm, chip_id)?;
    // SAFETY: KVM filled the union's `pic` member for a PIC chip id; it is
    // plain bytes, every pattern valid.
    Ok(unsafe { chip.chip.pic })
}

/// Saves the PICs, IOAPIC, PIT and kvmclock of `vm` (created with
/// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`), with every vCPU parked.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let pic_master = get_pic(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let pic_slave = get_pic(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let chip = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled the union's `ioapic` member for the IOAPIC chip
    // id; it is plain integers, every pattern valid.
    let ioapic = IoapicState::from(&unsafe { chip.chip.ioapic });
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock,
    })
}

/// Puts `s` into `vm`, a fresh VM with its in-kernel irqchip and PIT, before
/// any vCPU runs (and before the vCPUs' own state is restored).
///
/// The kvmclock is set to the saved value with `KVM_CLOCK_REALTIME`
/// cleared: the guest's clock resumes where it stopped, not advanced by the
/// time the VM was down (see the `state` module documentation).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    chip.chip.pic = s.pic_master;
    vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    chip.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    chip.chip.pic = s.pic_slave;
    vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    chip.chip_id = KVM_IRQCHIP_IOAPIC;
    chip.chip.ioapic = kvm_ioapic_state::from(&s.ioapic);
    vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        // Not KVM_CLOCK_REALTIME: do not advance by the wall time since.
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
}
