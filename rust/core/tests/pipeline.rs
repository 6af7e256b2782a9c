//! The pipeline end to end in-process: ring -> batcher thread -> sealed requests -> outcomes, with this test
//! playing the sender and Kinesis. Counts every event (accepted == delivered + dead_lettered).

mod common;
use common::{events_in, ok_response};

use std::collections::HashSet;
use std::time::{Duration, Instant};

use treasure_core::batch::{BatcherConfig, DeadRecord, Overflow, Pipeline, RequestFailure};
use treasure_core::shards::ShardMap;
use treasure_core::CoreError;

fn shard_map(n: u32) -> ShardMap {
    ShardMap::even(n)
}

/// Plays the sender until everything accepted is delivered (or the deadline passes).
fn deliver_all(p: &Pipeline, deadline: Duration, mut fail_every: Option<usize>) -> Vec<Vec<u8>> {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    let mut n = 0usize;
    p.begin_flush();
    while p.stats().in_flight > 0 {
        assert!(
            Instant::now() < end,
            "not delivered in time: {:?}",
            p.stats()
        );
        for req in p.poll(64) {
            n += 1;
            if let Some(k) = fail_every.as_mut() {
                // The first request fails too: a burst sealed into fewer than `k` requests still retries.
                if n % *k == 1 {
                    p.fail(req, RequestFailure::Throttled("test".into()));
                    continue;
                }
            }
            seen.extend(events_in(req.body()));
            let records = req.records();
            p.complete(req, &ok_response(records)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    seen
}

fn config(aggregate: bool) -> BatcherConfig {
    BatcherConfig {
        stream: "s".into(),
        aggregate,
        linger: Duration::from_millis(2),
        shard_records_per_s: 1e9,
        shard_bytes_per_s: 1e12,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        ..BatcherConfig::default()
    }
}

#[test]
fn every_event_delivered_once_with_retries() {
    for aggregate in [true, false] {
        let p = Pipeline::start(config(aggregate), shard_map(4)).unwrap();
        let n = 20_000;
        for i in 0..n {
            p.submit(
                format!("{i}").as_bytes(),
                &format!("k{}", i % 500),
                None,
                Overflow::Reject,
            )
            .unwrap();
        }
        let seen = deliver_all(&p, Duration::from_secs(30), Some(3));
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), n, "aggregate={aggregate}");
        assert_eq!(
            seen.len(),
            n,
            "a failed request's records must not be counted twice"
        );
        let s = p.stats();
        assert_eq!(
            (s.accepted, s.delivered, s.in_flight),
            (n as u64, n as u64, 0)
        );
        assert!(s.retried > 0);
        p.shutdown(false);
    }
}

/// Regression: token buckets were only refilled when a record was taken, so a shard whose bucket fell
/// below one aggregate's cost never sent again.
#[test]
fn rate_limited_shard_keeps_sending() {
    let cfg = BatcherConfig {
        shard_bytes_per_s: 100_000.0,
        shard_records_per_s: 50.0,
        ..config(true)
    };
    let p = Pipeline::start(cfg, shard_map(1)).unwrap();
    let data = vec![b'x'; 1000];
    for i in 0..150 {
        p.submit(&data, &format!("k{i}"), None, Overflow::Reject)
            .unwrap();
    }
    let started = Instant::now();
    let seen = deliver_all(&p, Duration::from_secs(20), None);
    assert_eq!(seen.len(), 150);
    // 150 KB at 100 KB/s with a 100 KB burst: at least ~0.4 s, and it must finish.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    p.shutdown(false);
}

#[test]
fn dropped_request_is_retried_not_lost() {
    let p = Pipeline::start(config(false), shard_map(2)).unwrap();
    for i in 0..100 {
        p.submit(format!("{i}").as_bytes(), "k", None, Overflow::Reject)
            .unwrap();
    }
    p.begin_flush();
    let end = Instant::now() + Duration::from_secs(5);
    let mut dropped = 0;
    while dropped == 0 {
        assert!(Instant::now() < end);
        for req in p.poll(8) {
            dropped += req.events();
            drop(req);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    let seen = deliver_all(&p, Duration::from_secs(10), None);
    assert_eq!(seen.len(), 100);
    assert_eq!(p.stats().delivered, 100);
}

#[test]
fn shutdown_with_abandon_dead_letters_everything() {
    let p = Pipeline::start(
        BatcherConfig {
            linger: Duration::from_secs(10),
            ..config(true)
        },
        shard_map(2),
    )
    .unwrap();
    for i in 0..1000 {
        p.submit(
            format!("{i}").as_bytes(),
            &format!("k{i}"),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
    p.shutdown(true);
    let dead = p.take_dead(usize::MAX);
    assert_eq!(dead.len(), 1000);
    assert!(dead.iter().all(|d| &*d.error_code == "ProducerClosed"));
    p.confirm_dead(1000);
    let s = p.stats();
    assert_eq!((s.accepted, s.dead_lettered, s.in_flight), (1000, 1000, 0));
}

/// An abandoning stop with a dead bound reads the ring only as fast as the dead list is taken: the records
/// waiting never hold much more than the bound, however large the backlog, and every event comes out once,
/// oldest first per key. Without anyone taking them, `lift_dead_bound` lets the stop finish.
#[test]
fn bounded_abandon_keeps_the_dead_list_under_its_bound_and_loses_nothing() {
    const EVENTS: usize = 120_000;
    const KEYS: usize = 50;
    const BOUND: u64 = 1 << 20;
    // Nothing is sealed (linger, and no one polls) and the batcher's budget is small: the backlog stays in
    // the ring.
    let start = || {
        let config = BatcherConfig {
            ring_bytes: 32 << 20,
            linger: Duration::from_secs(10),
            max_request_bytes: 1 << 20,
            max_buffered_bytes: 2 << 20,
            ..config(true)
        };
        std::sync::Arc::new(Pipeline::start(config, shard_map(4)).unwrap())
    };
    let p = start();
    for i in 0..EVENTS {
        let data = format!("{i:0>100}");
        p.submit(
            data.as_bytes(),
            &format!("k{}", i % KEYS),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
    // Unbounded, the dead list would hold the whole backlog at once: more than 25 times the bound.
    let stopper = {
        let p = std::sync::Arc::clone(&p);
        std::thread::spawn(move || p.shutdown_bounded(true, Some(BOUND)))
    };
    let mut dead = Vec::new();
    let mut most = 0u64;
    let mut lagging = true;
    loop {
        most = most.max(p.dead_bytes());
        let done = stopper.is_finished();
        let batch = p.take_dead(2_000);
        p.confirm_dead(batch.len() as u64);
        if batch.is_empty() && done {
            break;
        }
        dead.extend(batch);
        if lagging && dead.len() > EVENTS / 2 {
            // A slow taker: the batcher must wait for it, not read on.
            std::thread::sleep(Duration::from_millis(50));
            most = most.max(p.dead_bytes());
            lagging = false;
        }
    }
    stopper.join().unwrap();
    let total: u64 = dead.iter().map(DeadRecord::mem).sum();
    assert!(
        total > 25 * BOUND,
        "the backlog is not large enough to test the bound: {total}"
    );
    // One ring chunk (256 KiB of events) becomes at most about 2 MiB of dead records on top of the bound,
    // plus what the batcher held (its buffer budget) at the stop.
    assert!(
        most <= BOUND + (4 << 20),
        "the dead list reached {most} bytes"
    );
    assert_eq!(dead.len(), EVENTS);
    assert!(dead.iter().all(|d| &*d.error_code == "ProducerClosed"));
    let mut next = vec![0usize; KEYS];
    for d in &dead {
        let i: usize = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
        let k = i % KEYS;
        assert_eq!(d.partition_key, format!("k{k}"));
        assert!(i >= next[k], "event {i} of key {k} after a later one");
        next[k] = i + 1;
    }
    let unique: HashSet<&[u8]> = dead.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(unique.len(), EVENTS);
    let s = p.stats();
    assert_eq!(
        (s.accepted, s.dead_lettered, s.in_flight),
        (EVENTS as u64, EVENTS as u64, 0)
    );
    assert_eq!(p.dead_bytes(), 0);

    // Nobody takes: lifting the bound lets the stop finish with everything in the dead list.
    let p = start();
    for i in 0..60_000 {
        p.submit(format!("{i:0>100}").as_bytes(), "k", None, Overflow::Reject)
            .unwrap();
    }
    let stopper = {
        let p = std::sync::Arc::clone(&p);
        std::thread::spawn(move || p.shutdown_bounded(true, Some(1)))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stopper.is_finished(),
        "the stop did not wait for the dead list to be taken"
    );
    p.lift_dead_bound();
    stopper.join().unwrap();
    assert_eq!(p.take_dead(usize::MAX).len(), 60_000);
}

/// `shed_at_bytes`: past the critical backlog the pipeline refuses with `Overloaded` (before the ring is full),
/// and accepts again once it has drained.
#[test]
fn critical_backlog_sheds_before_the_ring_is_full_and_recovers() {
    let mut cfg = config(true);
    cfg.ring_bytes = 1 << 20;
    cfg.max_record_bytes = 64 << 10;
    cfg.max_request_bytes = 256 << 10;
    cfg.aggregation_max_bytes = 16 << 10;
    cfg.max_buffered_bytes = 1 << 20;
    cfg.max_ready_requests = 1;
    cfg.shed_at_bytes = 512 << 10;
    let p = Pipeline::start(cfg, shard_map(1)).unwrap();
    let mut accepted = 0u64;
    let shed = loop {
        match p.submit(&[b'x'; 200], "k", None, Overflow::Reject) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 1_000_000, "never shed");
    };
    match shed {
        CoreError::Overloaded { used, critical } => {
            assert_eq!(critical, 512 << 10);
            assert!(
                used >= critical && used < 1 << 20,
                "shed at {used} bytes, before the ring was full"
            );
        }
        other => panic!("expected Overloaded, got {other}"),
    }
    assert_eq!(p.stats().refused, 1);
    let seen = deliver_all(&p, Duration::from_secs(30), None);
    assert_eq!(seen.len() as u64, accepted);
    p.submit(b"after", "k", None, Overflow::Reject)
        .expect("accepts again once drained");
    assert_eq!(deliver_all(&p, Duration::from_secs(30), None).len(), 1);
    p.shutdown(false);
}

/// The benchmark's path (events laid out beforehand, then the batcher alone) seals exactly the bodies that
/// the path laying events out as it goes does, for keys with and without explicit hash keys; and staging
/// refuses a bad partition key as `submit` does.
#[test]
fn staged_events_seal_the_same_bodies() {
    use treasure_core::batch::{seal_offline, seal_staged, StagedEvents};
    let data: Vec<Vec<u8>> = (0..20_000u32)
        .map(|i| vec![(i % 251) as u8; (i % 700) as usize])
        .collect();
    let keys: Vec<String> = (0..20_000u32).map(|i| format!("k-{}", i % 997)).collect();
    let events = || {
        data.iter().zip(&keys).enumerate().map(|(i, (d, k))| {
            let ehk = (i % 5 == 0).then_some(u128::MAX / 7 * (i % 7) as u128);
            (d.as_slice(), k.as_str(), ehk)
        })
    };
    for aggregate in [true, false] {
        let expected = seal_offline(config(aggregate), shard_map(4), events()).unwrap();
        let staged = StagedEvents::new(events()).unwrap();
        assert_eq!(staged.len(), data.len());
        let mut got = Vec::new();
        seal_staged(config(aggregate), shard_map(4), &staged, |b| {
            got.push(b.to_vec());
        })
        .unwrap();
        assert!(!got.is_empty());
        assert_eq!(got, expected, "aggregate={aggregate}");
    }
    let long = "x".repeat(257);
    for bad in ["", long.as_str()] {
        let err = StagedEvents::new([(&b"d"[..], bad, None)]).unwrap_err();
        assert!(matches!(err, CoreError::InvalidPartitionKey(_)), "{err:?}");
    }
}
