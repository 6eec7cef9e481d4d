//! The event-loop side of a virtio-mmio device: wait on the queue notify
//! eventfds and serve the notified queue.

use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::error;
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;

/// Serves one virtio-mmio device on the VMM's `EventManager`. vCPU threads
/// reach the same transport through the MMIO bus.
#[derive(Debug)]
pub struct VirtioSubscriber {
    transport: Arc<Mutex<MmioTransport>>,
    /// Duplicates of the transport's queue eventfds (same kernel objects),
    /// so that draining them does not need the transport lock.
    queue_evts: Vec<EventFd>,
}

impl VirtioSubscriber {
    /// A subscriber for `transport`'s queues. Fails only if the eventfds
    /// cannot be duplicated.
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<Self> {
        let queue_evts = lock(&transport)
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            transport,
            queue_evts,
        })
    }
}

fn lock(transport: &Arc<Mutex<MmioTransport>>) -> MutexGuard<'_, MmioTransport> {
    transport.lock().unwrap_or_else(|e| e.into_inner())
}

impl MutEventSubscriber for VirtioSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            let data = u32::try_from(index).unwrap_or(u32::MAX);
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                error!("virtio: cannot watch queue {index} notifications: {e}");
            }
        }
        // After a restore, requests may sit in the rings whose notification
        // was consumed before the checkpoint: look at every queue once.
        let mut transport = lock(&self.transport);
        for index in 0..self.queue_evts.len() {
            transport.process_queue(index);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            error!("virtio: event for unknown queue {index}");
            return;
        };
        if events.event_set().contains(EventSet::ERROR) {
            error!("virtio: queue {index} eventfd reported an error; no longer watched");
            let _ = ops.remove(events);
            return;
        }
        // A failed read means "no pending count" (EAGAIN): serve anyway.
        let _ = evt.read();
        lock(&self.transport).process_queue(index);
    }
}
