//! virtio-blk tests: a real image file, real guest memory, requests built
//! as a driver (or a hostile one) would.

use std::io::Write;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::BusDevice;
use crate::virtio::MmioTransport;
use crate::virtio::mmio::CONFIG_SPACE_OFFSET;
use crate::virtio::test_utils::*;

const SECTORS: u64 = 64;
const QUEUE_BASE: u64 = 0x10000;
const HDR: u64 = 0x20000;
const STATUS: u64 = 0x21000;
const DATA: u64 = 0x40000;
const DATA2: u64 = 0x80000;
const MEM_SIZE: usize = 1 << 20;

/// An image of `SECTORS` sectors, sector `i` filled with byte `i`.
fn image() -> TempFile {
    let f = TempFile::new_with_prefix("/tmp/evm-blk-test").expect("temp file");
    let mut data = Vec::new();
    for i in 0..SECTORS {
        data.extend(std::iter::repeat_n(i as u8, 512));
    }
    f.as_file().write_all(&data).expect("fill image");
    f
}

struct Fixture<'a> {
    t: MmioTransport,
    q: TestQueue<'a>,
    mem: &'a GuestMem,
}

impl<'a> Fixture<'a> {
    fn new(mem: &'a GuestMem, img: &TempFile, read_only: bool) -> Self {
        let blk = Block::new(img.as_path(), read_only, "evm-disk0").expect("block");
        let mut t = MmioTransport::new(mem.clone(), Box::new(blk)).expect("transport");
        let q = TestQueue::new(mem, QUEUE_BASE, 16);
        driver_init(&mut t, &q, u64::MAX);
        assert!(t.is_activated());
        Self { t, q, mem }
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        self.mem
            .write_slice(&[0xff], GuestAddress(STATUS))
            .expect("status");
    }

    /// Serve one chain; returns (status byte, used length).
    fn run(&mut self, bufs: &[Buf]) -> (u8, u32) {
        let head = self.q.add_chain(bufs);
        let before = self.q.used_idx();
        self.t.process_queue(0);
        assert_eq!(
            self.q.used_idx(),
            before.wrapping_add(1),
            "chain not completed"
        );
        let (id, len) = self.q.used_elem(before);
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// A standard three-descriptor request.
    fn request(&mut self, req_type: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
        self.header(req_type, sector);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend(data);
        bufs.push((STATUS, 1, true));
        self.run(&bufs)
    }
}

fn read_guest(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read guest");
    v
}

#[test]
fn write_then_read_gives_the_same_bytes() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA))
        .expect("pattern");

    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 3, Some((DATA, 1024, false))),
        (0, 1)
    );
    let mut on_disk = vec![0u8; 1024];
    img.as_file()
        .read_exact_at(&mut on_disk, 3 * 512)
        .expect("read image");
    assert_eq!(on_disk, pattern);
    // Neighbours untouched.
    let mut b = [0u8; 1];
    img.as_file()
        .read_exact_at(&mut b, 5 * 512)
        .expect("read image");
    assert_eq!(b[0], 5);

    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 3, Some((DATA2, 1024, true))),
        (0, 1025)
    );
    assert_eq!(read_guest(&mem, DATA2, 1024), pattern);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 63, Some((DATA2, 512, true))),
        (0, 513)
    );
    assert_eq!(read_guest(&mem, DATA2, 512), vec![63u8; 512]);
}

#[test]
fn data_split_over_many_descriptors_and_a_split_header() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    f.header(VIRTIO_BLK_T_IN, 10);
    // Header in two pieces, data in 3 uneven pieces, status alone.
    let bufs = [
        (HDR, 5, false),
        (HDR + 5, 11, false),
        (DATA, 100, true),
        (DATA2, 800, true),
        (DATA + 0x1000, 124, true),
        (STATUS, 1, true),
    ];
    assert_eq!(f.run(&bufs), (0, 1025));
    let mut got = read_guest(&mem, DATA, 100);
    got.extend(read_guest(&mem, DATA2, 800));
    got.extend(read_guest(&mem, DATA + 0x1000, 124));
    let mut want = vec![10u8; 512];
    want.extend(vec![11u8; 512]);
    assert_eq!(got, want);
}

