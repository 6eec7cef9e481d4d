//! vCPU threads: one per vCPU, each running `KVM_RUN` and routing port and
//! MMIO exits through the buses. A vCPU is kicked out of `KVM_RUN` with
//! `immediate_exit` plus a signal (the freeze of later issues builds on it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Why the machine stops, as reported to the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (reboot, or a triple fault).
    Reset,
    /// The user typed the console escape.
    Escape,
    /// Something failed; the message says what.
    Error(String),
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick handler; without it the signal would kill us.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Interrupt `KVM_RUN` on this thread.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread_t comes from a JoinHandle that has not been
        // joined, so the thread (or its zombie) still exists; sending a
        // signal for which a handler is installed has no other effect.
        unsafe {
            libc::pthread_kill(self.handle.as_pthread_t(), kick_signal());
        }
    }
}

/// Start vCPU `index` on its own thread.
pub fn spawn(
    index: u8,
    mut vcpu: VcpuFd,
    pio: Bus,
    mmio: Bus,
    stop: Arc<AtomicBool>,
    events: Sender<VmEvent>,
) -> std::io::Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let event = run_loop(index, &mut vcpu, &pio, &mmio, &stop);
            if let Some(e) = event {
                let _ = events.send(e);
            }
        })?;
    Ok(VcpuThread { handle })
}

fn run_loop(
    index: u8,
    vcpu: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    stop: &AtomicBool,
) -> Option<VmEvent> {
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(port as u64, data) {
                    log::trace!("vcpu{index}: in from unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !pio.write(port as u64, data) {
                    log::trace!("vcpu{index}: out to unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    log::debug!("vcpu{index}: read from unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    log::debug!("vcpu{index}: write to unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Shutdown) => {
                log::info!("vcpu{index}: triple fault; treating it as a reset");
                return Some(VmEvent::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                    other => VmEvent::Error(format!("vcpu{index}: system event {other}")),
                });
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip, HLT does not exit unless the
                // guest halted with interrupts off: it will never wake.
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: guest halted with interrupts disabled"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: KVM internal error (the guest ran something KVM cannot emulate)"
                )));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VmEvent::Error(format!(
                    "vcpu{index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::debug!("vcpu{index}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                return Some(VmEvent::Error(format!("vcpu{index}: KVM_RUN failed: {e}")));
            }
        }
    }
}
