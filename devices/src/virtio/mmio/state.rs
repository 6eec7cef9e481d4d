//! Save and restore of a virtio-mmio transport and the device behind it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};

use super::{
    MmioError, MmioTransport, STATUS_ACK, STATUS_ALL, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::GuestMem;
use crate::virtio::{
    INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, StateError, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioDeviceState,
};

/// Saved configuration and position of one split virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtqState {
    /// Maximum size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use on this queue.
    pub event_idx: bool,
}

impl From<&Queue> for VirtqState {
    fn from(q: &Queue) -> Self {
        Self {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }
}

impl From<VirtqState> for QueueState {
    fn from(s: VirtqState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Saved state of a virtio-mmio transport, including its device's.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// Virtio device id, checked on restore.
    pub device_type: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote (acked once FEATURES_OK is set).
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// The device status register.
    pub status: u32,
    /// The ISR (`InterruptStatus`).
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Every queue of the device, in order.
    pub queues: Vec<VirtqState>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

impl MmioTransport {
    /// Raise the interrupt if ISR bits are pending (after a restore, once
    /// the interrupt controllers are restored). A spurious interrupt is
    /// harmless: the driver reads the ISR. Returns whether it raised it.
    pub fn resignal(&self) -> std::io::Result<bool> {
        let pending = self.interrupt.status();
        if pending != 0 {
            self.interrupt.trigger(pending)?;
        }
        Ok(pending != 0)
    }

    /// Save the transport's and the device's state. Call it with the
    /// transport locked: no request is then half done.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(VirtqState::from).collect(),
            device: self.device.save_state(),
        }
    }

    /// Rebuild a transport from saved state, around `device` freshly built
    /// from the same configuration (same disk, same id). Validates every
    /// field; re-activates the device if the driver had set DRIVER_OK.
    /// New eventfds are created: register them with KVM as for
    /// [`MmioTransport::new`]. A pending ISR is kept but not signalled:
    /// call [`MmioTransport::resignal`] once the VM's interrupt controllers
    /// are restored (an edge sent earlier meets a masked, reset IOAPIC pin
    /// and is lost, and the guest then waits for its completion forever).
    pub fn restore(
        mem: GuestMem,
        mut device: Box<dyn VirtioDevice>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        let name = device.name();
        let invalid = |reason: String| StateError::Invalid {
            device: name,
            reason,
        };
        if state.device_type != device.device_type() {
            return Err(invalid(format!(
                "device type {} but the device has type {}",
                state.device_type,
                device.device_type()
            ))
            .into());
        }
        check_status(state.status)
            .map_err(|r| invalid(format!("status {:#x}: {r}", state.status)))?;
        let offered = device.avail_features();
        if state.driver_features & !offered != 0 {
            return Err(invalid(format!(
                "driver features {:#x} include features {:#x} the device does not offer",
                state.driver_features,
                state.driver_features & !offered
            ))
            .into());
        }
        let features_ok = state.status & STATUS_FEATURES_OK != 0;
        if features_ok && state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(invalid("FEATURES_OK without VIRTIO_F_VERSION_1".into()).into());
        }
        if state.interrupt_status & !(INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE) != 0 {
            return Err(invalid(format!(
                "interrupt status {:#x} has unknown bits",
                state.interrupt_status
            ))
            .into());
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(invalid(format!(
                "{} queues saved but the device has {}",
                state.queues.len(),
                max_sizes.len()
            ))
            .into());
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max {
                return Err(invalid(format!(
                    "queue {index} maximum size {} but the device offers {max}",
                    saved.max_size
                ))
                .into());
            }
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| invalid(format!("queue {index} {saved:?}: {e}")))?;
            queues.push(queue);
        }
        device.restore_state(&state.device)?;
        let acked = device.acked_features();
        let expected = if features_ok {
            state.driver_features
        } else {
            0
        };
        if acked != expected {
            return Err(invalid(format!(
                "device acked features {acked:#x} but the transport says {expected:#x}"
            ))
            .into());
        }

        let mut transport = Self::new(mem, device)?;
        transport.queues = queues;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        if state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_NEEDS_RESET == 0 {
            if let Some((index, q)) = transport
                .queues
                .iter()
                .enumerate()
                .find(|(_, q)| q.ready() && !q.is_valid(&transport.mem))
            {
                return Err(invalid(format!(
                    "queue {index} {:?} is outside guest memory",
                    VirtqState::from(q)
                ))
                .into());
            }
            let mem = transport.mem.clone();
            let interrupt = Arc::clone(&transport.interrupt);
            transport
                .device
                .activate(mem, interrupt)
                .map_err(MmioError::Activate)?;
        }
        // The saved ISR bits are back (`Self::new` made a fresh interrupt);
        // the interrupt itself is raised by `resignal` once the VM's
        // interrupt controllers are restored.
        transport.interrupt.set_status(state.interrupt_status);
        Ok(transport)
    }
}

/// A status value a driver can have reached through a valid sequence.
fn check_status(status: u32) -> Result<(), &'static str> {
    if status & !STATUS_ALL != 0 {
        Err("unknown bits")
    } else if status & STATUS_DRIVER != 0 && status & STATUS_ACK == 0
        || status & STATUS_FEATURES_OK != 0 && status & STATUS_DRIVER == 0
        || status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0
    {
        Err("a later initialisation step without an earlier one")
    } else {
        Ok(())
    }
}
