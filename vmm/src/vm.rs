//! Building the machine — fresh from a kernel, or resumed from a store's
//! last committed epoch — and running it until the guest powers off,
//! resets, or the user stops it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoint::{CreateOptions, Store};
use devices::legacy::{
    ACPI_POWER_BASE, ACPI_POWER_LEN, AcpiPower, I8042, I8042_BASE, I8042_LEN, PowerEvent,
};
use devices::serial::SerialPort;
use devices::virtio::{Block, Rng, VirtioDevice};
use devices::{Bus, GuestMem};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{COM1_BASE, COM1_GSI};
use crate::api::{ApiServer, Control};
use crate::boot::{self, BootError, ImageKind};
use crate::console::{self, RawTerminal};
use crate::cpu::{self, CpuError};
use crate::epoch::Checkpointer;
use crate::freeze::{self, DeviceStates, Freezer, ParkedState, Quiesce};
use crate::gate::Gate;
use crate::host::{self, HostError};
use crate::memory::{self, MemoryError};
use crate::persist::{self, Flags, PersistError, StoredConfig};
use crate::state::{self, MachineState};
use crate::store_disk::{self, StoreDiskError};
use crate::telemetry::Telemetry;
use crate::vcpu::{self, Pauser, VcpuContext, VmEvent};
use crate::{acpi, cpuid, signals};

/// The virtio-blk device id the guest reads with GET_ID.
pub const DISK_ID: &str = "evm-disk0";
/// Default guest RAM when neither flags nor a store say.
pub const DEFAULT_MEM: u64 = 512 << 20;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 2;

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `EVM_INJECT_FAULT` does not parse.
    #[error("EVM_INJECT_FAULT: {0}")]
    FaultPlan(#[from] checkpoint::FaultPlanError),
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
        path: PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::BlockError,
    },
    /// The store's disk.
    #[error(transparent)]
    StoreDisk(#[from] crate::store_disk::StoreDiskError),
    /// Attaching virtio devices failed.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioError),
    /// The store (its errors name the path).
    #[error(transparent)]
    Store(checkpoint::StoreError),
    /// The stored configuration disagrees with the flags or the host.
    #[error("--store {}: {error}", path.display())]
    StoreConfig {
        /// The store.
        path: PathBuf,
        /// Why (not a `source`: the message already holds it).
        error: PersistError,
    },
    /// The store's path could not be examined or prepared.
    #[error("--store {}", path.display())]
    StorePath {
        /// The store.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stored configuration.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The control API socket.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Saved machine state that cannot be restored.
    #[error("cannot restore epoch {epoch}: {reason}")]
    Restore {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// No kernel to boot.
    #[error("--kernel is required to boot a new VM")]
    NoKernel,
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
    /// The user stopped evm (console escape or a signal); with a store, a
    /// final epoch was committed.
    Stopped,
}

/// What `evm run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Boot flags.
    pub flags: Flags,
    /// The store (`None`: an ephemeral VM).
    pub store: Option<PathBuf>,
    /// Epoch interval.
    pub interval: Duration,
    /// Discard the saved state and boot again.
    pub fresh: bool,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
}

/// Reports the guest's power-off and reset requests, and marks the machine
/// off first: the vCPU that asked (on whose thread this runs) then stops
/// running guest code, and so does every other one once kicked (see
/// `vcpu::run_loop`).
fn power_handler(
    events: Sender<VmEvent>,
    machine_off: Arc<AtomicBool>,
) -> devices::legacy::PowerHandler {
    let events = Mutex::new(events);
    Box::new(move |e| {
        let ev = match e {
            PowerEvent::PowerOff => VmEvent::PowerOff,
            PowerEvent::Reset => VmEvent::Reset,
        };
        machine_off.store(true, std::sync::atomic::Ordering::Release);
        let _ = events.lock().unwrap_or_else(|p| p.into_inner()).send(ev);
    })
}

/// The boot configuration from flags alone (no store, or a new one).
fn config_from_flags(flags: &Flags) -> Result<StoredConfig, VmError> {
    let kernel = flags.kernel.clone().ok_or(VmError::NoKernel)?;
    let kind = boot::detect(&kernel)?;
    Ok(StoredConfig {
        version: persist::CONFIG_VERSION,
        kernel,
        probe: kind == ImageKind::Probe,
        initrd: flags.initrd.clone(),
        cmdline: flags.cmdline.clone(),
        mem_bytes: flags.mem.as_ref().map(|m| m.1).unwrap_or(DEFAULT_MEM),
        vcpus: flags.vcpus.unwrap_or(DEFAULT_VCPUS),
        disk: flags.disk.clone(),
        disk_bytes: 0,
        disk_import: None,
        cpu_features: Vec::new(),
    })
}

/// Files the boot needs, opened (and checked) before KVM is touched.
struct BootFiles {
    kernel: File,
    initrd: Option<File>,
}

fn open_boot_files(cfg: &StoredConfig) -> Result<BootFiles, VmError> {
    boot::detect(&cfg.kernel)?;
    let kernel = File::open(&cfg.kernel).map_err(|e| BootError::Io(cfg.kernel.clone(), e))?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(File::open(p).map_err(|e| BootError::Io(p.clone(), e))?),
        None => None,
    };
    Ok(BootFiles { kernel, initrd })
}

