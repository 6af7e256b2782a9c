//! Loom models of the ring's claim / commit / read protocol (2 producers, 1 consumer, a 64-byte ring).
//!
//! Run with:
//!
//! ```text
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom" cargo test -p treasure_core --test ring_loom --release
//! ```
//!
//! `LOOM_MAX_PREEMPTIONS=2` bounds the explored interleavings (each thread may be preempted at most twice), which
//! keeps each model to seconds; without it the state space is far too large. Under loom the length words are loom
//! atomics and every plain access to the buffer's bytes goes through a loom cell, so loom reports both protocol
//! errors (lost or torn records, wrong order) and racy accesses to record bytes (e.g. a producer writing a slot
//! the consumer has not finished zeroing). Parking is not modelled (it relies on `SeqCst`, which loom treats as
//! `AcqRel`); the unit and property tests cover it.
#![cfg(loom)]

use loom::thread;
use treasure_core::ring::{channel_unchecked, PushError, RingConsumer, RingProducer};

/// A 64-byte ring: `max_payload` is 8, so each record takes 16 bytes.
const CAPACITY: usize = 64;

fn push_retrying(producer: &RingProducer, payload: &[u8]) {
    loop {
        match producer.try_push(payload) {
            Ok(()) => return,
            Err(PushError::Full) => thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
}

/// Reads until `expected` records arrived; checks per-producer order (payload = [producer, seq, ...]).
fn consume(consumer: &mut RingConsumer, expected: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < expected {
        if consumer.read(usize::MAX, |p| got.push(p.to_vec())) == 0 {
            thread::yield_now();
        }
    }
    got
}

fn check(got: &[Vec<u8>], producers: u8, per_producer: u8) {
    for producer in 0..producers {
        let seqs: Vec<u8> = got
            .iter()
            .filter(|p| p[0] == producer)
            .map(|p| p[1])
            .collect();
        assert_eq!(
            seqs,
            (0..per_producer).collect::<Vec<_>>(),
            "producer {producer}"
        );
    }
    for p in got {
        assert!(
            p[2..].iter().all(|&b| b == p[0] ^ p[1]),
            "torn record {p:?}"
        );
    }
}

fn record(producer: u8, seq: u8, len: usize) -> Vec<u8> {
    let mut v = vec![producer ^ seq; len];
    v[0] = producer;
    v[1] = seq;
    v
}

/// Two producers push concurrently with a consumer reading; every record arrives once, intact, in order.
#[test]
fn two_producers_one_consumer() {
    loom::model(|| {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        let handles: Vec<_> = (0..2u8)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    for seq in 0..2 {
                        push_retrying(&producer, &record(id, seq, 8));
                    }
                })
            })
            .collect();
        let got = consume(&mut consumer, 4);
        for h in handles {
            h.join().unwrap();
        }
        check(&got, 2, 2);
        assert_eq!(consumer.used_bytes(), 0);
    });
}

/// The tail starts near the end of the buffer, so the producers' claims wrap with a padding record, and the
/// ring fills, so the producers reuse slots the consumer has just zeroed and released.
#[test]
fn wrap_with_padding_and_reuse() {
    loom::model(|| {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        // Move the tail to index 40: 24 bytes before the end, records of 16 bytes (8 payload) + 8 (0 payload).
        producer.try_push(&[0; 8]).unwrap();
        producer.try_push(&[0; 8]).unwrap();
        producer.try_push(&[]).unwrap();
        assert_eq!(consumer.read(usize::MAX, |_| {}), 3);
        let handles: Vec<_> = (0..2u8)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    // 16 + 16 fits the 24 bytes to the end once; the second claim pads to the end.
                    push_retrying(&producer, &record(id, 0, 8));
                    push_retrying(&producer, &record(id, 1, 2));
                })
            })
            .collect();
        let got = consume(&mut consumer, 4);
        for h in handles {
            h.join().unwrap();
        }
        check(&got, 2, 2);
        assert_eq!(consumer.used_bytes(), 0);
    });
}

/// A claim racing `close` either lands (and is read) or fails with `Closed`; the consumer drains exactly the
/// accepted records once it sees the ring closed and empty.
#[test]
fn close_races_push() {
    loom::model(|| {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        let pusher = {
            let producer = producer.clone();
            thread::spawn(move || u8::from(producer.try_push(&record(0, 0, 4)).is_ok()))
        };
        let closer = thread::spawn(move || producer.close());
        let mut got = 0usize;
        loop {
            got += consumer.read(usize::MAX, |p| assert_eq!(p, &record(0, 0, 4)[..]));
            if consumer.is_closed() && consumer.used_bytes() == 0 {
                break;
            }
            thread::yield_now();
        }
        closer.join().unwrap();
        assert_eq!(got, usize::from(pusher.join().unwrap()));
    });
}