#[test]
fn status_may_share_the_last_data_descriptor() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    f.header(VIRTIO_BLK_T_IN, 2);
    let head = f.q.add_chain(&[(HDR, 16, false), (DATA, 513, true)]);
    f.t.process_queue(0);
    assert_eq!(f.q.used_elem(0), (u32::from(head), 513));
    assert_eq!(read_guest(&mem, DATA, 513)[..512], [2u8; 512]);
    assert_eq!(read_guest(&mem, DATA + 512, 1)[0], VIRTIO_BLK_S_OK as u8);
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    f.header(VIRTIO_BLK_T_IN, 7);
    let table = 0x30000u64;
    let indirect = TestQueue::new(&mem, table, 4);
    indirect.write_desc(0, HDR, 16, 1, 1);
    indirect.write_desc(1, DATA, 512, 1 | 2, 2);
    indirect.write_desc(2, STATUS, 1, 2, 0);
    let head = 0;
    f.q.write_desc(head, table, 3 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    f.q.publish(head);
    f.t.process_queue(0);
    assert_eq!(f.q.used_elem(0), (0, 513));
    assert_eq!(f.status(), 0);
    assert_eq!(read_guest(&mem, DATA, 512), vec![7u8; 512]);
}

#[test]
fn flush_and_get_id() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, None), (0, 1));
    mem.write_slice(&[0xee; 24], GuestAddress(DATA))
        .expect("fill");
    assert_eq!(
        f.request(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, true))),
        (0, 21)
    );
    let mut want = b"evm-disk0".to_vec();
    want.resize(20, 0);
    assert_eq!(read_guest(&mem, DATA, 20), want);
    assert_eq!(read_guest(&mem, DATA + 20, 4), vec![0xee; 4]);
    // A short buffer gets a truncated id.
    assert_eq!(
        f.request(VIRTIO_BLK_T_GET_ID, 0, Some((DATA2, 4, true))),
        (0, 5)
    );
    assert_eq!(read_guest(&mem, DATA2, 4), b"evm-");
}

#[test]
fn unknown_requests_are_unsupported() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    for t in [2, 11, 13, 14, 0x8000_0000, u32::MAX] {
        assert_eq!(
            f.request(t, 0, None),
            (VIRTIO_BLK_S_UNSUPP as u8, 1),
            "type {t}"
        );
    }
}

#[test]
fn out_of_range_and_misshapen_transfers_fail_with_ioerr() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    let ioerr = (VIRTIO_BLK_S_IOERR as u8, 1);
    let cases: [(u32, u64, (u64, u32, bool)); 8] = [
        (VIRTIO_BLK_T_IN, SECTORS - 1, (DATA, 1024, true)),
        (VIRTIO_BLK_T_IN, SECTORS, (DATA, 512, true)),
        (VIRTIO_BLK_T_IN, u64::MAX, (DATA, 512, true)),
        (VIRTIO_BLK_T_OUT, u64::MAX - 1, (DATA, 1024, false)),
        (VIRTIO_BLK_T_IN, 0, (DATA, 100, true)),
        (VIRTIO_BLK_T_OUT, 0, (DATA, 513, false)),
        // Data of the wrong direction.
        (VIRTIO_BLK_T_IN, 0, (DATA, 512, false)),
        (VIRTIO_BLK_T_OUT, 0, (DATA, 512, true)),
    ];
    for (t, sector, data) in cases {
        assert_eq!(
            f.request(t, sector, Some(data)),
            ioerr,
            "type {t} sector {sector} {data:?}"
        );
    }
    // A write just past the end must not grow the image.
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, SECTORS, Some((DATA, 512, false))),
        ioerr
    );
    let len = img.as_file().metadata().expect("metadata").len();
    assert_eq!(len, SECTORS * 512);
    // The image is unchanged.
    let mut b = vec![0u8; 512];
    img.as_file().read_exact_at(&mut b, 0).expect("read");
    assert_eq!(b, vec![0u8; 512]);
    // A zero-length read at the very end is fine.
    assert_eq!(f.request(VIRTIO_BLK_T_IN, SECTORS, None), (0, 1));
}

