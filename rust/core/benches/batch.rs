//! Batcher throughput: 100-byte events, 10,000 keys, 4 shards, aggregation on, one core.
//!
//! `batcher/aggregate_4_shards` and `batcher/raw_4_shards` time the batcher thread's work alone: routing,
//! aggregation and sealing of events already laid out as the ring holds them (validating and laying out an
//! event is the submitting thread's work, timed by the Python `submit` benchmarks).
//! `batcher/stage_and_aggregate_4_shards` also lays the events out, for reference. Also the pieces that bound
//! it (MD5 of an aggregate, base64 into the body).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use md5::{Digest, Md5};
use treasure_core::batch::{seal_offline_with, seal_staged, BatcherConfig, StagedEvents};
use treasure_core::shards::ShardMap;

fn shard_map(n: u32) -> ShardMap {
    ShardMap::even(n)
}

fn events(n: usize) -> (Vec<Vec<u8>>, Vec<String>) {
    let data = (0..n).map(|i| format!("{i:0>100}").into_bytes()).collect();
    let keys = (0..n)
        .map(|i| format!("key-{}", (i * 7919) % 10_000))
        .collect();
    (data, keys)
}

fn batcher(c: &mut Criterion) {
    // Enough events per run that start-up (empty key cache, first buffers) is amortised as in a live batcher.
    const N: usize = 400_000;
    let (data, keys) = events(N);
    let mut g = c.benchmark_group("batcher");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    let staged = StagedEvents::new(
        data.iter()
            .zip(&keys)
            .map(|(d, k)| (d.as_slice(), k.as_str(), None)),
    )
    .unwrap();
    let config = |aggregate| BatcherConfig {
        stream: "s".into(),
        aggregate,
        ..BatcherConfig::default()
    };
    for aggregate in [true, false] {
        let name = if aggregate {
            "aggregate_4_shards"
        } else {
            "raw_4_shards"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                // Bodies are counted and dropped as they are sealed, as the sender does.
                let mut bytes = 0usize;
                seal_staged(config(aggregate), shard_map(4), &staged, |b| {
                    bytes += b.len();
                })
                .unwrap();
                bytes
            });
        });
    }
    g.bench_function("stage_and_aggregate_4_shards", |b| {
        b.iter(|| {
            let evs = data
                .iter()
                .zip(&keys)
                .map(|(d, k)| (d.as_slice(), k.as_str(), None));
            let mut bytes = 0usize;
            seal_offline_with(config(true), shard_map(4), evs, |b| bytes += b.len()).unwrap();
            bytes
        });
    });
    g.finish();

    let blob = vec![7u8; 51_200];
    let mut g = c.benchmark_group("pieces");
    g.throughput(Throughput::Bytes(blob.len() as u64));
    g.bench_function("md5_50KiB", |b| b.iter(|| Md5::digest(&blob)));
    g.bench_function("base64_50KiB", |b| {
        b.iter(|| base64_simd::STANDARD.encode_to_string(&blob));
    });
    g.finish();
}

criterion_group!(benches, batcher);
criterion_main!(benches);
