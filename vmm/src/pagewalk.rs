//! Guest-virtual to guest-physical translation through the guest's own page
//! tables (x86-64 4- and 5-level paging), for offline tools that read a
//! stored epoch's memory: `evm inspect` shows the code at each vCPU's RIP
//! and the words at its RSP, which tell where a wedged guest kernel is.

/// Present.
const P: u64 = 1;
/// Page size (a 1 GiB or 2 MiB leaf above the last level).
const PS: u64 = 1 << 7;
/// Physical-address bits of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;

/// The guest-physical address of `va` under `cr3`, or `None` if it is not
/// mapped. `read_u64` reads a guest-physical 8-byte word (`None`: not RAM).
pub fn translate(
    mut read_u64: impl FnMut(u64) -> Option<u64>,
    cr3: u64,
    cr4: u64,
    va: u64,
) -> Option<u64> {
    let levels: u32 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDR;
    for level in (1..=levels).rev() {
        // Level 1 maps 4 KiB pages (index bits 12..20), level 2 2 MiB, …
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 0x1ff;
        let entry = read_u64(table + index * 8)?;
        if entry & P == 0 {
            return None;
        }
        let leaf = level == 1 || (entry & PS != 0 && level <= 3);
        if leaf {
            let size = 1u64 << shift;
            let base = entry & ADDR & !(size - 1);
            return Some(base | (va & (size - 1)));
        }
        table = entry & ADDR;
    }
    None
}

/// `len` bytes at guest-virtual `va`, page by page through `translate`;
/// `read_page(gpa)` gives the 4 KiB page at a page-aligned guest-physical
/// address. `None` if any byte is unmapped.
pub fn read_virtual(
    mut read_page: impl FnMut(u64) -> Option<[u8; 4096]>,
    cr3: u64,
    cr4: u64,
    va: u64,
    len: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    let mut at = va;
    while out.len() < len {
        let gpa = translate(
            |a| {
                let page = read_page(a & !0xfff)?;
                let o = (a & 0xff8) as usize;
                Some(u64::from_le_bytes(page[o..o + 8].try_into().ok()?))
            },
            cr3,
            cr4,
            at,
        )?;
        let page = read_page(gpa & !0xfff)?;
        let from = (gpa & 0xfff) as usize;
        let take = (4096 - from).min(len - out.len());
        out.extend_from_slice(&page[from..from + take]);
        at = at.wrapping_add(take as u64);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A guest memory of sparse pages.
    #[derive(Default)]
    struct Mem(HashMap<u64, [u8; 4096]>);

    impl Mem {
        fn set_u64(&mut self, gpa: u64, v: u64) {
            let page = self.0.entry(gpa & !0xfff).or_insert([0; 4096]);
            let o = (gpa & 0xfff) as usize;
            page[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn page(&self, gpa: u64) -> Option<[u8; 4096]> {
            self.0.get(&gpa).copied()
        }
    }

    fn idx(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// A kernel-text address through a 2 MiB leaf, a stack address through
    /// 4 KiB pages, a read across a page boundary, and an unmapped address.
    #[test]
    fn walks_four_level_tables() {
        let mut m = Mem::default();
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        let text = 0xffff_ffff_8100_1234u64;
        let stack = 0xffff_ffff_8160_0ff8u64;
        m.set_u64(pml4 + idx(text, 4) * 8, pdpt | 3);
        m.set_u64(pdpt + idx(text, 3) * 8, pd | 3);
        // 2 MiB leaf for the text at guest-physical 0x20_0000.
        m.set_u64(pd + idx(text, 2) * 8, 0x20_0000 | PS | 3);
        // 4 KiB pages for the stack: two adjacent ones, not contiguous.
        m.set_u64(pd + idx(stack, 2) * 8, pt | 3);
        m.set_u64(pt + idx(stack, 1) * 8, 0x9000 | 3);
        m.set_u64(pt + idx(stack + 8, 1) * 8, 0x7000 | 3);
        m.set_u64(0x9ff8, 0x1111);
        m.set_u64(0x7000, 0x2222);
        let read = |a: u64| {
            let p = m.page(a & !0xfff)?;
            let o = (a & 0xff8) as usize;
            Some(u64::from_le_bytes(p[o..o + 8].try_into().unwrap()))
        };
        assert_eq!(translate(read, pml4, 0, text), Some(0x20_1234));
        assert_eq!(translate(read, pml4, 0, stack), Some(0x9ff8));
        assert_eq!(translate(read, pml4, 0, 0x1000), None);
        let words = read_virtual(|g| m.page(g), pml4, 0, stack, 16).expect("mapped");
        assert_eq!(&words[..8], &0x1111u64.to_le_bytes());
        assert_eq!(&words[8..], &0x2222u64.to_le_bytes());
        // A read running past the mapped pair into a page not present.
        assert_eq!(read_virtual(|g| m.page(g), pml4, 0, stack + 16, 4096), None);
    }
}
