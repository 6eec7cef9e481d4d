//! Stamped pages: the unit the dirty workload writes and verifies.
//!
//! A page is 512 little 64-bit words:
//!
//! | word | content |
//! | --- | --- |
//! | 0 | magic `EVMPAGE1` |
//! | 1 | page index in the buffer |
//! | 2 | generation: the global write number of this write |
//! | 3 | checksum (`sum64`) of words 4..512 |
//! | 4..512 | pattern: `base + k * GOLDEN`, `base` derived from (index, generation) |
//!
//! Every word of the body depends on (index, generation), so a page mixing
//! two writes (torn) disagrees with its header, and a whole page from
//! another moment carries the wrong generation.

use crate::hash::{GOLDEN, mix64, sum64};
use std::fmt;

pub const PAGE_BYTES: usize = 4096;
pub const PAGE_WORDS: usize = PAGE_BYTES / 8;
const HEADER_WORDS: usize = 4;
pub const PAGE_MAGIC: u64 = u64::from_le_bytes(*b"EVMPAGE1");

/// What is wrong with a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// Word 0 is not the magic: never stamped, or overwritten.
    BadMagic { index: u64, found: u64 },
    /// The page claims another index: memory moved or mixed up.
    WrongIndex { index: u64, found: u64 },
    /// The body disagrees with the header's generation: a torn or corrupted
    /// page (`word` is the first bad word, counting from the page start).
    Torn {
        index: u64,
        generation: u64,
        word: usize,
        expected: u64,
        found: u64,
    },
    /// Body matches the header, the stored checksum does not.
    BadChecksum {
        index: u64,
        stored: u64,
        computed: u64,
    },
    /// A consistent page, older than the last write the table remembers.
    Stale {
        index: u64,
        expected: u64,
        found: u64,
    },
    /// A consistent page, newer than anything the table knows of.
    Future {
        index: u64,
        expected: u64,
        found: u64,
    },
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::BadMagic { index, found } => {
                write!(f, "page {index}: bad magic {found:#018x}")
            }
            PageError::WrongIndex { index, found } => {
                write!(f, "page {index}: header says page {found}")
            }
            PageError::Torn {
                index,
                generation,
                word,
                expected,
                found,
            } => write!(
                f,
                "page {index}: torn at word {word}: expected {expected:#018x} found {found:#018x} (header gen {generation})"
            ),
            PageError::BadChecksum {
                index,
                stored,
                computed,
            } => write!(
                f,
                "page {index}: checksum stored {stored:#018x} computed {computed:#018x}"
            ),
            PageError::Stale {
                index,
                expected,
                found,
            } => write!(
                f,
                "page {index}: stale: expected gen {expected} found gen {found}"
            ),
            PageError::Future {
                index,
                expected,
                found,
            } => write!(
                f,
                "page {index}: from the future: expected gen {expected} found gen {found}"
            ),
        }
    }
}

impl std::error::Error for PageError {}

fn pattern_base(index: u64, generation: u64) -> u64 {
    mix64(mix64(generation ^ PAGE_MAGIC) ^ index.wrapping_mul(GOLDEN))
}

fn pattern_word(base: u64, word: usize) -> u64 {
    base.wrapping_add((word as u64).wrapping_mul(GOLDEN))
}

/// Writes page `index` of generation `generation`: body first, header last.
pub fn stamp(page: &mut [u64], index: u64, generation: u64) {
    let base = pattern_base(index, generation);
    for (k, w) in page.iter_mut().enumerate().skip(HEADER_WORDS) {
        *w = pattern_word(base, k);
    }
    let sum = sum64(&page[HEADER_WORDS..]);
    page[..HEADER_WORDS].copy_from_slice(&[PAGE_MAGIC, index, generation, sum]);
}

