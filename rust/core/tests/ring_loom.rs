//! Loom models of the ring: the claim / commit / read protocol (2 producers, 1 consumer, a 64-byte ring), a run
//! of records claimed at once beside single pushes, the consumer's parking handshake, and a producer whose write
//! closure panics.
//!
//! Run with `make loom`, or:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p treasure_core --test ring_loom --profile loom
//! ```
//!
//! Each model explores the interleavings with at most [`PREEMPTIONS`] preemptions per thread (more for the small
//! parking models; `LOOM_MAX_PREEMPTIONS` overrides both), which keeps each model to seconds; unbounded, the state
//! space is far too large. Under loom the length words are loom atomics and every plain access to the buffer's
//! bytes goes through a loom cell, so loom reports both protocol errors (lost or torn records, wrong order) and
//! racy accesses to record bytes (e.g. a producer writing a slot the consumer has not finished zeroing). The
//! `loom` profile keeps overflow checks on: they found a claim that underflowed `new_tail - head`.
//!
//! Parking: loom's `Condvar::wait_timeout` never times out, so a lost wake-up in `park_until` is a deadlock that
//! loom reports; the parking models pass only if a producer's notification wakes the consumer. The handshake is
//! read-modify-writes of one location (the parked bit in `tail`) plus release/acquire, all of which loom models
//! exactly (it does not model the single total order of `SeqCst` accesses across locations, so a Dekker-style
//! handshake could only be checked written with fences).
#![cfg(loom)]

use std::time::{Duration, Instant};

use loom::thread;
use treasure_core::ring::{channel_unchecked, PushError, RingConsumer, RingProducer};

/// A 64-byte ring: `max_payload` is 8, so each record takes 16 bytes.
const CAPACITY: usize = 64;
/// Preemption bound of a model unless `LOOM_MAX_PREEMPTIONS` says otherwise: 2 keeps the largest models (two
/// producers, a consumer, wrap-around) to seconds; 3 takes minutes for them.
const PREEMPTIONS: usize = 2;

/// `loom::model` with the preemption bound defaulting to [`PREEMPTIONS`].
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    model_bounded(PREEMPTIONS, f);
}

/// `loom::model` with the preemption bound defaulting to `preemptions` (for the small models, which can afford
/// more).
fn model_bounded<F: Fn() + Sync + Send + 'static>(preemptions: usize, f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemptions);
    }
    builder.check(f);
}

