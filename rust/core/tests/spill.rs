//! `Overflow::Spill` end to end in-process: a sender that does not take requests (a stalled endpoint), a burst
//! many times the ring, then delivery; the spill's size limit; and a spill left behind by one pipeline and
//! replayed by the next. Every event is counted.

mod common;
use common::{events_in, ok_response};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use treasure_core::batch::{BatcherConfig, Overflow, Pipeline};
use treasure_core::shards::ShardMap;
use treasure_core::spill::SpillConfig;
use treasure_core::{clock, CoreError};

fn config(dir: &Path, max_bytes: u64) -> BatcherConfig {
    BatcherConfig {
        stream: "s".into(),
        ring_bytes: 32 << 10,
        max_record_bytes: 4096,
        max_request_bytes: 64 << 10,
        aggregation_max_bytes: 4096,
        max_buffered_bytes: 160 << 10,
        max_ready_requests: 2,
        linger: Duration::from_millis(2),
        shard_records_per_s: 1e9,
        shard_bytes_per_s: 1e12,
        ordered: true,
        spill: Some(SpillConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: 256 << 10,
        }),
        ..BatcherConfig::default()
    }
}

/// Plays a healthy endpoint until nothing is in flight and the spill is empty.
fn deliver_all(p: &Pipeline) -> Vec<Vec<u8>> {
    let end = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    p.begin_flush();
    loop {
        let s = p.stats();
        if s.in_flight == 0 && s.spill_backlog_bytes == 0 {
            break;
        }
        assert!(Instant::now() < end, "not delivered in time: {s:?}");
        for req in p.poll(64) {
            seen.extend(events_in(req.body()));
            let n = req.records();
            p.complete(req, &ok_response(n)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    seen
}

fn event(i: usize) -> (Vec<u8>, String) {
    let key = format!("k{}", i % 13);
    (format!("{i}:{key}:{}", "x".repeat(90)).into_bytes(), key)
}

fn id(data: &[u8]) -> usize {
    std::str::from_utf8(data)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Per key, ids must come out in the order they went in.
fn assert_ordered_per_key(seen: &[Vec<u8>]) {
    let mut last: HashMap<String, usize> = HashMap::new();
    for data in seen {
        let text = std::str::from_utf8(data).unwrap();
        let mut parts = text.split(':');
        let i: usize = parts.next().unwrap().parse().unwrap();
        let key = parts.next().unwrap().to_string();
        if let Some(&prev) = last.get(&key) {
            assert!(prev < i, "key {key}: {i} after {prev}");
        }
        last.insert(key, i);
    }
}

#[test]
fn burst_many_times_the_ring_is_accepted_then_delivered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pipeline::start(config(dir.path(), 64 << 20), ShardMap::even(2)).unwrap();
    let n = 20_000; // ~2.3 MB of events into a 32 KiB ring: about 70 times its size
    for i in 0..n {
        let (data, key) = event(i);
        p.submit(&data, &key, None, Overflow::Spill).unwrap();
    }
    let s = p.stats();
    assert_eq!(s.accepted, n as u64);
    assert!(
        s.spilled > n as u64 / 2,
        "most of the burst went to disk: {s:?}"
    );
    assert_eq!(s.refused, 0);
    let seen = deliver_all(&p);
    assert_eq!(seen.len(), n);
    let unique: HashSet<usize> = seen.iter().map(|d| id(d)).collect();
    assert_eq!(unique.len(), n);
    assert_ordered_per_key(&seen);
    let s = p.stats();
    assert_eq!(
        (s.delivered, s.in_flight, s.dead_lettered),
        (n as u64, 0, 0)
    );
    // Events submitted after the spill drained go straight to the ring again.
    let (data, key) = event(n);
    p.submit(&data, &key, None, Overflow::Spill).unwrap();
    assert_eq!(p.stats().spilled, s.spilled);
    assert_eq!(deliver_all(&p).len(), 1);
    p.shutdown(false);
}

#[test]
fn full_spill_refuses_with_buffer_full_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pipeline::start(config(dir.path(), 1 << 20), ShardMap::even(1)).unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..30_000 {
        let (data, key) = event(i);
        match p.submit(&data, &key, None, Overflow::Spill) {
            Ok(()) => accepted.push(i),
            Err(CoreError::BufferFull) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0, "a 1 MiB spill cannot take 3 MB");
    assert_eq!(p.stats().refused, refused);
    let seen = deliver_all(&p);
    let got: HashSet<usize> = seen.iter().map(|d| id(d)).collect();
    assert_eq!(got, accepted.iter().copied().collect());
    p.shutdown(false);
}

#[test]
fn spill_left_at_an_abandoning_stop_is_replayed_by_the_next_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let n = 10_000;
    let first = Pipeline::start(config(dir.path(), 64 << 20), ShardMap::even(2)).unwrap();
    for i in 0..n {
        let (data, key) = event(i);
        first.submit(&data, &key, None, Overflow::Spill).unwrap();
    }
    assert!(first.stats().spilled > 0);
    // The endpoint never answered: stop, abandoning what is in memory (dead letters).
    first.shutdown(true);
    let dead: Vec<usize> = first
        .take_dead(usize::MAX)
        .iter()
        .map(|d| id(&d.data))
        .collect();
    let left = first.stats().spill_backlog_bytes;
    assert!(left > 0, "the spill keeps what was not replayed");
    drop(first);

    let second = Pipeline::start(config(dir.path(), 64 << 20), ShardMap::even(2)).unwrap();
    let seen = deliver_all(&second);
    let replayed: Vec<usize> = seen.iter().map(|d| id(d)).collect();
    assert_eq!(second.stats().spill_recovered, replayed.len() as u64);
    assert!(
        !replayed.is_empty(),
        "the second pipeline replays the spill"
    );
    let mut all: Vec<usize> = dead.iter().chain(&replayed).copied().collect();
    all.sort_unstable();
    let expected: Vec<usize> = (0..n).collect();
    assert!(
        all == expected,
        "each event dead-lettered or replayed, once: {} dead + {} replayed of {n}",
        dead.len(),
        replayed.len()
    );
    assert_ordered_per_key(&seen);
    second.shutdown(false);
}

#[test]
fn a_second_pipeline_cannot_share_a_spill_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Pipeline::start(config(dir.path(), 1 << 20), ShardMap::even(1)).unwrap();
    match Pipeline::start(config(dir.path(), 1 << 20), ShardMap::even(1)) {
        Err(CoreError::StorageLocked(_)) => {}
        other => panic!("expected StorageLocked, got {other:?}"),
    }
}

/// The Python binding releases the GIL only inside `offer`'s `wait`: every event that goes to the spill (a
/// write to the disk, under a lock the batcher holds while it reads the disk) is written inside it, and an
/// event that fits the ring is pushed without calling it.
#[test]
fn every_spilled_event_is_written_inside_wait() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pipeline::start(config(dir.path(), 64 << 20), ShardMap::even(1)).unwrap();
    let (mut waits, mut direct) = (0u64, 0u64);
    for i in 0..5_000 {
        let (data, key) = event(i);
        let spilled_before = p.stats().spilled;
        let mut waited = false;
        p.offer(
            &data,
            &key,
            None,
            clock::coarse_ns(),
            Overflow::Spill,
            |write| {
                waited = true;
                write()
            },
        )
        .unwrap();
        p.count_accepted(1);
        let spilled = p.stats().spilled - spilled_before;
        assert_eq!(
            spilled,
            u64::from(waited),
            "event {i}: spilled {spilled}, waited {waited}"
        );
        if waited {
            waits += 1;
        } else {
            direct += 1;
        }
    }
    assert!(waits > 0 && direct > 0, "{waits} spilled, {direct} pushed");
    assert_eq!(deliver_all(&p).len(), 5_000);
    p.shutdown(false);
}
