//! `durability = "wal"` in-process: what a pipeline accepted and never saw acknowledged is replayed by the next
//! pipeline on the same directory; what was acknowledged is not. (The SIGKILL case is tested from Python, where
//! a child process can be killed.)

mod common;
use common::{events_in, ok_response};

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use treasure_core::batch::{BatcherConfig, Overflow, Pipeline};
use treasure_core::log::FsyncPolicy;
use treasure_core::shards::ShardMap;
use treasure_core::wal::WalConfig;
use treasure_core::CoreError;

fn config(dir: &Path) -> BatcherConfig {
    BatcherConfig {
        stream: "s".into(),
        ring_bytes: 1 << 20,
        max_record_bytes: 64 << 10,
        max_request_bytes: 1 << 20,
        aggregation_max_bytes: 16 << 10,
        max_buffered_bytes: 4 << 20,
        linger: Duration::from_millis(2),
        shard_records_per_s: 1e9,
        shard_bytes_per_s: 1e12,
        wal: Some(WalConfig {
            dir: dir.to_path_buf(),
            fsync: FsyncPolicy::Never,
            segment_bytes: 64 << 10,
        }),
        ..BatcherConfig::default()
    }
}

fn ids_in(body: &[u8]) -> Vec<u64> {
    events_in(body)
        .iter()
        .map(|d| std::str::from_utf8(d).unwrap().parse().unwrap())
        .collect()
}

fn deliver_all(p: &Pipeline) -> Vec<u64> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    p.begin_flush();
    loop {
        let s = p.stats();
        if s.in_flight == 0 && s.wal_replay_pending == 0 {
            break;
        }
        assert!(Instant::now() < end, "not delivered in time: {s:?}");
        for req in p.poll(64) {
            seen.extend(ids_in(req.body()));
            let n = req.records();
            p.complete(req, &ok_response(n)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    seen
}

fn submit_range(p: &Pipeline, ids: std::ops::Range<u64>) {
    for i in ids {
        p.submit(
            i.to_string().as_bytes(),
            &format!("k{}", i % 31),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
}

#[test]
fn unacknowledged_events_are_replayed_and_acknowledged_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    submit_range(&first, 0..5_000);
    let delivered: HashSet<u64> = deliver_all(&first).into_iter().collect();
    assert_eq!(delivered.len(), 5_000);
    std::thread::sleep(Duration::from_millis(250)); // the cursor moves at most every 200 ms
    submit_range(&first, 5_000..8_000);
    // The endpoint is gone: stop, leaving the rest in the dead list, never confirmed as stored.
    first.shutdown(true);
    let dead = first.take_dead(usize::MAX).len();
    assert_eq!(dead, 3_000);
    drop(first);

    let second = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    let replayed = deliver_all(&second);
    let s = second.stats();
    let replayed_set: HashSet<u64> = replayed.iter().copied().collect();
    assert!(
        (5_000..8_000).all(|i| replayed_set.contains(&i)),
        "every unacknowledged event is replayed"
    );
    assert_eq!(
        s.wal_recovered, 3_000,
        "acknowledged events are not replayed"
    );
    assert_eq!((s.accepted, s.delivered), (3_000, 3_000));
    second.shutdown(false);
    drop(second);

    let third = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    assert_eq!(
        third.stats().wal_replay_pending,
        0,
        "everything was acknowledged"
    );
    assert!(deliver_all(&third).is_empty());
    third.shutdown(false);
}

#[test]
fn confirmed_dead_letters_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pipeline::start(config(dir.path()), ShardMap::even(1)).unwrap();
    submit_range(&first, 0..1_000);
    first.shutdown(true);
    let n = first.take_dead(usize::MAX).len() as u64;
    first.confirm_dead(n);
    first.finish_wal().unwrap();
    drop(first);
    let second = Pipeline::start(config(dir.path()), ShardMap::even(1)).unwrap();
    assert!(deliver_all(&second).is_empty());
    assert_eq!(second.stats().wal_recovered, 0);
}

#[test]
fn a_full_ring_refuses_before_writing_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_buffered_bytes = 2 << 20;
    cfg.max_ready_requests = 1;
    let first = Pipeline::start(cfg.clone(), ShardMap::even(1)).unwrap();
    let mut accepted = 0u64;
    for i in 0..200_000u64 {
        let data = format!("{i}{}", " ".repeat(200));
        match first.submit(data.trim_end().as_bytes(), "k", None, Overflow::Reject) {
            Ok(()) => accepted += 1,
            Err(CoreError::BufferFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted < 200_000, "the ring filled");
    first.shutdown(true);
    let _ = first.take_dead(usize::MAX);
    drop(first);
    let second = Pipeline::start(cfg, ShardMap::even(1)).unwrap();
    let replayed = deliver_all(&second);
    assert_eq!(
        replayed.len() as u64,
        accepted,
        "the refused event never reached the WAL"
    );
}
