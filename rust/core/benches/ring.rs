//! Ring throughput: single-thread push + read of 100-byte payloads, and two producers against one consumer.
//!
//! `cargo bench -p treasure_core --bench ring`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use treasure_core::ring::{channel, PushError};

const PAYLOAD: [u8; 100] = [0x5a; 100];

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_single_thread");
    group.throughput(Throughput::Elements(1));
    let (producer, mut consumer) = channel(1 << 20).unwrap();
    group.bench_function("try_push_100B", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Push in chunks that fit the ring, read outside the timed part.
                let chunk = left.min(4096);
                let t0 = Instant::now();
                for _ in 0..chunk {
                    producer.try_push(black_box(&PAYLOAD)).unwrap();
                }
                elapsed += t0.elapsed();
                consumer.read(usize::MAX, |p| {
                    black_box(p);
                });
                left -= chunk;
            }
            elapsed
        });
    });
    group.finish();
    let mut group = c.benchmark_group("ring_single_thread_batch64");
    group.throughput(Throughput::Elements(64));
    group.bench_function("try_push_100B_plus_read", |b| {
        b.iter(|| {
            for _ in 0..64 {
                producer.try_push(black_box(&PAYLOAD)).unwrap();
            }
            consumer.read(usize::MAX, |p| {
                black_box(p);
            })
        });
    });
    group.finish();
}

fn two_producers(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_two_producers");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.bench_function("push_100B_each", |b| {
        b.iter_custom(|iters| {
            let (producer, mut consumer) = channel(1 << 20).unwrap();
            let per_producer = iters.div_ceil(2);
            let stop = Arc::new(AtomicBool::new(false));
            let reader = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || consumer.used_bytes() > 0 {
                        let got = consumer.read(usize::MAX, |p| {
                            black_box(p);
                        });
                        if got == 0 {
                            // 2-core CI machines: with 3 busy threads, spinning starves the producers.
                            thread::yield_now();
                        }
                        n += got as u64;
                    }
                    n
                })
            };
            let t0 = Instant::now();
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let producer = producer.clone();
                    thread::spawn(move || {
                        for _ in 0..per_producer {
                            loop {
                                match producer.try_push(black_box(&PAYLOAD)) {
                                    Ok(()) => break,
                                    Err(PushError::Full) => thread::yield_now(),
                                    Err(e) => panic!("{e}"),
                                }
                            }
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            let n = reader.join().unwrap();
            let elapsed = t0.elapsed();
            assert_eq!(n, per_producer * 2);
            elapsed
        });
    });
    group.finish();
}

criterion_group!(benches, single_thread, two_producers);
criterion_main!(benches);
