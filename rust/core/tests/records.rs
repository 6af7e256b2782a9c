//! The GetRecords response parser: plain and KPL-aggregated records (built with `kpl::Aggregator`), JSON
//! escapes, paging fields, records that do not decode (reported in place, neighbours kept), bodies that are
//! not GetRecords responses, and a property test over random mixes of plain and aggregated records. Then the
//! check of aggregates against their shard's hash-key range: both policies, explicit hash keys, plain
//! records left alone, counts, and a property test against a model hashed with the md-5 crate.

use proptest::prelude::*;
use treasure_core::kpl::{self, Aggregator};
use treasure_core::records::{
    lane_of, parse_get_records, parse_get_records_checked, HashKeyRange, OutOfRange, Page,
    RangeCheck, RecordParts,
};
use treasure_core::shards::hash_key;
use treasure_core::CoreError;

/// A user record as a test builds it and as it should come back.
#[derive(Debug, Clone, PartialEq)]
struct User {
    data: Vec<u8>,
    partition_key: String,
    explicit_hash_key: Option<String>,
}

fn user(data: &[u8], partition_key: &str, explicit_hash_key: Option<&str>) -> User {
    User {
        data: data.to_vec(),
        partition_key: partition_key.to_owned(),
        explicit_hash_key: explicit_hash_key.map(str::to_owned),
    }
}

fn aggregate(users: &[User]) -> Vec<u8> {
    let mut agg = Aggregator::new();
    for u in users {
        agg.add(
            u.partition_key.as_bytes(),
            u.explicit_hash_key.as_deref().map(str::as_bytes),
            &u.data,
        );
    }
    let mut blob = Vec::new();
    agg.finish_into(&mut blob);
    blob
}

fn seq(n: usize) -> String {
    format!("49590338271490256608559692538361571095921575989{n:09}")
}

/// A Kinesis record of a GetRecords body, as a JSON value.
fn kinesis(data: &[u8], partition_key: &str, ehk: Option<&str>, n: usize) -> serde_json::Value {
    let mut rec = serde_json::json!({
        "Data": base64_simd::STANDARD.encode_to_string(data),
        "PartitionKey": partition_key,
        "SequenceNumber": seq(n),
        "ApproximateArrivalTimestamp": 1_700_000_000.5 + n as f64,
        "EncryptionType": "NONE",
    });
    if let Some(ehk) = ehk {
        rec["ExplicitHashKey"] = ehk.into();
    }
    rec
}

fn body(records: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "Records": records,
        "NextShardIterator": "AAAAAAAAAAE",
        "MillisBehindLatest": 1234,
    }))
    .unwrap()
}

/// Every user record of the page, in order, as `(user, sequence number, sub-sequence, aggregated)`.
fn users_of(page: &Page) -> Vec<(User, String, u64, bool)> {
    page.records()
        .map(|r| {
            (
                user(r.data(), r.partition_key(), r.explicit_hash_key()),
                r.sequence_number().to_owned(),
                r.sub_sequence_number(),
                r.aggregated(),
            )
        })
        .collect()
}

