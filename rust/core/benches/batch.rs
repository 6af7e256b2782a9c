//! Batcher throughput: 100-byte events, 10,000 keys, 4 shards, aggregation on, one core.
//! Also the pieces that bound it (MD5 of an aggregate, base64 into the body).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use md5::{Digest, Md5};
use treasure_core::batch::{seal_offline_with, BatcherConfig};
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
    for aggregate in [true, false] {
        let name = if aggregate {
            "aggregate_4_shards"
        } else {
            "raw_4_shards"
        };
        g.bench_function(name, |b| {
            b.iter_batched(
                || (),
                |()| {
                    let config = BatcherConfig {
                        stream: "s".into(),
                        aggregate,
                        ..BatcherConfig::default()
                    };
                    let evs = data
                        .iter()
                        .zip(&keys)
                        .map(|(d, k)| (d.as_slice(), k.as_str(), None));
                    // Bodies are counted and dropped as they are sealed, as the sender does.
                    let mut bytes = 0usize;
                    seal_offline_with(config, shard_map(4), evs, |b| bytes += b.len()).unwrap();
                    bytes
                },
                BatchSize::PerIteration,
            );
        });
    }
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
