//! ACPI tables: how an unmodified Linux finds evm's vCPUs (MADT), its
//! virtio-mmio devices (DSDT, HID `LNRO0005`) and how to power off or reset
//! (a hardware-reduced FADT pointing at `devices::legacy::AcpiPower`).
//!
//! Layout from `cpu::layout::ACPI` (0xe0000, where Linux scans for the RSDP;
//! the zero page also carries its address): RSDP, XSDT, FADT, MADT, DSDT.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vm_memory::{Bytes, GuestAddress};

use crate::cpu::layout;
use crate::memory;
use devices::GuestMem;
use devices::legacy::{ACPI_POWER_BASE, S5_SLEEP_TYPE, SLEEP_CONTROL, SLEEP_STATUS};

/// COM1's I/O port base, as the DSDT describes it.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt.
pub const COM1_GSI: u32 = 4;

const OEM_ID: [u8; 6] = *b"EVM   ";
const OEM_TABLE: [u8; 8] = *b"EVMVM   ";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// MMIO base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// GSI on the IOAPIC.
    pub gsi: u32,
}

/// Errors writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables did not fit below 1 MiB.
    #[error("ACPI tables of {0} bytes do not fit in the BIOS area")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write ACPI tables into guest memory")]
    GuestMemory,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn gas_io8(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// The DSDT's AML body: `_S5_` and one device per virtio-mmio window.
fn dsdt_body(mmio: &[MmioDevice]) -> Vec<u8> {
    let mut out = Vec::new();
    let s5_values: [u8; 2] = [S5_SLEEP_TYPE, 0];
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_values[0], &s5_values[1]]),
    )
    .to_aml_bytes(&mut out);

    let names: Vec<String> = (0..mmio.len()).map(|i| format!("V{i:03X}")).collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<u32> = (0..mmio.len() as u32).collect();
    let uid_names: Vec<aml::Name> = uids
        .iter()
        .map(|u| aml::Name::new("_UID".into(), u))
        .collect();
    let mems: Vec<aml::Memory32Fixed> = mmio
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.len as u32))
        .collect();
    let irqs: Vec<aml::Interrupt> = mmio
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.gsi))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let crs_names: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devs: Vec<aml::Device> = (0..mmio.len())
        .map(|i| {
            aml::Device::new(
                names[i].as_str().into(),
                vec![&hid, &uid_names[i], &crs_names[i]],
            )
        })
        .collect();
    // COM1: Linux maps ISA IRQs only for devices that ACPI describes (a
    // hardware-reduced platform has no legacy PIC set-up), so without this
    // the 8250 driver cannot get IRQ 4 and /dev/ttyS0 cannot be opened.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_res = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devs.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut out);
    out
}

/// Build all tables and write them to guest memory at `layout::ACPI`.
pub fn write_tables(mem: &GuestMem, vcpus: u8, mmio: &[MmioDevice]) -> Result<(), AcpiError> {
    let base = layout::ACPI;
    let rsdp_len = Rsdp::len() as u64;
    // Offsets of each table, 64-byte aligned after the RSDP.
    let align = |x: u64| (x + 63) & !63;

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&dsdt_body(mmio));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(memory::LAPIC_ADDR),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, memory::IOAPIC_ADDR, 0));
    let madt = bytes(&madt);

    let xsdt_addr = align(base + rsdp_len);
    // XSDT with two entries: 36 + 16 bytes.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let madt_addr = align(fadt_addr + FADTBuilder::default().as_len());
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::HIMEM {
        return Err(AcpiError::TooLarge((end - base) as usize));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // No ACPI reset register: with one, Linux 6.1 (BOOT_ACPI, its default)
    // hung in acpi_reboot() under nested KVM and never reached the write;
    // without one it goes straight to the i8042 reset line (0xFE to port
    // 0x64), which works, as Firecracker's guests do. The reset register
    // at ACPI_POWER_BASE + RESET_REGISTER still works for guests that write
    // it directly (the probe).
    fadt.sleep_control_reg = gas_io8(ACPI_POWER_BASE + SLEEP_CONTROL);
    fadt.sleep_status_reg = gas_io8(ACPI_POWER_BASE + SLEEP_STATUS);
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5).
    fadt.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"EVMEVMEV").into();
    let fadt = bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, data) in [
        (base, rsdp.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (madt_addr, madt.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|_| AcpiError::GuestMemory)?;
    }
    Ok(())
}

trait FadtLen {
    fn as_len(&self) -> u64;
}

impl FadtLen for FADTBuilder {
    fn as_len(&self) -> u64 {
        acpi_tables::fadt::FADT::len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_found_and_checksummed() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mmio = [MmioDevice {
            base: memory::VIRTIO_MMIO_BASE,
            len: 0x1000,
            gsi: 5,
        }];
        write_tables(&mem, 2, &mmio).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(layout::ACPI))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(&hdr[..4], b"XSDT");
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(sum(&xsdt), 0);
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let a = u64::from_le_bytes(e.try_into().unwrap());
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(a)).unwrap();
            let l = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; l];
            mem.read_slice(&mut t, GuestAddress(a)).unwrap();
            assert_eq!(sum(&t), 0, "{:?}", &h[..4]);
            sigs.push(String::from_utf8_lossy(&h[..4]).to_string());
            if &h[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let mut d = [0u8; 8];
                mem.read_slice(&mut d, GuestAddress(dsdt)).unwrap();
                assert_eq!(&d[..4], b"DSDT");
                let dl = u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize;
                let mut body = vec![0u8; dl];
                mem.read_slice(&mut body, GuestAddress(dsdt)).unwrap();
                assert_eq!(sum(&body), 0);
                let text = String::from_utf8_lossy(&body);
                assert!(
                    text.contains("LNRO0005") && text.contains("_S5_") && text.contains("COM1")
                );
            }
            if &h[..4] == b"APIC" {
                // 44-byte header, two 8-byte LAPICs, one 12-byte IOAPIC.
                assert_eq!(l, 44 + 16 + 12);
            }
        }
        assert_eq!(sigs, ["FACP", "APIC"]);
    }
}
