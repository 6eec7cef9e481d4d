//! Cheap 64-bit mixing and checksums shared by page stamps and disk records.
//!
//! Not cryptographic: they only have to catch torn, stale and corrupted
//! data, never an adversary.

/// An odd constant (2^64 / golden ratio), used for mixing and patterns.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finalizer: spreads every input bit over the whole output.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checksum of a run of 64-bit words.
///
/// Each step (xor the word, multiply by an odd constant, rotate) is a
/// bijection of the running value, so changing any single word always
/// changes the result; the rotation carries high bits back down so that
/// changes in several words do not cancel as they can in plain FNV.
pub fn sum64(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, &w| {
        (h ^ w).wrapping_mul(GOLDEN).rotate_left(29)
    })
}

/// A xorshift64* generator: small, fast, good enough to pick pages.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix64(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`); the tiny modulo bias does not matter here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_word_change_changes_the_sum() {
        let words: Vec<u64> = (0..64).map(mix64).collect();
        let base = sum64(&words);
        for i in 0..words.len() {
            for bit in [0, 1, 31, 32, 62, 63] {
                let mut w = words.clone();
                w[i] ^= 1 << bit;
                assert_ne!(sum64(&w), base, "word {i} bit {bit}");
            }
        }
    }

    #[test]
    fn two_top_bit_flips_in_adjacent_words_are_caught() {
        let words = vec![5u64; 8];
        let mut w = words.clone();
        w[3] ^= 1 << 63;
        w[4] ^= 1 << 63;
        assert_ne!(sum64(&w), sum64(&words));
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(0);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
    }
}
