//! The virtio-mmio transport, version 2 ("modern"), as in the virtio 1.2
//! specification, section 4.2.2.
//!
//! The register file is 0x100 bytes of 32-bit registers, followed by the
//! device's configuration space. The guest driver reaches it through the
//! MMIO bus ([`BusDevice`]); queue notifications normally bypass the bus as
//! KVM ioeventfds on [`QUEUE_NOTIFY_OFFSET`] (see [`MmioTransport::queue_events`]).

mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, GuestWarnings, INTERRUPT_CONFIG_CHANGE, StateError, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioInterrupt,
};
use crate::{BusDevice, GuestMem};

pub use state::{MmioTransportState, VirtqState};

/// `MagicValue`: "virt" in little-endian ASCII.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// `Version`: 2, the modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID`: "EVM" in little-endian ASCII.
pub const VENDOR_ID: u32 = 0x004d_5645;
/// Size of the MMIO window of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify`: register the queue eventfds at `base + this`,
/// with the queue index (u32) as datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

const STATUS_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const STATUS_ALL: u32 = STATUS_ACK
    | STATUS_DRIVER
    | STATUS_FEATURES_OK
    | STATUS_DRIVER_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// Errors of building or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device asked for a queue size virtio-queue refuses.
    #[error("virtio {device}: queue {index} maximum size {max_size} is invalid")]
    QueueSize {
        /// Device name.
        device: &'static str,
        /// Queue index.
        index: usize,
        /// The refused size.
        max_size: u16,
    },
    /// Creating an eventfd failed.
    #[error("virtio {device}: cannot create an eventfd")]
    EventFd {
        /// Device name.
        device: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The saved state does not fit.
    #[error(transparent)]
    State(#[from] StateError),
    /// Re-activating a restored device failed.
    #[error("restoring an active device")]
    Activate(#[source] ActivateError),
}

/// A virtio device behind the virtio-mmio (version 2) register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    warnings: GuestWarnings,
}

impl fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &format_args!("{:#x}", self.status))
            .field(
                "driver_features",
                &format_args!("{:#x}", self.driver_features),
            )
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`. Creates the
    /// interrupt (irqfd) and one notify eventfd per queue.
    pub fn new(mem: GuestMem, device: Box<dyn VirtioDevice>) -> Result<Self, MmioError> {
        let name = device.name();
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size).map_err(|_| MmioError::QueueSize {
                    device: name,
                    index,
                    max_size,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let evt_err = |source| MmioError::EventFd {
            device: name,
            source,
        };
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(evt_err))
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt = Arc::new(VirtioInterrupt::new().map_err(evt_err)?);
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            warnings: GuestWarnings::default(),
        })
    }

    /// One notify eventfd per queue, in queue order. Register each with KVM
    /// as an ioeventfd at MMIO address `base + QUEUE_NOTIFY_OFFSET`,
    /// datamatch `index as u32`.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt; register `interrupt().irqfd()` with KVM at
    /// the device's GSI.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device serves its queues (DRIVER_OK, activated, and not
    /// waiting for a reset).
    pub fn is_activated(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_NEEDS_RESET == 0
            && self.device.is_activated()
    }

    /// Serve queue `index` after a notification. Does nothing unless the
    /// device is activated and the queue ready. If the device stopped early
    /// with work left, the queue's eventfd is re-armed so the event loop
    /// comes back; if the driver broke the queue, the device is marked
    /// DEVICE_NEEDS_RESET.
    pub fn process_queue(&mut self, index: usize) {
        if !self.is_activated() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        match self.device.process_queue(index, queue) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.queue_evts[index].write(1) {
                    log::error!(
                        "virtio {}: cannot re-arm queue {index}: {e}",
                        self.device.name()
                    );
                }
            }
            Err(e) => self.needs_reset(format_args!("{e}")),
        }
    }

    /// Log a guest mistake that is ignored.
    fn complain(&mut self, what: fmt::Arguments<'_>) {
        self.warnings.warn(self.device.name(), what);
    }

    /// The driver broke the device: set DEVICE_NEEDS_RESET and tell it.
    fn needs_reset(&mut self, why: fmt::Arguments<'_>) {
        self.complain(format_args!("{why}; device needs reset"));
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0
            && let Err(e) = self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE)
        {
            log::error!(
                "virtio {}: cannot signal the guest: {e}",
                self.device.name()
            );
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        // Drop notifications that arrived for the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.set_status(0);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let features = self.device.avail_features();
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| q.max_size().into())
            }
            reg::VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a length of all ones says so.
            reg::VIRTIO_MMIO_SHM_LEN_LOW
            | reg::VIRTIO_MMIO_SHM_LEN_HIGH
            | reg::VIRTIO_MMIO_SHM_BASE_LOW
            | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.complain(format_args!(
                    "read of write-only or unknown register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        log::error!(
                            "virtio {}: cannot notify queue {value}: {e}",
                            self.device.name()
                        );
                    }
                }
                None => self.complain(format_args!("notify of nonexistent queue {value}")),
            },
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_SHM_SEL => {}
            _ => self.complain(format_args!(
                "write of read-only or unknown register {offset:#x} (value {value:#x})"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let status = self.status;
        if status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) != STATUS_DRIVER {
            self.complain(format_args!(
                "DriverFeatures written in status {status:#x}, ignored"
            ));
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel if value != 0 => {
                self.complain(format_args!(
                    "driver acked features {value:#x} in word {sel}"
                ));
            }
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u32, value: u32) {
        let index = self.queue_select as usize;
        let status = self.status;
        let configurable = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK;
        let Some(queue) = self.queues.get_mut(index) else {
            self.complain(format_args!(
                "write to register {offset:#x} of nonexistent queue {index}"
            ));
            return;
        };
        if offset == reg::VIRTIO_MMIO_QUEUE_READY && value == 0 && !queue.ready() {
            // Linux's del_vq, usually after a reset: nothing to do.
            return;
        }
        if !configurable {
            self.complain(format_args!(
                "queue {index} register {offset:#x} written in status {status:#x}, ignored"
            ));
            return;
        }
        if queue.ready() && offset != reg::VIRTIO_MMIO_QUEUE_READY {
            self.complain(format_args!(
                "queue {index} register {offset:#x} written while the queue is ready, ignored"
            ));
            return;
        }
        let low = |a: GuestAddress| GuestAddress((a.0 & !0xffff_ffff) | u64::from(value));
        let high = |a: GuestAddress| GuestAddress((a.0 & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            reg::VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => queue.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            },
            reg::VIRTIO_MMIO_QUEUE_READY => {
                queue.set_ready(value == 1);
                Ok(())
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                queue.try_set_desc_table_address(low(GuestAddress(queue.desc_table())))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(high(GuestAddress(queue.desc_table())))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                queue.try_set_avail_ring_address(low(GuestAddress(queue.avail_ring())))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                queue.try_set_avail_ring_address(high(GuestAddress(queue.avail_ring())))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                queue.try_set_used_ring_address(low(GuestAddress(queue.used_ring())))
            }
            _ => queue.try_set_used_ring_address(high(GuestAddress(queue.used_ring()))),
        };
        if let Err(e) = result {
            self.needs_reset(format_args!(
                "queue {index} register {offset:#x} = {value:#x}: {e}"
            ));
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let bad = if value & !STATUS_ALL != 0 {
            Some("unknown bits")
        } else if value & old != old {
            Some("clears bits without a reset")
        } else if (value & !old) & STATUS_NEEDS_RESET != 0 {
            Some("sets DEVICE_NEEDS_RESET")
        } else if value & STATUS_DRIVER != 0 && value & STATUS_ACK == 0
            || value & STATUS_FEATURES_OK != 0 && value & STATUS_DRIVER == 0
            || value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0
        {
            Some("skips a step of the initialisation")
        } else {
            None
        };
        if let Some(bad) = bad {
            self.complain(format_args!(
                "status write {value:#x} (was {old:#x}) {bad}, ignored"
            ));
            return;
        }
        let mut value = value;
        if value & !old & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads Status back and gives up.
            value &= !STATUS_FEATURES_OK;
            if value & STATUS_DRIVER_OK != 0 {
                self.complain(format_args!("DRIVER_OK without accepted features, ignored"));
                return;
            }
        }
        self.status = value;
        if value & !old & STATUS_DRIVER_OK != 0
            && value & STATUS_NEEDS_RESET == 0
            && let Err(e) = self.activate()
        {
            self.needs_reset(format_args!("activation failed: {e}"));
        }
    }

    /// Validate the features the driver acked at FEATURES_OK and hand them
    /// to the device.
    fn accept_features(&mut self) -> bool {
        let offered = self.device.avail_features();
        let acked = self.driver_features;
        if acked & !offered != 0 {
            self.complain(format_args!(
                "driver acked features {:#x} the device did not offer",
                acked & !offered
            ));
            return false;
        }
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            self.complain(format_args!(
                "driver did not ack VIRTIO_F_VERSION_1 (acked {acked:#x}); legacy drivers are not supported"
            ));
            return false;
        }
        self.device.ack_features(acked);
        true
    }

    /// Check the ready queues and start the device.
    fn activate(&mut self) -> Result<(), ActivateError> {
        let name = self.device.name();
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut any_ready = false;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) {
                return Err(ActivateError::Device {
                    device: name,
                    reason: format!(
                        "queue {index} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is outside guest memory",
                        queue.size(),
                        queue.desc_table(),
                        queue.avail_ring(),
                        queue.used_ring()
                    ),
                });
            }
            queue.set_event_idx(event_idx);
            any_ready = true;
        }
        if !any_ready {
            return Err(ActivateError::NoReadyQueue { device: name });
        }
        self.device
            .activate(self.mem.clone(), Arc::clone(&self.interrupt))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            self.complain(format_args!(
                "{}-byte read at {offset:#x}, registers are 32-bit and aligned",
                data.len()
            ));
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_register(offset as u32, u32::from_le_bytes(word));
            }
            _ => self.complain(format_args!(
                "{}-byte write at {offset:#x}, registers are 32-bit and aligned",
                data.len()
            )),
        }
    }
}
