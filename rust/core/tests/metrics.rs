//! Counters, gauges, histograms and the registry of `treasure_core::metrics`.

// The values compared are exact by construction (integers and halves in an f64, powers of two, bounds).
#![allow(clippy::float_cmp)]

use std::sync::Arc;
use std::thread;

use proptest::prelude::*;
use treasure_core::metrics::{
    Counter, Gauge, Histogram, HistogramLayout, Kind, Metric, Registry, Value, MAX_EXPORTED_BOUNDS,
};
use treasure_core::CoreError;

const THREADS: usize = 4;
const PER_THREAD: u64 = 100_000;

#[test]
fn counter_is_exact_under_threads() {
    let c = Arc::new(Counter::new());
    thread::scope(|s| {
        for t in 0..THREADS {
            let c = &c;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    match (t + i as usize) % 3 {
                        0 => c.inc(),
                        1 => c.inc_by(1),
                        _ => assert!(c.add(1.0)),
                    }
                }
            });
        }
    });
    assert_eq!(c.whole(), THREADS as u64 * PER_THREAD);
    assert_eq!(c.value(), (THREADS as u64 * PER_THREAD) as f64);
}

#[test]
fn counter_takes_fractions_and_refuses_to_go_down() {
    let c = Counter::new();
    assert!(c.add(0.25));
    assert!(c.add(2.0));
    assert!(c.add(0.5));
    assert_eq!(c.whole(), 2);
    assert_eq!(c.value(), 2.75);
    for bad in [-1.0, -0.0001, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert!(!c.add(bad), "{bad}");
    }
    assert_eq!(c.value(), 2.75);
    // Integral increments beyond 2**53 stay exact in the integer part.
    let big = Counter::new();
    big.inc_by(1 << 60);
    big.inc();
    assert_eq!(big.whole(), (1 << 60) + 1);
}

#[test]
fn gauge_add_sub_under_threads() {
    let g = Arc::new(Gauge::new());
    g.set(10.0);
    thread::scope(|s| {
        for _ in 0..THREADS {
            let g = &g;
            s.spawn(move || {
                for _ in 0..PER_THREAD {
                    g.add(1.0);
                    g.sub(0.5);
                }
            });
        }
    });
    // Halves are exact in an f64 at this size, whatever the interleaving.
    assert_eq!(g.value(), 10.0 + 0.5 * (THREADS as u64 * PER_THREAD) as f64);
    g.set(-3.5);
    assert_eq!(g.value(), -3.5);
}

fn single_bucket(h: &Histogram) -> usize {
    let counts = h.bucket_counts();
    let hit: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    assert_eq!(hit.len(), 1, "{counts:?}");
    hit[0]
}

/// Values on, just below and just above every sub-bucket bound of the range, and outside it.
fn edge_values(layout: HistogramLayout) -> Vec<f64> {
    let mut values = vec![
        0.0,
        f64::MIN_POSITIVE,
        1e-300,
        1e300,
        f64::MAX,
        f64::INFINITY,
    ];
    for i in 0..layout.buckets() {
        let (lo, hi) = layout.bucket_range(i);
        for v in [lo, hi] {
            if v.is_finite() && v > 0.0 {
                values.extend([
                    v,
                    f64::from_bits(v.to_bits() - 1),
                    f64::from_bits(v.to_bits() + 1),
                ]);
                values.push(v * 1.03);
            }
        }
    }
    values.retain(|v| *v >= 0.0);
    values
}

#[test]
fn every_value_lands_in_a_bucket_that_contains_it() {
    for layout in [
        HistogramLayout::SECONDS,
        HistogramLayout::COUNT,
        HistogramLayout::new(-3, 5).unwrap(),
    ] {
        let last = layout.buckets() - 1;
        for v in edge_values(layout) {
            let h = Histogram::new(layout);
            h.record(v);
            let i = single_bucket(&h);
            let (lo, hi) = layout.bucket_range(i);
            match i {
                0 => assert!(v <= hi, "{v} in the floor bucket (.., {hi}]"),
                i if i == last => assert!(v > lo, "{v} in the overflow bucket ({lo}, ..]"),
                _ => assert!(lo < v && v <= hi, "{v} in bucket {i} ({lo}, {hi}]"),
            }
            assert_eq!(h.count(), 1);
        }
    }
}

