//! CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
//! ext4 and btrfs. SSE4.2's `crc32` instruction when the CPU has it, a
//! slice-by-8 table otherwise; both give identical results (tested).

use std::sync::OnceLock;

const POLY: u32 = 0x82F6_3B78;

fn tables() -> &'static [[u32; 256]; 8] {
    static TABLES: OnceLock<Box<[[u32; 256]; 8]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new([[0u32; 256]; 8]);
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            }
        }
        t
    })
}

/// Continue a CRC over `data` with the portable table code. `crc` is the
/// running value in its non-inverted form (start with 0 via [`crc32c`]).
fn update_table(crc: u32, data: &[u8]) -> u32 {
    let t = tables();
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn update_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut c = u64::from(!crc);
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(ch);
        c = _mm_crc32_u64(c, u64::from_le_bytes(w));
    }
    // The instruction returns the CRC in the low 32 bits.
    let mut c32 = c as u32;
    for &b in chunks.remainder() {
        c32 = _mm_crc32_u8(c32, b);
    }
    !c32
}

fn has_sse42() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("sse4.2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Continue the CRC32C `crc` (as returned by an earlier call; 0 to start)
/// over `data`.
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if has_sse42() {
        // SAFETY: `update_sse42` only needs the SSE4.2 instructions, and we
        // checked at run time that this CPU has them.
        return unsafe { update_sse42(crc, data) };
    }
    update_table(crc, data)
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_update(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 B.4 and the usual check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32u8).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        assert_eq!(update_table(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn hardware_and_table_agree_and_chain() {
        let data: Vec<u8> = (0..10_007u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for cut in [0, 1, 7, 8, 9, 4096, 10_006, 10_007] {
            let whole = crc32c(&data);
            let chained = crc32c_update(crc32c(&data[..cut]), &data[cut..]);
            assert_eq!(whole, chained, "cut {cut}");
            let t = update_table(update_table(0, &data[..cut]), &data[cut..]);
            assert_eq!(whole, t, "table cut {cut}");
        }
    }
}
