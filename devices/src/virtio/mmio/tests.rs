//! Transport tests, with the real virtio-rng device behind it.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_mmio as reg;

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::{
    COMMON_FEATURES, INTERRUPT_USED_BUFFER, Rng, VirtioDeviceState, VirtioSubscriber,
};

const QUEUE_BASE: u64 = 0x10000;
const BUF: u64 = 0x20000;

fn rng_transport(mem: &GuestMem) -> MmioTransport {
    MmioTransport::new(mem.clone(), Box::new(Rng::new())).expect("transport")
}

fn irq_count(t: &MmioTransport) -> u64 {
    t.interrupt().irqfd().read().unwrap_or(0)
}

#[test]
fn identifies_as_virtio_mmio_v2() {
    let mem = guest_mem(1 << 20);
    let mut t = rng_transport(&mem);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 4);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_VENDOR_ID), 0x4d5645);
    assert_eq!(device_features(&mut t), COMMON_FEATURES);
    write32(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);
}

#[test]
fn driver_init_sequence_activates() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    assert!(!t.is_activated());
    driver_init(&mut t, &q, u64::MAX);
    assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(t.is_activated());
    assert_eq!(t.device().acked_features(), COMMON_FEATURES);
    let s = t.state();
    assert_eq!(s.queues[0].size, 16);
    assert!(s.queues[0].ready && s.queues[0].event_idx);
    assert_eq!(
        (
            s.queues[0].desc_table,
            s.queues[0].avail_ring,
            s.queues[0].used_ring
        ),
        (q.desc, q.avail, q.used)
    );
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn features_without_version_1_are_refused() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    let status = negotiate(&mut t, !(1 << VIRTIO_F_VERSION_1));
    assert_eq!(status & FEATURES_OK, 0);
    // Queue set-up and DRIVER_OK are then refused too.
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(t.state().queues[0].size, 256);
    write32(
        &mut t,
        reg::VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(!t.is_activated());
    assert_eq!(t.status(), ACK | DRIVER);
    // A driver that tries again properly succeeds.
    driver_init(&mut t, &q, u64::MAX);
    assert!(t.is_activated());
}

#[test]
fn unoffered_features_are_refused() {
    let mem = guest_mem(1 << 20);
    let mut t = rng_transport(&mem);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
    write32(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 | (1 << 8));
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRIVER);
    assert_eq!(t.device().acked_features(), 0);
}

#[test]
fn out_of_order_status_and_late_writes_are_ignored() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    // Skipping steps.
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(t.status(), 0);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER_OK);
    assert_eq!(t.status(), 0);
    // Unknown bits, and the device-only NEEDS_RESET bit.
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | 0x10);
    assert_eq!(t.status(), 0);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | 0x40);
    assert_eq!(t.status(), 0);
    // Queue registers before FEATURES_OK.
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // Clearing bits without a reset.
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(t.status(), ACK | DRIVER);

    negotiate(&mut t, u64::MAX);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
    assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK);

    driver_init(&mut t, &q, u64::MAX);
    let before = t.state();
    // Once running: feature and queue writes change nothing.
    write32(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    // Writes to read-only registers.
    write32(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE, 1);
    write32(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS, 1);
    assert_eq!(t.state(), before);
    assert!(t.is_activated());
}

#[test]
fn narrow_and_misaligned_register_accesses_are_ignored() {
    let mem = guest_mem(1 << 20);
    let mut t = rng_transport(&mem);
    let mut b2 = [0xaau8; 2];
    t.read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xaau8; 4];
    t.read(2, &mut b4);
    assert_eq!(b4, [0; 4]);
    let mut b8 = [0xaau8; 8];
    t.read(0, &mut b8);
    assert_eq!(b8, [0; 8]);
    t.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[ACK as u8]);
    t.write(u64::from(reg::VIRTIO_MMIO_STATUS) + 1, &ACK.to_le_bytes());
    assert_eq!(t.status(), 0);
    // Config space accepts any width (rng has none: zeros).
    let mut c = [0xaau8; 3];
    t.read(CONFIG_SPACE_OFFSET + 1, &mut c);
    assert_eq!(c, [0; 3]);
}

