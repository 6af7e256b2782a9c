//! The KPL aggregated-record format, byte-compatible with the Kinesis Producer Library, the KCL and the
//! Python package `aws-kinesis-agg`.
//!
//! An aggregate is `MAGIC` + a protobuf `AggregatedRecord` + the 16-byte MD5 of the protobuf bytes:
//!
//! ```text
//! message AggregatedRecord { repeated string partition_key_table = 1;
//!                            repeated string explicit_hash_key_table = 2;
//!                            repeated Record records = 3; }
//! message Record { required uint64 partition_key_index = 1; optional uint64 explicit_hash_key_index = 2;
//!                  required bytes data = 3; repeated Tag tags = 4; }
//! message Tag { required string key = 1; optional string value = 2; }
//! ```
//!
//! The encoder is hand-written (measured against prost in `benches/kpl.rs`) and emits what protobuf's own
//! serializer emits for that schema, fields in number order: every partition-key table entry (field 1),
//! then every explicit-hash-key table entry (field 2), then every record (field 3). Inside a record:
//! `partition_key_index` (always, even when 0), `explicit_hash_key_index` (only when the record has one),
//! `data` (always, even when empty); no tags. Varints are minimal. Table indexes are assigned on first sight.
//!
//! The decoder accepts any valid protobuf encoding of the schema (fields in any order, repeated scalars last
//! wins, unknown fields of wire types 0, 1, 2 and 5 skipped, tags skipped) and rejects everything else with
//! [`CoreError::Malformed`]: missing magic, MD5 mismatch, truncated or overlong varints and lengths, group
//! wire types, missing required fields, table indexes out of range and non-UTF-8 keys. Every sub-record is
//! validated before the first callback, so a caller that falls back to "treat the blob as one raw record"
//! never sees a partial aggregate. It never panics.

use std::hash::Hasher;

use md5::{Digest, Md5};
use rustc_hash::FxHasher;

use crate::CoreError;

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;
/// Bytes an aggregate carries beyond its protobuf body: the magic and the MD5 digest.
pub const OVERHEAD: usize = MAGIC.len() + DIGEST_LEN;

// Field keys, `field_number << 3 | wire_type` (0 = varint, 2 = length-delimited); all fit one byte.
const PK_TABLE_KEY: u8 = 1 << 3 | 2;
const EHK_TABLE_KEY: u8 = 2 << 3 | 2;
const RECORD_KEY: u8 = 3 << 3 | 2;
const REC_PK_INDEX_KEY: u8 = 1 << 3;
const REC_EHK_INDEX_KEY: u8 = 2 << 3;
const REC_DATA_KEY: u8 = 3 << 3 | 2;

/// Bytes the minimal varint encoding of `v` takes (1 to 10).
#[inline]
const fn varint_len(v: u64) -> usize {
    // One byte per started group of 7 significant bits; `| 1` makes 0 take one byte.
    ((63 - (v | 1).leading_zeros() as usize) * 9 + 73) / 64
}

#[inline]
#[cfg(test)]
fn put_varint(buf: &mut Vec<u8>, v: u64) {
    let mut head = Head::new();
    head.varint(v);
    buf.extend_from_slice(head.as_slice());
}

/// A record's field headers, assembled on the stack and appended in one copy: one capacity check instead
/// of one per byte pushed.
struct Head {
    bytes: [u8; 48],
    len: usize,
}

impl Head {
    #[inline]
    fn new() -> Self {
        Self {
            bytes: [0; 48],
            len: 0,
        }
    }

