//! Loading a Linux bzImage: the kernel, the initramfs, the command line and
//! the zero page (boot_params with the e820 map and the ACPI RSDP address).

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, load_cmdline};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::BootError;
use crate::cpu::layout;
use crate::memory;
use devices::GuestMem;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The command line a Linux guest gets when the user gives none: the
/// console on COM1, no PCI probing (evm has no PCI bus), reboot on panic
/// (evm then exits, as on any reset), and a quiet boot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 pci=off panic=-1 quiet";

/// Offset of the 64-bit entry point from the start of the loaded kernel.
const ENTRY_64_OFFSET: u64 = 0x200;

/// The parts of guest-visible set-up that the VM builder needs afterwards.
#[derive(Debug)]
pub struct LinuxBoot {
    /// Where the boot vCPU starts (64-bit entry).
    pub entry: u64,
}

/// Load `kernel` (+ `initrd`) into `mem` and write the zero page.
pub fn load(
    mem: &GuestMem,
    kernel_path: &Path,
    kernel: &mut File,
    initrd: Option<(&Path, &mut File)>,
    cmdline: &str,
    mem_bytes: u64,
) -> Result<LinuxBoot, BootError> {
    let loaded =
        BzImage::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM))).map_err(|e| {
            BootError::Kernel {
                path: kernel_path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    let mut hdr = loaded.setup_header.ok_or_else(|| BootError::Kernel {
        path: kernel_path.to_path_buf(),
        reason: "no setup header".into(),
    })?;

    let mut cl =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = cmdline_len as u32 + 1;
    if hdr.kernel_alignment < KERNEL_MIN_ALIGNMENT {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    let low_end = mem_bytes.min(memory::MMIO_GAP_START);
    if let Some((path, file)) = initrd {
        let (addr, size) = load_initrd(mem, path, file, low_end, loaded.kernel_end, &hdr)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: layout::ACPI,
        ..Default::default()
    };
    let mut add = |addr: u64, size: u64, type_: u32| -> Result<(), BootError> {
        let i = params.e820_entries as usize;
        if i >= params.e820_table.len() {
            return Err(BootError::Layout("too many e820 entries"));
        }
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        params.e820_entries += 1;
        Ok(())
    };
    add(0, layout::EBDA, E820_RAM)?;
    add(layout::EBDA, layout::HIMEM - layout::EBDA, E820_RESERVED)?;
    add(layout::HIMEM, low_end - layout::HIMEM, E820_RAM)?;
    if mem_bytes > memory::MMIO_GAP_START {
        add(
            memory::MMIO_GAP_END,
            mem_bytes - memory::MMIO_GAP_START,
            E820_RAM,
        )?;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Layout(Box::leak(e.to_string().into_boxed_str())))?;

    write_reset_stub(mem)?;
    Ok(LinuxBoot {
        entry: loaded.kernel_load.raw_value() + ENTRY_64_OFFSET,
    })
}

/// Place the initramfs at the top of low RAM (below `initrd_addr_max`),
/// page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    file: &mut File,
    low_end: u64,
    kernel_end: u64,
    hdr: &linux_loader::loader::bootparam::setup_header,
) -> Result<(u64, u64), BootError> {
    let size = file
        .metadata()
        .map_err(|e| BootError::Io(path.to_path_buf(), e))?
        .len();
    let limit = if hdr.initrd_addr_max == 0 {
        low_end
    } else {
        low_end.min(hdr.initrd_addr_max as u64 + 1)
    };
    let too_big = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(layout::HIMEM) {
        return Err(too_big());
    }
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|_| too_big())?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::Io(path.to_path_buf(), std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Real-mode code at the x86 reset vector (F000:FFF0) that pulses the
/// i8042 reset line. Linux on a hardware-reduced ACPI platform reboots
/// through EFI and then "BIOS" (a jump to the reset vector) before it tries
/// the keyboard controller; with no firmware there it would run zeros
/// forever. `mov al, 0xfe; out 0x64, al; hlt; jmp $-1`.
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// The reset vector's physical address.
pub const RESET_VECTOR: u64 = 0xffff0;

fn write_reset_stub(mem: &GuestMem) -> Result<(), BootError> {
    use vm_memory::Bytes;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|_| BootError::Layout("cannot write the reset-vector stub"))
}
