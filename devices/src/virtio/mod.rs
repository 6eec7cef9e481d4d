//! virtio: the MMIO transport and the devices behind it.
//!
//! The split of work:
//! - [`mmio::MmioTransport`] is the register file the guest driver sees
//!   (virtio-mmio version 2). It owns the virtqueues' configuration, the
//!   device status state machine and one notify [`EventFd`] per queue.
//! - A [`VirtioDevice`] (virtio-blk in [`block`], virtio-rng in [`rng`]) owns
//!   what is specific to the device: features, config space and the handling
//!   of the requests on its queues.
//! - [`subscriber::VirtioSubscriber`] runs on the VMM's event loop: it waits
//!   on the queue notify eventfds (which the VMM registers as KVM
//!   ioeventfds) and processes the notified queue.
//! - The device raises interrupts through [`VirtioInterrupt`], whose eventfd
//!   the VMM registers as a KVM irqfd.

pub mod block;
pub mod mmio;
pub mod rng;
pub mod subscriber;

#[cfg(test)]
mod test_utils;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::GuestMem;

pub use block::{Block, BlockError, BlockMap, BlockState, CommittedBlocks, EpochDisk};
pub use mmio::{MmioError, MmioTransport, MmioTransportState, VirtqState};
pub use rng::{Rng, RngState};
pub use subscriber::VirtioSubscriber;

/// Feature bit: the device complies with virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Features every evm virtio device offers (transport and ring features).
pub const COMMON_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// ISR bit: the device used a buffer on some queue.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// ISR bit: the device's configuration (or status, e.g. NEEDS_RESET) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The interrupt of one virtio-mmio device: the ISR bits the driver reads
/// from `InterruptStatus`, and the eventfd the VMM registers as a KVM irqfd
/// at the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// A new interrupt with a fresh (non-blocking) eventfd and no bits set.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register with KVM (`register_irqfd(&irqfd, gsi)`).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Set `bits` (see [`INTERRUPT_USED_BUFFER`], [`INTERRUPT_CONFIG_CHANGE`])
    /// in the ISR and signal the guest.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The current ISR value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clear `bits` of the ISR (the driver's write to `InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Overwrite the ISR (device reset, state restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device has no usable queue.
    #[error("virtio {device}: no queue is ready")]
    NoReadyQueue {
        /// Device name.
        device: &'static str,
    },
    /// A device-specific failure.
    #[error("virtio {device}: {reason}")]
    Device {
        /// Device name.
        device: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// A queue that the driver broke so badly that the device must be reset
/// (the transport then sets DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Reading the available ring or writing the used ring failed.
    #[error("virtqueue {index}: {source}")]
    Ring {
        /// Queue index.
        index: usize,
        /// The virtio-queue error.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Errors of restoring saved device state: the saved state does not fit the
/// device it is restored into, or is inconsistent in itself.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The saved state belongs to another kind of device.
    #[error("saved state is for a virtio {saved} device, not {device}")]
    WrongDevice {
        /// The device kind the state was saved from.
        saved: &'static str,
        /// The device kind being restored.
        device: &'static str,
    },
    /// A field has a value the device cannot have.
    #[error("saved virtio {device} state: {reason}")]
    Invalid {
        /// Device name.
        device: &'static str,
        /// What is wrong, with the value.
        reason: String,
    },
}

/// Saved state of the device behind a transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioDeviceState {
    /// A virtio-blk device.
    Block(BlockState),
    /// A virtio-rng device.
    Rng(RngState),
}

impl VirtioDeviceState {
    /// The device kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "block",
            Self::Rng(_) => "rng",
        }
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Short name for messages ("block", "rng").
    fn name(&self) -> &'static str;
    /// The virtio device id (2 = block, 4 = entropy).
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn avail_features(&self) -> u64;
    /// The features the driver acknowledged (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    /// Record the features the driver acknowledged at FEATURES_OK. The
    /// transport only passes subsets of `avail_features`.
    fn ack_features(&mut self, features: u64);
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read from the device configuration space (`offset` from its start).
    /// Bytes beyond the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving: the driver set DRIVER_OK with valid queues.
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether `activate` succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Return to the state before feature negotiation (driver wrote 0 to
    /// Status). Drops the memory and interrupt handles.
    fn reset(&mut self);
    /// Handle the available requests on queue `index`. Returns `Ok(true)`
    /// when it stopped early (per-call budget spent) and requests remain.
    fn process_queue(&mut self, index: usize, queue: &mut Queue) -> Result<bool, QueueError>;
    /// The device's saved state.
    fn save_state(&self) -> VirtioDeviceState;
    /// Restore the device's state (before re-activation by the transport).
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError>;
}

/// How many guest driver mistakes a device logs at warn level before the
/// rest go to debug level: a broken or hostile driver must not flood logs.
const MAX_GUEST_WARNINGS: u32 = 16;

/// A rate limiter for log lines about guest driver mistakes.
#[derive(Debug, Default)]
pub(crate) struct GuestWarnings {
    logged: u32,
}

impl GuestWarnings {
    /// Log `what` about device `who`.
    pub(crate) fn warn(&mut self, who: &str, what: fmt::Arguments<'_>) {
        if self.logged < MAX_GUEST_WARNINGS {
            self.logged += 1;
            log::warn!("virtio {who}: {what}");
            if self.logged == MAX_GUEST_WARNINGS {
                log::warn!("virtio {who}: further guest driver errors are logged at debug level");
            }
        } else {
            log::debug!("virtio {who}: {what}");
        }
    }
}

/// Serve the available chains of `queue` with `handle`, which returns the
/// number of bytes it wrote into the chain's buffers. At most `queue.size()`
/// chains are handled per call (returns `Ok(true)` if more remain), so a
/// driver that keeps the ring full cannot monopolise the event loop. Raises
/// the used-buffer interrupt once if the driver asked for it.
pub(crate) fn serve_queue<F>(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMem,
    interrupt: &VirtioInterrupt,
    mut handle: F,
) -> Result<bool, QueueError>
where
    F: FnMut(DescriptorChain<&GuestMem>) -> u32,
{
    let ring = |source| QueueError::Ring { index, source };
    let mut budget = usize::from(queue.size());
    let mut used_any = false;
    let mut more = false;
    'outer: loop {
        queue.disable_notification(mem).map_err(ring)?;
        while let Some(chain) = queue.iter(mem).map_err(ring)?.next() {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len).map_err(ring)?;
            used_any = true;
            budget -= 1;
            if budget == 0 {
                // Notifications stay disabled; the caller re-arms the queue
                // event and the next call carries on.
                more = true;
                break 'outer;
            }
        }
        if !queue.enable_notification(mem).map_err(ring)? {
            break;
        }
    }
    if used_any
        && queue.needs_notification(mem).map_err(ring)?
        && let Err(e) = interrupt.trigger(INTERRUPT_USED_BUFFER)
    {
        log::error!("virtio queue {index}: cannot signal the guest: {e}");
    }
    Ok(more)
}

/// Copy config bytes at `offset` into `data`; bytes past the end read 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Repeat a read(2)-like call `op(done)` until `len` bytes are transferred,
/// retrying EINTR. Stops early only when `op` returns 0 (end of file).
/// Returns the bytes transferred.
pub(crate) fn transfer_all(len: usize, mut op: impl FnMut(usize) -> isize) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        let ret = op(done);
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ret == 0 {
            break;
        }
        done += ret.unsigned_abs();
    }
    Ok(done)
}
