//! Sealing on the calling thread, without the ring, rate limits or a sender (benchmarks and tests).

use std::sync::Arc;

use crate::clock;
use crate::ring;
use crate::shards::ShardMap;
use crate::CoreError;

use super::batcher::Batcher;
use super::config::BatcherConfig;
use super::event::{check_partition_key, event_len, write_event};
use super::request::Request;
use super::shared::{lock, Shared};

/// The body of a request handled offline (no sender): it needs no outcome.
fn take_body(mut r: Request) -> Vec<u8> {
    r.home = None;
    let body = std::mem::take(&mut r.body);
    Arc::try_unwrap(body).unwrap_or_else(|b| (*b).clone())
}

/// Runs the batcher's routing, aggregation and request sealing over `events` on the calling thread, without
/// the ring, rate limits or a sender, and returns the sealed request bodies. For benchmarks and tests that
/// compare the batcher with other aggregators on the same events.
pub fn seal_offline<'a>(
    config: BatcherConfig,
    map: ShardMap,
    events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
) -> Result<Vec<Vec<u8>>, CoreError> {
    let mut out = Vec::new();
    seal_offline_with(config, map, events, |body| out.push(body.to_vec()))?;
    Ok(out)
}

/// [`seal_offline`], lending each body to `sink` as soon as it is sealed; the buffer is then reused.
pub fn seal_offline_with<'a>(
    config: BatcherConfig,
    map: ShardMap,
    events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), CoreError> {
    let mut offline = Offline::new(config, map, clock::coarse_ns())?;
    // Events are laid out as in the ring, a group at a time, and handed over as the ring's reader does.
    let mut stage = StagedEvents::at(offline.now);
    for (data, key, ehk) in events {
        stage.push(data, key, ehk)?;
        if stage.len() == ring::READ_GROUP {
            stage.for_each_group(|group| offline.ingest(group, &mut sink));
            stage.clear();
        }
    }
    stage.for_each_group(|group| offline.ingest(group, &mut sink));
    offline.finish(&mut sink);
    Ok(())
}

/// Events laid out exactly as the ring holds them (header, key, payload), as `submit` writes them.
///
/// [`seal_staged`] runs the batcher over them, so that a benchmark of the batcher times the batcher thread's
/// work alone: in the producer, validating and laying out each event is the submitting thread's work.
#[derive(Debug)]
pub struct StagedEvents {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// The submit time written into every event.
    at: u64,
}

impl StagedEvents {
    /// Lays out `events`, validating each partition key as `submit` does.
    pub fn new<'a>(
        events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
    ) -> Result<Self, CoreError> {
        let mut staged = Self::at(clock::coarse_ns());
        for (data, key, ehk) in events {
            staged.push(data, key, ehk)?;
        }
        Ok(staged)
    }

    fn at(at: u64) -> Self {
        Self {
            bytes: Vec::new(),
            ends: Vec::new(),
            at,
        }
    }

    fn push(&mut self, data: &[u8], key: &str, ehk: Option<u128>) -> Result<(), CoreError> {
        check_partition_key(key)?;
        let at = self.bytes.len();
        self.bytes
            .resize(at + event_len(key.len(), ehk.is_some(), data.len()), 0);
        write_event(
            &mut self.bytes[at..],
            self.at,
            key.as_bytes(),
            ehk,
            None,
            data,
        );
        self.ends.push(self.bytes.len());
        Ok(())
    }

    /// How many events are staged.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no event is staged.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Hands the events to `f` in groups of up to [`ring::READ_GROUP`], as the ring's reader does.
    fn for_each_group(&self, mut f: impl FnMut(&[&[u8]])) {
        let mut group: [&[u8]; ring::READ_GROUP] = [&[]; ring::READ_GROUP];
        let mut start = 0;
        for ends in self.ends.chunks(ring::READ_GROUP) {
            for (g, &end) in group.iter_mut().zip(ends) {
                *g = &self.bytes[start..end];
                start = end;
            }
            f(&group[..ends.len()]);
        }
    }
}

/// [`seal_offline_with`] over events already laid out as in the ring: the batcher thread's work alone.
pub fn seal_staged(
    config: BatcherConfig,
    map: ShardMap,
    staged: &StagedEvents,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), CoreError> {
    // The batcher's clock stands at the events' submit time, as it does when they are laid out as it goes.
    let mut offline = Offline::new(config, map, staged.at)?;
    staged.for_each_group(|group| offline.ingest(group, &mut sink));
    offline.finish(&mut sink);
    Ok(())
}

/// A batcher driven on the calling thread, without the ring, rate limits or a sender.
struct Offline {
    shared: Arc<Shared>,
    batcher: Batcher,
    now: u64,
    events: usize,
}

impl Offline {
    fn new(mut config: BatcherConfig, map: ShardMap, now: u64) -> Result<Self, CoreError> {
        config.shard_records_per_s = f64::MAX / 4.0;
        config.shard_bytes_per_s = f64::MAX / 4.0;
        config.validate()?;
        let (offline_ring, _offline_consumer) = ring::channel(4096)?;
        let shared = Shared::new(config, offline_ring)?;
        let batcher = Batcher::new(Arc::clone(&shared), map);
        Ok(Self {
            shared,
            batcher,
            now,
            events: 0,
        })
    }

    /// One group of up to [`ring::READ_GROUP`] events; every 4,096 events, seals what is due.
    fn ingest(&mut self, group: &[&[u8]], sink: &mut impl FnMut(&[u8])) {
        if group.is_empty() {
            return;
        }
        let before = self.events;
        self.batcher.on_events(group);
        self.events += group.len();
        if self.events / 4096 != before / 4096 {
            self.fill(false, sink);
        }
    }

    fn finish(mut self, sink: &mut impl FnMut(&[u8])) {
        self.batcher.close_aggregates(self.now, true);
        self.fill(true, sink);
    }

    /// Seals what is due, handing the requests to `sink` whenever the ready queue fills (the sender's part):
    /// the queue keeps the configured bound, which the request size depends on
    /// ([`BatcherConfig::request_payload_cap`]).
    fn fill(&mut self, flushing: bool, sink: &mut impl FnMut(&[u8])) {
        loop {
            self.batcher.fill(self.now, flushing, false);
            if lock(&self.shared.ready).is_empty() {
                return;
            }
            self.drain(sink);
        }
    }

    fn drain(&mut self, sink: &mut impl FnMut(&[u8])) {
        let ready: Vec<Request> = lock(&self.shared.ready).drain(..).collect();
        for body in ready.into_iter().map(take_body) {
            sink(&body);
            self.batcher.recycle_body(body);
        }
    }
}