fn open_disk(cfg: &StoredConfig) -> Result<Option<Block>, VmError> {
    cfg.disk
        .as_ref()
        .map(|p| {
            Block::new(p, false, DISK_ID).map_err(|e| VmError::Disk {
                path: p.clone(),
                source: e,
            })
        })
        .transpose()
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

/// Size of the log ring of a new store for `mem_bytes` of RAM.
pub fn default_log_bytes(mem_bytes: u64) -> u64 {
    (mem_bytes * 2).max(256 << 20)
}

/// A store opened for the run, and what it holds.
struct Opened {
    store: Store,
    config: StoredConfig,
    /// The epoch to resume from, if any.
    resume: Option<u64>,
}

fn store_err(_path: &Path) -> impl FnOnce(checkpoint::StoreError) -> VmError {
    VmError::Store
}

fn open_or_create_store(
    path: &Path,
    opts: &RunOptions,
    supported: &kvm_bindings::CpuId,
) -> Result<Opened, VmError> {
    let blank = Store::is_blank(path).map_err(|e| VmError::StorePath {
        path: path.to_path_buf(),
        source: e,
    })?;
    if blank {
        let mut config = config_from_flags(&opts.flags)?;
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| VmError::StorePath {
                path: path.to_path_buf(),
                source: e,
            })?;
        }
        config.cpu_features = persist::cpu_features(supported);
        // A store keeps its disk inside: `--disk IMG` is imported.
        let (disk_bytes, import) =
            store_disk::plan(config.disk.as_deref(), opts.flags.disk_size.as_ref())?;
        config.disk = None;
        config.disk_bytes = disk_bytes;
        config.disk_import = import;
        let create = CreateOptions {
            mem_bytes: config.mem_bytes,
            disk_bytes,
            log_bytes: default_log_bytes(config.mem_bytes),
            config: config.encode(),
        };
        let mut store = Store::create(path, &create).map_err(store_err(path))?;
        log::info!("created store {}", path.display());
        if let Some(img) = &config.disk_import {
            store_disk::import(&mut store, img)?;
        }
        return Ok(Opened {
            store,
            config,
            resume: None,
        });
    }
    let mut store = Store::open(path).map_err(store_err(path))?;
    let config = StoredConfig::decode(store.config()).map_err(|error| VmError::StoreConfig {
        path: path.to_path_buf(),
        error,
    })?;
    let config_err = |error| VmError::StoreConfig {
        path: path.to_path_buf(),
        error,
    };
    persist::check_flags(&opts.flags, &config).map_err(config_err)?;
    if let Some(note) = store.recovery_note() {
        eprintln!("evm: --store {}: {note}", path.display());
    }
    if let Some(w) = store.superblock_warning() {
        eprintln!("evm: --store {}: {w}", path.display());
    }
    let mut resume = if store.resumable() {
        store.last_epoch()
    } else {
        None
    };
    if opts.fresh && resume.is_some() {
        store.discard_machine_state().map_err(store_err(path))?;
        resume = None;
    }
    if resume.is_some() {
        persist::check_cpu(&config.cpu_features, supported).map_err(config_err)?;
    }
    Ok(Opened {
        store,
        config,
        resume,
    })
}

