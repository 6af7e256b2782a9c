//! The consumer's side of Kinesis: a GetRecords response body parsed into user records, with KPL aggregates
//! de-aggregated the way the KCL does it.
//!
//! [`parse_get_records`] reads the JSON body with serde, borrowing every string from the body (an escaped
//! string, which Kinesis never sends but JSON allows, is unescaped into a copy) and decoding all base64
//! `Data` into one owned buffer as it goes; then it de-aggregates, in stream order. Every user record is a
//! set of ranges into that buffer: its data, its partition key, its explicit hash key, and the sequence
//! number of the Kinesis record it came in. The partition and explicit hash keys of a sub-record point into
//! the aggregate's own key tables, so a page costs its decoded size once, whatever the number of
//! sub-records sharing a key.
//!
//! Per Kinesis record, in stream order:
//! - a KPL aggregate ([`kpl::is_aggregated`]) that decodes gives one user record per sub-record, with
//!   `sub_sequence_number` its index in the aggregate, `aggregated = true`, and the sub-record's keys;
//! - an aggregate that does not decode (MD5 mismatch, truncated or invalid protobuf, table index out of
//!   range) gives one [`BadRecord`] with the raw bytes, the Kinesis record's partition key, sequence number
//!   and arrival, the reason (the [`CoreError`] message) and the position (how many user records of the
//!   page come before it), so a consumer can dead-letter it in order; so does a `Data` that is not valid
//!   base64, whose raw bytes are then the undecoded text. A bad record never fails the page;
//! - anything else gives one plain user record, `sub_sequence_number = 0`, `aggregated = false`.
//!
//! Unknown fields are ignored at every level (`EncryptionType`, `HashKeyRange`, fields AWS may add). A body
//! that is not a GetRecords response (not JSON, trailing bytes, not an object, `Records` missing or not an
//! array of records, a record without `Data`, `PartitionKey` or `SequenceNumber`, a field of the wrong type)
//! is a [`CoreError::Malformed`] naming what is wrong and where. A record without
//! `ApproximateArrivalTimestamp` (optional in the API) gets 0.0. Arrival times are `f64` seconds since the
//! epoch, as Kinesis sends them. The page's buffer and ranges are `u32`-sized, so a body over 4 GiB is
//! refused (a real page is at most about 14 MB).
//!
//! Checked against the shard's hash-key range ([`parse_get_records_checked`] with a [`RangeCheck`]), each
//! sub-record of an aggregate that decoded is *in range* when its hash key (its explicit hash key, else
//! `MD5(partition key)` as a big-endian u128, as Kinesis routes) lies in the shard's range; an explicit hash
//! key that is not a decimal integer in `[0, 2**128)` is out of range. An aggregate can hold sub-records
//! outside its shard's range after a reshard, or when a producer aggregated across shards. Then, by
//! [`OutOfRange`]:
//! - `Deliver`: every sub-record is a user record; those of an aggregate with any sub-record out of range are
//!   counted, all of them ([`Page::out_of_range_records`]): the records a KCL consumer would not see, and the
//!   ones a producer that repairs wrong-shard aggregates sent again (so this count is the duplicates it made);
//! - `Skip` (the KCL's rule): the aggregate gives no user record at all; its sub-records are counted
//!   ([`Page::skipped_out_of_range_records`]). It still counts in [`Page::kinesis_records`] and
//!   [`Page::last_sequence_number`]: skipped by policy, it is handled, and the checkpoint passes it.
//!
//! Plain records are never checked (Kinesis placed them by their own key) and nothing is hashed without a
//! range: the check costs one MD5 per distinct partition key of the page's aggregates (all of them at once,
//! [`md5x`]) and a hash-map lookup per sub-record, nothing when the range is the whole key space (a stream of
//! one shard).
//!
//! [`lane_of`] maps a partition key to one of `n` lanes (CRC-32C of the key's bytes, mod `n`), so that a
//! consumer can hand records to `n` workers in parallel and keep the order of every key.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use rustc_hash::FxHashMap;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::shards::parse_hash_key;
use crate::{kpl, md5x, CoreError};

