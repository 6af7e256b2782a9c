//! Metrics: a counter increment, a gauge add, a histogram record, get-or-create of an existing series, and the
//! snapshot of a registry shaped like a running engine (64 shards x 6 metrics, 10 breakers x 3, 20 producer
//! metrics: 434 series, 138 of them histograms).
//!
//! `cargo bench -p treasure_core --bench metrics`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use treasure_core::metrics::{HistogramLayout, Metric, Registry};

fn recording(c: &mut Criterion) {
    let r: Registry = Registry::new();
    let counter = r
        .counter("te_records_total", "", &[("shard", "1")])
        .unwrap();
    let gauge = r.gauge("te_lag_seconds", "", &[("shard", "1")]).unwrap();
    let histogram = r
        .histogram(
            "te_put_seconds",
            "",
            &[("shard", "1")],
            HistogramLayout::SECONDS,
        )
        .unwrap();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("counter_inc", |b| b.iter(|| black_box(&counter).inc()));
    group.bench_function("counter_add_f64", |b| {
        b.iter(|| black_box(&counter).add(black_box(3.0)));
    });
    group.bench_function("gauge_add", |b| {
        b.iter(|| black_box(&gauge).add(black_box(0.5)));
    });
    let mut v = 0.000_123;
    group.bench_function("histogram_record", |b| {
        b.iter(|| {
            v = if v > 100.0 { 0.000_123 } else { v * 1.37 };
            black_box(&histogram).record(black_box(v));
        });
    });
    group.bench_function("get_existing_counter", |b| {
        b.iter(|| {
            r.counter(black_box("te_records_total"), "", &[("shard", "1")])
                .unwrap()
        });
    });
    group.finish();
}

/// 64 shards x (3 counters, a gauge, 2 histograms), 10 breakers x (gauge, 2 counters), 20 producer metrics
/// (15 counters and gauges, 5 histograms); every histogram has seen a few hundred values.
fn engine_shaped() -> Registry {
    let r: Registry = Registry::new();
    for s in 0..64 {
        let shard = format!("shardId-{s:012}");
        let labels = [("stream", "events"), ("shard", shard.as_str())];
        r.counter("te_records_total", "Records.", &labels)
            .unwrap()
            .inc_by(1000);
        r.counter("te_bytes_total", "Bytes.", &labels)
            .unwrap()
            .inc_by(1 << 20);
        r.counter("te_errors_total", "Errors.", &labels)
            .unwrap()
            .inc_by(s);
        r.gauge("te_lag_seconds", "Lag.", &labels)
            .unwrap()
            .set(0.25);
        let put = r
            .histogram("te_put_seconds", "Put.", &labels, HistogramLayout::SECONDS)
            .unwrap();
        let batch = r
            .histogram(
                "te_batch_records",
                "Batch.",
                &labels,
                HistogramLayout::COUNT,
            )
            .unwrap();
        for i in 0..300 {
            put.record(0.0001 * f64::from(i + 1));
            batch.record(f64::from(i % 500 + 1));
        }
    }
    for b in 0..10 {
        let name = format!("breaker-{b}");
        let labels = [("breaker", name.as_str())];
        r.gauge("te_breaker_state", "State.", &labels)
            .unwrap()
            .set(1.0);
        r.counter("te_breaker_calls_total", "Calls.", &labels)
            .unwrap()
            .inc_by(10);
        r.counter("te_breaker_rejected_total", "Rejected.", &labels)
            .unwrap()
            .inc_by(1);
    }
    for p in 0..20 {
        let name = format!("te_producer_m{p}");
        if p < 15 {
            r.counter(&name, "Producer.", &[]).unwrap().inc_by(p);
        } else {
            let h = r
                .histogram(&name, "Producer.", &[], HistogramLayout::SECONDS)
                .unwrap();
            for i in 0..300 {
                h.record(0.001 * f64::from(i + 1));
            }
        }
    }
    assert_eq!(r.len(), 64 * 6 + 10 * 3 + 20);
    r
}

fn snapshot(c: &mut Criterion) {
    let r = engine_shaped();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("snapshot_434_series", |b| {
        b.iter(|| black_box(r.snapshot()));
    });
    // What the Python binding does: list the series once, then read each into a reused buffer.
    let mut buf = Vec::new();
    group.bench_function("series_and_export_434", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for s in r.series() {
                total += match &s.metric {
                    Metric::Counter(c) => c.whole(),
                    Metric::Gauge(g) => g.value() as u64,
                    Metric::Histogram(h) => h.export_into(&mut buf).1,
                };
            }
            black_box(total)
        });
    });
    group.finish();
}

criterion_group!(benches, recording, snapshot);
criterion_main!(benches);