    #[inline]
    fn byte(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }

    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    #[inline]
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Bytes a length-delimited field of `len` payload bytes takes, one-byte key included.
#[inline]
const fn len_field_size(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of a `Record` message body (without its own key and length).
#[inline]
const fn record_body_len(pk_index: usize, ehk_index: Option<usize>, data_len: usize) -> usize {
    let ehk = match ehk_index {
        Some(i) => 1 + varint_len(i as u64),
        None => 0,
    };
    1 + varint_len(pk_index as u64) + ehk + len_field_size(data_len)
}

#[inline]
fn hash_key(key: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(key);
    h.finish()
}

/// One deduplicating string table, kept in its wire form so that sealing is a copy.
///
/// An open-addressing index (linear probing) goes from the key's hash to its table index; key bytes live
/// once, in `wire`. So a new key costs no allocation of its own, only amortised growth of the buffers, and
/// a lookup is one probe of a flat array (a hash map with collision chains was 10% of the batcher).
#[derive(Debug, Default)]
struct KeyTable {
    /// The table's protobuf fields, `key, length, bytes` per entry, in index order.
    wire: Vec<u8>,
    /// `(start, len)` of each entry's bytes in `wire`.
    spans: Vec<(usize, usize)>,
    /// `0`: free; else the entry's index + 1 in the low 32 bits, the top 32 bits of its hash above.
    /// A power of two in length, at most half full.
    slots: Vec<u64>,
    /// Each entry's hash, to re-place them when `slots` grows.
    hashes: Vec<u64>,
}

impl KeyTable {
    #[inline]
    fn get(&self, index: usize) -> Option<&[u8]> {
        let &(start, len) = self.spans.get(index)?;
        self.wire.get(start..start + len)
    }

    #[inline]
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let tag = hash >> 32;
        let mut i = self.home(hash);
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if slot >> 32 == tag {
                let index = (slot as u32 - 1) as usize;
                if self.get(index) == Some(key) {
                    return Some(index);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// The index `key` has or would get, and the bytes adding it would add to the table.
    #[inline]
    fn probe(&self, key: &[u8]) -> (usize, usize) {
        match self.find(key, hash_key(key)) {
            Some(index) => (index, 0),
            None => (self.spans.len(), len_field_size(key.len())),
        }
    }

    /// The index of `key`, adding it as an entry with field key `field_key` on first sight.
    #[inline]
    fn intern(&mut self, key: &[u8], field_key: u8) -> usize {
        let hash = hash_key(key);
        match self.find(key, hash) {
            Some(index) => index,
            None => self.insert_new(key, hash, field_key),
        }
    }

    /// Adds `key`, known to be absent, under its precomputed `hash`.
    #[inline]
    fn insert_new(&mut self, key: &[u8], hash: u64, field_key: u8) -> usize {
        let index = self.spans.len();
        if (index + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut head = Head::new();
        head.byte(field_key);
        head.varint(key.len() as u64);
        self.wire.reserve(head.len + key.len());
        self.wire.extend_from_slice(head.as_slice());
        self.spans.push((self.wire.len(), key.len()));
        self.wire.extend_from_slice(key);
        self.hashes.push(hash);
        self.place(index, hash);
        index
    }

    /// The slot `hash` probes first: the top bits of a multiplicative mix (the Fx hash's low bits are
    /// weak for short keys that differ in their last bytes, and clustered probes were 4% of the batcher).
    #[inline]
    fn home(&self, hash: u64) -> usize {
        // `slots.len()` is a power of two, at least 64, whenever this is called.
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.slots.len().trailing_zeros()))
            as usize
    }

    #[inline]
    fn place(&mut self, index: usize, hash: u64) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = (hash >> 32) << 32 | (index as u64 + 1);
    }

    #[cold]
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(64);
        self.slots.clear();
        self.slots.resize(size, 0);
        for index in 0..self.hashes.len() {
            self.place(index, self.hashes[index]);
        }
    }

    fn clear(&mut self) {
        self.wire.clear();
        self.spans.clear();
        self.slots.fill(0);
        self.hashes.clear();
    }
}

/// An aggregate under construction: user records are added one at a time and the whole is sealed with
/// [`Aggregator::finish_into`], after which the aggregator is empty and keeps its allocations.
///
/// Seal only non-empty aggregates: an empty one is 20 bytes that consumers (the KCL, `aws-kinesis-agg`,
/// [`decode`]) treat as one raw record, not as zero records.
#[derive(Debug, Default)]
pub struct Aggregator {
    pks: KeyTable,
    ehks: KeyTable,
    /// `room` bytes kept free for magic and tables (see [`take_undigested`](Self::take_undigested)), then
    /// the `records` fields (key, length, `Record` body) in order.
    records: Vec<u8>,
    room: usize,
    count: usize,
}

/// Most bytes kept before the records for the magic and the key tables.
const MAX_ROOM: usize = 64 << 10;

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Exact encoded size (magic + protobuf + MD5) the aggregate would have after adding this record.
    #[inline]
    pub fn size_with(
        &self,
        partition_key: &[u8],
        explicit_hash_key: Option<&[u8]>,
        data_len: usize,
    ) -> usize {
        let (pk_index, pk_extra) = self.pks.probe(partition_key);
        let (ehk_index, ehk_extra) = match explicit_hash_key {
            Some(ehk) => {
                let (index, extra) = self.ehks.probe(ehk);
                (Some(index), extra)
            }
            None => (None, 0),
        };
        let body = record_body_len(pk_index, ehk_index, data_len);
        self.encoded_len() + pk_extra + ehk_extra + len_field_size(body)
    }