/// Checks that `page` is page `index` exactly as generation `expected`
/// wrote it. `page` must be `PAGE_WORDS` long.
pub fn check(page: &[u64], index: u64, expected: u64) -> Result<(), PageError> {
    let [magic, found_index, generation, stored] = [page[0], page[1], page[2], page[3]];
    if magic != PAGE_MAGIC {
        return Err(PageError::BadMagic {
            index,
            found: magic,
        });
    }
    if found_index != index {
        return Err(PageError::WrongIndex {
            index,
            found: found_index,
        });
    }
    let base = pattern_base(index, generation);
    if let Some((k, &w)) = page
        .iter()
        .enumerate()
        .skip(HEADER_WORDS)
        .find(|&(k, &w)| w != pattern_word(base, k))
    {
        return Err(PageError::Torn {
            index,
            generation,
            word: k,
            expected: pattern_word(base, k),
            found: w,
        });
    }
    let computed = sum64(&page[HEADER_WORDS..]);
    if computed != stored {
        return Err(PageError::BadChecksum {
            index,
            stored,
            computed,
        });
    }
    match generation.cmp(&expected) {
        std::cmp::Ordering::Less => Err(PageError::Stale {
            index,
            expected,
            found: generation,
        }),
        std::cmp::Ordering::Greater => Err(PageError::Future {
            index,
            expected,
            found: generation,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(index: u64, generation: u64) -> Vec<u64> {
        let mut p = vec![0u64; PAGE_WORDS];
        stamp(&mut p, index, generation);
        p
    }

    #[test]
    fn fresh_page_checks() {
        assert_eq!(check(&page(3, 17), 3, 17), Ok(()));
        assert_eq!(check(&page(0, 0), 0, 0), Ok(()));
    }

    #[test]
    fn detects_stale_page() {
        let e = check(&page(3, 17), 3, 20).expect_err("stale");
        assert!(matches!(
            e,
            PageError::Stale {
                expected: 20,
                found: 17,
                ..
            }
        ));
        assert_eq!(e.to_string(), "page 3: stale: expected gen 20 found gen 17");
    }

    #[test]
    fn detects_page_from_the_future() {
        let e = check(&page(3, 21), 3, 20).expect_err("future");
        assert!(matches!(
            e,
            PageError::Future {
                expected: 20,
                found: 21,
                ..
            }
        ));
    }

    #[test]
    fn detects_torn_pages() {
        // First half from generation 21, second half still generation 20,
        // header of either: both are caught.
        let old = page(5, 20);
        let new = page(5, 21);
        for (first, second) in [(&new, &old), (&old, &new)] {
            let mut torn = first[..PAGE_WORDS / 2].to_vec();
            torn.extend_from_slice(&second[PAGE_WORDS / 2..]);
            let e = check(&torn, 5, 20).expect_err("torn");
            assert!(matches!(e, PageError::Torn { word: 256, .. }), "{e}");
        }
        // A single 512-byte sector from the other generation.
        let mut torn = old.clone();
        torn[64..128].copy_from_slice(&new[64..128]);
        assert!(matches!(
            check(&torn, 5, 20),
            Err(PageError::Torn { word: 64, .. })
        ));
    }

    #[test]
    fn detects_other_damage() {
        let good = page(9, 4);
        let mut p = good.clone();
        p[0] = 0;
        assert!(matches!(check(&p, 9, 4), Err(PageError::BadMagic { .. })));
        let mut p = good.clone();
        p[3] ^= 1;
        assert!(matches!(
            check(&p, 9, 4),
            Err(PageError::BadChecksum { .. })
        ));
        let mut p = good.clone();
        p[511] ^= 1 << 40;
        assert!(matches!(
            check(&p, 9, 4),
            Err(PageError::Torn { word: 511, .. })
        ));
        assert!(matches!(
            check(&page(8, 4), 9, 4),
            Err(PageError::WrongIndex { found: 8, .. })
        ));
        assert!(matches!(
            check(&[0u64; PAGE_WORDS], 9, 4),
            Err(PageError::BadMagic { .. })
        ));
    }

    #[test]
    fn patterns_differ_between_generations_and_pages() {
        let a = page(1, 1);
        assert_ne!(a[4..], page(1, 2)[4..]);
        assert_ne!(a[4..], page(2, 1)[4..]);
    }
}