#[test]
fn malformed_chains_never_panic() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;

    // No status descriptor at all: dropped with used length 0.
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(f.run(&[(HDR, 16, false), (DATA, 512, false)]), (0xff, 0));
    // Read-only status after writable data: the last writable byte gets IOERR.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)])
            .1,
        1
    );
    assert_eq!(read_guest(&mem, DATA + 511, 1)[0], ioerr);
    // Write-only header.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]),
        (ioerr, 1)
    );
    // Short header.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[(HDR, 8, false), (STATUS, 1, true)]), (ioerr, 1));
    // Huge lengths: over the request cap, and past the end of guest memory.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (DATA, 0xffff_fe00, true),
            (STATUS, 1, true)
        ]),
        (ioerr, 1)
    );
    f.header(VIRTIO_BLK_T_IN, 0);
    let near_end = MEM_SIZE as u64 - 0x1000;
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (near_end, 0x8000, true),
            (STATUS, 1, true)
        ]),
        (ioerr, 1)
    );
    // Buffers outside guest memory, and wrapping around the address space.
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (1 << 40, 512, false), (STATUS, 1, true)]),
        (ioerr, 1)
    );
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (u64::MAX - 10, 512, false),
            (STATUS, 1, true)
        ]),
        (ioerr, 1)
    );
    // Header outside guest memory.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(1 << 40, 16, false), (STATUS, 1, true)]),
        (ioerr, 1)
    );
    // Status outside guest memory: dropped.
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(f.run(&[(HDR, 16, false), (1 << 40, 1, true)]), (0xff, 0));

    // A descriptor loop: the chain ends after queue-size descriptors.
    f.header(VIRTIO_BLK_T_IN, 0);
    let head = 3;
    f.q.write_desc(head, HDR, 16, 1, head);
    f.q.publish(head);
    f.t.process_queue(0);
    // Too many descriptors (through an indirect table of 200 entries).
    let table = 0x30000u64;
    for i in 0..200u16 {
        let at = GuestAddress(table + 16 * u64::from(i));
        let (addr, len, flags) = if i == 0 {
            (HDR, 16, 1)
        } else {
            (DATA, 1, 1 | 2)
        };
        mem.write_obj(addr, at).expect("desc");
        mem.write_obj(len as u32, at.unchecked_add(8))
            .expect("desc");
        mem.write_obj(if i == 199 { 2u16 } else { flags }, at.unchecked_add(12))
            .expect("desc");
        mem.write_obj(i + 1, at.unchecked_add(14)).expect("desc");
    }
    f.q.write_desc(5, table, 200 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    f.q.publish(5);
    f.t.process_queue(0);
    assert_eq!(read_guest(&mem, DATA, 1)[0], ioerr);
    // Far too many (an indirect table of 4095 entries): dropped unanswered.
    for i in 0..4095u16 {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(DATA2, at).expect("desc");
        mem.write_obj(1u32, at.unchecked_add(8)).expect("desc");
        mem.write_obj(if i == 4094 { 2u16 } else { 3 }, at.unchecked_add(12))
            .expect("desc");
        mem.write_obj(i + 1, at.unchecked_add(14)).expect("desc");
    }
    mem.write_obj(0x77u8, GuestAddress(DATA2)).expect("marker");
    f.q.write_desc(6, table, 4095 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    f.q.publish(6);
    let used = f.q.used_idx();
    f.t.process_queue(0);
    assert_eq!(f.q.used_idx(), used.wrapping_add(1));
    assert_eq!(f.q.used_elem(used).1, 0);
    assert_eq!(read_guest(&mem, DATA2, 1)[0], 0x77);
    // The device still works.
    assert!(f.t.is_activated());
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 1, Some((DATA, 512, true))),
        (0, 513)
    );
}