/// A shard's hash-key range as ListShards gives it: `start..=end`, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKeyRange {
    start: u128,
    end: u128,
}

impl HashKeyRange {
    /// The range `start..=end`; [`CoreError::InvalidHashKey`] when `start > end`.
    pub fn new(start: u128, end: u128) -> Result<Self, CoreError> {
        if start > end {
            return Err(CoreError::InvalidHashKey(format!(
                "hash-key range starts at {start}, after its end {end}"
            )));
        }
        Ok(Self { start, end })
    }

    /// The whole key space: a stream of one shard.
    pub const ALL: Self = Self {
        start: 0,
        end: u128::MAX,
    };

    #[inline]
    pub fn start(self) -> u128 {
        self.start
    }

    #[inline]
    pub fn end(self) -> u128 {
        self.end
    }

    #[inline]
    pub fn contains(self, hash: u128) -> bool {
        self.start <= hash && hash <= self.end
    }
}

/// What becomes of a KPL aggregate some of whose sub-records lie outside its shard's hash-key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutOfRange {
    /// Deliver every sub-record; count those out of range. Nothing a producer wrote is lost.
    #[default]
    Deliver,
    /// Skip the whole aggregate, as the KCL does; count its sub-records.
    Skip,
}

impl OutOfRange {
    /// The policy by its configuration name, `"deliver"` or `"skip"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "deliver" => Some(Self::Deliver),
            "skip" => Some(Self::Skip),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Deliver => "deliver",
            Self::Skip => "skip",
        }
    }
}

/// The range of the shard a page was read from, and what to do with aggregates that stray out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeCheck {
    pub range: HashKeyRange,
    pub policy: OutOfRange,
}

/// A range of [`Page`]'s buffer, `u32`-sized to keep a record small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    #[inline]
    fn range(self) -> Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One Kinesis record: its decoded data and keys, and what it contributes to every user record it holds.
#[derive(Debug, Clone, Copy)]
struct Raw {
    data: Span,
    partition_key: Span,
    sequence_number: Span,
    explicit_hash_key: Option<Span>,
    arrival: f64,
    /// Whether `Data` was valid base64 (else `data` holds the undecoded text).
    base64: bool,
}

/// One user record, as ranges of the page's buffer.
#[derive(Debug, Clone, Copy)]
struct Entry {
    data: Span,
    partition_key: Span,
    explicit_hash_key: Option<Span>,
    /// Index of the Kinesis record in [`Page::raws`].
    raw: u32,
    /// Index in the aggregate (an aggregate is at most 1 MiB, so it holds fewer than 2**32 records).
    sub_sequence_number: u32,
    aggregated: bool,
}

/// A Kinesis record that carries the KPL magic but does not decode, or whose `Data` is not base64.
#[derive(Debug, Clone)]
struct Bad {
    data: Span,
    raw: u32,
    reason: String,
    position: usize,
}