#[test]
fn bucket_ranges_tile_the_range() {
    let layout = HistogramLayout::SECONDS;
    assert_eq!(layout.buckets(), 32 * 8 + 2);
    for i in 1..layout.buckets() {
        assert_eq!(
            layout.bucket_range(i - 1).1,
            layout.bucket_range(i).0,
            "bucket {i}"
        );
    }
    assert_eq!(layout.bucket_range(0).1, 2f64.powi(-20));
    assert_eq!(layout.bucket_range(layout.buckets() - 1).0, 4096.0);
}

#[test]
fn export_is_cumulative_and_exact_at_the_bounds() {
    let h = Histogram::new(HistogramLayout::SECONDS);
    let values = edge_values(HistogramLayout::SECONDS);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    for &v in &finite {
        h.record(v);
    }
    let bounds = HistogramLayout::SECONDS.bounds();
    assert_eq!(bounds.len(), 34);
    assert!(bounds.len() <= MAX_EXPORTED_BOUNDS);
    assert_eq!(*bounds.last().unwrap(), f64::INFINITY);
    assert!(bounds.windows(2).all(|w| w[0] < w[1]));
    let mut cumulative = Vec::new();
    let (sum, count) = h.export_into(&mut cumulative);
    assert_eq!(cumulative.len(), bounds.len());
    assert!(cumulative.windows(2).all(|w| w[0] <= w[1]));
    for (b, c) in bounds.iter().zip(&cumulative) {
        let expected = finite.iter().filter(|v| *v <= b).count() as u64;
        assert_eq!(*c, expected, "le={b}");
    }
    assert_eq!(count, finite.len() as u64);
    assert_eq!(count, h.count());
    // One thread: the sum is the same additions in the same order.
    let expected_sum = finite.iter().fold(0.0, |acc, v| acc + v);
    assert_eq!(sum.to_bits(), expected_sum.to_bits());
}

#[test]
fn negative_and_nan_are_rejected() {
    let h = Histogram::new(HistogramLayout::COUNT);
    for v in [-1.0, -0.0, f64::NAN, f64::NEG_INFINITY, -1e-300] {
        h.record(v);
    }
    // -0.0 >= 0.0 holds: it is a zero and goes to the floor bucket.
    assert_eq!(h.rejected(), 4);
    assert_eq!(h.count(), 1);
    assert_eq!(h.bucket_counts()[0], 1);
    h.record(3.0);
    assert_eq!(h.count(), 2);
    assert_eq!(h.sum(), 3.0);
}

#[test]
fn histogram_counts_are_exact_under_threads() {
    let h = Arc::new(Histogram::new(HistogramLayout::COUNT));
    thread::scope(|s| {
        for t in 0..THREADS {
            let h = &h;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    h.record(((i + t as u64) % 1000 + 1) as f64);
                }
            });
        }
    });
    assert_eq!(h.count(), THREADS as u64 * PER_THREAD);
    // Integers summed in an f64 below 2**53 are exact.
    let per_thread: u64 = (0..PER_THREAD).map(|i| i % 1000 + 1).sum();
    let expected: u64 = (0..THREADS as u64)
        .map(|t| (0..PER_THREAD).map(|i| (i + t) % 1000 + 1).sum::<u64>())
        .sum();
    assert_eq!(expected, per_thread * THREADS as u64);
    assert_eq!(h.sum(), expected as f64);
}

#[test]
fn layouts_are_bounded() {
    assert!(HistogramLayout::new(0, 38).is_ok());
    assert_eq!(
        HistogramLayout::new(0, 38).unwrap().bounds().len(),
        MAX_EXPORTED_BOUNDS
    );
    for (lo, hi) in [(0, 39), (3, 3), (4, 2), (-1023, 0), (1000, 1024)] {
        assert!(
            matches!(HistogramLayout::new(lo, hi), Err(CoreError::Config { .. })),
            "{lo}..{hi}"
        );
    }
    assert_eq!(HistogramLayout::COUNT.bounds().len(), 22);
    assert_eq!(HistogramLayout::COUNT.bounds()[0], 1.0);
}

fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

proptest! {
    #[test]
    fn quantiles_are_within_an_eighth(
        values in prop::collection::vec(2f64.powi(-20)..4096.0, 1..400),
        qs in prop::collection::vec(0.0f64..=1.0, 1..8),
    ) {
        let h = Histogram::new(HistogramLayout::SECONDS);
        for &v in &values {
            h.record(v);
        }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for q in qs.into_iter().chain([0.5, 0.9, 0.99, 1.0]) {
            let exact = exact_quantile(&sorted, q);
            let estimate = h.quantile(q).unwrap();
            prop_assert!(
                (estimate - exact).abs() <= exact / 8.0,
                "q={} exact={} estimate={}", q, exact, estimate
            );
        }
    }

    #[test]
    fn cumulative_counts_match_a_sort(values in prop::collection::vec(0.0f64..2e6, 0..300)) {
        let h = Histogram::new(HistogramLayout::COUNT);
        for &v in &values {
            h.record(v);
        }
        let mut out = Vec::new();
        let (_, count) = h.export_into(&mut out);
        prop_assert_eq!(count, values.len() as u64);
        for (b, c) in HistogramLayout::COUNT.bounds().iter().zip(&out) {
            prop_assert_eq!(*c, values.iter().filter(|v| *v <= b).count() as u64);
        }
    }
}

#[test]
fn registry_get_or_create_is_by_name_and_sorted_labels() {
    let r: Registry = Registry::new();
    let a = r
        .counter("x_total", "help", &[("b", "1"), ("a", "2")])
        .unwrap();
    let b = r
        .counter("x_total", "other help", &[("a", "2"), ("b", "1")])
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = r.counter("x_total", "help", &[("a", "2")]).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(r.len(), 2);
    a.inc();
    let snap = r.snapshot();
    assert_eq!(snap.len(), 2);
    // Sorted by labels within the family; the first help wins.
    assert_eq!(&*snap[0].labels, &[("a".to_owned(), "2".to_owned())]);
    assert_eq!(
        &*snap[1].labels,
        &[
            ("a".to_owned(), "2".to_owned()),
            ("b".to_owned(), "1".to_owned())
        ]
    );
    assert_eq!(&*snap[1].help, "help");
    assert_eq!(snap[1].value, Value::Counter(1.0));
    assert_eq!(snap[1].kind(), "counter");
}

#[test]
fn registry_refuses_bad_names_and_kinds() {
    let r: Registry = Registry::new();
    r.counter("ok_total", "", &[]).unwrap();
    let config = |res: Result<Arc<treasure_core::metrics::Series>, CoreError>| {
        matches!(res, Err(CoreError::Config { .. }))
    };
    assert!(config(r.register("ok_total", "", &[], Kind::Gauge)));
    r.histogram("lat_seconds", "", &[], HistogramLayout::SECONDS)
        .unwrap();
    assert!(config(r.register(
        "lat_seconds",
        "",
        &[("a", "b")],
        Kind::Histogram(HistogramLayout::COUNT)
    )));
    assert!(config(r.register(
        "lat_seconds",
        "",
        &[("le", "1")],
        Kind::Histogram(HistogramLayout::SECONDS)
    )));
    for bad in ["", "1abc", "a-b", "a b", "é", "a.b"] {
        assert!(config(r.register(bad, "", &[], Kind::Counter)), "{bad:?}");
    }
    for good in ["a", "_a", ":a", "a:b_c9", "treasure_engine_records_total"] {
        assert!(r.register(good, "", &[], Kind::Counter).is_ok(), "{good:?}");
    }
    for bad in ["", "1a", "a:b", "__reserved", "a-b"] {
        assert!(
            config(r.register("y", "", &[(bad, "v")], Kind::Counter)),
            "{bad:?}"
        );
    }
    assert!(config(r.register(
        "y",
        "",
        &[("a", "1"), ("a", "2")],
        Kind::Counter
    )));
    // Any label value is fine.
    assert!(r
        .register("y", "", &[("a", "\n\"\\ é")], Kind::Counter)
        .is_ok());
}