#[test]
fn device_writes_are_recorded_in_the_dirty_bitmap() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let head = f.q.build_chain(&[
        (HDR, 16, false),
        (DATA + 0x800, 0x2000, true),
        (STATUS, 1, true),
    ]);
    clear_dirty(&mem);
    assert!(dirty_pages(&mem).is_empty());
    f.q.publish(head);
    // The driver's own writes (avail ring) are KVM's business: forget them.
    clear_dirty(&mem);
    f.t.process_queue(0);
    assert_eq!(f.status(), 0);
    // The read buffer spans three pages; the status page; the used ring.
    let mut want = vec![DATA >> 12, (DATA >> 12) + 1, (DATA >> 12) + 2, STATUS >> 12];
    want.push(f.q.used >> 12);
    want.sort_unstable();
    assert_eq!(dirty_pages(&mem), want);

    // A write request dirties only the status and used-ring pages.
    clear_dirty(&mem);
    f.header(VIRTIO_BLK_T_OUT, 0);
    clear_dirty(&mem);
    let head =
        f.q.build_chain(&[(HDR, 16, false), (DATA2, 0x1000, false), (STATUS, 1, true)]);
    f.q.publish(head);
    clear_dirty(&mem);
    f.t.process_queue(0);
    assert_eq!(f.status(), 0);
    let mut want = vec![STATUS >> 12, f.q.used >> 12];
    want.sort_unstable();
    assert_eq!(dirty_pages(&mem), want);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let mut f = Fixture::new(&mem, &img, true);
    assert_ne!(f.t.device().avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    mem.write_slice(&[0x55; 512], GuestAddress(DATA))
        .expect("fill");
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, false))),
        (VIRTIO_BLK_S_IOERR as u8, 1)
    );
    let mut b = vec![0u8; 512];
    img.as_file().read_exact_at(&mut b, 0).expect("read");
    assert_eq!(b, vec![0u8; 512]);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 1, Some((DATA, 512, true))),
        (0, 513)
    );
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, None), (0, 1));
}

