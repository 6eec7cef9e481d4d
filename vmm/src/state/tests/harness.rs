//! A tiny VMM for the state tests: boots the probe guest (or a synthetic
//! probe-format image) the way evm sets up vCPUs, runs it on real KVM,
//! parks the vCPUs the way a freeze must (after a `KVM_RUN` that returned
//! `EINTR`), and resumes a saved machine in a fresh VM.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use devices::GuestMem;
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::state::{MachineState, restore_vcpu, restore_vm, save_vcpu, save_vm};
use crate::{boot, cpu, cpuid, memory, vcpu};

/// Opens `/dev/kvm`; without it the test fails (never skips).
pub fn kvm() -> Kvm {
    let kvm = Kvm::new().unwrap_or_else(|e| {
        panic!("cannot open /dev/kvm ({e}): the state tests need KVM and never skip")
    });
    let version = kvm.get_api_version();
    assert_eq!(
        version, 12,
        "/dev/kvm answers API version {version}, not KVM's 12: the state tests need KVM"
    );
    kvm
}

fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .filter(|d| d.join("guest-images/probe/build.sh").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no guest-images/probe/build.sh above {}",
                manifest.display()
            )
        })
        .to_path_buf()
}

/// Builds (if its sources changed) and returns `.cache/probe/probe.elf`.
pub fn probe_elf() -> PathBuf {
    static BUILD: Once = Once::new();
    let root = repo_root();
    let cache = std::env::var_os("EVM_CACHE").map_or_else(|| root.join(".cache"), PathBuf::from);
    BUILD.call_once(|| {
        let out = std::process::Command::new("sh")
            .arg(root.join("guest-images/probe/build.sh"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run guest-images/probe/build.sh: {e}"));
        assert!(
            out.status.success(),
            "guest-images/probe/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    cache.join("probe/probe.elf")
}

/// A probe-format ELF (EVMPROBE note, ABI 1) whose code is `code`, placed
/// at its entry point 0x400200; written to a temporary file.
pub fn code_image(code: &[u8]) -> vmm_sys_util::tempfile::TempFile {
    assert!(code.len() <= 0xe00, "code too long");
    let mut f = vec![0u8; 0x1000];
    let put = |f: &mut Vec<u8>, at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    put(&mut f, 0, b"\x7fELF\x02\x01\x01");
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &0x40_0200u64.to_le_bytes()); // entry
    put(&mut f, 32, &64u64.to_le_bytes()); // program headers
    put(&mut f, 52, &64u16.to_le_bytes());
    put(&mut f, 54, &56u16.to_le_bytes());
    put(&mut f, 56, &2u16.to_le_bytes());
    // PT_LOAD R+X: the whole 4 KiB file at 4 MiB.
    put(&mut f, 64, &1u32.to_le_bytes());
    put(&mut f, 68, &5u32.to_le_bytes());
    for (k, v) in [0u64, 0x40_0000, 0x40_0000, 0x1000, 0x1000]
        .iter()
        .enumerate()
    {
        put(&mut f, 72 + 8 * k, &v.to_le_bytes());
    }
    // PT_NOTE at 0x180: name "EVMPROBE", type 1, descriptor = ABI 1.
    put(&mut f, 120, &4u32.to_le_bytes());
    put(&mut f, 124, &4u32.to_le_bytes());
    for (k, v) in [0x180u64, 0, 0, 28, 28].iter().enumerate() {
        put(&mut f, 128 + 8 * k, &v.to_le_bytes());
    }
    put(&mut f, 0x180, &9u32.to_le_bytes());
    put(&mut f, 0x184, &4u32.to_le_bytes());
    put(&mut f, 0x188, &1u32.to_le_bytes());
    put(&mut f, 0x18c, b"EVMPROBE\0");
    put(&mut f, 0x198, &boot::probe::PROBE_ABI_VERSION.to_le_bytes());
    put(&mut f, 0x200, code);
    let tmp = vmm_sys_util::tempfile::TempFile::new().expect("temp file");
    tmp.as_file().write_all(&f).expect("write image");
    tmp
}

/// Guest RAM contents: `(guest address, bytes)` per region.
pub type MemoryImage = Vec<(u64, Vec<u8>)>;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// `until` said so; every vCPU is parked.
    Stopped,
    /// The guest wrote the power-off command.
    PowerOff,
    /// Neither within the time limit.
    Timeout,
    /// A vCPU failed: an unexpected exit or ioctl error.
    Failed(String),
}

/// What the guest has produced so far in a run.
#[derive(Debug, Default)]
pub struct Seen {
    /// Bytes written to COM1.
    pub text: String,
    /// Other `out`s: (vCPU, port, value of up to 4 bytes).
    pub ports: Vec<(u8, u16, u32)>,
}

/// A VM with its memory and (parked) vCPUs.
#[derive(Debug)]
pub struct Machine {
    pub vm: VmFd,
    pub mem: GuestMem,
    pub vcpus: Vec<VcpuFd>,
}

fn fresh_vm(kvm: &Kvm, mem_bytes: u64) -> (VmFd, GuestMem) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).expect("KVM_CREATE_PIT2");
    let mem = memory::create(mem_bytes).expect("guest memory");
    memory::register(&vm, &mem, false).expect("register guest memory");
    (vm, mem)
}

impl Machine {
    /// Boots `image` (a probe-format ELF) with `cmdline` on `vcpus` vCPUs
    /// and `mem_mib` MiB, set up as `evm run` sets up a probe guest.
    pub fn boot(kvm: &Kvm, image: &Path, cmdline: &str, vcpus: u8, mem_mib: u64) -> Machine {
        let (vm, mem) = fresh_vm(kvm, mem_mib << 20);
        let mut file = File::open(image).expect("open the image");
        let boot = boot::probe::load(&mem, &mut file, cmdline, vcpus).expect("load the image");
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let fds = (0..vcpus)
            .map(|i| {
                let fd = vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU");
                let mut c = supported.clone();
                cpuid::for_vcpu(&mut c, i, vcpus, deadline);
                cpu::setup_common(&fd, i, &c).expect("vCPU set-up");
                let khz = fd.get_tsc_khz().unwrap_or(0);
                boot::probe::setup_vcpu(&fd, &boot, i, khz).expect("probe vCPU set-up");
                fd
            })
            .collect();
        Machine {
            vm,
            mem,
            vcpus: fds,
        }
    }

    /// Programs every vCPU the way a running Linux guest would have it —
    /// syscall MSRs, PAT, an MTRR range, kvmclock, steal time, PV EOI,
    /// async page faults, and the LAPIC timer in TSC-deadline mode with a
    /// deadline an hour away — so that saving and restoring must carry
    /// non-default values. The pages KVM writes (kvmclock, steal time) are
    /// in the last 64 KiB of RAM, which the probe never touches; nothing
    /// here sends the probe an interrupt.
    pub fn program_like_linux(&self) {
        let ram_end = self
            .mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        for (i, fd) in self.vcpus.iter().enumerate() {
            let page = ram_end - 0x1_0000 + 0x1000 * i as u64;
            let tsc = fd.get_tsc_khz().map_or(1_000_000, u64::from) * 1000;
            let now = crate::state::tests::kvm_tsc(fd);
            let mut lapic = fd.get_lapic().expect("KVM_GET_LAPIC");
            let lvtt: u32 = 0xef | (2 << 17); // vector 0xef, TSC-deadline, unmasked
            for (k, b) in lvtt.to_le_bytes().iter().enumerate() {
                lapic.regs[0x320 + k] = *b as libc::c_char;
            }
            fd.set_lapic(&lapic).expect("KVM_SET_LAPIC");
            let msrs: Vec<kvm_bindings::kvm_msr_entry> = [
                (0x174, 0x10),
                (0x175, 0xffff_8880_0000_1000 + i as u64),
                (0x176, 0xffff_ffff_8100_0000),
                (0xc000_0081, 0x0023_0010_0000_0000),
                (0xc000_0082, 0xffff_ffff_8100_0040),
                (0xc000_0083, 0xffff_ffff_8100_0080),
                (0xc000_0084, 0x4_7700),
                (0xc000_0102, 0xffff_8880_7fc0_0000 + (i as u64) * 0x1000),
                (0x277, 0x0407_0506_0007_0406),
                (0x200, 0xc000_0000),              // MTRR range 0: 3 GiB.., UC
                (0x201, 0xff_c000_0800),           // 1 GiB, valid
                (0x4b56_4d01, page | 1),           // kvmclock, enabled
                (0x4b56_4d00, page + 0x100),       // wall clock
                (0x4b56_4d03, (page + 0x200) | 1), // steal time, enabled
                (0x4b56_4d04, (page + 0x300) | 1), // PV EOI, enabled
                (0x4b56_4d06, 0xec),               // async PF vector
                (0x4b56_4d02, (page + 0x400) | 1 | 8), // async PF on, as an interrupt
                (0x6e0, now + 3600 * tsc),         // TSC deadline in an hour
            ]
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
            let set = fd
                .set_msrs(&kvm_bindings::Msrs::from_entries(&msrs).expect("MSR list"))
                .expect("KVM_SET_MSRS");
            assert_eq!(
                set,
                msrs.len(),
                "KVM refused MSR {:#x}",
                msrs[set.min(msrs.len() - 1)].index
            );
        }
    }

    /// A copy of all guest RAM.
    pub fn memory(&self) -> MemoryImage {
        self.mem
            .iter()
            .map(|r| {
                let mut bytes = vec![0u8; r.len() as usize];
                self.mem
                    .read_slice(&mut bytes, r.start_addr())
                    .expect("read guest memory");
                (r.start_addr().0, bytes)
            })
            .collect()
    }

    /// Saves every vCPU and the VM (the vCPUs are parked).
    pub fn save(&self, msrs: &[u32], devices: Vec<u8>) -> MachineState {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| save_vcpu(v, msrs).expect("save_vcpu"))
            .collect();
        MachineState::new(vcpus, save_vm(&self.vm).expect("save_vm"), devices)
    }

    /// A fresh VM holding `image` and `state`, ready to run: VM state
    /// first, then each vCPU's.
    pub fn resume(kvm: &Kvm, state: &MachineState, image: &MemoryImage) -> Machine {
        let bytes = image.iter().map(|(_, b)| b.len() as u64).sum();
        let (vm, mem) = fresh_vm(kvm, bytes);
        for (gpa, b) in image {
            mem.write_slice(b, GuestAddress(*gpa))
                .expect("write guest memory");
        }
        restore_vm(&vm, &state.vm).expect("restore_vm");
        let vcpus = state
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let fd = vm.create_vcpu(i as u64).expect("KVM_CREATE_VCPU");
                restore_vcpu(&fd, s).expect("restore_vcpu");
                fd
            })
            .collect();
        Machine { vm, mem, vcpus }
    }

    /// Runs every vCPU until `until` (called every millisecond with what
    /// the guest produced in this run) returns true — then parks them all —
    /// or the guest powers off, a vCPU fails, or `timeout` passes.
    pub fn run(&mut self, timeout: Duration, until: &mut dyn FnMut(&Seen) -> bool) -> (End, Seen) {
        vcpu::install_kick_handler().expect("kick handler");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let end = Arc::new(Mutex::new(None::<End>));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let (seen, end, stop) = (seen.clone(), end.clone(), stop.clone());
            threads.push(thread::spawn(move || {
                vcpu_loop(index as u8, fd, &seen, &end, &stop)
            }));
        }
        let started = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(1));
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if until(&seen.lock().expect("lock")) {
                end.lock().expect("lock").get_or_insert(End::Stopped);
                break;
            }
            if started.elapsed() > timeout {
                end.lock().expect("lock").get_or_insert(End::Timeout);
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // Spinning in the guest, a vCPU leaves KVM_RUN on the signal.
                let _ = t.kill(vcpu::kick_signal());
            }
            thread::sleep(Duration::from_micros(200));
        }
        self.vcpus = threads
            .into_iter()
            .map(|t| t.join().expect("vCPU thread"))
            .collect();
        let end = end.lock().expect("lock").take().unwrap_or(End::Timeout);
        let seen = std::mem::take(&mut *seen.lock().expect("lock"));
        (end, seen)
    }
}

