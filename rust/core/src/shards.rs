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