fn malformed_message(body: &[u8]) -> String {
    match parse_get_records(body) {
        Err(CoreError::Malformed(why)) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn plain_and_aggregated_records_round_trip_in_order() {
    let first = [user(b"a1", "k1", None), user(b"a2", "k2", Some("17"))];
    let second = [user(b"", "k3", None)];
    let page = parse_get_records(&body(vec![
        kinesis(b"plain one", "p1", None, 0),
        kinesis(&aggregate(&first), "outer", None, 1),
        kinesis(
            b"plain two",
            "p2",
            Some("340282366920938463463374607431768211455"),
            2,
        ),
        kinesis(&aggregate(&second), "outer2", Some("5"), 3),
    ]))
    .unwrap();
    assert_eq!(page.kinesis_records(), 4);
    assert_eq!(page.len(), 5);
    assert_eq!(page.malformed().len(), 0);
    assert_eq!(
        users_of(&page),
        [
            (user(b"plain one", "p1", None), seq(0), 0, false),
            (first[0].clone(), seq(1), 0, true),
            (first[1].clone(), seq(1), 1, true),
            (
                user(
                    b"plain two",
                    "p2",
                    Some("340282366920938463463374607431768211455")
                ),
                seq(2),
                0,
                false
            ),
            (second[0].clone(), seq(3), 0, true),
        ]
    );
    let arrivals: Vec<f64> = page.records().map(|r| r.approximate_arrival()).collect();
    assert_eq!(
        arrivals,
        [
            1_700_000_000.5,
            1_700_000_001.5,
            1_700_000_001.5,
            1_700_000_002.5,
            1_700_000_003.5
        ]
    );
    assert_eq!(page.next_shard_iterator(), Some("AAAAAAAAAAE"));
    assert_eq!(page.millis_behind_latest(), Some(1234));
    assert!(page.child_shards().is_empty());
    assert_eq!(page.last_sequence_number(), Some(seq(3).as_str()));
    assert_eq!(
        page.get(1).unwrap().partition_key_bytes(),
        b"k1",
        "the sub-record's key, not the aggregate's"
    );
    assert!(page.get(5).is_none());
}

#[test]
fn escaped_strings_are_unescaped() {
    // `\/` is a legal escape of `/`, which base64 uses; keys and values may carry any escape.
    let data = [0xFBu8, 0xFF, 0xFE]; // base64 "+//+"
    let b64 = base64_simd::STANDARD.encode_to_string(data);
    assert!(b64.contains('/'));
    let body = format!(
        r#"{{"Records":[{{"D\u0061ta":"{}","PartitionKey":"k\"\u00e9\n\ud83d\ude00","SequenceNumber":"1\u0032",
            "ExplicitHashKey":"\u0034\u0032","ApproximateArrivalTimestamp":1.7E9}}],
            "NextShardIterator":"it\/er"}}"#,
        b64.replace('/', "\\/")
    );
    let page = parse_get_records(body.as_bytes()).unwrap();
    let r = page.get(0).unwrap();
    assert_eq!(r.data(), data);
    assert_eq!(r.partition_key(), "k\"é\n😀");
    assert_eq!(r.sequence_number(), "12");
    assert_eq!(r.explicit_hash_key(), Some("42"));
    assert!((r.approximate_arrival() - 1.7e9).abs() < f64::EPSILON);
    assert_eq!(page.next_shard_iterator(), Some("it/er"));
    assert_eq!(page.millis_behind_latest(), None);
}

#[test]
fn shard_end_null_iterator_child_shards_and_unknown_fields() {
    let body = br#"{"Unknown":{"nested":[1,{"a":null}]},"Records":[],"NextShardIterator":null,
        "MillisBehindLatest":0,"ChildShards":[
          {"ShardId":"shardId-000000000002","ParentShards":["shardId-000000000000","shardId-000000000001"],
           "HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"340282366920938463463374607431768211455"}},
          {"ShardId":"shardId-000000000003","ParentShards":["shardId-000000000000"]}]}"#;
    let page = parse_get_records(body).unwrap();
    assert!(page.is_empty());
    assert_eq!(page.kinesis_records(), 0);
    assert_eq!(page.next_shard_iterator(), None);
    assert_eq!(page.last_sequence_number(), None);
    assert_eq!(page.millis_behind_latest(), Some(0));
    assert_eq!(
        page.child_shards(),
        [
            (
                "shardId-000000000002".to_owned(),
                vec![
                    "shardId-000000000000".to_owned(),
                    "shardId-000000000001".to_owned()
                ]
            ),
            (
                "shardId-000000000003".to_owned(),
                vec!["shardId-000000000000".to_owned()]
            ),
        ]
    );
    // Absent iterator, null child shards, a record without an arrival time.
    let page = parse_get_records(
        br#"{"ChildShards":null,"Records":[{"Data":"eA==","PartitionKey":"k","SequenceNumber":"1"}]}"#,
    )
    .unwrap();
    assert_eq!(page.next_shard_iterator(), None);
    assert!(page.child_shards().is_empty());
    assert_eq!(page.get(0).unwrap().data(), b"x");
    assert!(page.get(0).unwrap().approximate_arrival() == 0.0);
}

