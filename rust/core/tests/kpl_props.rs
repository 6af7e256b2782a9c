//! Property tests of the KPL codec: roundtrip, exact sizes, byte equality with prost's encoding of the same
//! schema, and no panic on hostile input.

use md5::{Digest, Md5};
use proptest::prelude::*;
use prost::Message;
use treasure_core::kpl::{self, Aggregator, SubRecord, MAGIC, OVERHEAD};

/// The KPL schema, derived by hand (no build script), as the independent reference encoder.
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AggregatedRecord {
        #[prost(string, repeated, tag = "1")]
        pub partition_key_table: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub explicit_hash_key_table: Vec<String>,
        #[prost(message, repeated, tag = "3")]
        pub records: Vec<Record>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(uint64, required, tag = "1")]
        pub partition_key_index: u64,
        #[prost(uint64, optional, tag = "2")]
        pub explicit_hash_key_index: Option<u64>,
        #[prost(bytes = "vec", required, tag = "3")]
        pub data: Vec<u8>,
        #[prost(message, repeated, tag = "4")]
        pub tags: Vec<Tag>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tag {
        #[prost(string, required, tag = "1")]
        pub key: String,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }
}

#[derive(Debug, Clone)]
struct Input {
    pk: String,
    ehk: Option<String>,
    data: Vec<u8>,
}

/// Records drawn from small key pools (so keys repeat), unicode partition keys, decimal EHKs.
fn inputs(max_records: usize, max_data: usize) -> impl Strategy<Value = Vec<Input>> {
    let pks = prop::collection::vec("\\PC{1,24}", 1..12);
    let ehks = prop::collection::vec("[0-9]{1,39}", 1..5);
    (pks, ehks).prop_flat_map(move |(pks, ehks)| {
        let record = (
            0..pks.len(),
            prop::option::of(0..ehks.len()),
            prop::collection::vec(any::<u8>(), 0..=max_data),
        );
        prop::collection::vec(record, 0..=max_records).prop_map(move |recs| {
            recs.into_iter()
                .map(|(p, e, data)| Input {
                    pk: pks[p].clone(),
                    ehk: e.map(|e| ehks[e].clone()),
                    data,
                })
                .collect()
        })
    })
}

fn aggregate(inputs: &[Input]) -> Vec<u8> {
    let mut agg = Aggregator::new();
    for i in inputs {
        agg.add(
            i.pk.as_bytes(),
            i.ehk.as_deref().map(str::as_bytes),
            &i.data,
        );
    }
    let mut out = Vec::new();
    agg.finish_into(&mut out);
    out
}

/// What the KPL would build: tables in first-seen order, one message per user record.
fn prost_message(inputs: &[Input]) -> pb::AggregatedRecord {
    fn index_of(table: &mut Vec<String>, key: &str) -> u64 {
        let i = table.iter().position(|k| k == key).unwrap_or_else(|| {
            table.push(key.to_owned());
            table.len() - 1
        });
        i as u64
    }
    let mut msg = pb::AggregatedRecord::default();
    for i in inputs {
        let partition_key_index = index_of(&mut msg.partition_key_table, &i.pk);
        let explicit_hash_key_index = i
            .ehk
            .as_deref()
            .map(|e| index_of(&mut msg.explicit_hash_key_table, e));
        msg.records.push(pb::Record {
            partition_key_index,
            explicit_hash_key_index,
            data: i.data.clone(),
            tags: Vec::new(),
        });
    }
    msg
}

fn wrap(proto: &[u8]) -> Vec<u8> {
    let mut blob = MAGIC.to_vec();
    blob.extend_from_slice(proto);
    blob.extend_from_slice(&Md5::digest(proto));
    blob
}

fn md5_matches(blob: &[u8]) -> bool {
    blob.len() >= OVERHEAD
        && Md5::digest(&blob[4..blob.len() - 16]).as_slice() == &blob[blob.len() - 16..]
}

fn assert_roundtrip(inputs: &[Input], blob: &[u8]) {
    if inputs.is_empty() {
        // 20 bytes: the KCL and aws-kinesis-agg read it as a raw record, and so does the decoder.
        assert_eq!(blob.len(), OVERHEAD);
        assert!(!kpl::is_aggregated(blob) && kpl::decode_vec(blob).is_err());
        return;
    }
    let got = kpl::decode_vec(blob).expect("own output decodes");
    assert_eq!(got.len(), inputs.len());
    for (g, i) in got.iter().zip(inputs) {
        let want = SubRecord {
            partition_key: &i.pk,
            explicit_hash_key: i.ehk.as_deref(),
            data: &i.data,
        };
        assert_eq!(*g, want);
    }
}