#[test]
fn remove_forgets_a_series_and_its_family() {
    let r: Registry = Registry::new();
    let g = r.gauge("lag_seconds", "", &[("shard", "1")]).unwrap();
    r.gauge("lag_seconds", "", &[("shard", "2")]).unwrap();
    assert!(r.remove("lag_seconds", &[("shard", "1")]).unwrap());
    assert!(!r.remove("lag_seconds", &[("shard", "1")]).unwrap());
    assert!(!r.remove("nothing", &[]).unwrap());
    g.set(5.0); // the handle still works, unseen
    assert_eq!(r.len(), 1);
    assert!(r.remove("lag_seconds", &[("shard", "2")]).unwrap());
    assert!(r.is_empty());
    // With its family gone, the name may come back as another kind.
    r.counter("lag_seconds", "", &[]).unwrap();
    // A handle made again is a new series.
    let g2 = r.gauge("other", "", &[("shard", "1")]).unwrap();
    assert_eq!(g2.value(), 0.0);
}

#[test]
fn concurrent_get_or_create_gives_one_series() {
    let r: Registry = Registry::new();
    let handles: Vec<Arc<Counter>> = thread::scope(|s| {
        let joins: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let c = r.counter("c_total", "", &[("k", "v")]).unwrap();
                    for _ in 0..1000 {
                        c.inc();
                    }
                    c
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert!(handles.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    assert_eq!(handles[0].whole(), THREADS as u64 * 1000);
    assert_eq!(r.len(), 1);
}

#[test]
fn snapshot_of_64_shards() {
    let r: Registry = Registry::new();
    let shards: Vec<String> = (0..64).map(|i| format!("shardId-{i:012}")).collect();
    for (i, shard) in shards.iter().enumerate() {
        let labels = [("stream", "events"), ("shard", shard.as_str())];
        r.counter("te_records_total", "records", &labels)
            .unwrap()
            .inc_by(i as u64);
        r.gauge("te_lag_seconds", "lag", &labels)
            .unwrap()
            .set(i as f64 / 2.0);
        let h = r
            .histogram("te_put_seconds", "put", &labels, HistogramLayout::SECONDS)
            .unwrap();
        for k in 0..=i {
            h.record(0.001 * (k + 1) as f64);
        }
        let b = r
            .histogram("te_batch_records", "batch", &labels, HistogramLayout::COUNT)
            .unwrap();
        b.record(i as f64 + 1.0);
    }
    assert_eq!(r.len(), 64 * 4);
    let snap = r.snapshot();
    assert_eq!(snap.len(), 64 * 4);
    let names: Vec<&str> = snap.iter().map(|s| &*s.name).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "families come out by name, each in one run");
    for (j, s) in snap.iter().enumerate() {
        let i = j % 64; // shard labels sort like the shard numbers
        assert_eq!(s.labels[0], ("shard".to_owned(), shards[i].clone()));
        assert_eq!(s.labels[1], ("stream".to_owned(), "events".to_owned()));
        match (&*s.name, &s.value) {
            ("te_records_total", Value::Counter(v)) => assert_eq!(*v, i as f64),
            ("te_lag_seconds", Value::Gauge(v)) => assert_eq!(*v, i as f64 / 2.0),
            ("te_put_seconds", Value::Histogram(h)) => {
                assert_eq!(h.count, i as u64 + 1);
                assert_eq!(*h.cumulative.last().unwrap(), h.count);
                assert_eq!(h.bounds.len(), h.cumulative.len());
                assert!(h.cumulative.windows(2).all(|w| w[0] <= w[1]));
            }
            ("te_batch_records", Value::Histogram(h)) => {
                assert_eq!(h.count, 1);
                assert_eq!(h.sum, i as f64 + 1.0);
                assert_eq!(h.bounds.len(), 22);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Series keep their handles' kinds.
    let all = r.series();
    assert!(matches!(all[0].metric, Metric::Histogram(_)));
    assert_eq!(
        all[0].metric.kind(),
        Kind::Histogram(HistogramLayout::COUNT)
    );
}