#[test]
fn broken_aggregates_are_reported_in_place_and_neighbours_survive() {
    let users = [user(b"u0", "k0", None), user(b"u1", "k1", None)];
    let good = aggregate(&users);
    let mut bad_md5 = good.clone();
    *bad_md5.last_mut().unwrap() ^= 0xFF;
    // Cut inside the protobuf and give it a correct digest: only the protobuf is wrong.
    let proto = &kpl::digest_input(&good)[..good.len() - kpl::OVERHEAD - 3];
    let mut truncated = kpl::MAGIC.to_vec();
    truncated.extend_from_slice(proto);
    let mut md5 = [0u8; 16];
    md5.copy_from_slice(&treasure_core::md5x::md5_many(&[proto])[0]);
    truncated.extend_from_slice(&md5);

    let page = parse_get_records(&body(vec![
        kinesis(b"before", "p0", None, 0),
        kinesis(&bad_md5, "outer-a", None, 1),
        kinesis(&good, "outer-b", None, 2),
        kinesis(&truncated, "outer-c", None, 3),
        kinesis(b"after", "p1", None, 4),
    ]))
    .unwrap();
    assert_eq!(page.kinesis_records(), 5);
    assert_eq!(
        users_of(&page),
        [
            (user(b"before", "p0", None), seq(0), 0, false),
            (users[0].clone(), seq(2), 0, true),
            (users[1].clone(), seq(2), 1, true),
            (user(b"after", "p1", None), seq(4), 0, false),
        ]
    );
    let bad: Vec<_> = page.malformed().collect();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].data(), bad_md5);
    assert_eq!(bad[0].partition_key(), "outer-a");
    assert_eq!(bad[0].sequence_number(), seq(1));
    assert!((bad[0].approximate_arrival() - 1_700_000_001.5).abs() < 1e-6);
    assert!(
        bad[0].reason().contains("MD5 mismatch"),
        "{}",
        bad[0].reason()
    );
    assert_eq!(bad[0].position(), 1);
    assert_eq!(bad[1].data(), truncated);
    assert_eq!(bad[1].partition_key(), "outer-c");
    assert_eq!(bad[1].sequence_number(), seq(3));
    assert!(
        bad[1]
            .reason()
            .starts_with("malformed input: KPL aggregate:"),
        "{}",
        bad[1].reason()
    );
    assert_eq!(bad[1].position(), 3);
    // The checkpoint covers the whole page, whatever became of its records.
    assert_eq!(page.last_sequence_number(), Some(seq(4).as_str()));
}

#[test]
fn the_last_record_may_be_the_bad_one() {
    let mut blob = aggregate(&[user(b"x", "k", None)]);
    blob[5] ^= 1;
    let page = parse_get_records(&body(vec![
        kinesis(b"ok", "k", None, 0),
        kinesis(&blob, "k", None, 1),
    ]))
    .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page.malformed().next().unwrap().position(), 1);
    assert_eq!(page.last_sequence_number(), Some(seq(1).as_str()));
}

#[test]
fn invalid_base64_is_a_bad_record_with_the_raw_text() {
    let page = parse_get_records(
        br#"{"Records":[{"Data":"not base64!","PartitionKey":"k","SequenceNumber":"7"},
                        {"Data":"eQ==","PartitionKey":"k","SequenceNumber":"8"}]}"#,
    )
    .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page.get(0).unwrap().data(), b"y");
    let bad = page.malformed().next().unwrap();
    assert_eq!(bad.data(), b"not base64!");
    assert_eq!(bad.position(), 0);
    assert!(bad.reason().contains("base64"), "{}", bad.reason());
    assert!(bad.reason().contains('7'), "{}", bad.reason());
}

