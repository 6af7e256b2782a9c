//! Shard map: which open shard owns a 128-bit hash key, and the partition-key hash itself.
//!
//! Kinesis routes a record by `MD5(partition key)` read as a big-endian unsigned 128-bit integer (or by an
//! explicit hash key, a decimal string in `[0, 2**128)`). Open shards partition that space into contiguous
//! ranges; routing is a binary search over their starting keys.

use md5::{Digest, Md5};

use crate::CoreError;

/// One open shard: its id and its inclusive hash-key range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub start: u128,
    pub end: u128,
}

/// Open shards sorted by starting hash key.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    shards: Vec<Shard>,
}

impl ShardMap {
    /// Builds the map; ranges must be well-formed and must not overlap.
    pub fn new(mut shards: Vec<Shard>) -> Result<Self, CoreError> {
        if shards.is_empty() {
            return Err(CoreError::Config {
                field: "shards",
                reason: "the stream has no open shard".into(),
            });
        }
        shards.sort_by_key(|s| s.start);
        for s in &shards {
            if s.start > s.end {
                return Err(CoreError::Config {
                    field: "shards",
                    reason: format!("shard {} has start {} > end {}", s.id, s.start, s.end),
                });
            }
        }
        for pair in shards.windows(2) {
            if pair[1].start <= pair[0].end {
                return Err(CoreError::Config {
                    field: "shards",
                    reason: format!("shards {} and {} overlap", pair[0].id, pair[1].id),
                });
            }
        }
        Ok(Self { shards })
    }

    /// Index of the shard owning `hash`. A hash in a gap between ranges (only seen mid-reshard) goes to the
    /// shard below it; Kinesis re-routes by the explicit hash key anyway, and the response's shard id tells us
    /// to refresh the map.
    #[inline]
    pub fn route(&self, hash: u128) -> usize {
        self.shards
            .partition_point(|s| s.start <= hash)
            .saturating_sub(1)
    }

    /// `n` shards splitting the hash space evenly, named as Kinesis names them (`shardId-000000000000`...):
    /// the map CreateStream gives a new stream. For tests, benchmarks and offline use.
    pub fn even(n: u32) -> Self {
        let n = u128::from(n.max(1));
        let step = u128::MAX / n;
        let shards = (0..n)
            .map(|i| Shard {
                id: format!("shardId-{i:012}"),
                start: i * step,
                end: if i == n - 1 {
                    u128::MAX
                } else {
                    (i + 1) * step - 1
                },
            })
            .collect();
        Self { shards }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn get(&self, index: usize) -> &Shard {
        &self.shards[index]
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn index_of(&self, shard_id: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.id == shard_id)
    }
}

/// `MD5(partition_key)` as a big-endian u128: the hash Kinesis routes by.
#[inline]
pub fn hash_key(partition_key: &[u8]) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key).into())
}

/// Cache of partition-key hashes ([`hash_key`]) for the batcher: an open-addressing table of one cache line
/// per slot, the key stored in the slot (up to [`KeyCache::INLINE`] bytes; longer ones in a side arena), so a
/// hit reads one line. The batcher computes [`KeyCache::slot_hash`] for a group of events first and
/// [`prefetch`](KeyCache::prefetch)es their slots: with ten thousand keys the table outgrows the L2 cache
/// and a lookup used to wait on memory (15% of the batcher's time).
#[derive(Debug, Default)]
pub struct KeyCache {
    slots: Vec<KeySlot>,
    /// Keys longer than [`KeyCache::INLINE`] bytes.
    arena: Vec<u8>,
    len: usize,
}

/// One slot: the key's table hash, its MD5, and the key (inline or in the arena).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct KeySlot {
    md5: u128,
    hash: u64,
    /// `0` marks a free slot (partition keys are never empty).
    key_len: u32,
    /// The key's bytes when `key_len <= INLINE`, else its offset in the arena in the first four.
    inline: [u8; KeyCache::INLINE],
}

const _: () = assert!(std::mem::size_of::<KeySlot>() == 64);

const FREE: KeySlot = KeySlot {
    md5: 0,
    hash: 0,
    key_len: 0,
    inline: [0; KeyCache::INLINE],
};