/// A parsed GetRecords response: the user records in stream order, the records that did not decode, and the
/// response's paging fields. Owns one buffer that every record's bytes and strings point into.
#[derive(Clone, Default)]
pub struct Page {
    /// Decoded `Data` of every Kinesis record, then its partition key, sequence number and explicit hash key.
    /// Every range a string is read from holds UTF-8, checked when it was parsed.
    buf: Vec<u8>,
    raws: Vec<Raw>,
    entries: Vec<Entry>,
    bad: Vec<Bad>,
    next_shard_iterator: Option<String>,
    millis_behind_latest: Option<i64>,
    child_shards: Vec<(String, Vec<String>)>,
    /// Sub-records delivered although outside the shard's range ([`OutOfRange::Deliver`]).
    out_of_range: usize,
    /// Sub-records of the aggregates skipped for straying out of the range ([`OutOfRange::Skip`]).
    skipped_out_of_range: usize,
    /// Sub-sequence number of the last sub-record of the last Kinesis record, delivered or skipped.
    last_sub_sequence_number: u32,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("records", &self.entries.len())
            .field("malformed", &self.bad.len())
            .field("kinesis_records", &self.raws.len())
            .field("buffer_bytes", &self.buf.len())
            .field("next_shard_iterator", &self.next_shard_iterator)
            .field("millis_behind_latest", &self.millis_behind_latest)
            .field("child_shards", &self.child_shards)
            .field("out_of_range", &self.out_of_range)
            .field("skipped_out_of_range", &self.skipped_out_of_range)
            .field("last_sub_sequence_number", &self.last_sub_sequence_number)
            .finish()
    }
}

/// The parts of one user record, for [`Page::from_records`] (records built by hand, tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordParts<'a> {
    pub data: &'a [u8],
    pub partition_key: &'a str,
    pub explicit_hash_key: Option<&'a str>,
    pub sequence_number: &'a str,
    pub sub_sequence_number: u32,
    /// Seconds since the epoch.
    pub approximate_arrival: f64,
    pub aggregated: bool,
}

impl Page {
    /// User records in stream order.
    #[inline]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The user record at `index` in stream order.
    #[inline]
    pub fn get(&self, index: usize) -> Option<UserRecord<'_>> {
        self.entries
            .get(index)
            .map(|entry| UserRecord { page: self, entry })
    }

    /// The user records in stream order.
    pub fn records(&self) -> impl ExactSizeIterator<Item = UserRecord<'_>> + '_ {
        self.entries
            .iter()
            .map(|entry| UserRecord { page: self, entry })
    }

    /// The Kinesis records that carry the KPL magic but do not decode, in stream order.
    pub fn malformed(&self) -> impl ExactSizeIterator<Item = BadRecord<'_>> + '_ {
        self.bad.iter().map(|bad| BadRecord { page: self, bad })
    }

    /// The iterator for the next GetRecords call; `None` once a closed shard has been read to its end.
    pub fn next_shard_iterator(&self) -> Option<&str> {
        self.next_shard_iterator.as_deref()
    }

    pub fn millis_behind_latest(&self) -> Option<i64> {
        self.millis_behind_latest
    }

    /// `(shard id, parent shard ids)` of each child shard, present when the shard has ended.
    pub fn child_shards(&self) -> &[(String, Vec<String>)] {
        &self.child_shards
    }

    /// Kinesis records in the response, before de-aggregation.
    pub fn kinesis_records(&self) -> usize {
        self.raws.len()
    }

    /// Sequence number of the last Kinesis record of the page (plain, aggregated or malformed): the
    /// checkpoint that covers the whole page.
    pub fn last_sequence_number(&self) -> Option<&str> {
        self.raws.last().map(|raw| self.str_at(raw.sequence_number))
    }

    /// Sub-sequence number of the last user record of the page's last Kinesis record, whether it was delivered
    /// or skipped by [`OutOfRange::Skip`]; 0 when that record is plain or malformed. With
    /// [`last_sequence_number`](Self::last_sequence_number), the checkpoint that covers the whole page.
    pub fn last_sub_sequence_number(&self) -> u64 {
        u64::from(self.last_sub_sequence_number)
    }

    /// Sub-records delivered from aggregates that hold any sub-record outside the shard's range, all of them
    /// ([`OutOfRange::Deliver`]); 0 when the page was parsed without a [`RangeCheck`].
    pub fn out_of_range_records(&self) -> usize {
        self.out_of_range
    }

    /// Sub-records of the aggregates skipped whole because one of them lies outside the shard's range
    /// ([`OutOfRange::Skip`]), those in range included.
    pub fn skipped_out_of_range_records(&self) -> usize {
        self.skipped_out_of_range
    }

    /// A page of the given user records (each its own Kinesis record), for records built by hand.
    pub fn from_records(records: &[RecordParts<'_>]) -> Result<Self, CoreError> {
        let mut b = Builder::default();
        for r in records {
            let raw = b.page.raws.len() as u32;
            let data = b.push_bytes(r.data)?;
            let partition_key = b.push_bytes(r.partition_key.as_bytes())?;
            let sequence_number = b.push_bytes(r.sequence_number.as_bytes())?;
            let explicit_hash_key = match r.explicit_hash_key {
                Some(ehk) => Some(b.push_bytes(ehk.as_bytes())?),
                None => None,
            };
            b.page.raws.push(Raw {
                data,
                partition_key,
                sequence_number,
                explicit_hash_key,
                arrival: r.approximate_arrival,
                base64: true,
            });
            b.page.entries.push(Entry {
                data,
                partition_key,
                explicit_hash_key,
                raw,
                sub_sequence_number: r.sub_sequence_number,
                aggregated: r.aggregated,
            });
        }
        Ok(b.page)
    }

    #[inline]
    fn bytes_at(&self, span: Span) -> &[u8] {
        &self.buf[span.range()]
    }

    #[inline]
    fn str_at(&self, span: Span) -> &str {
        std::str::from_utf8(self.bytes_at(span))
            .expect("string ranges are checked UTF-8 when parsed")
    }
}

