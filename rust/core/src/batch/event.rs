//! Events in the ring: [enqueued_ns u64][key_len u16][flags u8][pad 5][key][ehk u128 LE if flagged]
//! [WAL position u64 LE if flagged][data]. The spill and the WAL store them without the WAL position.

use crate::wal::NO_WAL;
use crate::wire;
use crate::CoreError;

pub(super) const EVENT_HEADER: usize = 16;
pub(super) const FLAG_EHK: u8 = 1;
const FLAG_WAL: u8 = 2;
pub(super) const WAL_FIELD: usize = 8;

/// Ring payload length of one event.
#[inline]
pub fn event_len(key_len: usize, has_ehk: bool, data_len: usize) -> usize {
    EVENT_HEADER + key_len + if has_ehk { 16 } else { 0 } + data_len
}

/// The longest event a config admits (a 256-character key in UTF-8, an explicit hash key, the largest record).
pub(super) fn largest_event(max_record_bytes: usize) -> usize {
    event_len(256 * 4, true, max_record_bytes)
}

/// How `offer` runs what may block: a wait for room, or a write to the spill (the disk, and the spill's lock,
/// which the batcher holds while it reads the disk). The Python binding releases the GIL around it. The event's
/// `data` and `key` are read after it returns as well (see [`Pipeline::offer`]).
pub type Wait<'a> = &'a (dyn Fn() -> Result<(), CoreError> + Sync);

// Always inlined: a call per event measured as a visible share of submit.
#[allow(clippy::inline_always)]
#[inline(always)]
pub(super) fn write_event(
    buf: &mut [u8],
    now: u64,
    key: &[u8],
    ehk: Option<u128>,
    wal: Option<u64>,
    data: &[u8],
) {
    buf[..8].copy_from_slice(&now.to_le_bytes());
    buf[8..10].copy_from_slice(&(key.len() as u16).to_le_bytes());
    buf[10] = if ehk.is_some() { FLAG_EHK } else { 0 } | if wal.is_some() { FLAG_WAL } else { 0 };
    let mut at = EVENT_HEADER;
    buf[at..at + key.len()].copy_from_slice(key);
    at += key.len();
    if let Some(h) = ehk {
        buf[at..at + 16].copy_from_slice(&h.to_le_bytes());
        at += 16;
    }
    if let Some(pos) = wal {
        buf[at..at + WAL_FIELD].copy_from_slice(&pos.to_le_bytes());
        at += WAL_FIELD;
    }
    buf[at..].copy_from_slice(data);
}

/// The CRC32C of the WAL frame of `len` bytes that `write_event` writes for this event without a WAL position,
/// computed from the event's pieces (see [`crate::log::frame_crc_of_pieces`]).
#[inline]
pub(super) fn event_frame_crc(
    len: usize,
    now: u64,
    key: &[u8],
    ehk: Option<u128>,
    data: &[u8],
) -> u32 {
    let flags = if ehk.is_some() { FLAG_EHK } else { 0 };
    // Bytes 8..16 of the header: the key's length, the flags, five zero bytes.
    let meta = key.len() as u64 | u64::from(flags) << 16;
    crate::log::frame_crc_of_pieces(len as u32, [now, meta], key, ehk, data)
}

/// Whether bytes read back from disk hold a whole event (the ring's own events always do).
pub(super) fn event_is_well_formed(buf: &[u8]) -> bool {
    if buf.len() < EVENT_HEADER {
        return false;
    }
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    let ehk = if buf[10] & FLAG_EHK != 0 { 16 } else { 0 };
    let wal = if buf[10] & FLAG_WAL != 0 {
        WAL_FIELD
    } else {
        0
    };
    (1..=1024).contains(&key_len) && EVENT_HEADER + key_len + ehk + wal <= buf.len()
}

pub(super) struct EventView<'a> {
    pub(super) enqueued_ns: u64,
    pub(super) key: &'a [u8],
    pub(super) ehk: Option<u128>,
    pub(super) wal: u64,
    pub(super) data: &'a [u8],
}

#[inline]
pub(super) fn read_event(buf: &[u8]) -> EventView<'_> {
    let enqueued_ns = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    let mut at = EVENT_HEADER;
    let key = &buf[at..at + key_len];
    at += key_len;
    let ehk = if buf[10] & FLAG_EHK != 0 {
        let h = u128::from_le_bytes(buf[at..at + 16].try_into().unwrap_or_default());
        at += 16;
        Some(h)
    } else {
        None
    };
    let wal = if buf[10] & FLAG_WAL != 0 {
        let pos = u64::from_le_bytes(buf[at..at + WAL_FIELD].try_into().unwrap_or_default());
        at += WAL_FIELD;
        pos
    } else {
        NO_WAL
    };
    EventView {
        enqueued_ns,
        key,
        ehk,
        wal,
        data: &buf[at..],
    }
}

/// The partition key of a ring event, without parsing the rest.
#[inline]
pub(super) fn event_key(buf: &[u8]) -> &[u8] {
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    &buf[EVENT_HEADER..EVENT_HEADER + key_len]
}

/// Validates a partition key: 1 to 256 Unicode characters.
#[inline]
pub fn check_partition_key(key: &str) -> Result<(), CoreError> {
    if key.is_empty() {
        return Err(CoreError::InvalidPartitionKey("must not be empty".into()));
    }
    // Fast path: 256 bytes can never be more than 256 characters.
    if key.len() > wire::MAX_PARTITION_KEY_CHARS {
        let chars = key.chars().count();
        if chars > wire::MAX_PARTITION_KEY_CHARS {
            return Err(CoreError::InvalidPartitionKey(format!(
                "{chars} characters, at most 256 allowed"
            )));
        }
    }
    Ok(())
}