/// A deadline that never passes within a model (waits never time out under loom anyway).
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

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
    model(|| {
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

/// One producer claims two records at once (`claim_run`) and fills one, leaving the other to the drop as padding,
/// while another pushes one by one and the consumer reads: every record arrives once, intact, in order, and the
/// padding is skipped.
#[test]
fn a_run_beside_single_pushes() {
    model(|| {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        let single = {
            let producer = producer.clone();
            thread::spawn(move || {
                for seq in 0..2 {
                    push_retrying(&producer, &record(1, seq, 8));
                }
            })
        };
        let mut filled = 0;
        while filled == 0 {
            let (mut run, n) = producer.claim_run([8, 8].into_iter()).unwrap();
            if n > 0 {
                run.push_with(8, |dst| dst.copy_from_slice(&record(0, 0, 8)))
                    .unwrap();
                filled = 1;
            } else {
                drop(run);
                thread::yield_now();
            }
        }
        let got = consume(&mut consumer, 3);
        single.join().unwrap();
        let seqs = |id: u8| {
            got.iter()
                .filter(|p| p[0] == id)
                .map(|p| p[1])
                .collect::<Vec<_>>()
        };
        assert_eq!((seqs(0), seqs(1)), (vec![0], vec![0, 1]));
        for p in &got {
            assert!(
                p[2..].iter().all(|&b| b == p[0] ^ p[1]),
                "torn record {p:?}"
            );
        }
        assert_eq!(consumer.read(usize::MAX, |_| panic!("extra record")), 0);
        assert_eq!(consumer.used_bytes(), 0);
    });
}

/// The tail starts near the end of the buffer, so the producers' claims wrap with a padding record, and the
/// ring fills, so the producers reuse slots the consumer has just zeroed and released.
#[test]
fn wrap_with_padding_and_reuse() {
    model(|| {
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
    model(|| {
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

/// Parks and reads until `expected` records arrived. `park_until` returns only once the wake condition held or a
/// producer woke it (loom never times a wait out, and the deadline is far), so a lost wake-up deadlocks the model.
fn park_and_consume(consumer: &mut RingConsumer, expected: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < expected {
        consumer.park_until(far());
        consumer.read(usize::MAX, |p| got.push(p.to_vec()));
    }
    got
}

/// The parking handshake: a consumer that parks on an empty ring is woken by the producer's commit. Failed (a
/// deadlock) on the former handshake, a store then a load of another location on each side: the producer's
/// length store could still be in its store buffer when it loaded the parked flag (false), while the consumer set
/// the flag and read the length as 0.
#[test]
fn park_woken_by_commit() {
    model_bounded(4, || {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        let pusher = thread::spawn(move || producer.try_push(&record(0, 0, 8)).unwrap());
        let got = park_and_consume(&mut consumer, 1);
        pusher.join().unwrap();
        assert_eq!(got, [record(0, 0, 8)]);
    });
}

/// The head record ends below the wake threshold but a later claim reached it, and the two commits come in
/// either order: the consumer must end up awake with the head record committed (the former handshake lost this
/// wake-up when the head record's producer judged by its own record's end and committed last).
#[test]
fn park_woken_by_head_record_below_threshold() {
    model_bounded(3, || {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        // Two 16-byte records: the threshold needs both claimed, and the first one committed.
        consumer.set_wake_threshold(32);
        let pushers: Vec<_> = (0..2u8)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || producer.try_push(&record(id, 0, 8)).unwrap())
            })
            .collect();
        drop(producer);
        consumer.park_until(far());
        let mut got = Vec::new();
        consumer.read(usize::MAX, |p| got.push(p.to_vec()));
        assert!(
            !got.is_empty(),
            "woken before the head record was committed"
        );
        // The second record may still be uncommitted: wait for it record by record.
        consumer.set_wake_threshold(1);
        got.extend(park_and_consume(&mut consumer, 2 - got.len()));
        for h in pushers {
            h.join().unwrap();
        }
        check(&got, 2, 1);
    });
}

/// Message of the panic the writer closure raises (kept out of the test output by the hook below).
const WRITER_PANIC: &str = "loom model: writer panics mid-commit";

/// Silences [`WRITER_PANIC`] (raised and caught in every iteration), leaving every other panic to the default hook.
fn quiet_writer_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&WRITER_PANIC) {
                previous(info);
            }
        }));
    });
}

/// A producer whose write closure panics after its claim: the claim is published as padding (through the same
/// commit-and-wake path), so a consumer waiting for it as the head record gets past it, skips it, and still reads
/// the other producer's records, in order; the ring ends empty.
#[test]
fn panicking_writer_is_skipped_and_wakes() {
    quiet_writer_panics();
    model(|| {
        let (producer, mut consumer) = channel_unchecked(CAPACITY);
        let panicker = {
            let producer = producer.clone();
            thread::spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    producer
                        .try_push_with(8, |buf| {
                            buf[0] = 0xEE;
                            std::panic::panic_any(WRITER_PANIC);
                        })
                        .unwrap();
                }));
                assert!(result.is_err());
            })
        };
        let pusher = thread::spawn(move || {
            push_retrying(&producer, &record(1, 0, 4));
            push_retrying(&producer, &record(1, 1, 4));
        });
        let mut got = park_and_consume(&mut consumer, 2);
        panicker.join().unwrap();
        pusher.join().unwrap();
        // The abandoned claim may still be unread: drain it; it must yield nothing.
        consumer.read(usize::MAX, |p| got.push(p.to_vec()));
        assert_eq!(got, [record(1, 0, 4), record(1, 1, 4)]);
        assert_eq!(consumer.used_bytes(), 0);
    });
}
