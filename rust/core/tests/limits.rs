//! The batcher at the stream's real limits, with this test playing the sender and a Kinesis that places each
//! record by its hash as the real one does: the batcher sleeps while tokens or the sender hold records back,
//! sends full requests instead of a trickle, and repairs aggregates that a reshard put in a shard whose range
//! does not hold all of their records (a KCL consumer drops such an aggregate whole).

mod common;
use common::ok_response;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use treasure_core::batch::{BatcherConfig, Overflow, Pipeline};
use treasure_core::kpl;
use treasure_core::shards::{self, Shard, ShardMap};

fn shard(id: &str, start: u128, end: u128) -> Shard {
    Shard {
        id: id.into(),
        start,
        end,
    }
}

fn raised(ordered: bool) -> BatcherConfig {
    BatcherConfig {
        stream: "s".into(),
        linger: Duration::from_millis(2),
        shard_records_per_s: 1e9,
        shard_bytes_per_s: 1e12,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        ordered,
        ..BatcherConfig::default()
    }
}

/// One record as the fake stream stores it.
struct Stored {
    data: Vec<u8>,
    key: String,
    ehk: Option<String>,
}

/// A stream that places every record by its explicit hash key (or the MD5 of its partition key) in the open
/// shard whose range holds it, answers with that shard's id, and keeps each shard's records in order.
struct FakeKinesis {
    open: ShardMap,
    /// Every shard the stream ever had, parents first, with its range.
    lineage: Vec<Shard>,
    logs: HashMap<String, Vec<Stored>>,
    /// Places every record in this shard whatever its hash (moto keeps writing to a split parent).
    stuck_in: Option<String>,
}

impl FakeKinesis {
    fn new(open: ShardMap) -> Self {
        Self {
            lineage: open.shards().to_vec(),
            open,
            logs: HashMap::new(),
            stuck_in: None,
        }
    }

    /// Replaces the open shards (a split or a merge), keeping the closed ones for readers.
    fn reshard(&mut self, open: ShardMap) {
        for s in open.shards() {
            if !self.lineage.iter().any(|l| l.id == s.id) {
                self.lineage.push(s.clone());
            }
        }
        self.open = open;
    }

    fn put_records(&mut self, body: &[u8]) -> Vec<u8> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let mut answers = Vec::new();
        for r in v["Records"].as_array().unwrap() {
            let data = base64_simd::STANDARD
                .decode_to_vec(r["Data"].as_str().unwrap())
                .unwrap();
            let key = r["PartitionKey"].as_str().unwrap().to_owned();
            let ehk = r["ExplicitHashKey"].as_str().map(str::to_owned);
            let hash = hash_of(&key, ehk.as_deref());
            let id = self
                .stuck_in
                .clone()
                .unwrap_or_else(|| self.open.get(self.open.route(hash)).id.clone());
            let log = self.logs.entry(id.clone()).or_default();
            answers.push(format!(
                r#"{{"SequenceNumber":"{}","ShardId":"{id}"}}"#,
                log.len()
            ));
            log.push(Stored { data, key, ehk });
        }
        format!(
            r#"{{"FailedRecordCount":0,"Records":[{}]}}"#,
            answers.join(",")
        )
        .into_bytes()
    }

    /// What a KCL consumer hands its processor: every shard, parents first; an aggregate with any user record
    /// outside its shard's range is skipped whole. Returns (kept user records, user records skipped).
    fn read_as_kcl(&self) -> (Vec<Vec<u8>>, usize) {
        let (mut kept, mut skipped) = (Vec::new(), 0);
        for s in &self.lineage {
            for r in self.logs.get(&s.id).map_or(&[][..], Vec::as_slice) {
                if !kpl::is_aggregated(&r.data) {
                    assert!((s.start..=s.end).contains(&hash_of(&r.key, r.ehk.as_deref())));
                    kept.push(r.data.clone());
                    continue;
                }
                let subs = kpl::decode_vec(&r.data).unwrap();
                let inside = subs.iter().all(|sub| {
                    (s.start..=s.end).contains(&hash_of(sub.partition_key, sub.explicit_hash_key))
                });
                if inside {
                    kept.extend(subs.iter().map(|sub| sub.data.to_vec()));
                } else {
                    skipped += subs.len();
                }
            }
        }
        (kept, skipped)
    }
}

