//! Breaker hot path: `try_acquire` + `on_success` in CLOSED (count and time windows), and the refusal in OPEN.
//!
//! `cargo bench -p treasure_core --bench breaker`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use treasure_core::breaker::{Breaker, BreakerConfig, WindowKind};

fn closed(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");
    for (name, window) in [("count", WindowKind::Count), ("time", WindowKind::Time)] {
        let b = Breaker::new(BreakerConfig {
            window,
            ..BreakerConfig::default()
        })
        .unwrap();
        let mut now = 1_000_000_000u64;
        group.bench_function(format!("acquire_success_closed_{name}"), |bench| {
            bench.iter(|| {
                now += 100;
                let p = b.try_acquire(black_box(now)).unwrap();
                b.on_success(p, black_box(50), now);
            });
        });
    }
    let b = Breaker::new(BreakerConfig::default()).unwrap();
    b.force_open(0);
    group.bench_function("refused_forced_open", |bench| {
        bench.iter(|| black_box(b.try_acquire(black_box(1)).is_err()));
    });
    group.finish();
}

criterion_group!(benches, closed);
criterion_main!(benches);
