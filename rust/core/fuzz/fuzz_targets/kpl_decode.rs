//! Fuzzes the KPL decoder: `cargo +nightly fuzz run kpl_decode` from `rust/core`.
//!
//! Half the inputs are decoded as they come; the other half are treated as a protobuf body and wrapped in
//! magic + a valid MD5, so the fuzzer gets past the digest and into the parser. Whatever decodes must
//! re-encode through the `Aggregator` to an aggregate that decodes to the same sub-records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};
use treasure_core::kpl::{self, Aggregator, MAGIC};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        let _ = kpl::decode_vec(input);
        return;
    };
    let blob = if mode & 1 == 0 {
        input.to_vec()
    } else {
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(rest);
        blob.extend_from_slice(&Md5::digest(rest));
        blob
    };

    let Ok(records) = kpl::decode_vec(&blob) else {
        return;
    };
    if records.is_empty() {
        return; // re-encoded, zero records make the 20-byte blob every consumer reads as raw
    }
    assert!(kpl::is_aggregated(&blob));
    let mut count = 0;
    assert_eq!(kpl::decode(&blob, |_| count += 1), Ok(records.len()));
    assert_eq!(count, records.len());

    let mut agg = Aggregator::new();
    for r in &records {
        let ehk = r.explicit_hash_key.map(str::as_bytes);
        let predicted = agg.size_with(r.partition_key.as_bytes(), ehk, r.data.len());
        agg.add(r.partition_key.as_bytes(), ehk, r.data);
        assert_eq!(agg.encoded_len(), predicted);
    }
    let mut again = Vec::new();
    agg.finish_into(&mut again);
    assert_eq!(kpl::decode_vec(&again).as_deref(), Ok(&records[..]));
});