#[test]
fn config_space_describes_the_disk() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let f = Fixture::new(&mem, &img, false);
    let mut t = f.t;
    let mut cap = [0u8; 8];
    t.read(CONFIG_SPACE_OFFSET, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut w = [0u8; 4];
    t.read(CONFIG_SPACE_OFFSET + 4, &mut w);
    assert_eq!(u32::from_le_bytes(w), 0);
    t.read(CONFIG_SPACE_OFFSET + 12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    t.read(CONFIG_SPACE_OFFSET + 20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    let mut b = [0u8; 1];
    t.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(b[0], SECTORS as u8);
    t.read(CONFIG_SPACE_OFFSET + 0x400, &mut w);
    assert_eq!(w, [0; 4]);
    // Writes are ignored.
    t.write(CONFIG_SPACE_OFFSET, &[9; 8]);
    t.read(CONFIG_SPACE_OFFSET, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
}

#[test]
fn bad_images_are_refused_with_their_path() {
    let empty = TempFile::new_with_prefix("/tmp/evm-blk-test").expect("temp");
    let e = Block::new(empty.as_path(), false, "d").expect_err("empty");
    assert!(
        e.to_string()
            .contains(&empty.as_path().display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("empty"), "{e}");

    let odd = TempFile::new_with_prefix("/tmp/evm-blk-test").expect("temp");
    odd.as_file().write_all(&[1; 1000]).expect("fill");
    let e = Block::new(odd.as_path(), false, "d").expect_err("unaligned");
    assert!(e.to_string().contains("1000 bytes"), "{e}");
    assert!(
        e.to_string().contains(&odd.as_path().display().to_string()),
        "{e}"
    );

    let e = Block::new(Path::new("/nonexistent/disk.img"), false, "d").expect_err("missing");
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");

    let e = Block::new(Path::new("/tmp"), true, "d").expect_err("directory");
    assert!(matches!(e, BlockError::NotADisk { .. }), "{e}");

    let img = image();
    let e = Block::new(img.as_path(), false, "an-id-of-21-bytes-xyz").expect_err("long id");
    assert!(matches!(e, BlockError::IdTooLong { .. }), "{e}");
}

#[test]
fn an_image_in_use_is_refused() {
    let img = image();
    let first = Block::new(img.as_path(), false, "a").expect("first");
    let e = Block::new(img.as_path(), false, "b").expect_err("second writer");
    assert!(matches!(e, BlockError::Locked { .. }), "{e}");
    assert!(Block::new(img.as_path(), true, "b").is_err());
    drop(first);
    let _reader1 = Block::new(img.as_path(), true, "b").expect("reader");
    let _reader2 = Block::new(img.as_path(), true, "c").expect("second reader");
}

#[test]
fn block_state_round_trips_and_checks_the_image() {
    let mem = guest_mem(MEM_SIZE);
    let img = image();
    let f = Fixture::new(&mem, &img, false);
    let saved = f.t.state();
    drop(f);
    let blk = Block::new(img.as_path(), false, "evm-disk0").expect("block");
    let r = MmioTransport::restore(mem.clone(), Box::new(blk), &saved).expect("restore");
    assert_eq!(r.state(), saved);
    let crate::virtio::VirtioDeviceState::Block(bs) = &saved.device else {
        panic!("not a block state");
    };
    drop(r);

    let mut blk = Block::new(img.as_path(), false, "evm-disk0").expect("block");
    let mut bad = bs.clone();
    bad.capacity_sectors += 1;
    assert!(blk.restore(&bad).is_err());
    let mut bad = bs.clone();
    bad.read_only = true;
    assert!(blk.restore(&bad).is_err());
    let mut bad = bs.clone();
    bad.id[0] = b'x';
    assert!(blk.restore(&bad).is_err());
    let mut bad = bs.clone();
    bad.acked_features |= 1 << 50;
    assert!(blk.restore(&bad).is_err());
    blk.restore(bs).expect("good state");
    assert_eq!(&blk.state(), bs);
}

/// Committed contents for the epoch-disk test: every byte 0x11.
#[derive(Debug)]
struct Elevens;

impl CommittedBlocks for Elevens {
    fn read_block(&self, _off: u64, dst: &mut overlay::DiskBlock) -> std::io::Result<()> {
        dst.fill(0x11);
        Ok(())
    }
}

#[test]
fn epoch_disk_serves_requests_from_its_overlay_and_marks_guest_pages_dirty() {
    let mem = guest_mem(MEM_SIZE);
    let epoch = Arc::new(EpochDisk::new(Arc::new(Elevens), 64 * 4096).expect("epoch disk"));
    let blk = Block::with_epoch_disk(epoch.clone(), std::path::Path::new("vm.store"), "evm-disk0")
        .expect("block");
    assert_eq!(blk.capacity_sectors(), 64 * 8);
    let mut t = MmioTransport::new(mem.clone(), Box::new(blk)).expect("transport");
    let q = TestQueue::new(&mem, QUEUE_BASE, 16);
    driver_init(&mut t, &q, u64::MAX);
    let mut f = Fixture { t, q, mem: &mem };

    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 5 + 1) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA))
        .expect("pattern");
    // Three sectors straddling a 4 KiB block boundary.
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 7, Some((DATA, 1536, false))),
        (0, 1)
    );
    assert_eq!(epoch.overlay_blocks(), (2, 0));
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, None), (0, 1));
    let sealed = epoch.seal();
    assert_eq!(sealed.len(), 2);
    assert_eq!(sealed[&0][7 * 512..], pattern[..512]);
    assert_eq!(sealed[&0][..7 * 512], [0x11u8; 7 * 512]);

    clear_dirty(&mem);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 6, Some((DATA2, 2560, true))),
        (0, 2561)
    );
    let got = read_guest(&mem, DATA2, 2560);
    assert_eq!(got[..512], [0x11u8; 512]);
    assert_eq!(got[512..2048], pattern[..]);
    assert_eq!(got[2048..], [0x11u8; 512]);
    assert!(page_dirty(&mem, DATA2));
}
