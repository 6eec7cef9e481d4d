//! virtio-rng tests through the MMIO transport.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::MmioTransport;
use crate::virtio::test_utils::*;

const QUEUE_BASE: u64 = 0x10000;
const BUF: u64 = 0x40000;

fn setup(mem: &GuestMem) -> (MmioTransport, TestQueue<'_>) {
    let mut t = MmioTransport::new(mem.clone(), Box::new(Rng::new())).expect("transport");
    let q = TestQueue::new(mem, QUEUE_BASE, 16);
    driver_init(&mut t, &q, u64::MAX);
    (t, q)
}

#[test]
fn fills_the_buffer_with_random_bytes() {
    let mem = guest_mem(1 << 20);
    let (mut t, mut q) = setup(&mem);
    clear_dirty(&mem);
    let head = q.add_chain(&[(BUF, 256, true), (BUF + 0x1000, 256, true)]);
    t.process_queue(0);
    assert_eq!(q.used_elem(0), (u32::from(head), 512));
    let mut a = [0u8; 256];
    let mut b = [0u8; 256];
    mem.read_slice(&mut a, GuestAddress(BUF)).expect("read");
    mem.read_slice(&mut b, GuestAddress(BUF + 0x1000))
        .expect("read");
    // 256 zero bytes from a CSPRNG: probability 2^-2048.
    assert_ne!(a, [0u8; 256]);
    assert_ne!(a, b);
    assert!(page_dirty(&mem, BUF) && page_dirty(&mem, BUF + 0x1000));
    assert!(!page_dirty(&mem, BUF + 0x2000));
    assert_eq!(t.interrupt().status(), crate::virtio::INTERRUPT_USED_BUFFER);
}

#[test]
fn caps_each_request_and_ignores_readable_buffers() {
    let mem = guest_mem(1 << 20);
    let (mut t, mut q) = setup(&mem);
    let len = 0x2_0000u32;
    q.add_chain(&[(0x30000, 16, false), (BUF, len, true)]);
    t.process_queue(0);
    let cap = MAX_BYTES_PER_REQUEST as u32;
    assert_eq!(q.used_elem(0).1, cap);
    let mut tail = vec![0xffu8; (len - cap) as usize];
    mem.read_slice(&mut tail, GuestAddress(BUF + u64::from(cap)))
        .expect("read");
    assert!(
        tail.iter().all(|&b| b == 0),
        "bytes past the cap were written"
    );
    let mut head = [0u8; 16];
    mem.read_slice(&mut head, GuestAddress(0x30000))
        .expect("read");
    assert_eq!(head, [0u8; 16], "a device-readable buffer was written");
}

#[test]
fn buffers_outside_memory_complete_without_panicking() {
    let mem = guest_mem(1 << 20);
    let (mut t, mut q) = setup(&mem);
    q.add_chain(&[(0xf_ff00, 0x1000, true)]);
    q.add_chain(&[(u64::MAX - 4, 0x1000, true)]);
    t.process_queue(0);
    assert_eq!(q.used_idx(), 2);
    assert_eq!(q.used_elem(1).1, 0);
    assert!(t.is_activated());
}

#[test]
fn rng_state_round_trips_and_is_validated() {
    let mut rng = Rng::new();
    rng.ack_features(u64::MAX);
    let s = rng.state();
    assert_eq!(s.acked_features, crate::virtio::COMMON_FEATURES);
    let mut fresh = Rng::new();
    fresh.restore(&s).expect("restore");
    assert_eq!(fresh.state(), s);
    assert!(
        fresh
            .restore(&RngState {
                acked_features: 1 << 50
            })
            .is_err()
    );
    let other = VirtioDeviceState::Block(crate::virtio::BlockState {
        acked_features: 0,
        capacity_sectors: 1,
        read_only: false,
        id: [0; 20],
    });
    assert!(matches!(
        fresh.restore_state(&other),
        Err(StateError::WrongDevice {
            saved: "block",
            device: "rng"
        })
    ));
}
