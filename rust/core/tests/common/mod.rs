//! What the pipeline integration tests share: a canned PutRecords success, and the user events in a body.

#![allow(dead_code)] // each test crate uses its own subset

use treasure_core::kpl;

/// A PutRecords 200 body accepting `records` records (empty ShardId: no shard-map check).
pub fn ok_response(records: usize) -> Vec<u8> {
    let one = r#"{"SequenceNumber":"1","ShardId":""}"#;
    format!(
        r#"{{"FailedRecordCount":0,"Records":[{}]}}"#,
        vec![one; records].join(",")
    )
    .into_bytes()
}

/// The user events in a PutRecords body, de-aggregating KPL records.
pub fn events_in(body: &[u8]) -> Vec<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    let mut out = Vec::new();
    for r in v["Records"].as_array().unwrap() {
        let data = base64_simd::STANDARD
            .decode_to_vec(r["Data"].as_str().unwrap())
            .unwrap();
        if kpl::is_aggregated(&data) {
            out.extend(
                kpl::decode_vec(&data)
                    .unwrap()
                    .iter()
                    .map(|s| s.data.to_vec()),
            );
        } else {
            out.push(data);
        }
    }
    out
}