/// Build the VM described by `opts` and run it until it ends.
pub fn run(opts: &RunOptions) -> Result<RunEnd, VmError> {
    // Bad input is reported before anything is created.
    let faults = fault_plan()?;
    let flag_config = match opts.flags.kernel {
        Some(_) => {
            let c = config_from_flags(&opts.flags)?;
            open_boot_files(&c)?;
            open_disk(&c)?;
            Some(c)
        }
        None => None,
    };
    if opts.store.is_none() && flag_config.is_none() {
        return Err(VmError::NoKernel);
    }
    if let (None, Some((text, _))) = (&opts.store, &opts.flags.disk_size) {
        return Err(StoreDiskError::SizeWithoutStore(text.clone()).into());
    }
    // Bound before /dev/kvm is touched: a socket in use is bad input too.
    let api_listener = match &opts.api_sock {
        Some(p) => Some(crate::api::bind(p)?),
        None => None,
    };
    let kvm = host::open_kvm()?;
    if let Some(c) = &flag_config
        && !c.probe
        && host::is_pvm()
    {
        return Err(HostError::PvmCannotRunKernel {
            kvm: host::kvm_path(),
            kernel: c.kernel.clone(),
        }
        .into());
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let opened = match &opts.store {
        Some(path) => Some(open_or_create_store(path, opts, &supported)?),
        None => None,
    };
    let config = match (&opened, flag_config) {
        (Some(o), _) => o.config.clone(),
        (None, Some(c)) => c,
        (None, None) => return Err(VmError::NoKernel),
    };
    if !config.probe && host::is_pvm() {
        return Err(HostError::PvmCannotRunKernel {
            kvm: host::kvm_path(),
            kernel: config.kernel.clone(),
        }
        .into());
    }
    let resume = opened.as_ref().and_then(|o| o.resume);
    let machine_state = match (resume, &opened) {
        (Some(epoch), Some(o)) => {
            let bytes = o
                .store
                .read_state(epoch)
                .map_err(store_err(opts.store.as_deref().unwrap_or(Path::new(""))))?;
            Some((
                epoch,
                state::decode(&bytes).map_err(|e| VmError::Restore {
                    epoch,
                    reason: e.to_string(),
                })?,
            ))
        }
        _ => None,
    };
    let boot_files = if machine_state.is_none() {
        Some(open_boot_files(&config)?)
    } else {
        None
    };
    let (disk, epoch_disk) = match &opened {
        Some(o) if config.disk_bytes > 0 => {
            let (block, epoch) = store_disk::device(&o.store)?;
            (Some(block), Some(epoch))
        }
        _ => (open_disk(&config)?, None),
    };

    let vm = Arc::new(create_vm(&kvm)?);
    let mem = memory::create(config.mem_bytes)?;
    memory::register(&vm, &mem, opened.is_some())?;

    let devices_saved: Option<DeviceStates> = match &machine_state {
        Some((epoch, m)) => {
            Some(
                freeze::decode_devices(&m.devices).map_err(|e| VmError::Restore {
                    epoch: *epoch,
                    reason: format!("device state: {e}"),
                })?,
            )
        }
        None => None,
    };
    if let (Some((epoch, _)), Some(o)) = (&machine_state, &opened) {
        restore_memory(&o.store, *epoch, &mem, config.mem_bytes).map_err(|e| VmError::Restore {
            epoch: *epoch,
            reason: e,
        })?;
    }

    let (events_tx, events_rx) = channel::<VmEvent>();
    let machine_off = Arc::new(AtomicBool::new(false));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Os("eventfd", e))?;
    vm.register_irqfd(&com1_irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let serial = match &devices_saved {
        Some(d) => SerialPort::from_state(&d.serial, com1_irq, Box::new(std::io::stdout()))
            .map_err(|e| VmError::Restore {
                epoch: resume.unwrap_or(0),
                reason: e.to_string(),
            })?,
        None => SerialPort::new(com1_irq, Box::new(std::io::stdout())),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_BASE as u64, 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(power_handler(
            events_tx.clone(),
            machine_off.clone(),
        )))),
        I8042_BASE,
        I8042_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPower::new(power_handler(
            events_tx.clone(),
            machine_off.clone(),
        )))),
        ACPI_POWER_BASE,
        ACPI_POWER_LEN,
    )?;

    let mut virtio_devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(disk) = disk {
        virtio_devices.push(Box::new(disk));
    }
    virtio_devices.push(Box::new(Rng::new()));
    let saved_virtio: Vec<Option<&devices::virtio::MmioTransportState>> = match &devices_saved {
        Some(d) => {
            if d.virtio.len() != virtio_devices.len() {
                return Err(VmError::Restore {
                    epoch: resume.unwrap_or(0),
                    reason: format!(
                        "{} virtio devices saved, {} configured",
                        d.virtio.len(),
                        virtio_devices.len()
                    ),
                });
            }
            d.virtio.iter().map(Some).collect()
        }
        None => vec![None; virtio_devices.len()],
    };
    let attached = crate::virtio::attach(
        &vm,
        &mem,
        &mut mmio,
        virtio_devices.into_iter().zip(saved_virtio).collect(),
    )?;

    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for i in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if machine_state.is_none() {
            let mut c = supported.clone();
            cpuid::for_vcpu(&mut c, i, config.vcpus, tsc_deadline);
            cpu::setup_common(&vcpu, i, &c)?;
        }
        vcpus.push(vcpu);
    }

    match (&machine_state, boot_files) {
        (Some((epoch, m)), _) => restore_cpus(&vm, &vcpus, m, *epoch)?,
        (None, Some(mut files)) => {
            if config.probe {
                let probe_err = |source| BootError::Probe {
                    path: config.kernel.clone(),
                    source,
                };
                let boot = boot::probe::load(
                    &mem,
                    &mut files.kernel,
                    config.cmdline.as_deref().unwrap_or(""),
                    config.vcpus,
                )
                .map_err(probe_err)?;
                for (i, vcpu) in vcpus.iter().enumerate() {
                    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
                    boot::probe::setup_vcpu(vcpu, &boot, i as u8, tsc_khz).map_err(probe_err)?;
                }
            } else {
                let initrd = match (&config.initrd, files.initrd.as_mut()) {
                    (Some(p), Some(f)) => Some((p.as_path(), f)),
                    _ => None,
                };
                let boot = boot::linux::load(
                    &mem,
                    &config.kernel,
                    &mut files.kernel,
                    initrd,
                    config
                        .cmdline
                        .as_deref()
                        .unwrap_or(boot::linux::DEFAULT_CMDLINE),
                    config.mem_bytes,
                )?;
                acpi::write_tables(&mem, config.vcpus, &attached.described)?;
                cpu::setup_linux_boot_cpu(&mem, &vcpus[0], boot.entry)?;
            }
        }
        (None, None) => return Err(VmError::NoKernel),
    }
    if let Some(epoch) = resume {
        // Now that the IOAPIC and LAPICs hold their restored state, raise
        // again every interrupt the devices had pending at the freeze: one
        // raised while they were rebuilt met a masked, reset IOAPIC pin
        // and was lost (seen: a guest waiting forever for a virtio-blk
        // completion after a resume).
        let resignal = |what: &str, r: std::io::Result<bool>| match r {
            Ok(true) => log::debug!("resume: {what} interrupt raised again"),
            Ok(false) => {}
            Err(e) => log::warn!("resume: cannot raise the {what} interrupt again: {e}"),
        };
        resignal(
            "COM1",
            serial.lock().unwrap_or_else(|e| e.into_inner()).resignal(),
        );
        for t in &attached.transports {
            let t = t.lock().unwrap_or_else(|e| e.into_inner());
            resignal(t.device().name(), t.resignal());
        }
        log::info!("resumed from epoch {epoch}");
    }

    let quiesce = Quiesce {
        serial: serial.clone(),
        virtio: attached.transports.clone(),
        disk: epoch_disk,
    };
    attached
        .event_loop
        .spawn()
        .map_err(|e| VmError::Os("virtio thread", e))?;
    let running = Running {
        vm,
        mem,
        pio,
        mmio,
        serial,
        quiesce,
        events_tx,
        events_rx,
        machine_off,
        msrs: state::msr_indices_to_save(&kvm).map_err(|e| VmError::Run(e.to_string()))?,
    };
    let store = opened.map(|o| {
        let mut store = o.store;
        if let Some(plan) = faults {
            log::warn!(
                "EVM_INJECT_FAULT: store {:?} will fail with errno {} after {} more (testing)",
                plan.op,
                plan.errno,
                plan.skip
            );
            store.inject_faults(plan);
        }
        store
    });
    running.run(
        vcpus,
        store,
        Runtime {
            interval: opts.interval,
            api: api_listener,
            mem_bytes: config.mem_bytes,
            store_path: opts.store.clone(),
        },
    )
}