#[test]
fn invalid_queue_size_or_alignment_needs_reset() {
    for (register, value) in [
        (reg::VIRTIO_MMIO_QUEUE_NUM, 3),
        (reg::VIRTIO_MMIO_QUEUE_NUM, 512),
        (reg::VIRTIO_MMIO_QUEUE_NUM, 0),
        (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008),
        (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1001),
        (reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x1002),
    ] {
        let mem = guest_mem(1 << 20);
        let q = TestQueue::new(&mem, QUEUE_BASE, 16);
        let mut t = rng_transport(&mem);
        negotiate(&mut t, u64::MAX);
        setup_queue(&mut t, 0, &q);
        write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        write32(&mut t, register, value);
        let status = read32(&mut t, reg::VIRTIO_MMIO_STATUS);
        assert_ne!(status & 0x40, 0, "{register:#x} = {value:#x}");
        write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        write32(&mut t, reg::VIRTIO_MMIO_STATUS, status | DRIVER_OK);
        assert!(!t.is_activated());
    }
}

#[test]
fn queue_outside_memory_fails_activation_with_config_interrupt() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    negotiate(&mut t, u64::MAX);
    setup_queue(&mut t, 0, &q);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x10_0000 - 8);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    write32(
        &mut t,
        reg::VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(!t.is_activated());
    assert_ne!(t.status() & 0x40, 0);
    assert_eq!(
        read32(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(irq_count(&t), 1);
}

#[test]
fn no_ready_queue_fails_activation() {
    let mem = guest_mem(1 << 20);
    let mut t = rng_transport(&mem);
    negotiate(&mut t, u64::MAX);
    write32(
        &mut t,
        reg::VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(!t.is_activated());
    assert_ne!(t.status() & 0x40, 0);
}

fn rng_request(q: &mut TestQueue<'_>, len: u32) -> u16 {
    q.add_chain(&[(BUF, len, true)])
}

#[test]
fn reset_returns_to_initial_state() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    let initial = t.state();
    driver_init(&mut t, &q, u64::MAX);
    rng_request(&mut q, 64);
    t.process_queue(0);
    assert_eq!(t.interrupt().status(), INTERRUPT_USED_BUFFER);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    write32(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
    assert!(!t.is_activated());
    assert_eq!(t.state(), initial);
    // The pending notification was dropped with the old queue.
    assert!(t.queue_events()[0].read().is_err());
    // Linux's del_vq after reset is accepted silently.
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(t.state(), initial);
}

#[test]
fn bus_notify_writes_the_queue_eventfd() {
    let mem = guest_mem(1 << 20);
    let mut t = rng_transport(&mem);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    assert_eq!(t.queue_events()[0].read().expect("notified"), 2);
}

#[test]
fn isr_ack_and_irqfd() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    // No EVENT_IDX: every completion interrupts.
    driver_init(&mut t, &q, !(1 << crate::virtio::VIRTIO_RING_F_EVENT_IDX));
    assert_eq!(irq_count(&t), 0);
    rng_request(&mut q, 32);
    t.process_queue(0);
    assert_eq!(irq_count(&t), 1);
    assert_eq!(
        read32(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER
    );
    write32(
        &mut t,
        reg::VIRTIO_MMIO_INTERRUPT_ACK,
        INTERRUPT_USED_BUFFER,
    );
    assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // Nothing new to do: no interrupt.
    t.process_queue(0);
    assert_eq!(irq_count(&t), 0);
    assert_eq!(q.used_idx(), 1);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    // used_event (after the avail ring's 16 entries) = 5: interrupt only
    // when the used index passes 5.
    let used_event = GuestAddress(q.avail + 4 + 2 * 16);
    vm_memory::Bytes::write_obj(&mem, 5u16, used_event).expect("used_event");
    rng_request(&mut q, 8);
    t.process_queue(0);
    assert_eq!(q.used_idx(), 1);
    assert_eq!(irq_count(&t), 0);
    for _ in 0..5 {
        rng_request(&mut q, 8);
    }
    t.process_queue(0);
    assert_eq!(q.used_idx(), 6);
    assert_eq!(irq_count(&t), 1);
}

#[test]
fn a_full_ring_is_served_in_budgeted_rounds() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 4);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    for _ in 0..4 {
        rng_request(&mut q, 8);
    }
    t.process_queue(0);
    assert_eq!(q.used_idx(), 4);
    // Budget spent: the queue event is re-armed for another round.
    assert_eq!(t.queue_events()[0].read().expect("re-armed"), 1);
    t.process_queue(0);
    assert!(t.queue_events()[0].read().is_err());
}

#[test]
fn a_lying_avail_index_needs_reset() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    q.set_avail_idx(17);
    t.process_queue(0);
    assert_ne!(t.status() & 0x40, 0);
    assert!(!t.is_activated());
    assert_eq!(
        t.interrupt().status() & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    // Nothing is served until the driver resets the device.
    t.process_queue(0);
    assert_eq!(q.used_idx(), 0);
}

#[test]
fn a_head_index_beyond_the_queue_needs_reset() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    q.publish(200);
    t.process_queue(0);
    assert_ne!(t.status() & 0x40, 0);
}

