//! Ring -> shard aggregates: routing, KPL aggregation, buffer reuse.

use crate::clock;
use crate::kpl::{self, Aggregator};
use crate::md5x;
use crate::ring::{self, RingConsumer};
use crate::shards::{self, KeyCache};
use crate::wal::NO_WAL;

use super::{Batcher, OpenAggregate, KEY_CACHE_MAX, READ_CHUNK};
use crate::batch::event::{event_key, read_event, EventView, FLAG_EHK};
use crate::batch::request::Entry;

impl Batcher {
    /// Reads up to 16 chunks of the ring, as the memory budget allows. Returns whether it read anything, and
    /// whether more is waiting that the batcher will read without closing anything (see
    /// [`more_to_read`](Self::more_to_read)).
    pub(super) fn drain_ring(&mut self, ring: &mut RingConsumer) -> (bool, bool) {
        let mut budget = 16;
        let mut read = false;
        while self.has_room() && ring.used_bytes() > 0 && budget > 0 {
            // No more than the room left: the budget is not overshot by a whole chunk.
            let max_bytes = READ_CHUNK.min(self.room());
            if ring.read_grouped(max_bytes, |payloads| self.on_events(payloads)) == 0 {
                // The next record is still being written.
                return (read, false);
            }
            read = true;
            budget -= 1;
            let more = self.more_to_read(ring.used_bytes());
            self.seal_after_read(clock::coarse_ns(), more);
        }
        (read, self.more_to_read(ring.used_bytes()))
    }

    /// Whether events wait in the ring that the batcher reads next without closing an aggregate first: it has
    /// room for them, or room will come back with the answer to a request out with the sender. They are the
    /// company an open aggregate (and the open request) waits for. Only with no room and nothing out must
    /// open aggregates close to make room, even part-filled.
    pub(super) fn more_to_read(&self, ring_used: usize) -> bool {
        ring_used > 0 && (self.has_room() || self.unanswered > 0)
    }

    #[inline]
    fn hash_for(&mut self, key: &[u8], slot_hash: u64) -> u128 {
        if self.key_cache.len() >= KEY_CACHE_MAX {
            self.key_cache.clear();
        }
        self.key_cache.get_or_insert(key, slot_hash)
    }

    /// A group of ring payloads: the key-cache slots of all are fetched first, so their misses overlap
    /// instead of each event waiting on memory in turn.
    pub(in crate::batch) fn on_events(&mut self, payloads: &[&[u8]]) {
        let mut hashes = [0u64; ring::READ_GROUP];
        for (p, h) in payloads.iter().zip(hashes.iter_mut()) {
            if p[10] & FLAG_EHK == 0 {
                *h = KeyCache::slot_hash(event_key(p));
                self.key_cache.prefetch(*h);
            }
        }
        for (i, p) in payloads.iter().enumerate() {
            let slot_hash = hashes.get(i).copied();
            self.on_event_hashed(p, slot_hash);
        }
    }

    #[inline]
    fn on_event_hashed(&mut self, payload: &[u8], slot_hash: Option<u64>) {
        let ev = read_event(payload);
        if ev.wal != NO_WAL {
            // Ring order is WAL order: everything below this event has been read from the ring.
            self.wal_drained_next = ev.wal + 1;
        }
        self.ingest_hashed(&ev, slot_hash);
    }

    pub(super) fn ingest(&mut self, ev: &EventView<'_>) {
        self.ingest_hashed(ev, None);
    }