/// How the machine runs, besides its parts.
struct Runtime {
    interval: Duration,
    /// The bound control API socket.
    api: Option<crate::api::Bound>,
    mem_bytes: u64,
    store_path: Option<PathBuf>,
}

/// The store fault plan of `EVM_INJECT_FAULT`, if set: failures injected
/// into the store's writes or syncs from the first epoch on, to test how
/// evm rides out a failing store (`checkpoint::FaultPlan` has the syntax).
fn fault_plan() -> Result<Option<checkpoint::FaultPlan>, VmError> {
    match std::env::var("EVM_INJECT_FAULT") {
        Ok(v) if !v.is_empty() => Ok(Some(v.parse()?)),
        _ => Ok(None),
    }
}

/// Load the epoch's memory image into guest RAM.
fn restore_memory(store: &Store, epoch: u64, mem: &GuestMem, mem_bytes: u64) -> Result<(), String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let regions: Vec<_> = mem.iter().collect();
    if regions.len() == 1 {
        let r = regions[0];
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| e.to_string())?;
        // SAFETY: the region is a live mapping of `r.len()` bytes owned by
        // `mem`; no vCPU runs yet and no device thread exists, so nothing
        // else accesses it while this slice lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, r.len() as usize) };
        return store.read_memory(epoch, dst).map_err(|e| e.to_string());
    }
    // RAM split around the MMIO gap: the store holds it contiguously.
    let mut all = vec![0u8; mem_bytes as usize];
    store
        .read_memory(epoch, &mut all)
        .map_err(|e| e.to_string())?;
    let mut off = 0usize;
    for r in regions {
        let len = r.len() as usize;
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| e.to_string())?;
        // SAFETY: as above; `all[off..off + len]` is in bounds because the
        // regions' lengths sum to `mem_bytes`.
        unsafe { std::ptr::copy_nonoverlapping(all[off..].as_ptr(), host, len) };
        off += len;
    }
    Ok(())
}

