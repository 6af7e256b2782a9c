//! Fuzzes the GetRecords response parser (`treasure_core::records`): `cargo +nightly fuzz run get_records`
//! from `rust/core`.
//!
//! The first input byte picks a mode:
//! * bit 0 set: the rest is the response body as it comes (with `dicts/get_records.dict` the fuzzer soon
//!   writes JSON). Parsing must not panic, and a page that parses must answer every accessor.
//! * bit 0 clear: the rest describes a well-formed response that the harness writes as JSON: records whose
//!   data is plain bytes, a KPL aggregate (magic + body + the body's real MD5, so the decoder is reached), or
//!   text that is not base64, with keys that need JSON escapes, and the paging fields. Parsing must succeed,
//!   and the page must say exactly what the module documentation promises of each record, checked against
//!   `kpl::decode_vec` on the same bytes: a plain record as it was, an aggregate's sub-records in order, a bad
//!   record (with the raw bytes, at its position) for what does not decode.
//!
//! Bits 1-2 pick the range check: none, `Deliver` or `Skip`, with a range from the next 4 bytes. Under
//! `Skip` an aggregate is delivered whole or not at all, and the skipped ones are counted; under `Deliver`
//! everything is delivered and an aggregate with a sub-record out of range is counted whole. Whether a
//! sub-record is in range is computed here from `MD5(partition key)` or its explicit hash key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};
use treasure_core::kpl::{self, MAGIC};
use treasure_core::records::{
    parse_get_records, parse_get_records_checked, HashKeyRange, OutOfRange, Page, RangeCheck,
};
use treasure_core::shards::parse_hash_key;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `s` as a JSON string, escaping what must be and, with `ascii`, everything beyond ASCII too (`\uXXXX`,
/// surrogate pairs included), so the parser's unescaping path is taken.
fn json_string(s: &str, ascii: bool) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads the structured mode's input: small numbers and byte strings, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.byte()).min(max).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn text(&mut self, max: usize) -> String {
        String::from_utf8_lossy(self.bytes(max)).into_owned()
    }
}

enum Data {
    Bytes(Vec<u8>),
    NotBase64(String),
}

struct Built {
    data: Data,
    partition_key: String,
    explicit_hash_key: Option<String>,
    sequence_number: String,
}

/// Touches everything a page offers (a parsed page must answer all of it without panicking).
fn walk(page: &Page) {
    assert_eq!(page.records().len(), page.len());
    assert_eq!(page.is_empty(), page.len() == 0);
    for (i, r) in page.records().enumerate() {
        let g = page.get(i).expect("get(i) below len");
        assert_eq!(g.data(), r.data());
        let _ = (r.partition_key(), r.partition_key_bytes(), r.explicit_hash_key());
        let _ = (r.sequence_number(), r.sub_sequence_number(), r.aggregated());
        let _ = (r.approximate_arrival(), format!("{r:?}"));
    }
    assert!(page.get(page.len()).is_none());
    let mut last = 0;
    for b in page.malformed() {
        let _ = (b.data(), b.partition_key(), b.sequence_number(), b.reason());
        let _ = (b.approximate_arrival(), format!("{b:?}"));
        assert!(b.position() >= last && b.position() <= page.len());
        last = b.position();
    }
    let _ = (page.next_shard_iterator(), page.millis_behind_latest());
    let _ = (page.child_shards(), page.kinesis_records(), page.last_sequence_number());
    let _ = (page.last_sub_sequence_number(), page.out_of_range_records());
    let _ = (page.skipped_out_of_range_records(), format!("{page:?}"));
}

fn in_range(range: HashKeyRange, partition_key: &str, explicit_hash_key: Option<&str>) -> bool {
    match explicit_hash_key {
        Some(ehk) => parse_hash_key(ehk).is_ok_and(|h| range.contains(h)),
        None => range.contains(u128::from_be_bytes(
            Md5::digest(partition_key.as_bytes()).into(),
        )),
    }
}