    #[inline]
    fn ingest_hashed(&mut self, ev: &EventView<'_>, slot_hash: Option<u64>) {
        let route_hash = if let Some(h) = ev.ehk {
            h
        } else {
            let h = slot_hash.unwrap_or_else(|| KeyCache::slot_hash(ev.key));
            self.hash_for(ev.key, h)
        };
        let shard = self.map.route(route_hash);
        let cfg = &self.shared.config;
        let mut ehk_buf = [0u8; 40];
        let ehk_text = ev.ehk.map(|h| shards::format_hash_key(h, &mut ehk_buf));
        let ehk_bytes = ehk_text.map(str::as_bytes);
        let alone =
            kpl::OVERHEAD + ev.data.len() + ev.key.len() + ehk_bytes.map_or(0, <[u8]>::len) + 32;
        if cfg.aggregate && alone + ev.key.len() <= cfg.aggregation_max_bytes {
            let max = cfg.aggregation_max_bytes;
            // The outer record's partition key counts against the record limit too.
            if let Some(open) = self.shards[shard].open.as_mut() {
                let before = open.agg.encoded_len();
                let limit = max - open.first_key.len();
                if open.agg.try_add(ev.key, ehk_bytes, ev.data, limit) {
                    open.wal = open.wal.min(ev.wal);
                    self.buffered += open.agg.encoded_len() - before;
                    return;
                }
                let open = self.shards[shard]
                    .open
                    .take()
                    .unwrap_or_else(|| unreachable!());
                let entry = self.finish_aggregate(open);
                self.buffered += entry.mem();
                self.shards[shard].fresh.push_back(entry);
            }
            // Reuse a cleared aggregator: a new one per aggregate re-grows its key tables every time.
            let mut agg = self.spare_aggregators.pop().unwrap_or_default();
            agg.add(ev.key, ehk_bytes, ev.data);
            self.buffered += agg.encoded_len();
            self.shards[shard].open = Some(OpenAggregate {
                agg,
                first_key: ev.key.to_vec(),
                first_hash: route_hash,
                first_ehk: ev.ehk.is_some(),
                first_ns: ev.enqueued_ns,
                wal: ev.wal,
            });
            return;
        }
        if let Some(open) = self.shards[shard].open.take() {
            // The open aggregate holds earlier events, maybe of this key: it goes first.
            let entry = self.finish_aggregate(open);
            self.buffered += entry.mem();
            self.shards[shard].fresh.push_back(entry);
        }
        // A recycled buffer: one allocation and free less per raw event.
        let mut data = self.raw_pool.pop().unwrap_or_default();
        data.extend_from_slice(ev.data);
        let entry = Entry {
            data,
            start: 0,
            key: ev.key.into(),
            route_hash,
            send_ehk: ev.ehk.is_some(),
            events: 1,
            attempts: 0,
            first_ns: ev.enqueued_ns,
            first_failure_ns: 0,
            wal: ev.wal,
            not_before_ns: 0,
            last_error: None,
            digest_pending: false,
        };
        self.buffered += entry.mem();
        self.shards[shard].fresh.push_back(entry);
    }

