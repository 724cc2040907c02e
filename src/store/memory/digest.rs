//! A key's identity in the memory store: a keyed two-lane digest of its tag, period and
//! bytes (which also picks the window it lives in), and what the identity's second word
//! says in the clear (its period and algorithm, for sweeping and eviction).

use std::hash::BuildHasher;

use crate::algorithm::Algorithm;

/// Four random 64-bit keys (from the standard library's randomly keyed hasher).
pub(super) fn random_seeds() -> [u64; 4] {
    let state = std::collections::hash_map::RandomState::new();
    [0u8, 1, 2, 3].map(|i| state.hash_one(i) | 1)
}

/// Two 64-bit hashes of a key's identity (tag, period, bytes) in one pass: two lanes of
/// folded multiplication, each keyed by its own random seeds. Nobody outside the process
/// sees a digest, so identities cannot be chosen to collide.
#[inline]
pub(super) fn digest(seeds: &[u64; 4], tag: u8, period: u32, bytes: &[u8]) -> [u64; 2] {
    #[inline(always)]
    fn fold(x: u64, y: u64) -> u64 {
        let p = u128::from(x) * u128::from(y);
        (p as u64) ^ (p >> 64) as u64
    }
    let head = u64::from(tag) << 56 | (bytes.len() as u64) << 32 | u64::from(period);
    let (mut a, mut b) = (
        fold(head ^ seeds[0], seeds[2]),
        fold(head ^ seeds[1], seeds[3]),
    );
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        a = fold(a ^ w, seeds[2]);
        b = fold(b ^ w, seeds[3]);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let w = tail_word(rest);
        a = fold(a ^ w, seeds[2]);
        b = fold(b ^ w, seeds[3]);
    }
    [fold(a, seeds[0]), fold(b, seeds[1])]
}

/// One to seven bytes as a word, read in at most two (possibly overlapping) pieces rather
/// than copied; the length is already in the digest, so overlaps cannot alias.
#[inline(always)]
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    if n >= 4 {
        let lo = u32::from_le_bytes(rest[..4].try_into().expect("four bytes"));
        let hi = u32::from_le_bytes(rest[n - 4..].try_into().expect("four bytes"));
        u64::from(hi) << 32 | u64::from(lo)
    } else {
        u64::from(rest[0]) << 16 | u64::from(rest[n / 2]) << 8 | u64::from(rest[n - 1])
    }
}

/// What an identity word says of its key, for sweeping and eviction.
pub(super) fn ident_period_alg(ident1: u64) -> (u64, Algorithm) {
    let alg = match ident1 >> 30 & 3 {
        0 => Algorithm::FixedWindow,
        1 => Algorithm::SlidingWindow,
        _ => Algorithm::TokenBucket,
    };
    ((ident1 >> 32) * 1_000_000, alg)
}