/// One user record of a [`Page`], borrowed from it.
#[derive(Clone, Copy)]
pub struct UserRecord<'a> {
    page: &'a Page,
    entry: &'a Entry,
}

impl<'a> UserRecord<'a> {
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.page.bytes_at(self.entry.data)
    }

    /// The partition key as bytes (what [`lane_of`] hashes), without the UTF-8 check of `partition_key`.
    #[inline]
    pub fn partition_key_bytes(&self) -> &'a [u8] {
        self.page.bytes_at(self.entry.partition_key)
    }

    #[inline]
    pub fn partition_key(&self) -> &'a str {
        self.page.str_at(self.entry.partition_key)
    }

    #[inline]
    pub fn explicit_hash_key(&self) -> Option<&'a str> {
        self.entry.explicit_hash_key.map(|s| self.page.str_at(s))
    }

    /// The sequence number of the Kinesis record the user record came in (shared by an aggregate's records).
    #[inline]
    pub fn sequence_number(&self) -> &'a str {
        self.page.str_at(self.raw().sequence_number)
    }

    /// Index of the record in its aggregate; 0 for a plain record.
    #[inline]
    pub fn sub_sequence_number(&self) -> u64 {
        u64::from(self.entry.sub_sequence_number)
    }

    #[inline]
    pub fn aggregated(&self) -> bool {
        self.entry.aggregated
    }

    /// `ApproximateArrivalTimestamp` of the Kinesis record, seconds since the epoch (0.0 when absent).
    #[inline]
    pub fn approximate_arrival(&self) -> f64 {
        self.raw().arrival
    }

    #[inline]
    fn raw(&self) -> &'a Raw {
        &self.page.raws[self.entry.raw as usize]
    }
}

impl fmt::Debug for UserRecord<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("data_len", &self.data().len())
            .field("partition_key", &self.partition_key())
            .field("explicit_hash_key", &self.explicit_hash_key())
            .field("sequence_number", &self.sequence_number())
            .field("sub_sequence_number", &self.sub_sequence_number())
            .field("aggregated", &self.aggregated())
            .field("approximate_arrival", &self.approximate_arrival())
            .finish()
    }
}

/// A Kinesis record of a [`Page`] that carries the KPL magic but does not decode (or whose `Data` is not
/// base64), borrowed from the page.
#[derive(Clone, Copy)]
pub struct BadRecord<'a> {
    page: &'a Page,
    bad: &'a Bad,
}

