//! Multi-buffer MD5 against the md-5 crate one message at a time, on the batcher's shape: 8 and 16 KPL
//! aggregates of 51,200 bytes sealed together. Throughput is in bytes hashed, so criterion prints MiB/s;
//! every backend this CPU runs is measured in the same run, next to `md5_many` (its own choice) and the crate.
//! Run with `cargo bench -p treasure_core --bench md5x`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use md5::{Digest, Md5};
use treasure_core::md5x;

const AGGREGATE: usize = 51_200;

fn aggregates(count: usize) -> Vec<Vec<u8>> {
    // A fixed LCG so runs compare.
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    (0..count)
        .map(|_| {
            (0..AGGREGATE)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (state >> 56) as u8
                })
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for count in [8, 16] {
        let owned = aggregates(count);
        let messages: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let mut group = c.benchmark_group(format!("md5x/{count}x{AGGREGATE}B"));
        group.throughput(Throughput::Bytes((count * AGGREGATE) as u64));

        group.bench_function("md-5 crate one by one", |b| {
            b.iter(|| {
                messages
                    .iter()
                    .map(|m| <[u8; 16]>::from(Md5::digest(black_box(m))))
                    .collect::<Vec<_>>()
            });
        });
        group.bench_function("md5_many", |b| {
            b.iter(|| md5x::md5_many(black_box(&messages)));
        });
        for name in md5x::backends() {
            group.bench_with_input(
                BenchmarkId::new("md5_many_with", name),
                &messages,
                |b, messages| {
                    b.iter(|| md5x::md5_many_with(name, black_box(messages)));
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