fn restore_cpus(vm: &VmFd, vcpus: &[VcpuFd], m: &MachineState, epoch: u64) -> Result<(), VmError> {
    let fail = |reason: String| VmError::Restore { epoch, reason };
    if m.vcpus.len() != vcpus.len() {
        return Err(fail(format!(
            "{} vCPUs saved, {} configured",
            m.vcpus.len(),
            vcpus.len()
        )));
    }
    for (vcpu, s) in vcpus.iter().zip(&m.vcpus) {
        state::restore_vcpu(vcpu, s).map_err(|e| fail(e.to_string()))?;
    }
    state::restore_vm(vm, &m.vm).map_err(|e| fail(e.to_string()))
}

/// A built machine about to run.
struct Running {
    vm: Arc<VmFd>,
    mem: GuestMem,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialPort>>,
    quiesce: Quiesce,
    events_tx: Sender<VmEvent>,
    events_rx: std::sync::mpsc::Receiver<VmEvent>,
    /// Set when the guest asks for power-off or reset: no vCPU runs guest
    /// code after that.
    machine_off: Arc<AtomicBool>,
    msrs: Vec<u32>,
}

impl Running {
    fn run(self, vcpus: Vec<VcpuFd>, store: Option<Store>, rt: Runtime) -> Result<RunEnd, VmError> {
        vcpu::install_kick_handler().map_err(|e| {
            VmError::Os(
                "signal handler",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        })?;
        signals::forward_stop_signals(self.events_tx.clone())
            .map_err(|e| VmError::Os("signal thread", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu_count = vcpus.len();
        let pauser: Arc<Pauser<ParkedState>> = Arc::new(Pauser::new(vcpu_count));
        let msrs = Arc::new(self.msrs);
        let save: vcpu::SaveFn<ParkedState> =
            Arc::new(move |v: &VcpuFd| state::save_vcpu(v, &msrs).map_err(|e| e.to_string()));
        let mut terminal = RawTerminal::enter();
        let threads = Arc::new(Mutex::new(Vec::new()));
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                stop: stop.clone(),
                machine_off: self.machine_off.clone(),
                events: self.events_tx.clone(),
                pauser: pauser.clone(),
                save: save.clone(),
            };
            let t = vcpu::spawn(i as u8, vcpu, ctx).map_err(|e| VmError::Os("vCPU thread", e))?;
            threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        let gate = Arc::new(Gate::new(pauser, threads));
        console::spawn_pump(self.serial.clone()).map_err(|e| VmError::Os("console thread", e))?;
        console::spawn_stdin(self.serial.clone(), self.events_tx.clone())
            .map_err(|e| VmError::Os("stdin thread", e))?;
        let telemetry = Arc::new(Telemetry::new(
            rt.store_path.clone().filter(|_| store.is_some()),
            rt.interval,
            vcpu_count,
            rt.mem_bytes,
        ));
        let mode = crate::freeze::FreezeMode::from_env();
        let cow = store
            .as_ref()
            .filter(|_| mode == crate::freeze::FreezeMode::Cow)
            .and_then(|_| crate::cow::for_freeze(&self.mem));
        let checkpointer = match store {
            Some(store) => Some(
                Checkpointer::spawn(
                    Freezer {
                        vm: self.vm.clone(),
                        mem: self.mem.clone(),
                        gate: gate.clone(),
                        devices: self.quiesce.clone(),
                        staging: Mutex::new(Vec::new()),
                        freeze_staging: Mutex::new(Vec::new()),
                        precopy: mode == crate::freeze::FreezeMode::Precopy,
                        cow: cow.clone(),
                        early: Mutex::new(Vec::new()),
                    },
                    store,
                    rt.interval,
                    telemetry.clone(),
                )
                .map_err(|e| VmError::Os("checkpoint thread", e))?,
            ),
            None => None,
        };
        let api = match rt.api {
            Some(bound) => Some(
                ApiServer::spawn(
                    bound,
                    Control {
                        telemetry,
                        gate: gate.clone(),
                        epochs: checkpointer.as_ref().map(Checkpointer::epoch_now),
                        events: Mutex::new(self.events_tx.clone()),
                    },
                )
                .map_err(|e| VmError::Os("API thread", e))?,
            ),
            None => None,
        };
        let event = self
            .events_rx
            .recv()
            .unwrap_or_else(|_| VmEvent::Error("every vCPU thread ended".into()));
        if matches!(event, VmEvent::PowerOff | VmEvent::Reset) {
            // The machine is off: vCPUs still in KVM_RUN (another vCPU may
            // still be running guest code) come out and hold.
            gate.kick_all();
        }
        let outcome = match (&event, checkpointer) {
            (VmEvent::PowerOff | VmEvent::Reset, Some(c)) => c
                .discard()
                .map(|()| None)
                .map_err(|e| format!("marking the store powered off: {e}")),
            (VmEvent::Escape | VmEvent::Signal(_) | VmEvent::ApiStop, Some(c)) => c
                .finish()
                .map(|epoch| {
                    log::info!("final epoch {epoch} committed");
                    Some(epoch)
                })
                .map_err(|e| {
                    format!("final epoch failed: {e}; the store holds the last committed one")
                }),
            _ => Ok(None),
        };
        // The checkpoint thread has ended, and with it every capture: no
        // page is protected any more.
        if let Some(c) = &cow {
            c.shutdown();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        // Paused vCPUs must leave their park to see the stop.
        gate.resume();
        gate.kick_all();
        if let Some(api) = &api {
            api.stop_reply().stopped(outcome.clone());
        }
        drop(api);
        terminal.restore();
        outcome.map_err(VmError::Run)?;
        match event {
            VmEvent::PowerOff => Ok(RunEnd::PowerOff),
            VmEvent::Reset => Ok(RunEnd::Reset),
            VmEvent::Escape | VmEvent::Signal(_) | VmEvent::ApiStop => Ok(RunEnd::Stopped),
            VmEvent::Error(m) => Err(VmError::Run(m)),
        }
    }
}