impl<'a> BadRecord<'a> {
    /// The record's bytes as received (base64-decoded; the raw text when that failed).
    pub fn data(&self) -> &'a [u8] {
        self.page.bytes_at(self.bad.data)
    }

    /// The Kinesis record's partition key (the aggregate's, not a sub-record's).
    pub fn partition_key(&self) -> &'a str {
        self.page.str_at(self.raw().partition_key)
    }

    pub fn sequence_number(&self) -> &'a str {
        self.page.str_at(self.raw().sequence_number)
    }

    /// Seconds since the epoch (0.0 when absent).
    pub fn approximate_arrival(&self) -> f64 {
        self.raw().arrival
    }

    /// Why it did not decode: the message of the [`CoreError::Malformed`] the decoder returned.
    pub fn reason(&self) -> &'a str {
        &self.bad.reason
    }

    /// How many user records of the page come before it in stream order (the index of the user record it
    /// would precede).
    pub fn position(&self) -> usize {
        self.bad.position
    }

    fn raw(&self) -> &'a Raw {
        &self.page.raws[self.bad.raw as usize]
    }
}

impl fmt::Debug for BadRecord<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BadRecord")
            .field("data_len", &self.data().len())
            .field("partition_key", &self.partition_key())
            .field("sequence_number", &self.sequence_number())
            .field("reason", &self.reason())
            .field("position", &self.position())
            .finish()
    }
}

/// The lane, in `0..lanes`, that records with this partition key go to: CRC-32C of the key mod `lanes`.
/// Stable across runs, processes and versions; `lanes` of 0 or 1 gives 0.
#[inline]
pub fn lane_of(partition_key: &[u8], lanes: u32) -> u32 {
    if lanes <= 1 {
        return 0;
    }
    crc32c::crc32c(partition_key) % lanes
}

/// Parses a GetRecords response body; see the module documentation for what becomes of each record.
pub fn parse_get_records(body: &[u8]) -> Result<Page, CoreError> {
    parse_get_records_checked(body, None)
}

/// [`parse_get_records`], with the sub-records of every aggregate checked against the shard's range when
/// `check` is given (see the module documentation).
pub fn parse_get_records_checked(
    body: &[u8],
    check: Option<RangeCheck>,
) -> Result<Page, CoreError> {
    if u32::try_from(body.len()).is_err() {
        return Err(CoreError::Malformed(format!(
            "GetRecords response: {} bytes is more than this parser's 4 GiB limit",
            body.len()
        )));
    }
    let mut b = Builder::default();
    // Decoded data and copied keys never outgrow the body: one allocation, never copied as it fills.
    b.page.buf.reserve_exact(body.len());
    let mut de = serde_json::Deserializer::from_slice(body);
    ResponseSeed(&mut b)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| CoreError::Malformed(format!("GetRecords response: {e}")))?;
    b.deaggregate();
    if let Some(check) = check {
        b.check_range(check);
    }
    b.page.buf.shrink_to_fit();
    Ok(b.page)
}

/// The page under construction.
#[derive(Default)]
struct Builder {
    page: Page,
}

impl Builder {
    /// Appends `bytes` to the buffer and returns their range.
    fn push_bytes(&mut self, bytes: &[u8]) -> Result<Span, CoreError> {
        let start = self.page.buf.len();
        self.page.buf.extend_from_slice(bytes);
        self.span_from(start)
    }

    /// The range from `start` to the end of the buffer.
    fn span_from(&self, start: usize) -> Result<Span, CoreError> {
        let end = self.page.buf.len();
        match (u32::try_from(start), u32::try_from(end)) {
            (Ok(start), Ok(end)) => Ok(Span {
                start,
                len: end - start,
            }),
            _ => Err(CoreError::Malformed(
                "page larger than 4 GiB once decoded".to_owned(),
            )),
        }
    }

