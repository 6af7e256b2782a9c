//! Entries: one Kinesis record each (a KPL aggregate or a raw event), waiting in a shard queue; the requests
//! sealed from them, and what the sender reports back about each.

use std::sync::Arc;

use crate::clock;
use crate::kpl;
use crate::shards::ShardMap;
use crate::wire::{RequestBuilder, Span};
use md5::{Digest, Md5};

use super::shared::Shared;
use super::stats::RequestFailure;

#[derive(Debug)]
pub(super) struct Entry {
    /// The record's data is `data[start..]` (an aggregate handed over in its aggregator's buffer starts
    /// after the room the aggregator kept for its tables).
    pub(super) data: Vec<u8>,
    pub(super) start: usize,
    pub(super) key: Box<[u8]>,
    pub(super) route_hash: u128,
    pub(super) send_ehk: bool,
    pub(super) events: u32,
    pub(super) attempts: u32,
    pub(super) first_ns: u64,
    /// Coarse monotonic nanoseconds of the first failed attempt; 0 while none has failed.
    pub(super) first_failure_ns: u64,
    /// Lowest WAL position among its events ([`NO_WAL`] without a WAL).
    pub(super) wal: u64,
    pub(super) not_before_ns: u64,
    pub(super) last_error: Option<(String, String)>,
    /// A KPL aggregate whose MD5 trailer is still zero: digests are computed many at a time (SIMD lanes)
    /// just before records are taken into a request.
    pub(super) digest_pending: bool,
}

impl Entry {
    pub(super) fn note_failure(&mut self, code: String, message: String) {
        if self.first_failure_ns == 0 {
            self.first_failure_ns = clock::coarse_ns().max(1);
        }
        self.last_error = Some((code, message));
    }

    /// Writes the digest of an aggregate sealed without one (the rare paths that need it at once).
    pub(super) fn digest_now(&mut self) {
        if self.digest_pending {
            self.write_digest(Md5::digest(kpl::digest_input(self.bytes())).into());
        }
    }

    /// Writes an aggregate's MD5 trailer, computed by the caller (many at a time, see `encode_deferred`).
    pub(super) fn write_digest(&mut self, digest: [u8; 16]) {
        kpl::set_digest(&mut self.data[self.start..], digest);
        self.digest_pending = false;
    }

    pub(super) fn cost(&self) -> usize {
        RequestBuilder::record_cost(self.bytes().len(), self.key.len())
    }

    /// The record's data.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }
    pub(super) fn mem(&self) -> usize {
        self.data.capacity() + self.key.len() + std::mem::size_of::<Self>()
    }
}

/// One record of a sealed request: where its data sits in the body, enough to rebuild the entry if it fails.
#[derive(Debug, Clone, Copy)]
pub(super) struct SentEntry {
    pub(super) span: Span,
    pub(super) data_len: u32,
    pub(super) key_off: u32,
    pub(super) key_len: u16,
    pub(super) send_ehk: bool,
    pub(super) shard: u32,
    pub(super) route_hash: u128,
    pub(super) events: u32,
    pub(super) attempts: u32,
    pub(super) first_ns: u64,
    pub(super) first_failure_ns: u64,
    /// Lowest WAL position among its events ([`NO_WAL`] without a WAL).
    pub(super) wal: u64,
}

/// A sealed PutRecords request, owned by the sender until it calls [`Pipeline::complete`] or
/// [`Pipeline::fail`].
#[derive(Debug)]
pub struct Request {
    pub(super) id: u64,
    pub(super) body: Arc<Vec<u8>>,
    pub(super) keys: Vec<u8>,
    pub(super) entries: Vec<SentEntry>,
    pub(super) shard_ids: Arc<Vec<String>>,
    pub(super) shards: Vec<u32>,
    pub(super) generation: u64,
    pub(super) events: u64,
    pub(super) mem: usize,
    /// Set while the request is out with the sender: if it is dropped without an outcome, its records go
    /// back for retry instead of vanishing.
    pub(super) home: Option<Arc<Shared>>,
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(shared) = self.home.take() {
            shared.fail_request(
                self,
                RequestFailure::NotSent("the sender dropped the request without an outcome".into()),
            );
        }
    }
}

impl Request {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// The body, shared: the sender may keep it alive (e.g. exported to Python) past completion.
    pub fn body_shared(&self) -> Arc<Vec<u8>> {
        Arc::clone(&self.body)
    }
    /// Kinesis records in the request.
    pub fn records(&self) -> usize {
        self.entries.len()
    }
    /// User events in the request.
    pub fn events(&self) -> u64 {
        self.events
    }
    /// Ids of the shards the request writes to.
    pub fn shard_ids(&self) -> Vec<String> {
        self.shards
            .iter()
            .map(|&s| self.shard_ids[s as usize].clone())
            .collect()
    }
    /// Bytes of data plus partition keys (what Kinesis counts against its limits).
    pub fn payload_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.data_len as usize + e.key_len as usize)
            .sum()
    }
}

/// What the sender reports back, applied by the batcher thread.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) request_id: u64,
    pub(super) generation: u64,
    pub(super) shards: Vec<u32>,
    pub(super) retries: Vec<(u32, Entry)>,
    /// Aggregates acknowledged in another shard than the one they were built for, with that shard's id: not
    /// counted as delivered until the batcher knows whether that shard's range holds every record in them.
    pub(super) misplaced: Vec<(u32, Entry, String)>,
    pub(super) throttled_shards: Vec<u32>,
    pub(super) count_attempt: bool,
    pub(super) mem: usize,
}

#[derive(Debug, Default)]
pub(super) struct Inbox {
    pub(super) completions: Vec<Completion>,
    pub(super) new_map: Option<ShardMap>,
}
