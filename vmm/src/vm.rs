//! Building the machine and running it until the guest powers off, resets,
//! or the user quits.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};

use devices::legacy::{
    ACPI_POWER_BASE, ACPI_POWER_LEN, AcpiPower, I8042, I8042_BASE, I8042_LEN, PowerEvent,
};
use devices::serial::SerialPort;
use devices::virtio::{Block, Rng, VirtioDevice};

/// The virtio-blk device id the guest reads with GET_ID.
pub const DISK_ID: &str = "evm-disk0";
use devices::{Bus, GuestMem};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, ImageKind};
use crate::config::VmConfig;
use crate::console::{self, RawTerminal};
use crate::cpu::{self, CpuError};
use crate::host::{self, HostError};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, VmEvent};
use crate::{acpi, cpuid};

use crate::acpi::{COM1_BASE, COM1_GSI};

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Host problem.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Image problem.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Memory problem.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU set-up problem.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A disk image problem.
    #[error("--disk {}", path.display())]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::BlockError,
    },
    /// Attaching virtio devices failed.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioError),
    /// A KVM VM-level ioctl failed.
    #[error("KVM: {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating a thread or an eventfd failed.
    #[error("cannot create {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// The bus refused a device.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// The guest or a vCPU failed while running.
    #[error("{0}")]
    Run(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine.
    Reset,
    /// The user typed the console escape.
    Escape,
}

fn power_handler(events: Sender<VmEvent>) -> devices::legacy::PowerHandler {
    let events = Mutex::new(events);
    Box::new(move |e| {
        let ev = match e {
            PowerEvent::PowerOff => VmEvent::PowerOff,
            PowerEvent::Reset => VmEvent::Reset,
        };
        let _ = events.lock().unwrap_or_else(|p| p.into_inner()).send(ev);
    })
}

/// Everything checked before KVM is touched, so that bad input is reported
/// the same way on every host.
struct Inputs {
    kind: ImageKind,
    kernel: File,
    initrd: Option<File>,
    disk: Option<Block>,
}

fn open_inputs(config: &VmConfig) -> Result<Inputs, VmError> {
    let kind = boot::detect(&config.kernel)?;
    let kernel = File::open(&config.kernel).map_err(|e| BootError::Io(config.kernel.clone(), e))?;
    let initrd = match &config.initrd {
        Some(p) => Some(File::open(p).map_err(|e| BootError::Io(p.clone(), e))?),
        None => None,
    };
    let disk = match &config.disk {
        Some(p) => Some(Block::new(p, false, DISK_ID).map_err(|e| VmError::Disk {
            path: p.clone(),
            source: e,
        })?),
        None => None,
    };
    Ok(Inputs {
        kind,
        kernel,
        initrd,
        disk,
    })
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Build the VM described by `config` and run it until it ends.
pub fn run(config: &VmConfig) -> Result<RunEnd, VmError> {
    let mut inputs = open_inputs(config)?;
    let kvm = host::open_kvm()?;
    if inputs.kind == ImageKind::Linux && host::is_pvm() {
        return Err(HostError::PvmCannotRunKernel {
            kvm: host::kvm_path(),
            kernel: config.kernel.clone(),
        }
        .into());
    }
    let vm = create_vm(&kvm)?;
    let mem = memory::create(config.mem_bytes)?;
    memory::register(&vm, &mem, false)?;

    let (events_tx, events_rx) = channel::<VmEvent>();
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Os("eventfd", e))?;
    vm.register_irqfd(&com1_irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(
        com1_irq,
        Box::new(std::io::stdout()),
    )));
    pio.insert(serial.clone(), COM1_BASE as u64, 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(power_handler(events_tx.clone())))),
        I8042_BASE,
        I8042_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPower::new(power_handler(events_tx.clone())))),
        ACPI_POWER_BASE,
        ACPI_POWER_LEN,
    )?;
    let mut virtio_devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(disk) = inputs.disk.take() {
        virtio_devices.push(Box::new(disk));
    }
    virtio_devices.push(Box::new(Rng::new()));
    let (described, event_loop) = crate::virtio::attach(&vm, &mem, &mut mmio, virtio_devices)?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for i in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut c = supported.clone();
        cpuid::for_vcpu(&mut c, i, config.vcpus, tsc_deadline);
        cpu::setup_common(&vcpu, i, &c)?;
        vcpus.push(vcpu);
    }

    match inputs.kind {
        ImageKind::Linux => {
            let initrd = match (&config.initrd, inputs.initrd.as_mut()) {
                (Some(p), Some(f)) => Some((p.as_path(), f)),
                _ => None,
            };
            let boot = boot::linux::load(
                &mem,
                &config.kernel,
                &mut inputs.kernel,
                initrd,
                config
                    .cmdline
                    .as_deref()
                    .unwrap_or(boot::linux::DEFAULT_CMDLINE),
                config.mem_bytes,
            )?;
            acpi::write_tables(&mem, config.vcpus, &described)?;
            cpu::setup_linux_boot_cpu(&mem, &vcpus[0], boot.entry)?;
        }
        ImageKind::Probe => {
            let probe_err = |source| BootError::Probe {
                path: config.kernel.clone(),
                source,
            };
            let boot = boot::probe::load(
                &mem,
                &mut inputs.kernel,
                config.cmdline.as_deref().unwrap_or(""),
                config.vcpus,
            )
            .map_err(probe_err)?;
            for (i, vcpu) in vcpus.iter().enumerate() {
                let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
                boot::probe::setup_vcpu(vcpu, &boot, i as u8, tsc_khz).map_err(probe_err)?;
            }
        }
    }

    event_loop
        .spawn()
        .map_err(|e| VmError::Os("virtio thread", e))?;
    run_vcpus(vcpus, pio, mmio, serial, mem, events_tx, events_rx)
}

fn run_vcpus(
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialPort>>,
    _mem: GuestMem,
    events_tx: Sender<VmEvent>,
    events_rx: std::sync::mpsc::Receiver<VmEvent>,
) -> Result<RunEnd, VmError> {
    vcpu::install_kick_handler().map_err(|e| {
        VmError::Os(
            "signal handler",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut terminal = RawTerminal::enter();
    let mut threads = Vec::new();
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        threads.push(
            vcpu::spawn(
                i as u8,
                vcpu,
                pio.clone(),
                mmio.clone(),
                stop.clone(),
                events_tx.clone(),
            )
            .map_err(|e| VmError::Os("vCPU thread", e))?,
        );
    }
    console::spawn_pump(serial.clone()).map_err(|e| VmError::Os("console thread", e))?;
    console::spawn_stdin(serial, events_tx).map_err(|e| VmError::Os("stdin thread", e))?;
    let event = events_rx
        .recv()
        .unwrap_or_else(|_| VmEvent::Error("every vCPU thread ended".into()));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in &threads {
        t.kick();
    }
    terminal.restore();
    match event {
        VmEvent::PowerOff => Ok(RunEnd::PowerOff),
        VmEvent::Reset => Ok(RunEnd::Reset),
        VmEvent::Escape => Ok(RunEnd::Escape),
        VmEvent::Error(m) => Err(VmError::Run(m)),
    }
}