    /// First pass, while the JSON is read: one Kinesis record, its data decoded into the buffer.
    fn push_raw(&mut self, rec: &RawRecord<'_>) -> Result<(), CoreError> {
        if u32::try_from(self.page.raws.len()).is_err() {
            return Err(CoreError::Malformed("more than 2**32 records".to_owned()));
        }
        let data_start = self.page.buf.len();
        let base64 = base64_simd::STANDARD
            .decode_append(&*rec.data.0, &mut self.page.buf)
            .is_ok();
        if !base64 {
            // `decode_append` may have written part of it.
            self.page.buf.truncate(data_start);
            self.page.buf.extend_from_slice(&rec.data.0);
        }
        let data = self.span_from(data_start)?;
        let partition_key = self.push_bytes(rec.partition_key.0.as_bytes())?;
        let sequence_number = self.push_bytes(rec.sequence_number.0.as_bytes())?;
        let explicit_hash_key = match &rec.explicit_hash_key {
            Some(ehk) => Some(self.push_bytes(ehk.0.as_bytes())?),
            None => None,
        };
        self.page.raws.push(Raw {
            data,
            partition_key,
            sequence_number,
            explicit_hash_key,
            arrival: rec.approximate_arrival.unwrap_or(0.0),
            base64,
        });
        Ok(())
    }