fn hash_of(key: &str, ehk: Option<&str>) -> u128 {
    ehk.map_or_else(
        || shards::hash_key(key.as_bytes()),
        |e| shards::parse_hash_key(e).unwrap(),
    )
}

/// `<key>:<seq>:<padding>`: the key's index and the event's place in that key's order.
fn event(key: usize, seq: usize) -> Vec<u8> {
    let mut e = format!("{key}:{seq}:").into_bytes();
    e.resize(100, b'.');
    e
}

fn parse(e: &[u8]) -> (usize, usize) {
    let mut it = std::str::from_utf8(e).unwrap().split(':');
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    )
}

/// Plays the sender (and the producer's map refresh) for one round: every ready request goes to the fake
/// stream, and a map that a response showed stale is read again. Returns the requests sent.
fn send_round(p: &Pipeline, kinesis: &mut FakeKinesis) -> usize {
    let requests = p.poll(64);
    let n = requests.len();
    for req in requests {
        let answer = kinesis.put_records(req.body());
        p.complete(req, &answer).unwrap();
    }
    if p.refresh_wanted() {
        p.set_shards(kinesis.open.clone());
    }
    n
}

fn run_until_drained(p: &Pipeline, kinesis: &mut FakeKinesis, within: Duration) {
    let end = Instant::now() + within;
    p.begin_flush();
    while p.stats().in_flight > 0 {
        assert!(Instant::now() < end, "not drained: {:?}", p.stats());
        send_round(p, kinesis);
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
}

/// Every event read back by the KCL's rule, and the order per key of their first copies (parents first).
fn assert_kcl_reads_everything_in_order(
    kinesis: &FakeKinesis,
    keys: usize,
    per_key: usize,
) -> usize {
    let (kept, skipped) = kinesis.read_as_kcl();
    let mut next = vec![0usize; keys];
    let mut seen = HashSet::new();
    for e in &kept {
        let (k, seq) = parse(e);
        if seen.insert((k, seq)) {
            assert_eq!(seq, next[k], "key {k}: event {seq} read before {}", next[k]);
            next[k] += 1;
        }
    }
    assert_eq!(seen.len(), keys * per_key, "events lost to a KCL reader");
    skipped
}

/// Submits `per_key` events for each of `keys` keys, round-robin, from `seq` on.
fn submit_round_robin(p: &Pipeline, keys: usize, seqs: std::ops::Range<usize>) {
    for seq in seqs {
        for k in 0..keys {
            p.submit(&event(k, seq), &format!("key-{k}"), None, Overflow::Reject)
                .unwrap();
        }
    }
}

/// 200 keys x 30 events, ordered: the first third delivered by `initial`, then the stream reshards to `after`
/// while the producer still routes by `initial`, then the rest. Returns the stats and the user records a KCL
/// reader skipped, having checked that it reads every event, in order per key.
fn reshard_mid_burst(initial: ShardMap, after: ShardMap) -> (treasure_core::batch::Stats, usize) {
    let (keys, per_key) = (200, 30);
    let mut kinesis = FakeKinesis::new(initial.clone());
    let p = Pipeline::start(raised(true), initial).unwrap();
    submit_round_robin(&p, keys, 0..10);
    run_until_drained(&p, &mut kinesis, Duration::from_secs(20));
    kinesis.reshard(after);
    submit_round_robin(&p, keys, 10..per_key);
    run_until_drained(&p, &mut kinesis, Duration::from_secs(20));
    let s = p.stats();
    let n = (keys * per_key) as u64;
    assert_eq!((s.accepted, s.delivered, s.dead_lettered), (n, n, 0));
    assert!(s.shard_mismatches > 0, "the reshard went unnoticed: {s:?}");
    p.shutdown(false);
    (
        s,
        assert_kcl_reads_everything_in_order(&kinesis, keys, per_key),
    )
}

#[test]
fn split_mid_burst_misplaced_aggregates_are_sent_again_and_a_kcl_reader_loses_nothing() {
    let mid = u128::MAX / 2;
    let (s, skipped) = reshard_mid_burst(
        ShardMap::new(vec![shard("parent", 0, u128::MAX)]).unwrap(),
        ShardMap::new(vec![
            shard("low", 0, mid),
            shard("high", mid + 1, u128::MAX),
        ])
        .unwrap(),
    );
    assert!(skipped > 0, "the split must have misplaced some aggregates");
    // Each skipped aggregate was sent again once, all of its records.
    assert_eq!(s.wrong_shard_records, skipped as u64, "{s:?}");
}

#[test]
fn merge_mid_burst_loses_nothing_and_sends_nothing_twice() {
    let mid = u128::MAX / 2;
    let (s, skipped) = reshard_mid_burst(
        ShardMap::new(vec![shard("a", 0, mid), shard("b", mid + 1, u128::MAX)]).unwrap(),
        ShardMap::new(vec![shard("merged", 0, u128::MAX)]).unwrap(),
    );
    // The merged shard's range holds both parents': every misplaced aggregate stands as it landed.
    assert_eq!((s.wrong_shard_records, skipped), (0, 0), "{s:?}");
}

/// An emulator that keeps placing records in the parent it split (moto does): that parent's range holds them
/// all, so they stand where they landed, and nothing is re-sent or dead-lettered.
#[test]
fn records_placed_in_a_known_closed_parent_stand() {
    let mid = u128::MAX / 2;
    let parent = ShardMap::new(vec![shard("parent", 0, u128::MAX)]).unwrap();
    let mut kinesis = FakeKinesis::new(parent.clone());
    let p = Pipeline::start(raised(true), parent).unwrap();
    submit_round_robin(&p, 50, 0..5);
    run_until_drained(&p, &mut kinesis, Duration::from_secs(20));
    kinesis.reshard(
        ShardMap::new(vec![
            shard("low", 0, mid),
            shard("high", mid + 1, u128::MAX),
        ])
        .unwrap(),
    );
    p.set_shards(kinesis.open.clone());
    kinesis.stuck_in = Some("parent".into());
    submit_round_robin(&p, 50, 5..20);
    run_until_drained(&p, &mut kinesis, Duration::from_secs(20));
    let s = p.stats();
    assert_eq!(
        (s.delivered, s.dead_lettered, s.wrong_shard_records),
        (1000, 0, 0),
        "{s:?}"
    );
    assert!(s.shard_mismatches > 0, "{s:?}");
    assert_eq!(assert_kcl_reads_everything_in_order(&kinesis, 50, 20), 0);
    p.shutdown(false);
}

/// Under binding shard limits the batcher sleeps until tokens for more records come, and a request waits
/// `rate_limit_linger` for them instead of leaving with the first record the tokens allow.
#[test]
fn rate_limited_backlog_sends_full_requests_and_the_batcher_sleeps() {
    let cfg = BatcherConfig {
        aggregation_max_bytes: 4096,
        shard_bytes_per_s: 50_000.0,
        shard_records_per_s: 1000.0,
        rate_limit_linger: Duration::from_millis(100),
        ..raised(false)
    };
    let p = Pipeline::start(cfg, ShardMap::even(2)).unwrap();
    // 200 KB against a 100 KB burst: the second half waits for tokens, about a second.
    for i in 0..2000 {
        p.submit(
            &event(i % 200, i),
            &format!("key-{}", i % 200),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
    let started = Instant::now();
    let before = p.stats().batcher_wakeups;
    let mut kinesis = FakeKinesis::new(ShardMap::even(2));
    run_until_drained(&p, &mut kinesis, Duration::from_secs(20));
    let elapsed = started.elapsed();
    let s = p.stats();
    assert_eq!((s.delivered, s.in_flight), (2000, 0));
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    // One request per rate_limit_linger at most (and the first, from the burst); a trickle sends one per
    // aggregate the tokens allow: about 25 a second here.
    let most = elapsed.as_millis() as u64 / 100 + 4;
    assert!(s.requests <= most, "{} requests in {elapsed:?}", s.requests);
    // A handful of rounds per request (hold start and end, the poll, the completion), not a poll every
    // millisecond or a spin.
    let wakeups = s.batcher_wakeups - before;
    assert!(
        wakeups <= 12 * s.requests + 40,
        "{wakeups} wake-ups for {} requests",
        s.requests
    );
    p.shutdown(false);
}

/// With the ready queue full (the sender at `max_in_flight`) nothing can be sealed: the batcher waits for the
/// next poll instead of retrying the seal in a loop.
#[test]
fn a_full_ready_queue_parks_the_batcher_until_the_sender_polls() {
    let cfg = BatcherConfig {
        max_ready_requests: 1,
        max_request_records: 10,
        aggregate: false,
        ..raised(false)
    };
    let p = Pipeline::start(cfg, ShardMap::even(4)).unwrap();
    for i in 0..5000 {
        p.submit(
            &event(i % 50, i),
            &format!("key-{}", i % 50),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
    p.begin_flush();
    std::thread::sleep(Duration::from_millis(50));
    let before = p.stats().batcher_wakeups;
    std::thread::sleep(Duration::from_millis(300));
    let idle = p.stats().batcher_wakeups - before;
    assert!(idle <= 10, "{idle} wake-ups in 300 ms with nothing to do");
    p.end_flush();
    let end = Instant::now() + Duration::from_secs(20);
    while p.stats().in_flight > 0 {
        assert!(Instant::now() < end, "{:?}", p.stats());
        for req in p.poll(8) {
            let records = req.records();
            p.complete(req, &ok_response(records)).unwrap();
        }
    }
    p.shutdown(false);
}

/// Events per Kinesis record in a PutRecords body (1 for a plain record).
fn events_per_record(body: &[u8]) -> Vec<usize> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let data = base64_simd::STANDARD
                .decode_to_vec(r["Data"].as_str().unwrap())
                .unwrap();
            if kpl::is_aggregated(&data) {
                kpl::decode_vec(&data).unwrap().len()
            } else {
                1
            }
        })
        .collect()
}

#[test]
fn a_backlog_goes_out_in_full_aggregates_and_requests_of_the_budgets_share() {
    // A burst far larger than the buffer budget, flushed at once (as a service's shutdown or a benchmark does),
    // over 16 shards with the rate limits raised out of the way: what binds is the budget and the sender.
    let budget = 8 << 20;
    let config = BatcherConfig {
        max_buffered_bytes: budget,
        max_ready_requests: 8,
        ..raised(false)
    };
    let shards = 16;
    let p = Pipeline::start(config, ShardMap::even(shards)).unwrap();
    let (keys, per_key) = (1_000, 100);
    submit_round_robin(&p, keys, 0..per_key);
    p.begin_flush();
    let end = Instant::now() + Duration::from_secs(60);
    let (mut largest_body, mut records, mut per_record) = (0, 0, Vec::new());
    while p.stats().in_flight > 0 {
        assert!(Instant::now() < end, "not drained: {:?}", p.stats());
        // Eight requests in flight, answered together, as a sender with max_in_flight = 8 does.
        for req in p.poll(8) {
            largest_body = largest_body.max(req.body().len());
            records += req.records();
            per_record.extend(events_per_record(req.body()));
            let n = req.records();
            p.complete(req, &ok_response(n)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    assert_eq!(p.stats().delivered, (keys * per_key) as u64);
    // No request holds more than its share of the budget: one per request ready or in flight (16). A request
    // of 5 MiB of data would hold most of it and leave the requests behind it a few records each.
    assert!(
        largest_body <= budget / 16 + (16 << 10),
        "a request body of {largest_body} bytes, over a sixteenth of the {budget}-byte budget"
    );
    // Aggregates are filled from the backlog before they close, not cut at every ring chunk read: all but
    // the last of each shard hold (nearly) as many events as the fullest.
    let full = *per_record.iter().max().unwrap();
    let events = keys * per_key;
    let at_most = events.div_ceil(full * 9 / 10) + shards as usize;
    assert!(
        records <= at_most,
        "{records} Kinesis records for {events} events (at most {at_most} with aggregates of {full} events)"
    );
}