proptest! {
    #[test]
    fn roundtrip_and_prost_equality(inputs in inputs(64, 300)) {
        let blob = aggregate(&inputs);
        assert_eq!(kpl::is_aggregated(&blob), !inputs.is_empty());
        assert_roundtrip(&inputs, &blob);
        // Byte for byte what a protobuf library emits for the same message.
        let msg = prost_message(&inputs);
        prop_assert_eq!(&blob, &wrap(&msg.encode_to_vec()));
        prop_assert_eq!(pb::AggregatedRecord::decode(&blob[4..blob.len() - 16]).unwrap(), msg);
    }

    #[test]
    fn size_with_equals_encoded_len(inputs in inputs(64, 300)) {
        let mut agg = Aggregator::new();
        for i in &inputs {
            let ehk = i.ehk.as_deref().map(str::as_bytes);
            let predicted = agg.size_with(i.pk.as_bytes(), ehk, i.data.len());
            agg.add(i.pk.as_bytes(), ehk, &i.data);
            prop_assert_eq!(agg.encoded_len(), predicted);
        }
        prop_assert_eq!(agg.len(), inputs.len());
        prop_assert_eq!(agg.first_partition_key(), inputs.first().map(|i| i.pk.as_bytes()));
        let expected = agg.encoded_len();
        let mut out = vec![1, 2, 3];
        agg.finish_into(&mut out);
        prop_assert_eq!(out.len(), 3 + expected);
        prop_assert!(agg.is_empty());
        prop_assert_eq!(agg.encoded_len(), OVERHEAD);
    }

    #[test]
    fn decode_of_prost_output_with_tags(inputs in inputs(16, 40), tag_key in "\\PC{0,8}") {
        // Sub-records carrying tags (which the KPL can emit) decode to the same records.
        let mut msg = prost_message(&inputs);
        for r in &mut msg.records {
            r.tags.push(pb::Tag { key: tag_key.clone(), value: Some("v".into()) });
        }
        assert_roundtrip(&inputs, &wrap(&msg.encode_to_vec()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut with_magic = MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        for blob in [bytes.clone(), with_magic, wrap(&bytes)] {
            if let Ok(recs) = kpl::decode_vec(&blob) {
                prop_assert!(md5_matches(&blob));
                prop_assert!(recs.iter().all(|r| r.data.len() <= blob.len()));
            }
        }
    }

    #[test]
    fn bit_flips_and_truncations_error_unless_md5_matches(
        inputs in inputs(24, 64),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0..8u8), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let blob = aggregate(&inputs);
        let mut flipped = blob.clone();
        for (at, bit) in &flips {
            let at = at.index(flipped.len());
            flipped[at] ^= 1 << bit;
        }
        if kpl::decode_vec(&flipped).is_ok() {
            prop_assert!(md5_matches(&flipped) && flipped[..4] == MAGIC);
        } else {
            prop_assert!(flipped != blob || inputs.is_empty());
        }
        let truncated = &blob[..cut.index(blob.len())];
        prop_assert!(kpl::decode_vec(truncated).is_err());
        // The protobuf body flipped and re-signed: a valid digest over garbage must still not panic.
        let body = &flipped[4..flipped.len() - 16];
        if let Ok(recs) = kpl::decode_vec(&wrap(body)) {
            prop_assert!(recs.len() <= inputs.len() + body.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn large_aggregates_roundtrip(inputs in inputs(128, 16 * 1024)) {
        // Up to ~2 MiB in all, ~1 MiB on average: multi-byte length varints everywhere.
        let blob = aggregate(&inputs);
        assert_roundtrip(&inputs, &blob);
        prop_assert_eq!(&blob, &wrap(&prost_message(&inputs).encode_to_vec()));
    }
}

proptest! {
    /// `try_add` (one key-table lookup, used by the batcher) agrees exactly with `size_with` + `add`: it adds
    /// a record iff the result fits the limit, and the bytes are the same. Undigested sealing plus
    /// `set_digest` gives the same blob as `finish_into`.
    #[test]
    fn try_add_matches_size_with_then_add(inputs in inputs(64, 300), limit in 64usize..8192) {
        let mut fast = Aggregator::new();
        let mut slow = Aggregator::new();
        for i in &inputs {
            let ehk = i.ehk.as_deref().map(str::as_bytes);
            let fits = slow.size_with(i.pk.as_bytes(), ehk, i.data.len()) <= limit;
            if fits {
                slow.add(i.pk.as_bytes(), ehk, &i.data);
            }
            prop_assert_eq!(fast.try_add(i.pk.as_bytes(), ehk, &i.data, limit), fits);
            prop_assert_eq!(fast.encoded_len(), slow.encoded_len());
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        fast.finish_undigested_into(&mut a);
        let digest: [u8; 16] = md5::Md5::digest(kpl::digest_input(&a)).into();
        kpl::set_digest(&mut a, digest);
        slow.finish_into(&mut b);
        prop_assert_eq!(a, b);
    }
}