#[test]
fn plain_records_that_merely_look_aggregated_stay_plain() {
    // The magic alone, or the magic with an empty body, is a raw record for the KCL too.
    let mut empty_body = kpl::MAGIC.to_vec();
    empty_body.extend_from_slice(&[0u8; 16]);
    let page = parse_get_records(&body(vec![
        kinesis(&kpl::MAGIC, "k", None, 0),
        kinesis(&empty_body, "k", None, 1),
    ]))
    .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page.malformed().len(), 0);
    assert!(page.records().all(|r| !r.aggregated()));
    assert_eq!(page.get(1).unwrap().data(), empty_body);
}

#[test]
fn bodies_that_are_not_get_records_responses_are_errors() {
    let cases: [(&[u8], &str); 14] = [
        (b"", "EOF"),
        (b"not json", "expected"),
        (b"[]", "GetRecords response object"),
        (b"{}", "missing field `Records`"),
        (br#"{"Records":null}"#, "array of Kinesis records"),
        (br#"{"Records":{}}"#, "array of Kinesis records"),
        (br#"{"Records":[1]}"#, "Kinesis record object"),
        (
            br#"{"Records":[{"PartitionKey":"k","SequenceNumber":"1"}]}"#,
            "missing field `Data`",
        ),
        (
            br#"{"Records":[{"Data":"","SequenceNumber":"1"}]}"#,
            "missing field `PartitionKey`",
        ),
        (
            br#"{"Records":[{"Data":"","PartitionKey":"k"}]}"#,
            "missing field `SequenceNumber`",
        ),
        (
            br#"{"Records":[{"Data":"","PartitionKey":"k","SequenceNumber":1}]}"#,
            "invalid type",
        ),
        (
            br#"{"Records":[{"Data":"","PartitionKey":"k","SequenceNumber":"1","Data":""}]}"#,
            "duplicate field `Data`",
        ),
        (
            br#"{"Records":[],"Records":[]}"#,
            "duplicate field `Records`",
        ),
        (br#"{"Records":[]} trailing"#, "trailing characters"),
    ];
    for (body, why) in cases {
        let got = malformed_message(body);
        assert!(
            got.starts_with("GetRecords response: ") && got.contains(why),
            "{}: {got}",
            String::from_utf8_lossy(body)
        );
    }
    let got = malformed_message(br#"{"Records":[],"MillisBehindLatest":"soon"}"#);
    assert!(got.contains("invalid type"), "{got}");
    // Invalid UTF-8 inside a partition key.
    let got = malformed_message(
        b"{\"Records\":[{\"Data\":\"\",\"PartitionKey\":\"\xff\",\"SequenceNumber\":\"1\"}]}",
    );
    assert!(got.contains("UTF-8") || got.contains("unicode"), "{got}");
}

#[test]
fn from_records_builds_a_page_of_plain_records() {
    let parts = [
        RecordParts {
            data: b"d",
            partition_key: "k",
            explicit_hash_key: Some("9"),
            sequence_number: "5",
            sub_sequence_number: 3,
            approximate_arrival: 1.25,
            aggregated: true,
        },
        RecordParts {
            data: b"",
            partition_key: "k2",
            explicit_hash_key: None,
            sequence_number: "6",
            sub_sequence_number: 0,
            approximate_arrival: 0.0,
            aggregated: false,
        },
    ];
    let page = Page::from_records(&parts).unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page.kinesis_records(), 2);
    let r = page.get(0).unwrap();
    assert_eq!(
        (
            r.data(),
            r.partition_key(),
            r.explicit_hash_key(),
            r.sequence_number()
        ),
        (&b"d"[..], "k", Some("9"), "5")
    );
    assert_eq!(r.sub_sequence_number(), 3);
    assert!(r.aggregated());
    assert!((r.approximate_arrival() - 1.25).abs() < f64::EPSILON);
    assert_eq!(page.get(1).unwrap().explicit_hash_key(), None);
    assert_eq!(page.last_sequence_number(), Some("6"));
}

#[test]
fn lanes_are_stable_and_in_range() {
    assert_eq!(lane_of(b"anything", 0), 0);
    assert_eq!(lane_of(b"anything", 1), 0);
    // CRC-32C test vector (RFC 3720): "123456789" -> 0xE3069283.
    assert_eq!(lane_of(b"123456789", 1 << 31), 0xE306_9283 % (1 << 31));
    assert_eq!(lane_of(b"123456789", 7), 0xE306_9283 % 7);
    let mut seen = [0usize; 4];
    for i in 0..1000 {
        let key = format!("key-{i}");
        let lane = lane_of(key.as_bytes(), 4);
        assert_eq!(lane, lane_of(key.as_bytes(), 4));
        seen[lane as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
}

/// A Kinesis record of the property test: plain, or an aggregate of one or more user records.
#[derive(Debug, Clone)]
enum Kinesis {
    Plain(User),
    Aggregate(Vec<User>),
}

fn users() -> impl Strategy<Value = User> {
    (
        proptest::collection::vec(any::<u8>(), 0..40),
        "[a-zA-Z0-9é\"\\\\/ ]{1,12}",
        proptest::option::of(0u128..=u128::MAX),
    )
        .prop_map(|(data, partition_key, ehk)| User {
            data,
            partition_key,
            explicit_hash_key: ehk.map(|e| e.to_string()),
        })
}

fn kinesis_records() -> impl Strategy<Value = Vec<Kinesis>> {
    proptest::collection::vec(
        prop_oneof![
            users().prop_map(Kinesis::Plain),
            proptest::collection::vec(users(), 1..8).prop_map(Kinesis::Aggregate),
        ],
        0..20,
    )
}

proptest! {
    #[test]
    fn every_user_record_comes_back_in_order(records in kinesis_records()) {
        let mut expected = Vec::new();
        let json = records
            .iter()
            .enumerate()
            .map(|(n, rec)| match rec {
                Kinesis::Plain(u) => {
                    expected.push((u.clone(), seq(n), 0, false));
                    kinesis(&u.data, &u.partition_key, u.explicit_hash_key.as_deref(), n)
                }
                Kinesis::Aggregate(users) => {
                    for (i, u) in users.iter().enumerate() {
                        expected.push((u.clone(), seq(n), i as u64, true));
                    }
                    kinesis(&aggregate(users), "outer", None, n)
                }
            })
            .collect();
        let page = parse_get_records(&body(json)).unwrap();
        prop_assert_eq!(page.kinesis_records(), records.len());
        prop_assert_eq!(page.malformed().len(), 0);
        prop_assert_eq!(users_of(&page), expected);
        let last = records.len().checked_sub(1).map(seq);
        prop_assert_eq!(page.last_sequence_number(), last.as_deref());
    }

    #[test]
    fn any_bytes_give_a_page_or_an_error_never_a_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_get_records(&body);
    }

    #[test]
    fn a_corrupted_aggregate_never_costs_its_neighbours(users in proptest::collection::vec(users(), 1..6),
                                                        flip in any::<usize>()) {
        let mut blob = aggregate(&users);
        let at = kpl::MAGIC.len() + flip % (blob.len() - kpl::MAGIC.len());
        blob[at] ^= 0x01;
        let page = parse_get_records(&body(vec![
            kinesis(b"left", "l", None, 0),
            kinesis(&blob, "outer", None, 1),
            kinesis(b"right", "r", None, 2),
        ])).unwrap();
        let datas: Vec<&[u8]> = page.records().map(|r| r.data()).collect();
        prop_assert_eq!(datas.first().copied(), Some(&b"left"[..]));
        prop_assert_eq!(datas.last().copied(), Some(&b"right"[..]));
        prop_assert_eq!(page.malformed().len(), 1);
        prop_assert_eq!(page.len(), 2);
        let bad = page.malformed().next().unwrap();
        prop_assert_eq!(bad.position(), 1);
        prop_assert_eq!(bad.data(), &blob[..]);
    }
}

// --- the hash-key range of the shard ----------------------------------------------------------------------

/// The lower half of the key space: the first of two even shards.
fn lower() -> HashKeyRange {
    HashKeyRange::new(0, u128::MAX >> 1).unwrap()
}

/// A partition key whose MD5 falls in the lower half of the key space (`lower_half`) or the upper half.
fn key_in(lower_half: bool, tag: &str) -> String {
    (0..10_000)
        .map(|i| format!("{tag}-{i}"))
        .find(|k| (hash_key(k.as_bytes()) <= u128::MAX >> 1) == lower_half)
        .unwrap()
}

fn checked(records: Vec<serde_json::Value>, range: HashKeyRange, policy: OutOfRange) -> Page {
    parse_get_records_checked(&body(records), Some(RangeCheck { range, policy })).unwrap()
}

fn datas(page: &Page) -> Vec<&[u8]> {
    page.records().map(|r| r.data()).collect()
}

#[test]
fn an_aggregate_wholly_in_range_is_delivered_under_both_policies() {
    let (a, b) = (key_in(true, "a"), key_in(true, "b"));
    let users = [
        user(b"1", &a, None),
        user(b"2", &b, None),
        user(b"3", &a, None),
    ];
    for policy in [OutOfRange::Deliver, OutOfRange::Skip] {
        let page = checked(
            vec![kinesis(&aggregate(&users), "outer", None, 0)],
            lower(),
            policy,
        );
        assert_eq!(datas(&page), [b"1", b"2", b"3"], "{policy:?}");
        assert_eq!(page.out_of_range_records(), 0);
        assert_eq!(page.skipped_out_of_range_records(), 0);
        assert_eq!(page.last_sub_sequence_number(), 2);
    }
}

#[test]
fn an_aggregate_partly_out_of_range_is_delivered_and_counted_or_skipped_whole() {
    let (inside, outside) = (key_in(true, "in"), key_in(false, "out"));
    let stray = [
        user(b"s0", &inside, None),
        user(b"s1", &outside, None),
        user(b"s2", &outside, None),
        user(b"s3", &inside, None),
    ];
    let fine = [user(b"f0", &inside, None)];
    let records = || {
        vec![
            kinesis(b"p0", &outside, None, 0), // plain: in range whatever its key
            kinesis(&aggregate(&stray), &inside, None, 1),
            kinesis(&aggregate(&fine), &inside, None, 2),
        ]
    };
    let page = checked(records(), lower(), OutOfRange::Deliver);
    assert_eq!(
        datas(&page),
        [&b"p0"[..], b"s0", b"s1", b"s2", b"s3", b"f0"]
    );
    // All four records of the stray aggregate, not just its two outside the range.
    assert_eq!(page.out_of_range_records(), 4);
    assert_eq!(page.skipped_out_of_range_records(), 0);

    let page = checked(records(), lower(), OutOfRange::Skip);
    assert_eq!(datas(&page), [&b"p0"[..], b"f0"]);
    assert_eq!(page.out_of_range_records(), 0);
    assert_eq!(page.skipped_out_of_range_records(), 4);
    assert_eq!(page.kinesis_records(), 3);
    let subs: Vec<_> = page
        .records()
        .map(|r| (r.sequence_number().to_owned(), r.sub_sequence_number()))
        .collect();
    assert_eq!(subs, [(seq(0), 0), (seq(2), 0)]);

    // Without a range nothing is checked or counted.
    let page = parse_get_records(&body(records())).unwrap();
    assert_eq!(page.len(), 6);
    assert_eq!(page.out_of_range_records(), 0);
}

#[test]
fn explicit_hash_keys_decide_over_the_partition_key() {
    let (inside, outside) = (key_in(true, "in"), key_in(false, "out"));
    let low = "5";
    let high = (u128::MAX - 5).to_string();
    // Its key hashes out but its explicit hash key is in: in range, and the reverse.
    let saved = [user(b"saved", &outside, Some(low))];
    let lost = [user(b"lost", &inside, Some(&high))];
    let junk = [user(b"junk", &inside, Some("not a number"))];
    let too_big = [user(
        b"big",
        &inside,
        Some("340282366920938463463374607431768211456"),
    )];
    let page = checked(
        vec![
            kinesis(&aggregate(&saved), "o", None, 0),
            kinesis(&aggregate(&lost), "o", None, 1),
            kinesis(&aggregate(&junk), "o", None, 2),
            kinesis(&aggregate(&too_big), "o", None, 3),
        ],
        lower(),
        OutOfRange::Skip,
    );
    assert_eq!(datas(&page), [b"saved"]);
    assert_eq!(page.skipped_out_of_range_records(), 3);
    // The whole key space: only a hash key that is no hash key is out of it.
    let page = checked(
        vec![
            kinesis(&aggregate(&lost), "o", None, 0),
            kinesis(&aggregate(&junk), "o", None, 1),
        ],
        HashKeyRange::ALL,
        OutOfRange::Deliver,
    );
    assert_eq!(datas(&page), [&b"lost"[..], b"junk"]);
    assert_eq!(page.out_of_range_records(), 1);
}

#[test]
fn plain_records_are_never_out_of_range() {
    let outside = key_in(false, "out");
    let high = u128::MAX.to_string();
    let page = checked(
        vec![
            kinesis(b"a", &outside, None, 0),
            kinesis(b"b", "k", Some(&high), 1),
            kinesis(b"c", "k", Some("junk"), 2),
        ],
        lower(),
        OutOfRange::Skip,
    );
    assert_eq!(datas(&page), [b"a", b"b", b"c"]);
    assert_eq!(page.out_of_range_records(), 0);
    assert_eq!(page.skipped_out_of_range_records(), 0);
}

#[test]
fn a_page_of_skipped_aggregates_still_covers_its_records_for_the_checkpoint() {
    let outside = key_in(false, "out");
    let users = [
        user(b"x", &outside, None),
        user(b"y", &outside, None),
        user(b"z", &outside, None),
    ];
    let page = checked(
        vec![
            kinesis(&aggregate(&users[..1]), "o", None, 0),
            kinesis(&aggregate(&users), "o", None, 1),
        ],
        lower(),
        OutOfRange::Skip,
    );
    assert!(page.is_empty());
    assert_eq!(page.kinesis_records(), 2);
    assert_eq!(page.skipped_out_of_range_records(), 4);
    assert_eq!(page.last_sequence_number(), Some(seq(1).as_str()));
    assert_eq!(page.last_sub_sequence_number(), 2);
}

#[test]
fn bad_records_keep_their_place_among_what_is_left() {
    let (inside, outside) = (key_in(true, "in"), key_in(false, "out"));
    let mut broken = aggregate(&[user(b"b", &inside, None)]);
    *broken.last_mut().unwrap() ^= 1;
    let page = checked(
        vec![
            kinesis(b"p0", "k", None, 0),
            kinesis(
                &aggregate(&[user(b"s", &outside, None), user(b"t", &inside, None)]),
                "o",
                None,
                1,
            ),
            kinesis(&broken, "o", None, 2),
            kinesis(&aggregate(&[user(b"u", &outside, None)]), "o", None, 3),
            kinesis(&broken, "o", None, 4),
            kinesis(b"p5", "k", None, 5),
            kinesis(&broken, "o", None, 6),
        ],
        lower(),
        OutOfRange::Skip,
    );
    assert_eq!(datas(&page), [b"p0", b"p5"]);
    let positions: Vec<_> = page.malformed().map(|b| b.position()).collect();
    assert_eq!(positions, [1, 1, 2]);
    assert_eq!(page.skipped_out_of_range_records(), 3);
    assert_eq!(page.last_sub_sequence_number(), 0);
}

#[test]
fn ranges_and_policies_by_name() {
    assert!(HashKeyRange::new(2, 1).is_err());
    let one = HashKeyRange::new(7, 7).unwrap();
    assert!(one.contains(7) && !one.contains(6) && !one.contains(8));
    assert!(HashKeyRange::ALL.contains(0) && HashKeyRange::ALL.contains(u128::MAX));
    assert_eq!(OutOfRange::from_name("deliver"), Some(OutOfRange::Deliver));
    assert_eq!(OutOfRange::from_name("skip"), Some(OutOfRange::Skip));
    assert_eq!(OutOfRange::from_name("Skip"), None);
    assert_eq!(OutOfRange::default(), OutOfRange::Deliver);
    assert_eq!(OutOfRange::Skip.name(), "skip");
}

/// Whether the model says a user record's hash key lies in `range` (the md-5 crate, not `md5x`).
fn model_in_range(u: &User, range: HashKeyRange) -> bool {
    match &u.explicit_hash_key {
        Some(ehk) => ehk.parse::<u128>().is_ok_and(|h| range.contains(h)),
        None => range.contains(hash_key(u.partition_key.as_bytes())),
    }
}

fn ranges() -> impl Strategy<Value = HashKeyRange> {
    prop_oneof![
        Just(HashKeyRange::ALL),
        (any::<u128>(), any::<u128>())
            .prop_map(|(a, b)| HashKeyRange::new(a.min(b), a.max(b)).unwrap()),
        (0u32..4, 1u32..5).prop_map(|(i, n)| {
            let n = i.max(n - 1) + 1; // i < n
            let width = u128::MAX / u128::from(n);
            let end = if i + 1 == n {
                u128::MAX
            } else {
                width * u128::from(i + 1) - 1
            };
            HashKeyRange::new(width * u128::from(i), end).unwrap()
        }),
    ]
}

proptest! {
    #[test]
    fn the_range_check_agrees_with_a_model(records in kinesis_records(), range in ranges(), skip in any::<bool>()) {
        let policy = if skip { OutOfRange::Skip } else { OutOfRange::Deliver };
        let (mut expected, mut strays, mut skipped) = (Vec::new(), 0, 0);
        let mut last_sub = 0;
        let json = records
            .iter()
            .enumerate()
            .map(|(n, rec)| match rec {
                Kinesis::Plain(u) => {
                    expected.push((u.clone(), seq(n), 0, false));
                    last_sub = 0;
                    kinesis(&u.data, &u.partition_key, u.explicit_hash_key.as_deref(), n)
                }
                Kinesis::Aggregate(users) => {
                    let out = users.iter().filter(|u| !model_in_range(u, range)).count();
                    if out > 0 && skip {
                        skipped += users.len();
                    } else {
                        if !skip && out > 0 {
                            strays += users.len();
                        }
                        for (i, u) in users.iter().enumerate() {
                            expected.push((u.clone(), seq(n), i as u64, true));
                        }
                    }
                    last_sub = users.len() as u64 - 1;
                    kinesis(&aggregate(users), "outer", None, n)
                }
            })
            .collect();
        let page = checked(json, range, policy);
        prop_assert_eq!(users_of(&page), expected);
        prop_assert_eq!(page.out_of_range_records(), strays);
        prop_assert_eq!(page.skipped_out_of_range_records(), skipped);
        prop_assert_eq!(page.kinesis_records(), records.len());
        prop_assert_eq!(page.last_sub_sequence_number(), last_sub);
    }
}