    /// Turns an open aggregate into one entry; a lone event is sent as a plain record, as the KPL does.
    /// The aggregate's MD5 trailer is left for [`seal_digests`](Self::seal_digests).
    pub(super) fn finish_aggregate(&mut self, mut open: OpenAggregate) -> Entry {
        let events = open.agg.len() as u32;
        let before = open.agg.encoded_len();
        self.buffered = self.buffered.saturating_sub(before);
        if events == 1 {
            self.scratch.clear();
            open.agg.finish_into(&mut self.scratch);
            self.recycle(open.agg);
            let mut data = Vec::new();
            let _ = kpl::decode(&self.scratch, |sub| data = sub.data.to_vec());
            return Entry {
                data,
                start: 0,
                key: open.first_key.into_boxed_slice(),
                route_hash: open.first_hash,
                send_ehk: open.first_ehk,
                events: 1,
                attempts: 0,
                first_ns: open.first_ns,
                first_failure_ns: 0,
                wal: open.wal,
                not_before_ns: 0,
                last_error: None,
                digest_pending: false,
            };
        }
        // The aggregator's own buffer when its tables fit the room it kept: no copy of the records.
        // Sized for a whole aggregate: a buffer grown by doubling would copy it over again and again.
        let next = self
            .data_pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.shared.config.aggregation_max_bytes + 4096));
        let (data, start) = match open.agg.take_undigested(next) {
            Ok(taken) => taken,
            Err(mut data) => {
                data.clear();
                data.reserve(before);
                open.agg.finish_undigested_into(&mut data);
                (data, 0)
            }
        };
        self.recycle(open.agg);
        Entry {
            data,
            start,
            key: open.first_key.into_boxed_slice(),
            route_hash: open.first_hash,
            // The outer record is routed by the hash of its first event, so it lands in this shard.
            send_ehk: true,
            events,
            attempts: 0,
            first_ns: open.first_ns,
            first_failure_ns: 0,
            wal: open.wal,
            not_before_ns: 0,
            last_error: None,
            digest_pending: true,
        }
    }

    /// Keeps an aggregate's emptied buffer for the next aggregate: a deferred-trailer group's worth plus two
    /// per shard.
    pub(super) fn recycle_data(&mut self, mut data: Vec<u8>) {
        if self.data_pool.len() < 2 * self.shards.len() + self.md5_lanes {
            data.clear();
            self.data_pool.push(data);
        }
    }

    pub(in crate::batch) fn recycle_body(&mut self, body: Vec<u8>) {
        // Keep a few: enough for the requests in flight, and at most half the buffer budget, which they
        // count against: a kept body's pages stay resident.
        let cap = body.capacity();
        if self.body_pool.len() < 4 && self.pooled + cap <= self.config().max_buffered_bytes / 2 {
            self.pooled += cap;
            self.body_pool.push(body);
        }
    }

    pub(super) fn pooled_body(&mut self) -> Option<Vec<u8>> {
        let body = self.body_pool.pop()?;
        self.pooled -= body.capacity();
        Some(body)
    }

    /// What the batcher may still take in: `max_buffered_bytes` less what it holds outside the ring
    /// (aggregates, queues, request bodies, kept bodies).
    fn room(&self) -> usize {
        self.config()
            .max_buffered_bytes
            .saturating_sub(self.buffered + self.pooled)
    }

    pub(super) fn has_room(&self) -> bool {
        self.room() > 0
    }

    fn recycle(&mut self, agg: Aggregator) {
        if self.spare_aggregators.len() < self.shards.len().max(4) {
            self.spare_aggregators.push(agg);
        }
    }

    /// Computes the MD5 trailers of the deferred aggregates of the open request, many at a time in SIMD
    /// lanes (16 with AVX2 or AVX-512, see [`md5x`]): MD5 is serial per message and was 40% of the batcher's time.
    /// Then rewrites the base64 of their trailers in the body and recycles their buffers.
    ///
    /// A request holds fewer aggregates than there are lanes (seven at the default request size): the lanes
    /// left over take aggregates still queued for later requests, whose trailers are then written before they
    /// go in (`digest_pending` cleared), so no lane runs empty while a backlog waits.
    pub(super) fn encode_deferred(&mut self) {
        if self.open.deferred.is_empty() {
            return;
        }
        let mut deferred = std::mem::take(&mut self.open.deferred);
        let spare = self.md5_lanes.saturating_sub(deferred.len());
        let mut queued: Vec<(usize, usize)> = Vec::new();
        'shards: for (s, st) in self.shards.iter().enumerate() {
            for (k, e) in st.fresh.iter().enumerate() {
                if queued.len() >= spare {
                    break 'shards;
                }
                if e.digest_pending {
                    queued.push((s, k));
                }
            }
        }
        let digests = {
            let inputs: Vec<&[u8]> = deferred
                .iter()
                .map(|(data, start, _)| kpl::digest_input(&data[*start..]))
                .chain(
                    queued
                        .iter()
                        .map(|&(s, k)| kpl::digest_input(self.shards[s].fresh[k].bytes())),
                )
                .collect();
            md5x::md5_many(&inputs)
        };
        let (own, ahead) = digests.split_at(deferred.len());
        for (&(s, k), &digest) in queued.iter().zip(ahead) {
            self.shards[s].fresh[k].write_digest(digest);
        }
        for ((mut data, start, span), &digest) in deferred.drain(..).zip(own) {
            let blob = &mut data[start..];
            kpl::set_digest(blob, digest);
            let trailer = blob.len() - digest.len();
            self.open.builder.rewrite_tail(span, blob, trailer);
            self.buffered = self.buffered.saturating_sub(data.capacity());
            self.recycle_data(data);
        }
        self.open.deferred = deferred;
    }

    pub(in crate::batch) fn close_aggregates(&mut self, now: u64, flushing: bool) {
        let linger = self.config().linger.as_nanos() as u64;
        for i in 0..self.shards.len() {
            let due = match &self.shards[i].open {
                Some(o) => flushing || now >= o.first_ns.saturating_add(linger),
                None => false,
            };
            if due {
                let open = self.shards[i].open.take().unwrap_or_else(|| unreachable!());
                let entry = self.finish_aggregate(open);
                self.buffered += entry.mem();
                self.shards[i].fresh.push_back(entry);
            }
        }
    }
}
