//! Property tests of the MPSC ring: exactly-once, intact, per-producer ordered delivery under concurrency, a
//! sequential model for `Full`/`TooLarge`/`read(max_bytes)`, blocking pushes, and close.

use std::collections::VecDeque;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use treasure_core::ring::{channel, PushError, RingConsumer, RingProducer};

/// Payload of `len` (>= 8) bytes tagged with (producer, seq) and filled with a pattern derived from both.
fn payload(producer: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    out[..4].copy_from_slice(&producer.to_le_bytes());
    out[4..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in out[8..].iter_mut().enumerate() {
        *b = (i as u32 ^ producer.wrapping_mul(31) ^ seq.wrapping_mul(7)) as u8;
    }
    out
}

fn check_payload(bytes: &[u8], len_of: impl Fn(u32, u32) -> usize, next_seq: &mut [u32]) {
    assert!(bytes.len() >= 8, "record too short: {}", bytes.len());
    let producer = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    let seq = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let p = producer as usize;
    assert_eq!(
        seq, next_seq[p],
        "producer {producer}: out of order or duplicated"
    );
    next_seq[p] += 1;
    let len = len_of(producer, seq);
    assert_eq!(
        bytes,
        &payload(producer, seq, len)[..],
        "producer {producer} seq {seq}: bytes differ"
    );
}

/// Sizes weighted towards the interesting ones: tiny, around the wrap, and the maximum.
fn size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 8usize..=64,
        2 => 8usize..=max,
        1 => Just(max),
        1 => (max - 16)..=max,
    ]
}