impl KeyCache {
    /// Longest key held inside its slot.
    pub const INLINE: usize = 36;

    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.slots.fill(FREE);
        self.arena.clear();
        self.len = 0;
    }

    /// The table hash of `key` (not its MD5): what [`prefetch`](Self::prefetch) and
    /// [`get_or_insert`](Self::get_or_insert) take.
    #[inline]
    pub fn slot_hash(key: &[u8]) -> u64 {
        use std::hash::Hasher;
        let mut h = rustc_hash::FxHasher::default();
        h.write(key);
        // Spread the bits: the slot index comes from the top ones.
        h.finish().wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    #[inline]
    fn index(&self, hash: u64) -> usize {
        // `slots.len()` is a power of two (at least 2) whenever this is called.
        (hash >> (64 - self.slots.len().trailing_zeros())) as usize
    }

    /// Starts loading the slot `hash` probes first into the cache.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if self.slots.is_empty() {
            return;
        }
        let slot: *const KeySlot = &raw const self.slots[self.index(hash)];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; it never faults, and the address is inside `slots`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    #[inline]
    fn slot_key<'a>(&'a self, slot: &'a KeySlot) -> &'a [u8] {
        let len = slot.key_len as usize;
        if len <= Self::INLINE {
            &slot.inline[..len]
        } else {
            let off = u32::from_le_bytes([
                slot.inline[0],
                slot.inline[1],
                slot.inline[2],
                slot.inline[3],
            ]);
            &self.arena[off as usize..off as usize + len]
        }
    }

    /// `MD5(key)` as [`hash_key`] gives it, from the cache or computed and remembered. `hash` must be
    /// [`slot_hash`](Self::slot_hash)`(key)`.
    #[inline]
    pub fn get_or_insert(&mut self, key: &[u8], hash: u64) -> u128 {
        if !self.slots.is_empty() {
            let mask = self.slots.len() - 1;
            let mut i = self.index(hash);
            loop {
                let slot = &self.slots[i];
                if slot.key_len == 0 {
                    break;
                }
                if slot.hash == hash && self.slot_key(slot) == key {
                    return slot.md5;
                }
                i = (i + 1) & mask;
            }
        }
        self.insert(key, hash)
    }

    #[cold]
    #[inline(never)]
    fn insert(&mut self, key: &[u8], hash: u64) -> u128 {
        let md5 = hash_key(key);
        // Keep the load at most 5/8: linear probing stays short.
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        let mut slot = KeySlot {
            md5,
            hash,
            key_len: key.len() as u32,
            inline: [0; Self::INLINE],
        };
        if key.len() <= Self::INLINE {
            slot.inline[..key.len()].copy_from_slice(key);
        } else {
            slot.inline[..4].copy_from_slice(&(self.arena.len() as u32).to_le_bytes());
            self.arena.extend_from_slice(key);
        }
        self.place(slot);
        self.len += 1;
        md5
    }

    fn place(&mut self, slot: KeySlot) {
        let mask = self.slots.len() - 1;
        let mut i = self.index(slot.hash);
        while self.slots[i].key_len != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(1024);
        let old = std::mem::replace(&mut self.slots, vec![FREE; size]);
        for slot in old {
            if slot.key_len != 0 {
                self.place(slot);
            }
        }
    }
}

/// Parses an explicit hash key: a plain decimal integer in `[0, 2**128)`, no sign, no spaces.
pub fn parse_hash_key(text: &str) -> Result<u128, CoreError> {
    if text.is_empty() || text.len() > 39 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CoreError::InvalidHashKey(format!(
            "{text:?} is not a decimal integer in [0, 2**128)"
        )));
    }
    text.parse::<u128>()
        .map_err(|_| CoreError::InvalidHashKey(format!("{text} is not below 2**128")))
}

/// Writes `value` in decimal into `buf` and returns the digits (at most 39 of them).
pub fn format_hash_key(value: u128, buf: &mut [u8; 40]) -> &str {
    let mut i = buf.len();
    let mut v = value;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_range() {
        let m = ShardMap::even(4);
        assert_eq!(m.route(0), 0);
        assert_eq!(m.route(u128::MAX), 3);
        let s1 = m.get(1).clone();
        assert_eq!(m.route(s1.start), 1);
        assert_eq!(m.route(s1.end), 1);
        assert_eq!(m.route(s1.end + 1), 2);
    }

    #[test]
    fn hash_matches_kinesis() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key(b"a"), 0x0cc1_75b9_c0f1_b6a8_31c3_99e2_6977_2661);
    }

    #[test]
    fn key_cache_matches_md5() {
        let mut c = KeyCache::new();
        let long = "k".repeat(300);
        let keys: Vec<String> = (0..5000)
            .map(|i| {
                if i % 7 == 0 {
                    format!("{long}{i}")
                } else {
                    format!("key-{i}")
                }
            })
            .collect();
        for _ in 0..2 {
            for k in &keys {
                let h = KeyCache::slot_hash(k.as_bytes());
                c.prefetch(h);
                assert_eq!(c.get_or_insert(k.as_bytes(), h), hash_key(k.as_bytes()));
            }
        }
        assert_eq!(c.len(), keys.len());
        c.clear();
        assert!(c.is_empty());
        let h = KeyCache::slot_hash(b"a");
        assert_eq!(c.get_or_insert(b"a", h), hash_key(b"a"));
    }

    #[test]
    fn hash_key_text_roundtrip() {
        let mut buf = [0u8; 40];
        for v in [
            0u128,
            1,
            9,
            10,
            u128::MAX,
            340_282_366_920_938_463_463_374_607_431_768_211_455,
        ] {
            assert_eq!(parse_hash_key(format_hash_key(v, &mut buf)).unwrap(), v);
        }
        assert!(parse_hash_key("340282366920938463463374607431768211456").is_err());
        assert!(parse_hash_key("-1").is_err());
        assert!(parse_hash_key(" 1").is_err());
        assert!(parse_hash_key("").is_err());
        assert!(parse_hash_key("1e3").is_err());
    }

    #[test]
    fn rejects_overlap_and_empty() {
        assert!(ShardMap::new(vec![]).is_err());
        let a = Shard {
            id: "a".into(),
            start: 0,
            end: 10,
        };
        let b = Shard {
            id: "b".into(),
            start: 10,
            end: 20,
        };
        assert!(ShardMap::new(vec![a, b]).is_err());
    }
}