    /// Second pass, once the body is read: the user records and bad records in stream order.
    fn deaggregate(&mut self) {
        let Page {
            buf,
            raws,
            entries,
            bad,
            ..
        } = &mut self.page;
        // Sub-records borrow from the buffer; their ranges are their offsets in it.
        let base = buf.as_ptr() as usize;
        let span_of = |bytes: &[u8]| Span {
            start: (bytes.as_ptr() as usize - base) as u32,
            len: bytes.len() as u32,
        };
        // The digests of every aggregate at once, several per SIMD register (`md5x`), instead of one by one
        // inside `kpl::decode`.
        let inputs: Vec<&[u8]> = raws
            .iter()
            .filter(|raw| raw.base64)
            .map(|raw| &buf[raw.data.range()])
            .filter(|blob| kpl::is_aggregated(blob))
            .map(kpl::digest_input)
            .collect();
        let mut digests = vec![[0u8; 16]; inputs.len()];
        md5x::md5_many_into(&inputs, &mut digests);
        let mut digests = digests.iter();
        let mut last_sub = 0;
        for (index, raw) in raws.iter().enumerate() {
            let raw_index = index as u32;
            last_sub = 0;
            let blob = &buf[raw.data.range()];
            let failed = if !raw.base64 {
                CoreError::Malformed(format!(
                    "Data of the record with sequence number {} is not valid base64",
                    String::from_utf8_lossy(&buf[raw.sequence_number.range()])
                ))
            } else if !kpl::is_aggregated(blob) {
                entries.push(Entry {
                    data: raw.data,
                    partition_key: raw.partition_key,
                    explicit_hash_key: raw.explicit_hash_key,
                    raw: raw_index,
                    sub_sequence_number: 0,
                    aggregated: false,
                });
                continue;
            } else {
                let mut sub_sequence_number = 0;
                let digest = digests.next().expect("one digest per aggregate");
                let push = |sub: kpl::SubRecord<'_>| {
                    entries.push(Entry {
                        data: span_of(sub.data),
                        partition_key: span_of(sub.partition_key.as_bytes()),
                        explicit_hash_key: sub.explicit_hash_key.map(|k| span_of(k.as_bytes())),
                        raw: raw_index,
                        sub_sequence_number,
                        aggregated: true,
                    });
                    sub_sequence_number += 1;
                };
                let decoded = if blob[blob.len() - 16..] == digest[..] {
                    kpl::decode_verified(blob, push)
                } else {
                    kpl::decode(blob, push) // for its error
                };
                match decoded {
                    Ok(n) => {
                        last_sub = n.saturating_sub(1) as u32;
                        continue;
                    }
                    Err(why) => why,
                }
            };
            bad.push(Bad {
                data: raw.data,
                raw: raw_index,
                reason: failed.to_string(),
                position: entries.len(),
            });
        }
        self.page.last_sub_sequence_number = last_sub;
    }

    /// Third pass, with a range: checks every aggregate's sub-records against it, and counts them or drops
    /// the aggregate by the policy. Plain records are left alone.
    fn check_range(&mut self, check: RangeCheck) {
        /// `key_of` of an entry with no key to hash (never read).
        const NONE: u32 = u32::MAX;
        let Page {
            buf,
            entries,
            bad,
            out_of_range,
            skipped_out_of_range,
            ..
        } = &mut self.page;
        // The hash of every distinct partition key of the page's aggregates, all at once ([`md5x`]): `key_of`
        // gives each entry's index in `digests` (`NONE` for a plain record or an explicit hash key). The
        // whole key space needs none.
        let mut inputs: Vec<&[u8]> = Vec::new();
        let mut key_of: Vec<u32> = Vec::new();
        if check.range != HashKeyRange::ALL {
            let mut seen: FxHashMap<&[u8], u32> = FxHashMap::default();
            key_of.extend(entries.iter().map(|e| {
                if !e.aggregated || e.explicit_hash_key.is_some() {
                    return NONE;
                }
                let key = &buf[e.partition_key.range()];
                *seen.entry(key).or_insert_with(|| {
                    inputs.push(key);
                    (inputs.len() - 1) as u32
                })
            }));
        }
        let mut digests = vec![[0u8; 16]; inputs.len()];
        md5x::md5_many_into(&inputs, &mut digests);
        let in_range = |index: usize, e: &Entry| match e.explicit_hash_key {
            Some(ehk) => std::str::from_utf8(&buf[ehk.range()])
                .ok()
                .and_then(|text| parse_hash_key(text).ok())
                .is_some_and(|hash| check.range.contains(hash)),
            None => key_of.get(index).is_none_or(|&at| {
                check
                    .range
                    .contains(u128::from_be_bytes(digests[at as usize]))
            }),
        };
        // Entries are compacted in place (a skipped aggregate's are dropped); a bad record's position moves
        // back by the entries dropped before it.
        let (mut read, mut write, mut next_bad) = (0, 0, 0);
        while read < entries.len() {
            while next_bad < bad.len() && bad[next_bad].position <= read {
                bad[next_bad].position -= read - write;
                next_bad += 1;
            }
            let first = entries[read];
            let mut end = read + 1;
            if first.aggregated {
                while end < entries.len() && entries[end].raw == first.raw {
                    end += 1;
                }
            }
            let strays = if first.aggregated {
                (read..end).filter(|&i| !in_range(i, &entries[i])).count()
            } else {
                0
            };
            let keep = match check.policy {
                _ if strays == 0 => true,
                OutOfRange::Deliver => {
                    // Every record of it: the KCL would skip them all, and a repairing producer re-sent them all.
                    *out_of_range += end - read;
                    true
                }
                OutOfRange::Skip => {
                    *skipped_out_of_range += end - read;
                    false
                }
            };
            if keep {
                entries.copy_within(read..end, write);
                write += end - read;
            }
            read = end;
        }
        for b in &mut bad[next_bad..] {
            b.position -= read - write;
        }
        entries.truncate(write);
    }
}

/// A JSON string borrowed from the body, or unescaped into a copy.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON string as raw bytes, without the UTF-8 check (for `Data`, which is base64 and may be long).
struct RawText<'a>(Cow<'a, [u8]>);

impl<'de: 'a, 'a> Deserialize<'de> for RawText<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(RawText(Cow::Borrowed(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(RawText(Cow::Owned(v.to_owned())))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawText(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawText(Cow::Owned(v.as_bytes().to_owned())))
            }
        }
        // serde_json hands a string to `deserialize_bytes` as its raw (unescaped) bytes.
        d.deserialize_bytes(V)
    }
}