#[test]
fn state_round_trips_and_the_restored_device_carries_on() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    rng_request(&mut q, 16);
    t.process_queue(0);
    write32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    let saved = t.state();
    assert_eq!(saved.queues[0].next_avail, 1);
    assert_eq!(saved.interrupt_status, INTERRUPT_USED_BUFFER);

    let mut r = MmioTransport::restore(mem.clone(), Box::new(Rng::new()), &saved).expect("restore");
    assert_eq!(r.state(), saved);
    assert!(r.is_activated());
    // The pending ISR is kept, and signalled again only when asked (once
    // the VM's interrupt controllers are restored).
    assert_eq!(irq_count(&r), 0);
    assert!(r.resignal().expect("resignal"));
    assert_eq!(irq_count(&r), 1);
    rng_request(&mut q, 16);
    r.process_queue(0);
    assert_eq!(q.used_idx(), 2);
    assert_eq!(q.used_elem(1).1, 16);

    // A device that was never initialised round-trips too.
    let fresh = rng_transport(&mem).state();
    let r = MmioTransport::restore(mem.clone(), Box::new(Rng::new()), &fresh).expect("restore");
    assert_eq!(r.state(), fresh);
    assert!(!r.is_activated());
}

#[test]
fn restore_rejects_inconsistent_state() {
    let mem = guest_mem(1 << 20);
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut t = rng_transport(&mem);
    driver_init(&mut t, &q, u64::MAX);
    let good = t.state();
    let mut cases: Vec<(&str, MmioTransportState)> = Vec::new();
    let mut add = |what, f: &dyn Fn(&mut MmioTransportState)| {
        let mut s = good.clone();
        f(&mut s);
        cases.push((what, s));
    };
    add("device type", &|s| s.device_type = 2);
    add("unknown status bit", &|s| s.status |= 0x10);
    add("DRIVER_OK without FEATURES_OK", &|s| {
        s.status = ACK | DRIVER | DRIVER_OK
    });
    add("unoffered feature", &|s| s.driver_features |= 1 << 40);
    add("no VERSION_1", &|s| {
        s.driver_features &= !(1 << VIRTIO_F_VERSION_1)
    });
    add("ISR bits", &|s| s.interrupt_status = 0x80);
    add("queue count", &|s| s.queues.push(s.queues[0]));
    add("queue max size", &|s| s.queues[0].max_size = 128);
    add("queue size", &|s| s.queues[0].size = 3);
    add("desc alignment", &|s| s.queues[0].desc_table += 8);
    add("used ring outside memory", &|s| {
        s.queues[0].used_ring = 1 << 40
    });
    add("device kind", &|s| {
        s.device = VirtioDeviceState::Block(crate::virtio::BlockState {
            acked_features: 0,
            capacity_sectors: 1,
            read_only: false,
            id: [0; 20],
        })
    });
    add("device features disagree", &|s| {
        s.device = VirtioDeviceState::Rng(crate::virtio::RngState { acked_features: 0 })
    });
    for (what, state) in cases {
        assert!(
            MmioTransport::restore(mem.clone(), Box::new(Rng::new()), &state).is_err(),
            "{what} accepted"
        );
    }
}

#[test]
fn subscriber_serves_notified_queue_on_the_event_loop() {
    let mem = guest_mem(1 << 20);
    let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
    let t = Arc::new(Mutex::new(rng_transport(&mem)));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("em");
    let sub = VirtioSubscriber::new(Arc::clone(&t)).expect("subscriber");
    em.add_subscriber(Arc::new(Mutex::new(sub)));

    driver_init(&mut *t.lock().expect("lock"), &q, u64::MAX);
    rng_request(&mut q, 128);
    // As KVM would on the guest's QueueNotify write.
    t.lock().expect("lock").queue_events()[0]
        .write(1)
        .expect("kick");
    let mut dispatched = 0;
    for _ in 0..10 {
        dispatched += em.run_with_timeout(100).expect("run");
        if q.used_idx() == 1 {
            break;
        }
    }
    assert!(dispatched >= 1);
    assert_eq!(q.used_idx(), 1);
    assert_eq!(q.used_elem(0), (0, 128));
    assert_eq!(irq_count(&t.lock().expect("lock")), 1);
}