fn structured(mut input: Input<'_>, check: Option<RangeCheck>) {
    let n = usize::from(input.byte() % 8);
    let ascii = input.byte() & 1 == 1;
    let mut built = Vec::new();
    let mut body = String::from("{\"Records\":[");
    for i in 0..n {
        let kind = input.byte();
        let payload = input.bytes(200).to_vec();
        let data = match kind % 4 {
            0 | 1 => Data::Bytes(payload),
            2 => {
                let mut blob = MAGIC.to_vec();
                blob.extend_from_slice(&payload);
                blob.extend_from_slice(&Md5::digest(&payload));
                Data::Bytes(blob)
            }
            _ => {
                let mut text = base64(&payload);
                text.insert(text.len() / 2, '!');
                Data::NotBase64(text)
            }
        };
        let partition_key = input.text(40);
        let explicit_hash_key = (kind & 4 != 0).then(|| input.text(40));
        let sequence_number = format!("4959{i:04}");
        if i > 0 {
            body.push(',');
        }
        let encoded = match &data {
            Data::Bytes(b) => base64(b),
            Data::NotBase64(t) => t.clone(),
        };
        body.push_str(&format!(
            "{{\"Data\":\"{encoded}\",\"PartitionKey\":{},\"SequenceNumber\":\"{sequence_number}\"",
            json_string(&partition_key, ascii)
        ));
        if let Some(ehk) = &explicit_hash_key {
            body.push_str(&format!(",\"ExplicitHashKey\":{}", json_string(ehk, ascii)));
        }
        if kind & 8 != 0 {
            body.push_str(&format!(",\"ApproximateArrivalTimestamp\":{}.5", kind));
        }
        if kind & 16 != 0 {
            body.push_str(",\"EncryptionType\":\"NONE\",\"Unknown\":{\"a\":[1,null,true]}");
        }
        body.push('}');
        built.push(Built {
            data,
            partition_key,
            explicit_hash_key,
            sequence_number,
        });
    }
    body.push(']');
    let extras = input.byte();
    let iterator = input.text(60);
    if extras & 1 != 0 {
        body.push_str(&format!(",\"NextShardIterator\":{}", json_string(&iterator, ascii)));
    }
    let millis = i64::from(extras) * 1_000_003;
    if extras & 2 != 0 {
        body.push_str(&format!(",\"MillisBehindLatest\":{millis}"));
    }
    let children: Vec<(String, Vec<String>)> = if extras & 4 != 0 {
        (0..usize::from(extras >> 5))
            .map(|c| (format!("shardId-{c}"), vec![iterator.clone(); c % 3]))
            .collect()
    } else {
        Vec::new()
    };
    if extras & 4 != 0 {
        let items: Vec<String> = children
            .iter()
            .map(|(id, parents)| {
                let parents: Vec<String> = parents.iter().map(|p| json_string(p, ascii)).collect();
                format!(
                    "{{\"ShardId\":\"{id}\",\"ParentShards\":[{}],\"HashKeyRange\":{{\"StartingHashKey\":\"0\",\"EndingHashKey\":\"9\"}}}}",
                    parents.join(",")
                )
            })
            .collect();
        body.push_str(&format!(",\"ChildShards\":[{}]", items.join(",")));
    }
    body.push('}');

    let page = match parse_get_records_checked(body.as_bytes(), check) {
        Ok(page) => page,
        Err(e) => panic!("a well-formed body did not parse: {e}\n{body}"),
    };
    walk(&page);
    assert_eq!(page.kinesis_records(), n);
    assert_eq!(
        page.last_sequence_number(),
        built.last().map(|b| b.sequence_number.as_str())
    );
    assert_eq!(
        page.next_shard_iterator(),
        (extras & 1 != 0).then_some(iterator.as_str())
    );
    assert_eq!(page.millis_behind_latest(), (extras & 2 != 0).then_some(millis));
    assert_eq!(page.child_shards(), &children[..]);

    // The page, record by record against what was built.
    let mut records = page.records().peekable();
    let mut bad = page.malformed().peekable();
    let (mut delivered, mut out_of_range, mut skipped) = (0, 0, 0);
    let mut last_sub = 0;
    for b in &built {
        last_sub = 0;
        let seq = b.sequence_number.as_str();
        let mut mine = Vec::new();
        while let Some(r) = records.next_if(|r| r.sequence_number() == seq) {
            mine.push(r);
        }
        let mine_bad = bad.next_if(|x| x.sequence_number() == seq);
        if let Some(x) = &mine_bad {
            assert_eq!(x.position(), delivered, "bad record out of place");
            assert_eq!(x.partition_key(), b.partition_key);
            assert!(mine.is_empty());
        }
        delivered += mine.len();
        let bytes = match &b.data {
            Data::NotBase64(text) => {
                assert_eq!(mine_bad.expect("not base64: a bad record").data(), text.as_bytes());
                continue;
            }
            Data::Bytes(bytes) => bytes,
        };
        if !kpl::is_aggregated(bytes) {
            assert!(mine_bad.is_none());
            assert_eq!(mine.len(), 1, "a plain record is one user record");
            let r = mine[0];
            assert_eq!(r.data(), &bytes[..]);
            assert_eq!(r.partition_key(), b.partition_key);
            assert_eq!(r.explicit_hash_key(), b.explicit_hash_key.as_deref());
            assert_eq!((r.sub_sequence_number(), r.aggregated()), (0, false));
            continue;
        }
        match kpl::decode_vec(bytes) {
            Err(e) => {
                assert!(mine.is_empty());
                assert_eq!(mine_bad.expect("undecodable aggregate: a bad record").reason(), e.to_string());
                assert_eq!(mine_bad.unwrap().data(), &bytes[..]);
            }
            Ok(subs) => {
                assert!(mine_bad.is_none());
                last_sub = subs.len().saturating_sub(1) as u64;
                let strays = check.is_some_and(|c| {
                    subs.iter()
                        .any(|s| !in_range(c.range, s.partition_key, s.explicit_hash_key))
                });
                let policy = check.map(|c| c.policy);
                if strays && policy == Some(OutOfRange::Skip) {
                    assert!(mine.is_empty(), "a straying aggregate under Skip is dropped whole");
                    skipped += subs.len();
                    continue;
                }
                if strays {
                    out_of_range += subs.len();
                }
                assert_eq!(mine.len(), subs.len(), "an aggregate gives its sub-records, all of them");
                for (i, (r, s)) in mine.iter().zip(&subs).enumerate() {
                    assert_eq!(r.data(), s.data);
                    assert_eq!(r.partition_key(), s.partition_key);
                    assert_eq!(r.explicit_hash_key(), s.explicit_hash_key);
                    assert_eq!((r.sub_sequence_number(), r.aggregated()), (i as u64, true));
                }
            }
        }
    }
    assert!(records.next().is_none(), "user records nobody sent");
    assert!(bad.next().is_none(), "bad records nobody sent");
    assert_eq!(page.out_of_range_records(), out_of_range);
    assert_eq!(page.skipped_out_of_range_records(), skipped);
    assert_eq!(page.last_sub_sequence_number(), last_sub);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let check = match (mode >> 1) & 3 {
        0 => None,
        policy => {
            let (bounds, _) = rest.split_at(rest.len().min(4));
            let mut b = [0u8; 4];
            b[..bounds.len()].copy_from_slice(bounds);
            let (x, y) = (u128::from(b[0]) << 120 | u128::from(b[1]) << 112, u128::from(b[2]) << 120 | u128::from(b[3]) << 112);
            let range = HashKeyRange::new(x.min(y), x.max(y) | (u128::MAX >> 16)).expect("start <= end");
            let policy = if policy == 1 { OutOfRange::Deliver } else { OutOfRange::Skip };
            Some(RangeCheck { range, policy })
        }
    };
    if mode & 1 == 1 {
        if let Ok(page) = parse_get_records(rest) {
            walk(&page);
        }
        if let Ok(page) = parse_get_records_checked(rest, check) {
            walk(&page);
        }
    } else {
        let skip = if check.is_some() { rest.len().min(4) } else { 0 };
        structured(Input(&rest[skip..]), check);
    }
});