/// One element of `Records`. Read by hand rather than derived, so that keys are compared as raw bytes
/// (serde's derived field matching checks each key's UTF-8 first, a tenth of the time of a plain page).
struct RawRecord<'a> {
    data: RawText<'a>,
    partition_key: Text<'a>,
    sequence_number: Text<'a>,
    approximate_arrival: Option<f64>,
    explicit_hash_key: Option<Text<'a>>,
}

/// Stores a field's value, refusing a second one as serde's derived code does.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T, field: &'static str) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(E::duplicate_field(field));
    }
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for RawRecord<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRecord<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Kinesis record object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut data, mut partition_key, mut sequence_number) = (None, None, None);
                let (mut arrival, mut explicit_hash_key) = (None, None);
                while let Some(key) = map.next_key::<RawText<'de>>()? {
                    match &*key.0 {
                        b"Data" => once(&mut data, map.next_value()?, "Data")?,
                        b"PartitionKey" => {
                            once(&mut partition_key, map.next_value()?, "PartitionKey")?;
                        }
                        b"SequenceNumber" => {
                            once(&mut sequence_number, map.next_value()?, "SequenceNumber")?;
                        }
                        b"ApproximateArrivalTimestamp" => once(
                            &mut arrival,
                            map.next_value::<Option<f64>>()?,
                            "ApproximateArrivalTimestamp",
                        )?,
                        b"ExplicitHashKey" => once(
                            &mut explicit_hash_key,
                            map.next_value::<Option<Text<'de>>>()?,
                            "ExplicitHashKey",
                        )?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawRecord {
                    data: data.ok_or_else(|| de::Error::missing_field("Data"))?,
                    partition_key: partition_key
                        .ok_or_else(|| de::Error::missing_field("PartitionKey"))?,
                    sequence_number: sequence_number
                        .ok_or_else(|| de::Error::missing_field("SequenceNumber"))?,
                    approximate_arrival: arrival.flatten(),
                    explicit_hash_key: explicit_hash_key.flatten(),
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// One element of `ChildShards` (`HashKeyRange` ignored).
#[derive(Deserialize)]
struct RawChildShard {
    #[serde(rename = "ShardId")]
    shard_id: String,
    #[serde(rename = "ParentShards", default)]
    parent_shards: Vec<String>,
}

/// The response object, streamed into the builder (no intermediate vector of records).
struct ResponseSeed<'b>(&'b mut Builder);

impl<'de> DeserializeSeed<'de> for ResponseSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ResponseSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a GetRecords response object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen_records = false;
        while let Some(key) = map.next_key::<RawText<'de>>()? {
            match &*key.0 {
                b"Records" => {
                    if seen_records {
                        return Err(de::Error::duplicate_field("Records"));
                    }
                    seen_records = true;
                    map.next_value_seed(RecordsSeed(&mut *self.0))?;
                }
                b"NextShardIterator" => {
                    self.0.page.next_shard_iterator = map.next_value::<Option<String>>()?;
                }
                b"MillisBehindLatest" => {
                    self.0.page.millis_behind_latest = map.next_value::<Option<i64>>()?;
                }
                b"ChildShards" => {
                    let shards = map.next_value::<Option<Vec<RawChildShard>>>()?;
                    self.0.page.child_shards = shards
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| (c.shard_id, c.parent_shards))
                        .collect();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if seen_records {
            Ok(())
        } else {
            Err(de::Error::missing_field("Records"))
        }
    }
}

/// The `Records` array, each element added to the builder as it is read.
struct RecordsSeed<'b>(&'b mut Builder);

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of Kinesis records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(rec) = seq.next_element::<RawRecord<'de>>()? {
            self.0.push_raw(&rec).map_err(de::Error::custom)?;
        }
        Ok(())
    }
}
