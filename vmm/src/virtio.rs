//! Wiring virtio-mmio devices into the VM: a window on the MMIO bus, an
//! ioeventfd per queue (guest notifications never exit to a vCPU thread),
//! an irqfd for the interrupt, an ACPI description, and the event loop
//! thread that serves the queues.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice, VirtioSubscriber};
use devices::{Bus, GuestMem};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};

use crate::acpi::MmioDevice;
use crate::memory::{VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Too many devices for the GSIs evm hands out.
    #[error("at most {VIRTIO_MAX_DEVICES} virtio devices")]
    TooMany,
    /// The transport refused the device.
    #[error("virtio device {0}")]
    Transport(String, #[source] devices::virtio::MmioError),
    /// KVM refused an eventfd.
    #[error("KVM: {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The MMIO bus refused the window.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// The event loop could not be set up.
    #[error("virtio event loop: {0}")]
    EventLoop(String),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The thread-to-be that serves every virtio queue.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLoop")
    }
}

impl EventLoop {
    /// Start serving on a thread of its own.
    pub fn spawn(mut self) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                loop {
                    if let Err(e) = self.manager.run() {
                        log::error!("virtio event loop: {e:?}");
                    }
                }
            })?;
        Ok(())
    }
}

/// The virtio devices of a running VM.
#[derive(Debug)]
pub struct Attached {
    /// What the DSDT must describe.
    pub described: Vec<MmioDevice>,
    /// The transports, in window order (the freeze locks and saves them).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The event loop to start.
    pub event_loop: EventLoop,
}

/// Attach `devices` at consecutive virtio-mmio windows, each fresh or
/// restored from its saved transport state.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMem,
    mmio: &mut Bus,
    devices: Vec<(Box<dyn VirtioDevice>, Option<&MmioTransportState>)>,
) -> Result<Attached, VirtioError> {
    if devices.len() > VIRTIO_MAX_DEVICES as usize {
        return Err(VirtioError::TooMany);
    }
    debug_assert_eq!(MMIO_SIZE, VIRTIO_MMIO_SIZE);
    let mut manager =
        EventManager::<Subscriber>::new().map_err(|e| VirtioError::EventLoop(format!("{e:?}")))?;
    let mut described = Vec::new();
    let mut transports = Vec::new();
    for (i, (dev, saved)) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let name = dev.name().to_string();
        let transport = match saved {
            None => MmioTransport::new(mem.clone(), dev),
            Some(state) => MmioTransport::restore(mem.clone(), dev, state),
        }
        .map_err(|e| VirtioError::Transport(name.clone(), e))?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                q as u32,
            )
            .map_err(|e| VirtioError::Kvm("KVM_IOEVENTFD", e))?;
        }
        vm.register_irqfd(transport.interrupt().irqfd(), gsi)
            .map_err(|e| VirtioError::Kvm("KVM_IRQFD", e))?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        transports.push(transport.clone());
        let sub = VirtioSubscriber::new(transport)
            .map_err(|e| VirtioError::EventLoop(format!("{name}: {e}")))?;
        manager.add_subscriber(Arc::new(Mutex::new(sub)));
        described.push(MmioDevice {
            base,
            len: VIRTIO_MMIO_SIZE,
            gsi,
        });
    }
    Ok(Attached {
        described,
        transports,
        event_loop: EventLoop { manager },
    })
}