/// Runs one vCPU until `stop`, and parks it only after a `KVM_RUN` that
/// returned `EINTR`: with `immediate_exit` set, that call first completes
/// an `out` the last exit left half done (RIP still on it).
fn vcpu_loop(
    index: u8,
    mut fd: VcpuFd,
    seen: &Mutex<Seen>,
    end: &Mutex<Option<End>>,
    stop: &AtomicBool,
) -> VcpuFd {
    let finish = |why: End| {
        end.lock().expect("lock").get_or_insert(why);
        stop.store(true, Ordering::SeqCst);
    };
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping {
            fd.set_kvm_immediate_exit(1);
        }
        match fd.run() {
            Ok(VcpuExit::IoOut(0x3f8, data)) => {
                let text = String::from_utf8_lossy(data).into_owned();
                seen.lock().expect("lock").text.push_str(&text);
            }
            Ok(VcpuExit::IoOut(0x600, &[0x34])) => finish(End::PowerOff),
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let v = u32::from_le_bytes(b);
                seen.lock().expect("lock").ports.push((index, port, v));
            }
            Ok(exit) => {
                let exit = format!("{exit:?}");
                let rip = fd.get_regs().map(|r| r.rip);
                finish(End::Failed(format!(
                    "vCPU {index}: unexpected exit {exit} at rip {rip:x?}"
                )));
            }
            // KVM completes a pending exit before it looks for signals or
            // immediate_exit, so after any EINTR the state is whole.
            Err(e) if e.errno() == libc::EINTR => {
                if stopping || stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(e) => finish(End::Failed(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }
    fd.set_kvm_immediate_exit(0);
    fd
}