    /// Appends one user record unless the aggregate would then exceed `max_len` encoded bytes; returns
    /// whether it was added. One key-table lookup instead of the two of `size_with` then `add`.
    #[inline]
    pub fn try_add(
        &mut self,
        partition_key: &[u8],
        explicit_hash_key: Option<&[u8]>,
        data: &[u8],
        max_len: usize,
    ) -> bool {
        let pk_hash = hash_key(partition_key);
        let pk_found = self.pks.find(partition_key, pk_hash);
        let (pk_index, pk_extra) = match pk_found {
            Some(index) => (index, 0),
            None => (self.pks.spans.len(), len_field_size(partition_key.len())),
        };
        let (ehk_index, ehk_extra) = match explicit_hash_key {
            Some(ehk) => {
                let (index, extra) = self.ehks.probe(ehk);
                (Some(index), extra)
            }
            None => (None, 0),
        };
        let body = record_body_len(pk_index, ehk_index, data.len());
        if self.encoded_len() + pk_extra + ehk_extra + len_field_size(body) > max_len {
            return false;
        }
        if pk_found.is_none() {
            self.pks.insert_new(partition_key, pk_hash, PK_TABLE_KEY);
        }
        let ehk_index = explicit_hash_key.map(|ehk| self.ehks.intern(ehk, EHK_TABLE_KEY));
        self.push_record(pk_index, ehk_index, data);
        true
    }

    /// Appends one user record. Keys are taken as bytes (callers validate UTF-8 and limits).
    #[inline]
    pub fn add(&mut self, partition_key: &[u8], explicit_hash_key: Option<&[u8]>, data: &[u8]) {
        let pk_index = self.pks.intern(partition_key, PK_TABLE_KEY);
        let ehk_index = explicit_hash_key.map(|ehk| self.ehks.intern(ehk, EHK_TABLE_KEY));
        self.push_record(pk_index, ehk_index, data);
    }

    #[inline]
    fn push_record(&mut self, pk_index: usize, ehk_index: Option<usize>, data: &[u8]) {
        let body = record_body_len(pk_index, ehk_index, data.len());
        // At most 1 + 10 + 1 + 10 + 1 + 10 + 1 + 10 header bytes: they fit `Head`.
        let mut head = Head::new();
        head.byte(RECORD_KEY);
        head.varint(body as u64);
        head.byte(REC_PK_INDEX_KEY);
        head.varint(pk_index as u64);
        if let Some(index) = ehk_index {
            head.byte(REC_EHK_INDEX_KEY);
            head.varint(index as u64);
        }
        head.byte(REC_DATA_KEY);
        head.varint(data.len() as u64);
        let buf = &mut self.records;
        buf.reserve(head.len + data.len());
        buf.extend_from_slice(head.as_slice());
        buf.extend_from_slice(data);
        self.count += 1;
    }