fn run_concurrent(capacity: usize, lens: Vec<Vec<usize>>, read_sizes: Vec<usize>) {
    let (producer, mut consumer) = channel(capacity).unwrap();
    let max = producer.max_payload();
    let total: usize = lens.iter().map(Vec::len).sum();
    let writers: Vec<_> = lens
        .iter()
        .cloned()
        .enumerate()
        .map(|(id, lens)| {
            let producer = producer.clone();
            thread::spawn(move || {
                let id = id as u32;
                // Oversize payloads are refused without consuming space.
                assert_eq!(
                    producer.try_push(&vec![0; max + 1]),
                    Err(PushError::TooLarge)
                );
                if id % 3 == 2 {
                    push_in_runs(&producer, id, &lens);
                    return;
                }
                for (seq, len) in lens.into_iter().enumerate() {
                    let data = payload(id, seq as u32, len);
                    if id.is_multiple_of(2) {
                        loop {
                            match producer.try_push(&data) {
                                Ok(()) => break,
                                Err(PushError::Full) => thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        }
                    } else {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        producer
                            .push_with_deadline(len, deadline, |dst| dst.copy_from_slice(&data))
                            .unwrap();
                    }
                }
            })
        })
        .collect();

    let mut next_seq = vec![0u32; lens.len()];
    let mut got = 0;
    let mut i = 0;
    let give_up = Instant::now() + Duration::from_secs(60);
    while got < total {
        assert!(
            Instant::now() < give_up,
            "consumer stalled at {got}/{total}"
        );
        let max_bytes = read_sizes[i % read_sizes.len()];
        i += 1;
        let n = consumer.read(max_bytes, |bytes| {
            check_payload(bytes, |p, s| lens[p as usize][s as usize], &mut next_seq);
        });
        got += n;
        if n == 0 {
            consumer.park_until(Instant::now() + Duration::from_millis(1));
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(consumer.read(usize::MAX, |_| panic!("extra record")), 0);
    assert_eq!(consumer.used_bytes(), 0);
    for (p, lens) in lens.iter().enumerate() {
        assert_eq!(next_seq[p] as usize, lens.len());
    }
}

/// Pushes producer `id`'s records in runs of up to 7 claimed at once ([`RingProducer::claim_run`]), one at a
/// time where no run fits (the ring full, or its end reached).
fn push_in_runs(producer: &RingProducer, id: u32, lens: &[usize]) {
    let mut seq = 0;
    while seq < lens.len() {
        let want = &lens[seq..lens.len().min(seq + 7)];
        let (mut run, n) = producer.claim_run(want.iter().copied()).unwrap();
        for &len in &want[..n] {
            let data = payload(id, seq as u32, len);
            run.push_with(len, |dst| dst.copy_from_slice(&data))
                .unwrap();
            seq += 1;
        }
        drop(run);
        if n == 0 {
            let data = payload(id, seq as u32, lens[seq]);
            match producer.try_push(&data) {
                Ok(()) => seq += 1,
                Err(PushError::Full) => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn concurrent_case() -> impl Strategy<Value = (usize, Vec<Vec<usize>>, Vec<usize>)> {
    (12u32..=14, 2usize..=5).prop_flat_map(|(bits, producers)| {
        let capacity = 1usize << bits;
        let max = capacity / 4 - 8;
        (
            Just(capacity),
            prop::collection::vec(prop::collection::vec(size(max), 1..300), producers),
            prop::collection::vec(prop_oneof![Just(usize::MAX), 1usize..2 * capacity], 1..8),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_exactly_once_in_order((capacity, lens, read_sizes) in concurrent_case()) {
        run_concurrent(capacity, lens, read_sizes);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    Read(usize),
    /// `claim_run` of these lengths, then the first `n` of the claimed records filled, the rest dropped.
    Run(Vec<usize>, usize),
}

/// The ring's space accounting as a specification: positions, padding at the wrap, records in order.
struct Model {
    capacity: usize,
    head: usize,
    tail: usize,
    /// (ring space, payload or None for padding)
    records: VecDeque<(usize, Option<Vec<u8>>)>,
}

impl Model {
    fn push(&mut self, payload: &[u8], max: usize) -> Result<(), PushError> {
        if payload.len() > max {
            return Err(PushError::TooLarge);
        }
        let space = (8 + payload.len()).div_ceil(8) * 8;
        let to_end = self.capacity - self.tail % self.capacity;
        let padding = if space > to_end { to_end } else { 0 };
        if self.tail + padding + space - self.head > self.capacity {
            // Genuinely full: the free space cannot hold the record (and its padding, if at the wrap).
            return Err(PushError::Full);
        }
        if padding > 0 {
            self.records.push_back((padding, None));
        }
        self.records.push_back((space, Some(payload.to_vec())));
        self.tail += padding + space;
        Ok(())
    }

    /// How many of `lens` a run claims: the longest prefix that fits in the free space before the ring's end.
    fn claim_run(&self, lens: &[usize], max: usize) -> usize {
        let room = (self.capacity - (self.tail - self.head))
            .min(self.capacity - self.tail % self.capacity);
        let mut bytes = 0;
        lens.iter()
            .take_while(|&&len| {
                bytes += (8 + len).div_ceil(8) * 8;
                len <= max && bytes <= room
            })
            .count()
    }

    /// A run of `lens` claimed at once: the first `filled` payloads, then the rest of the claim as padding.
    fn run(&mut self, lens: &[usize], payloads: &[Vec<u8>]) {
        let claimed: usize = lens.iter().map(|len| (8 + len).div_ceil(8) * 8).sum();
        let mut used = 0;
        for p in payloads {
            let space = (8 + p.len()).div_ceil(8) * 8;
            self.records.push_back((space, Some(p.clone())));
            used += space;
        }
        if claimed > used {
            self.records.push_back((claimed - used, None));
        }
        self.tail += claimed;
    }

    fn read(&mut self, max_bytes: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut consumed = 0;
        while consumed < max_bytes {
            let Some((space, data)) = self.records.pop_front() else {
                break;
            };
            consumed += space;
            self.head += space;
            out.extend(data);
        }
        out
    }
}

fn op(max: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..=max + 8).prop_map(Op::Push),
        2 => (0usize..=max).prop_map(Op::Push),
        2 => prop_oneof![Just(usize::MAX), 0usize..3000].prop_map(Op::Read),
        3 => (prop::collection::vec(0usize..=max + 8, 0..8), 0usize..8).prop_map(|(lens, n)| Op::Run(lens, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Single-threaded, the ring must match the model exactly: `Full` only when genuinely full, `TooLarge` for
    /// oversize, padding at the wrap, `read` honouring `max_bytes`, zeroed bytes handed to writers.
    #[test]
    fn sequential_matches_model(ops in prop::collection::vec(op(4096 / 4 - 8), 1..400)) {
        let (producer, mut consumer) = channel(4096).unwrap();
        let max = producer.max_payload();
        let mut model = Model { capacity: 4096, head: 0, tail: 0, records: VecDeque::new() };
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Push(len) => {
                    let data: Vec<u8> = (0..len).map(|j| (i + j) as u8 | 1).collect();
                    let expected = model.push(&data, max);
                    let mut zeroed = true;
                    let actual = producer.try_push_with(len, |dst| {
                        zeroed = dst.iter().all(|&b| b == 0);
                        dst.copy_from_slice(&data);
                    });
                    prop_assert_eq!(actual, expected);
                    prop_assert!(zeroed, "claimed bytes not zeroed");
                }
                Op::Run(lens, fill) => {
                    let n = model.claim_run(&lens, max);
                    let (mut run, claimed) = producer.claim_run(lens.iter().copied()).unwrap();
                    prop_assert_eq!(claimed, n);
                    let payloads: Vec<Vec<u8>> = lens[..n.min(fill)]
                        .iter()
                        .enumerate()
                        .map(|(k, &len)| (0..len).map(|j| (i + k + j) as u8 | 1).collect())
                        .collect();
                    for p in &payloads {
                        let mut zeroed = true;
                        run.push_with(p.len(), |dst| {
                            zeroed = dst.iter().all(|&b| b == 0);
                            dst.copy_from_slice(p);
                        })
                        .unwrap();
                        prop_assert!(zeroed, "claimed bytes not zeroed");
                    }
                    if let Some(&extra) = lens.get(n) {
                        if payloads.len() == n {
                            // A record past the claim does not fit in what is left of it.
                            prop_assert_eq!(run.push_with(extra, |_| unreachable!()), Err(PushError::TooLarge));
                        }
                    }
                    drop(run);
                    model.run(&lens[..n], &payloads);
                }
                Op::Read(max_bytes) => {
                    let expected = model.read(max_bytes);
                    let mut actual = Vec::new();
                    let n = consumer.read(max_bytes, |p| actual.push(p.to_vec()));
                    prop_assert_eq!(n, expected.len());
                    prop_assert_eq!(actual, expected);
                }
            }
            prop_assert_eq!(producer.used_bytes(), model.tail - model.head);
        }
    }
}

#[test]
fn blocking_push_waits_for_slow_consumer() {
    let (producer, mut consumer) = channel(4096).unwrap();
    let per_producer = 2000u32;
    let writers: Vec<_> = (0..3u32)
        .map(|id| {
            let producer = producer.clone();
            thread::spawn(move || {
                for seq in 0..per_producer {
                    let data = payload(id, seq, 8 + (seq as usize * 37) % 900);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    producer
                        .push_with_deadline(data.len(), deadline, |dst| dst.copy_from_slice(&data))
                        .unwrap();
                }
            })
        })
        .collect();
    let mut next_seq = vec![0u32; 3];
    let mut got = 0;
    while got < 3 * per_producer as usize {
        // Slow and small reads keep the producers blocked most of the time.
        let n = consumer.read(1500, |bytes| {
            check_payload(bytes, |_, seq| 8 + (seq as usize * 37) % 900, &mut next_seq);
        });
        got += n;
        if n == 0 {
            consumer.park_until(Instant::now() + Duration::from_millis(5));
        } else if got % 64 == 0 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(next_seq, vec![per_producer; 3]);
}

#[test]
fn blocked_producer_woken_by_close() {
    let (producer, consumer) = channel(4096).unwrap();
    while producer.try_push(&[1; 1000]).is_ok() {}
    let blocked = {
        let producer = producer.clone();
        thread::spawn(move || {
            let t0 = Instant::now();
            let r =
                producer.push_with_deadline(100, Instant::now() + Duration::from_secs(30), |_| {});
            (r, t0.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(50));
    producer.close();
    let (r, waited) = blocked.join().unwrap();
    assert_eq!(r, Err(PushError::Closed));
    assert!(waited < Duration::from_secs(10));
    drop(consumer);
}

/// Producers push until the ring closes under them; every push that returned Ok is delivered exactly once.
#[test]
fn close_loses_nothing_accepted() {
    for round in 0..20 {
        let (producer, mut consumer): (RingProducer, RingConsumer) = channel(8192).unwrap();
        let writers: Vec<_> = (0..3u32)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    let mut accepted = 0u32;
                    loop {
                        let data = payload(id, accepted, 8 + (accepted as usize * 13) % 200);
                        match producer.try_push(&data) {
                            Ok(()) => accepted += 1,
                            Err(PushError::Full) => thread::yield_now(),
                            Err(PushError::Closed) => return accepted,
                            Err(PushError::TooLarge) => unreachable!(),
                        }
                    }
                })
            })
            .collect();
        let mut next_seq = vec![0u32; 3];
        let closer = {
            let producer = producer.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(2 + round % 5));
                producer.close();
            })
        };
        // Read until closed and drained; park_until returns at once after close.
        loop {
            let n = consumer.read(usize::MAX, |bytes| {
                check_payload(bytes, |_, seq| 8 + (seq as usize * 13) % 200, &mut next_seq);
            });
            if n == 0 {
                if consumer.is_closed() && consumer.used_bytes() == 0 {
                    break;
                }
                consumer.park_until(Instant::now() + Duration::from_millis(1));
            }
        }
        closer.join().unwrap();
        let accepted: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(next_seq, accepted, "round {round}: delivered != accepted");
        assert_eq!(producer.try_push(b"late"), Err(PushError::Closed));
    }
}

#[test]
fn a_run_whose_writer_panics_hands_the_rest_to_the_consumer_as_padding() {
    let (producer, mut consumer) = channel(4096).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut run, n) = producer.claim_run([10, 20, 30].into_iter()).unwrap();
        assert_eq!(n, 3);
        run.push_with(10, |dst| dst.fill(1)).unwrap();
        run.push_with(20, |_| panic!("the writer fails")).unwrap();
    }));
    assert!(outcome.is_err());
    producer.try_push(&[2; 5]).unwrap();
    let mut got = Vec::new();
    assert_eq!(consumer.read(usize::MAX, |p| got.push(p.to_vec())), 2);
    assert_eq!(got, vec![vec![1; 10], vec![2; 5]]);
    assert_eq!(consumer.used_bytes(), 0);
}

#[test]
fn a_run_never_wraps_and_a_closed_ring_claims_nothing() {
    let (producer, mut consumer) = channel(4096).unwrap();
    // Four records of 1,016 bytes, then read: the tail is 32 bytes before the end, and the ring empty.
    for _ in 0..4 {
        producer.try_push(&[7; 1002]).unwrap();
    }
    assert_eq!(consumer.read(usize::MAX, |_| {}), 4);
    let (run, n) = producer.claim_run([8, 16].into_iter()).unwrap();
    assert_eq!(
        n, 1,
        "the second record (24 bytes after the first's 16) would wrap"
    );
    drop(run);
    producer.close();
    assert!(matches!(
        producer.claim_run([8].into_iter()),
        Err(PushError::Closed)
    ));
}
