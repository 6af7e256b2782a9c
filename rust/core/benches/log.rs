//! Segment log append throughput: 256-byte payloads into a log with `FsyncPolicy::Interval(100ms)` (the
//! flusher thread fdatasyncs in the background while the benchmark appends), one at a time and in batches of
//! 64 through `append_many`.
//!
//! Closed segments are deleted outside the timed part so the run does not fill the disk; the buffer writes and
//! the rolls (with their fsync) are timed. `cargo bench -p treasure_core --bench log`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use treasure_core::log::{FsyncPolicy, Log, LogConfig};

const PAYLOAD: [u8; 256] = [0x5a; 256];
const BATCH: usize = 64;

fn open(dir: &std::path::Path) -> Log {
    let config = LogConfig {
        segment_bytes: 16 << 20,
        fsync: FsyncPolicy::Interval(Duration::from_millis(100)),
        ..LogConfig::default()
    };
    Log::open(dir, config).expect("open the log").0
}

/// Times `iters` calls of `step`, in rounds of at most `per_round` calls (about 50 MiB) after which the closed
/// segments are deleted (not timed).
fn timed(log: &Log, iters: u64, per_round: u64, mut step: impl FnMut()) -> Duration {
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let round = left.min(per_round);
        let t0 = Instant::now();
        for _ in 0..round {
            step();
        }
        elapsed += t0.elapsed();
        log.delete_before(log.end())
            .expect("delete closed segments");
        left -= round;
    }
    elapsed
}

fn append(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let log = open(tmp.path());
    let mut group = c.benchmark_group("log_append_256B_interval_100ms");
    group.throughput(Throughput::Bytes(PAYLOAD.len() as u64));
    group.bench_function("append", |b| {
        b.iter_custom(|iters| {
            timed(&log, iters, 200_000, || {
                black_box(log.append(black_box(&PAYLOAD)).expect("append"));
            })
        });
    });
    group.finish();

    let batch = vec![&PAYLOAD[..]; BATCH];
    let mut group = c.benchmark_group("log_append_many_64x256B_interval_100ms");
    group.throughput(Throughput::Bytes((PAYLOAD.len() * BATCH) as u64));
    group.bench_function("append_many", |b| {
        b.iter_custom(|iters| {
            timed(&log, iters, 200_000 / BATCH as u64, || {
                black_box(log.append_many(black_box(&batch)).expect("append_many"));
            })
        });
    });
    group.finish();
    let stats = log.stats();
    eprintln!(
        "appended {} frames, {} buffer writes, {} fsyncs, {} segments rolled",
        stats.appended_frames, stats.writes, stats.fsyncs, stats.rolls
    );
    log.close().expect("close");
}

criterion_group!(benches, append);
criterion_main!(benches);
