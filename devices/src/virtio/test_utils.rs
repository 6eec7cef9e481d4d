//! Helpers for the virtio unit tests: real guest memory (mmap with a dirty
//! bitmap), a driver-side split virtqueue written by hand into it, and the
//! driver's initialisation sequence over the MMIO registers.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{BusDevice, GuestMem};

/// Guest memory of `size` bytes at guest-physical 0, with a dirty bitmap.
pub fn guest_mem(size: usize) -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Forget every page recorded as dirty.
pub fn clear_dirty(mem: &GuestMem) {
    for region in mem.iter() {
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap().reset();
    }
}

/// Whether the page holding `gpa` is recorded as dirty.
pub fn page_dirty(mem: &GuestMem, gpa: u64) -> bool {
    let (region, offset) = mem
        .to_region_addr(GuestAddress(gpa))
        .expect("gpa in memory");
    GuestMemoryRegion::bitmap(region).dirty_at(offset.0 as usize)
}

/// Guest-physical page numbers recorded as dirty.
pub fn dirty_pages(mem: &GuestMem) -> Vec<u64> {
    let size = mem.last_addr().0 + 1;
    (0..size / 4096)
        .filter(|p| page_dirty(mem, p * 4096))
        .collect()
}

/// A split virtqueue as a driver lays it out: descriptor table at `base`,
/// available ring at `base + 0x1000`, used ring at `base + 0x2000`.
pub struct TestQueue<'a> {
    mem: &'a GuestMem,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

/// One buffer of a chain: address, length, device-writable.
pub type Buf = (u64, u32, bool);

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMem, base: u64, size: u16) -> Self {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base))
            .expect("zero rings");
        Self {
            mem,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Write descriptor `index` as is.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(index);
        let m = self.mem;
        m.write_obj(addr.to_le(), GuestAddress(at)).expect("desc");
        m.write_obj(len.to_le(), GuestAddress(at + 8))
            .expect("desc");
        m.write_obj(flags.to_le(), GuestAddress(at + 12))
            .expect("desc");
        m.write_obj(next.to_le(), GuestAddress(at + 14))
            .expect("desc");
    }

    /// Write `bufs` as a chain into free descriptor slots; returns the head
    /// without publishing it.
    pub fn build_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(index, addr, len, flags, self.next_desc);
        }
        head
    }

    /// Put `head` on the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Overwrite the available ring's index (a driver may lie).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Build and publish a chain; returns its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.build_chain(bufs);
        self.publish(head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(self.used + 2))
                .expect("used idx"),
        )
    }

    /// Used ring entry `i`: (descriptor head id, length written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used elem");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used elem");
        (u32::from_le(id), u32::from_le(len))
    }
}

pub fn read32(dev: &mut dyn BusDevice, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

pub fn write32(dev: &mut dyn BusDevice, offset: u32, value: u32) {
    dev.write(u64::from(offset), &value.to_le_bytes());
}

pub const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

/// The device's offered features, read the way Linux does.
pub fn device_features(dev: &mut dyn BusDevice) -> u64 {
    write32(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = read32(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES);
    write32(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read32(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES);
    (u64::from(high) << 32) | u64::from(low)
}

/// Negotiate `offered & ack_mask` up to FEATURES_OK; returns Status.
pub fn negotiate(dev: &mut dyn BusDevice, ack_mask: u64) -> u32 {
    write32(dev, reg::VIRTIO_MMIO_STATUS, 0);
    write32(dev, reg::VIRTIO_MMIO_STATUS, ACK);
    write32(dev, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
    let acked = device_features(dev) & ack_mask;
    write32(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, (acked >> 32) as u32);
    write32(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, acked as u32);
    write32(dev, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    read32(dev, reg::VIRTIO_MMIO_STATUS)
}

/// Configure queue `index` from `q` and set it ready.
pub fn setup_queue(dev: &mut dyn BusDevice, index: u32, q: &TestQueue<'_>) {
    write32(dev, reg::VIRTIO_MMIO_QUEUE_SEL, index);
    assert_eq!(read32(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(read32(dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(q.size));
    write32(dev, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
    for (low, addr) in [
        (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc),
        (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail),
        (reg::VIRTIO_MMIO_QUEUE_USED_LOW, q.used),
    ] {
        write32(dev, low, addr as u32);
        write32(dev, low + 4, (addr >> 32) as u32);
    }
    write32(dev, reg::VIRTIO_MMIO_QUEUE_READY, 1);
}

/// The whole Linux-like initialisation: reset, negotiate every offered
/// feature in `ack_mask`, set up queue 0 from `q`, DRIVER_OK.
pub fn driver_init(dev: &mut dyn BusDevice, q: &TestQueue<'_>, ack_mask: u64) {
    let status = negotiate(dev, ack_mask);
    assert_ne!(status & FEATURES_OK, 0, "device refused features");
    setup_queue(dev, 0, q);
    write32(
        dev,
        reg::VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}