    /// User records added since the last seal.
    #[inline]
    pub fn len(&self) -> usize {
        self.count
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Exact size [`Aggregator::finish_into`] would append now.
    #[inline]
    pub fn encoded_len(&self) -> usize {
        OVERHEAD + self.pks.wire.len() + self.ehks.wire.len() + self.records.len() - self.room
    }

    /// The encoded records, after the room kept for the tables.
    #[inline]
    fn record_bytes(&self) -> &[u8] {
        &self.records[self.room..]
    }

    /// The partition key of the first record (table index 0), the one the aggregate is usually sent under.
    pub fn first_partition_key(&self) -> Option<&[u8]> {
        self.pks.get(0)
    }

    /// Appends magic + protobuf + MD5 to `out`, then resets the aggregator for reuse (allocations kept).
    pub fn finish_into(&mut self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        let mut md5 = Md5::new();
        for part in [&self.pks.wire[..], &self.ehks.wire[..], self.record_bytes()] {
            md5.update(part);
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&md5.finalize());
        self.clear();
    }

    /// Like [`finish_into`](Self::finish_into) but leaves the 16 digest bytes zeroed, for callers that
    /// compute many digests at once with [`crate::md5x`] and write them with [`set_digest`].
    pub fn finish_undigested_into(&mut self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        for part in [&self.pks.wire[..], &self.ehks.wire[..], self.record_bytes()] {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&[0u8; 16]);
        self.fit_room();
        self.clear();
    }

    /// Like [`finish_undigested_into`](Self::finish_undigested_into) without copying the records: when the
    /// magic and the key tables fit the room kept before the records, they are written there and the
    /// aggregator's own buffer is handed over, `next` (any buffer, cleared) taking its place. Returns the
    /// buffer and the offset where the aggregate starts in it; or gives `next` back, the aggregator
    /// untouched, when the tables do not fit (the room then grows for the next aggregate).
    pub fn take_undigested(&mut self, mut next: Vec<u8>) -> Result<(Vec<u8>, usize), Vec<u8>> {
        let head = self.head_len();
        if head > self.room {
            return Err(next);
        }
        let start = self.room - head;
        let mut at = start;
        for part in [&MAGIC[..], &self.pks.wire, &self.ehks.wire] {
            self.records[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.records.extend_from_slice(&[0u8; 16]);
        self.fit_room();
        next.clear();
        let blob = std::mem::replace(&mut self.records, next);
        self.clear();
        Ok((blob, start))
    }

    /// Sizes the room for the next aggregate after this one's tables, with a margin.
    /// Bytes before the records in a sealed aggregate: the magic and the key tables.
    fn head_len(&self) -> usize {
        MAGIC.len() + self.pks.wire.len() + self.ehks.wire.len()
    }

    fn fit_room(&mut self) {
        let head = self.head_len();
        self.room = (head + head / 4 + 64).min(MAX_ROOM);
    }

    /// Drops every record, keeping the allocations.
    pub fn clear(&mut self) {
        self.pks.clear();
        self.ehks.clear();
        self.records.clear();
        self.records.resize(self.room, 0);
        self.count = 0;
    }
}

/// One user record inside an aggregate, borrowed from the aggregate's bytes.
/// The bytes an aggregate's digest covers: everything between the magic and the 16-byte trailer.
pub fn digest_input(blob: &[u8]) -> &[u8] {
    &blob[MAGIC.len()..blob.len() - 16]
}

/// Writes the digest trailer of an aggregate made by [`Aggregator::finish_undigested_into`].
pub fn set_digest(blob: &mut [u8], digest: [u8; 16]) {
    let at = blob.len() - 16;
    blob[at..].copy_from_slice(&digest);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRecord<'a> {
    pub partition_key: &'a str,
    pub explicit_hash_key: Option<&'a str>,
    pub data: &'a [u8],
}

/// Whether `blob` starts with the KPL magic and has a non-empty body before the digest.
///
/// Like the KCL and `aws-kinesis-agg`, a blob of exactly `OVERHEAD` bytes (an aggregate with an empty
/// body) does not count: they hand it on as a raw record, and so must we.
#[inline]
pub fn is_aggregated(blob: &[u8]) -> bool {
    blob.len() > OVERHEAD && blob[..MAGIC.len()] == MAGIC
}

/// Why a blob does not decode; turned into [`CoreError::Malformed`] at the API boundary.
#[derive(Debug)]
struct Bad(&'static str);

impl From<Bad> for CoreError {
    fn from(Bad(why): Bad) -> Self {
        CoreError::Malformed(format!("KPL aggregate: {why}"))
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// A protobuf cursor over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline]
    fn has_more(&self) -> bool {
        !self.buf.is_empty()
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        if n > self.buf.len() {
            return Err(Bad("field runs past the end of its message"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, Bad> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            if i == 9 && byte > 1 {
                return Err(Bad("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(Bad("truncated varint"))
    }

    /// The next field's number and wire type.
    #[inline]
    fn key(&mut self) -> Result<(u64, u8), Bad> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(Bad("field key out of range"));
        }
        let field = key >> 3;
        if field == 0 {
            return Err(Bad("field number 0"));
        }
        Ok((field, (key & 7) as u8))
    }

    #[inline]
    fn len_delimited(&mut self) -> Result<&'a [u8], Bad> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| Bad("length out of range"))?;
        self.take(len)
    }

    fn skip(&mut self, wire_type: u8) -> Result<(), Bad> {
        match wire_type {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.take(8).map(drop),
            WIRE_LEN => self.len_delimited().map(drop),
            WIRE_FIXED32 => self.take(4).map(drop),
            _ => Err(Bad("unsupported wire type")),
        }
    }
}

/// A `Record` with its indexes not yet resolved against the tables.
struct RawRecord<'a> {
    pk_index: u64,
    ehk_index: Option<u64>,
    data: &'a [u8],
}

fn parse_record(body: &[u8]) -> Result<RawRecord<'_>, Bad> {
    let mut r = Reader { buf: body };
    let (mut pk_index, mut ehk_index, mut data) = (None, None, None);
    while r.has_more() {
        match r.key()? {
            (1, WIRE_VARINT) => pk_index = Some(r.varint()?),
            (2, WIRE_VARINT) => ehk_index = Some(r.varint()?),
            (3, WIRE_LEN) => data = Some(r.len_delimited()?),
            // Tags (field 4) and unknown fields; a known number with another wire type is unknown too.
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    Ok(RawRecord {
        pk_index: pk_index.ok_or(Bad("record without partition_key_index"))?,
        ehk_index,
        data: data.ok_or(Bad("record without data"))?,
    })
}

fn utf8(bytes: &[u8]) -> Result<&str, Bad> {
    std::str::from_utf8(bytes).map_err(|_| Bad("key is not UTF-8"))
}

/// Resolves a table index checked in advance against the table's length.
#[inline]
fn lookup<'a>(table: &[&'a str], index: u64) -> Result<&'a str, Bad> {
    usize::try_from(index)
        .ok()
        .and_then(|i| table.get(i).copied())
        .ok_or(Bad("table index out of range"))
}

/// Decodes an aggregate, calling `f` for each sub-record in order, and returns how many there were.
///
/// Everything is validated before the first call of `f`; on any error nothing has been called and the
/// caller should treat `blob` as one raw record.
pub fn decode<'a>(blob: &'a [u8], f: impl FnMut(SubRecord<'a>)) -> Result<usize, CoreError> {
    if blob.len() < MAGIC.len() || blob[..MAGIC.len()] != MAGIC {
        return Err(Bad("no magic").into());
    }
    if blob.len() <= OVERHEAD {
        return Err(Bad("too short: no body before the digest").into());
    }
    let (body, digest) = blob[MAGIC.len()..].split_at(blob.len() - OVERHEAD);
    if Md5::digest(body).as_slice() != digest {
        return Err(Bad("MD5 mismatch").into());
    }
    decode_body(body, f)
}

/// [`decode`] of an aggregate whose digest the caller has already checked (e.g. many at once with
/// [`crate::md5x`]): the same validation of everything else, without hashing again.
pub fn decode_verified<'a>(
    blob: &'a [u8],
    f: impl FnMut(SubRecord<'a>),
) -> Result<usize, CoreError> {
    if !is_aggregated(blob) {
        return Err(Bad("no magic or too short").into());
    }
    decode_body(digest_input(blob), f)
}

fn decode_body<'a>(body: &'a [u8], mut f: impl FnMut(SubRecord<'a>)) -> Result<usize, CoreError> {
    let mut pks: Vec<&'a str> = Vec::new();
    let mut ehks: Vec<&'a str> = Vec::new();
    let mut records: Vec<RawRecord<'a>> = Vec::new();
    let mut r = Reader { buf: body };
    while r.has_more() {
        match r.key()? {
            (1, WIRE_LEN) => pks.push(utf8(r.len_delimited()?)?),
            (2, WIRE_LEN) => ehks.push(utf8(r.len_delimited()?)?),
            (3, WIRE_LEN) => records.push(parse_record(r.len_delimited()?)?),
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    // Tables may in principle follow the records, so indexes are checked once the tables are whole.
    for rec in &records {
        lookup(&pks, rec.pk_index)?;
        if let Some(index) = rec.ehk_index {
            lookup(&ehks, index)?;
        }
    }
    for rec in &records {
        f(SubRecord {
            partition_key: lookup(&pks, rec.pk_index)?,
            explicit_hash_key: match rec.ehk_index {
                Some(index) => Some(lookup(&ehks, index)?),
                None => None,
            },
            data: rec.data,
        });
    }
    Ok(records.len())
}

/// [`decode`] into a vector.
pub fn decode_vec(blob: &[u8]) -> Result<Vec<SubRecord<'_>>, CoreError> {
    let mut out = Vec::new();
    decode(blob, |rec| out.push(rec))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(proto: &[u8]) -> Vec<u8> {
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(proto);
        blob.extend_from_slice(&Md5::digest(proto));
        blob
    }

    fn malformed(blob: &[u8]) -> String {
        match decode_vec(blob) {
            Err(CoreError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn rec<'a>(pk: &'a str, ehk: Option<&'a str>, data: &'a [u8]) -> SubRecord<'a> {
        SubRecord {
            partition_key: pk,
            explicit_hash_key: ehk,
            data,
        }
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(Reader { buf: &buf }.varint().unwrap(), v);
        }
        let mut buf = Vec::new();
        put_varint(&mut buf, 300);
        assert_eq!(buf, [0xAC, 0x02]);
    }

    /// Three records, derived by hand from the schema:
    /// pk table "a" (0), "bc" (1); ehk table "12" (0);
    /// records ("a", -, "x"), ("bc", "12", ""), ("a", -, "yz").
    const FIXED_PROTO: [u8; 34] = [
        0x0A, 0x01, b'a', // partition_key_table[0] = "a"
        0x0A, 0x02, b'b', b'c', // partition_key_table[1] = "bc"
        0x12, 0x02, b'1', b'2', // explicit_hash_key_table[0] = "12"
        0x1A, 0x05, 0x08, 0x00, 0x1A, 0x01, b'x', // records[0]: pk 0, data "x"
        0x1A, 0x06, 0x08, 0x01, 0x10, 0x00, 0x1A, 0x00, // records[1]: pk 1, ehk 0, data ""
        0x1A, 0x06, 0x08, 0x00, 0x1A, 0x02, b'y', b'z', // records[2]: pk 0, data "yz"
    ];
    /// MD5 of `FIXED_PROTO`, computed independently (Python `hashlib.md5`).
    const FIXED_MD5: [u8; 16] = [
        0xb8, 0x98, 0x09, 0x1c, 0x16, 0xcf, 0xac, 0xbe, 0xc0, 0x2c, 0xb2, 0x7c, 0x94, 0x61, 0x4f,
        0xf6,
    ];

    #[test]
    fn fixed_vector_encodes_byte_for_byte() {
        let mut agg = Aggregator::new();
        assert_eq!(agg.encoded_len(), OVERHEAD);
        agg.add(b"a", None, b"x");
        agg.add(b"bc", Some(b"12"), b"");
        agg.add(b"a", None, b"yz");
        assert_eq!(agg.len(), 3);
        assert_eq!(agg.first_partition_key(), Some(&b"a"[..]));
        assert_eq!(agg.encoded_len(), 4 + 34 + 16);
        let mut out = vec![0xEE]; // appends, does not overwrite
        agg.finish_into(&mut out);
        let mut expected = vec![0xEE, 0xF3, 0x89, 0x9A, 0xC2];
        expected.extend_from_slice(&FIXED_PROTO);
        expected.extend_from_slice(&FIXED_MD5);
        assert_eq!(out, expected);
        assert!(agg.is_empty());
        assert_eq!(agg.encoded_len(), OVERHEAD);
        assert_eq!(agg.first_partition_key(), None);

        let records = decode_vec(&out[1..]).unwrap();
        assert_eq!(
            records,
            [
                rec("a", None, b"x"),
                rec("bc", Some("12"), b""),
                rec("a", None, b"yz")
            ]
        );
    }

    #[test]
    fn reuse_after_finish_starts_fresh_tables() {
        let mut agg = Aggregator::new();
        agg.add(b"zz", None, b"1");
        agg.add(b"a", None, b"1");
        let mut first = Vec::new();
        agg.finish_into(&mut first);
        agg.add(b"a", None, b"x");
        agg.add(b"bc", Some(b"12"), b"");
        agg.add(b"a", None, b"yz");
        let mut second = Vec::new();
        agg.finish_into(&mut second);
        assert_eq!(&second[4..38], &FIXED_PROTO[..]);
    }

    #[test]
    fn empty_aggregate_reads_as_raw_like_the_kcl() {
        let mut agg = Aggregator::new();
        let mut out = Vec::new();
        agg.finish_into(&mut out);
        assert_eq!(out, wrap(&[]));
        assert_eq!(out.len(), OVERHEAD);
        assert!(!is_aggregated(&out));
        assert!(malformed(&out).contains("too short"));
        // A non-empty body without records is a valid aggregate of nothing.
        let blob = wrap(&[0x0A, 0x01, b'a']);
        assert!(is_aggregated(&blob));
        assert_eq!(decode(&blob, |_| panic!("no records")).unwrap(), 0);
    }

    #[test]
    fn size_with_is_exact_across_varint_boundaries() {
        let mut agg = Aggregator::new();
        let data = [7u8; 200];
        for i in 0..300u32 {
            let pk = format!("key-{}", i % 150);
            let ehk = (i % 3 == 0).then(|| format!("{}", i * 1_000_003));
            let len = (i as usize * 7) % 200;
            let predicted = agg.size_with(pk.as_bytes(), ehk.as_deref().map(str::as_bytes), len);
            agg.add(
                pk.as_bytes(),
                ehk.as_deref().map(str::as_bytes),
                &data[..len],
            );
            assert_eq!(agg.encoded_len(), predicted);
        }
        let mut out = Vec::new();
        let expected = agg.encoded_len();
        agg.finish_into(&mut out);
        assert_eq!(out.len(), expected);
        assert_eq!(decode_vec(&out).unwrap().len(), 300);
    }

    #[test]
    fn decode_accepts_any_field_order_unknown_fields_and_tags() {
        let proto = [
            // a record before the tables it refers to
            0x1A, 0x11, //
            0x1A, 0x01, b'd', // data, later overridden (last wins)
            0x22, 0x05, 0x0A, 0x01, b'k', 0x12, 0x00, // tag {key "k", value ""}, skipped
            0x78, 0x05, // unknown field 15, varint
            0x08, 0x01, // pk index 1
            0x1A, 0x01, b'e', // data "e"
            0x0A, 0x01, b'p', // pk table "p"
            0x49, 1, 2, 3, 4, 5, 6, 7, 8, // unknown field 9, fixed64
            0x55, 1, 2, 3, 4, // unknown field 10, fixed32
            0x5A, 0x02, 0xFF, 0xFF, // unknown field 11, bytes (not UTF-8, not looked at)
            0x0A, 0x02, b'q', b'r', // pk table "qr"
            0x0A, 0x00, // pk table "" (legal protobuf, unused)
            0x12, 0x01, b'9', // ehk table "9"
            0x1A, 0x06, 0x08, 0x00, 0x10, 0x00, 0x1A, 0x00, // pk 0, ehk 0, empty data
            0x08, 0x81, 0x80, 0x00, // field 1 with wire type 0 at top level: unknown, skipped
        ];
        assert_eq!(
            decode_vec(&wrap(&proto)).unwrap(),
            [rec("qr", None, b"e"), rec("p", Some("9"), b"")]
        );
    }

    #[test]
    fn decode_rejects_bad_framing() {
        assert!(malformed(b"").contains("magic"));
        assert!(malformed(&[0xF3, 0x89, 0x9A]).contains("magic"));
        assert!(malformed(b"plain old record data").contains("magic"));
        assert!(malformed(&MAGIC).contains("short"));
        assert!(!is_aggregated(&MAGIC));
        let mut blob = wrap(&FIXED_PROTO);
        assert!(is_aggregated(&blob));
        *blob.last_mut().unwrap() ^= 1;
        assert!(malformed(&blob).contains("MD5"));
        let mut blob = wrap(&FIXED_PROTO);
        blob[10] ^= 0x40;
        assert!(malformed(&blob).contains("MD5"));
        let blob = wrap(&FIXED_PROTO);
        assert!(malformed(&blob[..blob.len() - 1]).contains("MD5"));
    }

    #[test]
    fn decode_rejects_bad_protobuf() {
        let cases: [(&[u8], &str); 14] = [
            (&[0x0A, 0x05, b'a'], "past the end"),
            (&[0x0A], "truncated varint"),
            (&[0x0A, 0x80], "truncated varint"),
            (
                &[
                    0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
                ],
                "past the end",
            ),
            (
                &[
                    0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02,
                ],
                "overflows",
            ),
            (
                &[
                    0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x80, 0x00,
                ],
                "overflows",
            ),
            (&[0x00, 0x00], "field number 0"),
            (&[0x0B, 0x0C], "wire type"),
            (&[0x0E], "wire type"),
            (&[0xF8, 0xFF, 0xFF, 0xFF, 0x1F, 0x00], "key out of range"),
            (&[0x0A, 0x01, 0xC3], "UTF-8"),
            (
                &[0x0A, 0x01, b'a', 0x1A, 0x03, 0x1A, 0x01, b'x'],
                "without partition_key_index",
            ),
            (&[0x0A, 0x01, b'a', 0x1A, 0x02, 0x08, 0x00], "without data"),
            (
                &[0x0A, 0x01, b'a', 0x1A, 0x04, 0x08, 0x01, 0x1A, 0x00],
                "index out of range",
            ),
        ];
        for (proto, why) in cases {
            let got = malformed(&wrap(proto));
            assert!(got.contains(why), "{proto:x?}: {got}");
        }
        // An EHK index with no EHK table.
        let proto = [
            0x0A, 0x01, b'a', 0x1A, 0x06, 0x08, 0x00, 0x10, 0x00, 0x1A, 0x00,
        ];
        assert!(malformed(&wrap(&proto)).contains("index out of range"));
        // A huge index must not wrap on 32-bit targets either.
        let proto = [
            0x0A, 0x01, b'a', 0x1A, 0x0D, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0xFF, 0x01, 0x1A, 0x00,
        ];
        assert!(malformed(&wrap(&proto)).contains("index out of range"));
    }

    #[test]
    fn no_callback_before_the_whole_aggregate_validates() {
        // One good record, then one pointing past the table.
        let proto = [
            0x0A, 0x01, b'a', 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00, 0x1A, 0x04, 0x08, 0x07, 0x1A,
            0x00,
        ];
        let mut calls = 0;
        assert!(decode(&wrap(&proto), |_| calls += 1).is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    fn keys_are_deduplicated_per_table() {
        let mut agg = Aggregator::new();
        agg.add("ключ".as_bytes(), Some(b"1"), b"a");
        agg.add(b"1", Some(b"1"), b"b"); // same bytes in the other table are a different key
        agg.add("ключ".as_bytes(), Some(b"2"), b"c");
        assert_eq!(agg.pks.spans.len(), 2);
        assert_eq!(agg.ehks.spans.len(), 2);
        let mut out = Vec::new();
        agg.finish_into(&mut out);
        assert_eq!(
            decode_vec(&out).unwrap(),
            [
                rec("ключ", Some("1"), b"a"),
                rec("1", Some("1"), b"b"),
                rec("ключ", Some("2"), b"c")
            ]
        );
    }

    #[test]
    fn take_undigested_gives_the_bytes_of_finish_undigested_into() {
        let (mut taker, mut copier) = (Aggregator::new(), Aggregator::new());
        let mut spare = Vec::new();
        let mut handed_over = 0;
        for round in 0..6usize {
            // Tables that grow from round to round: some rounds do not fit the room and fall back.
            for i in 0..(10 + round * round * 20) {
                let key = format!("key-{}-{}", round, i % (3 + round * 7));
                let ehk = (i % 4 == 0).then(|| format!("{}", i % 5));
                let data = vec![i as u8; i % 50];
                for agg in [&mut taker, &mut copier] {
                    agg.add(key.as_bytes(), ehk.as_deref().map(str::as_bytes), &data);
                }
            }
            let len = copier.encoded_len();
            assert_eq!(taker.encoded_len(), len);
            let mut want = Vec::new();
            copier.finish_undigested_into(&mut want);
            let got = match taker.take_undigested(std::mem::take(&mut spare)) {
                Ok((buf, start)) => {
                    handed_over += 1;
                    let got = buf[start..].to_vec();
                    spare = buf;
                    got
                }
                Err(next) => {
                    spare = next;
                    let mut out = Vec::new();
                    taker.finish_undigested_into(&mut out);
                    out
                }
            };
            assert_eq!(got, want, "round {round}");
            assert_eq!(got.len(), len);
            assert!(taker.is_empty() && taker.encoded_len() == OVERHEAD);
        }
        assert!(handed_over >= 3, "{handed_over}");
    }

    #[test]
    fn hash_collisions_are_resolved_by_bytes() {
        // Give every key the same hash to exercise the collision path, past a growth of the index.
        let mut table = KeyTable::default();
        let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("k{i}").into_bytes()).collect();
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(table.find(key, 42), None);
            assert_eq!(table.insert_new(key, 42, PK_TABLE_KEY), i);
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(table.find(key, 42), Some(i));
            // Another tag never matches, even when probing passes the key.
            assert_eq!(table.find(key, 0x7_0000_002A), None);
        }
        assert_eq!(table.find(b"w", 42), None);
        table.clear();
        assert_eq!(table.find(b"k0", 42), None);
    }
}
