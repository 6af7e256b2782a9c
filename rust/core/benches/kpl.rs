//! The hand-written KPL encoder/decoder against prost on the same schema, so the choice is by measurement.
//!
//! Workload: one aggregate of 400 user records of 100 bytes, partition keys drawn from 10,000 distinct keys
//! (so nearly every record brings a new table entry), no explicit hash keys; the same as the batcher's.
//! Run with `cargo bench -p treasure_core --bench kpl`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use md5::{Digest, Md5};
use prost::Message;
use rustc_hash::FxHashMap;
use treasure_core::kpl::{self, Aggregator, MAGIC};

#[derive(Clone, PartialEq, prost::Message)]
struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<Record>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tag {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

const RECORDS: usize = 400;
const DATA_LEN: usize = 100;
const CARDINALITY: u64 = 10_000;

struct Event {
    key: String,
    data: Vec<u8>,
}

fn events() -> Vec<Event> {
    // A fixed LCG so runs compare; keys look like the hex ids services use as partition keys.
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..RECORDS)
        .map(|_| {
            let n = next() % CARDINALITY;
            let key = format!(
                "{:032x}",
                u128::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
            );
            let data = (0..DATA_LEN).map(|_| next() as u8).collect();
            Event { key, data }
        })
        .collect()
}

/// The batcher's loop: check the size, add, seal.
fn hand_encode(agg: &mut Aggregator, events: &[Event], out: &mut Vec<u8>) {
    for e in events {
        if agg.size_with(e.key.as_bytes(), None, e.data.len()) > 1 << 20 {
            unreachable!();
        }
        agg.add(e.key.as_bytes(), None, &e.data);
    }
    agg.finish_into(out);
}

fn prost_build<'a>(events: &'a [Event], index: &mut FxHashMap<&'a str, u64>) -> AggregatedRecord {
    index.clear();
    let mut msg = AggregatedRecord {
        partition_key_table: Vec::new(),
        explicit_hash_key_table: Vec::new(),
        records: Vec::with_capacity(events.len()),
    };
    for e in events {
        let next = msg.partition_key_table.len() as u64;
        let partition_key_index = *index.entry(&e.key).or_insert_with(|| {
            msg.partition_key_table.push(e.key.clone());
            next
        });
        msg.records.push(Record {
            partition_key_index,
            explicit_hash_key_index: None,
            data: e.data.clone(),
            tags: Vec::new(),
        });
    }
    msg
}

fn prost_encode<'a>(events: &'a [Event], index: &mut FxHashMap<&'a str, u64>, out: &mut Vec<u8>) {
    let msg = prost_build(events, index);
    out.extend_from_slice(&MAGIC);
    let start = out.len();
    msg.encode(out).expect("Vec grows");
    let digest = Md5::digest(&out[start..]);
    out.extend_from_slice(&digest);
}

fn bench(c: &mut Criterion) {
    let events = events();
    let mut agg = Aggregator::new();
    let mut out = Vec::new();
    let mut index = FxHashMap::default();

    // Both encoders must produce the same bytes, or the comparison means nothing.
    hand_encode(&mut agg, &events, &mut out);
    let blob = out.clone();
    out.clear();
    prost_encode(&events, &mut index, &mut out);
    assert_eq!(blob, out, "hand and prost encodings differ");
    let distinct = AggregatedRecord::decode(&blob[4..blob.len() - 16])
        .unwrap()
        .partition_key_table
        .len();
    eprintln!(
        "aggregate: {} bytes, {RECORDS} records, {distinct} distinct keys",
        blob.len()
    );

    let mut g = c.benchmark_group("kpl_encode_400x100B");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("hand", |b| {
        b.iter(|| {
            out.clear();
            hand_encode(&mut agg, black_box(&events), &mut out);
            black_box(&out);
        });
    });
    g.bench_function("prost", |b| {
        b.iter(|| {
            out.clear();
            prost_encode(black_box(&events), &mut index, &mut out);
            black_box(&out);
        });
    });
    g.finish();

    // The same without the MD5 (which costs both the same): the protobuf work alone.
    let mut g = c.benchmark_group("kpl_protobuf_only_400x100B");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("hand", |b| {
        b.iter(|| {
            for e in black_box(&events) {
                agg.add(e.key.as_bytes(), None, &e.data);
            }
            black_box(agg.encoded_len());
            agg.clear();
        });
    });
    g.bench_function("prost", |b| {
        b.iter(|| {
            out.clear();
            prost_build(black_box(&events), &mut index)
                .encode(&mut out)
                .expect("Vec grows");
            black_box(&out);
        });
    });
    g.finish();

    let mut g = c.benchmark_group("kpl_decode_400x100B");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("hand", |b| {
        b.iter(|| {
            let mut bytes = 0;
            let n = kpl::decode(black_box(&blob), |r| {
                bytes += r.data.len() + r.partition_key.len();
            })
            .unwrap();
            black_box((n, bytes));
        });
    });
    g.bench_function("prost", |b| {
        b.iter(|| {
            let blob = black_box(&blob);
            let (body, digest) = blob[4..].split_at(blob.len() - 20);
            assert_eq!(Md5::digest(body).as_slice(), digest);
            let msg = AggregatedRecord::decode(body).unwrap();
            let bytes: usize = msg
                .records
                .iter()
                .map(|r| {
                    r.data.len() + msg.partition_key_table[r.partition_key_index as usize].len()
                })
                .sum();
            black_box((msg.records.len(), bytes));
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
