//! The consumer's GetRecords parser alone (`records::parse_get_records`): JSON, base64, KPL de-aggregation,
//! on the page of `bench/test_consume.py`. Throughput is in user records.
//!
//! Workloads: `aggregated_100x100`, 100 Kinesis records each a KPL aggregate of 100 user records; `plain_10000`,
//! 10,000 plain Kinesis records. Both carry 10,000 user records of about 100 bytes of JSON, partition keys
//! from 1,000. `parse_aggregated_100x100_range_{deliver,skip}`: the aggregated page checked against the lower
//! half of the key space (the first shard of two), which about half the sub-records fall outside of: the cost
//! of the range check (one MD5 per distinct key of each aggregate) under each policy. Run with
//! `cargo bench -p treasure_core --bench records`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use treasure_core::kpl::Aggregator;
use treasure_core::records::{self, lane_of, HashKeyRange, OutOfRange, RangeCheck};

const KINESIS_RECORDS: usize = 100;
const PER_AGGREGATE: usize = 100;
const USER_RECORDS: usize = KINESIS_RECORDS * PER_AGGREGATE;
const KEYS: usize = 1_000;

/// The `i`-th user event: about 100 bytes of JSON, and its partition key.
fn event(i: usize) -> (Vec<u8>, String) {
    let user = (i * 7_919) % KEYS;
    let data = format!(
        r#"{{"event_id":{i:>10},"user":"user-{user:06}","type":"page_view","path":"/products/{:05}","ms":{:>4}}}"#,
        i % 20_000,
        i % 1_000
    );
    (data.into_bytes(), format!("user-{user:06}"))
}

/// A Kinesis record of a GetRecords body, as JSON (the shape of `bench/test_consume.py`).
fn record_json(data: &[u8], partition_key: &str, n: usize) -> String {
    format!(
        concat!(
            r#"{{"SequenceNumber":"495903382714902566085596925383615710959215759{:011}","#,
            r#""ApproximateArrivalTimestamp":{:.3},"Data":"{}","PartitionKey":"{}"}}"#,
        ),
        n,
        1.7e9 + n as f64 * 0.001,
        base64_simd::STANDARD.encode_to_string(data),
        partition_key,
    )
}

fn body(records: &[String]) -> Vec<u8> {
    let iterator =
        "AAAAAAAAAAHsW8zCWf9164uy8Epue6WS3w6wmj4a4USt+CNvgaBsuZ3iRTyLCBLl8dq6a7F8YZ1aMSG6";
    format!(
        r#"{{"Records":[{}],"NextShardIterator":"{iterator}","MillisBehindLatest":0}}"#,
        records.join(",")
    )
    .into_bytes()
}

fn aggregated_body() -> Vec<u8> {
    let mut agg = Aggregator::new();
    let records: Vec<String> = (0..KINESIS_RECORDS)
        .map(|r| {
            for i in r * PER_AGGREGATE..(r + 1) * PER_AGGREGATE {
                let (data, key) = event(i);
                agg.add(key.as_bytes(), None, &data);
            }
            let mut blob = Vec::new();
            agg.finish_into(&mut blob);
            record_json(&blob, &event(r * PER_AGGREGATE).1, r)
        })
        .collect();
    body(&records)
}

fn plain_body() -> Vec<u8> {
    let records: Vec<String> = (0..USER_RECORDS)
        .map(|i| {
            let (data, key) = event(i);
            record_json(&data, &key, i)
        })
        .collect();
    body(&records)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("records");
    g.throughput(Throughput::Elements(USER_RECORDS as u64));
    for (name, body) in [
        ("parse_aggregated_100x100", aggregated_body()),
        ("parse_plain_10000", plain_body()),
    ] {
        let page = records::parse_get_records(&body).unwrap();
        assert_eq!(page.len(), USER_RECORDS);
        assert_eq!(page.malformed().len(), 0);
        eprintln!(
            "{name}: body {} bytes, {} Kinesis records",
            body.len(),
            page.kinesis_records()
        );
        g.bench_function(name, |b| {
            b.iter(|| records::parse_get_records(black_box(&body)).unwrap());
        });
    }
    let body = aggregated_body();
    let range = HashKeyRange::new(0, u128::MAX >> 1).unwrap();
    for (name, policy) in [
        (
            "parse_aggregated_100x100_range_deliver",
            OutOfRange::Deliver,
        ),
        ("parse_aggregated_100x100_range_skip", OutOfRange::Skip),
    ] {
        let check = Some(RangeCheck { range, policy });
        let page = records::parse_get_records_checked(&body, check).unwrap();
        eprintln!(
            "{name}: {} delivered, {} out of range, {} skipped",
            page.len(),
            page.out_of_range_records(),
            page.skipped_out_of_range_records()
        );
        g.bench_function(name, |b| {
            b.iter(|| records::parse_get_records_checked(black_box(&body), check).unwrap());
        });
    }
    let page = records::parse_get_records(&body).unwrap();
    g.bench_function("lane_of_4", |b| {
        b.iter(|| {
            page.records()
                .map(|r| lane_of(r.partition_key_bytes(), black_box(4)))
                .sum::<u32>()
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
