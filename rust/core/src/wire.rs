//! The Kinesis JSON 1.1 wire format for the data plane: PutRecords request bodies written straight into one
//! buffer (base64 data, JSON-escaped keys), and PutRecords response parsing into per-record outcomes.

use serde::Deserialize;

use crate::CoreError;

/// Most records in one PutRecords request.
pub const MAX_REQUEST_RECORDS: usize = 500;
/// Most bytes (data plus partition keys) in one PutRecords request.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// Most bytes in one PutRecords request to a stream raised with UpdateMaxRecordSize (records up to 10 MiB).
pub const MAX_LARGE_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// Default largest record (data plus partition key); streams raised with UpdateMaxRecordSize allow 10 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Most bytes in a partition key (256 characters of up to four UTF-8 bytes each).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;
/// The error code of a record (or request) Kinesis throttled: the shard's write limit was reached.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// Builds one PutRecords body: `{"StreamName":..,"Records":[{"Data":..,"PartitionKey":..,"ExplicitHashKey":..},..]}`.
#[derive(Debug)]
pub struct RequestBuilder {
    prefix: Vec<u8>,
    body: Vec<u8>,
    count: usize,
    payload_bytes: usize,
}

/// Where one record's base64 data lies in a sealed body, so a failed record can be recovered from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl RequestBuilder {
    /// `stream` is a stream name, or an ARN when `is_arn` (then sent as `StreamARN`).
    pub fn new(stream: &str, is_arn: bool) -> Self {
        let mut prefix = Vec::with_capacity(stream.len() + 32);
        prefix.extend_from_slice(if is_arn {
            b"{\"StreamARN\":"
        } else {
            b"{\"StreamName\":"
        });
        write_json_string(&mut prefix, stream.as_bytes());
        prefix.extend_from_slice(b",\"Records\":[");
        let mut body = Vec::with_capacity(64 * 1024);
        body.extend_from_slice(&prefix);
        Self {
            prefix,
            body,
            count: 0,
            payload_bytes: 0,
        }
    }

    /// Bytes a record counts against the request and record limits: data plus partition key.
    #[inline]
    pub fn record_cost(data_len: usize, key_len: usize) -> usize {
        data_len + key_len
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes written into the body so far, the opening prefix included.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Makes room for at least `bytes` of body in all, so that filling it does not reallocate.
    pub fn reserve(&mut self, bytes: usize) {
        self.body.reserve(bytes.saturating_sub(self.body.len()));
    }

    /// Bytes the body buffer can hold without growing.
    pub fn capacity(&self) -> usize {
        self.body.capacity()
    }

    /// Bytes of the opening prefix (`{"StreamName":..,"Records":[`).
    pub fn prefix_len(&self) -> usize {
        self.prefix.len()
    }

    /// Data plus partition-key bytes so far (what Kinesis counts against the 5 MiB limit).
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// Whether one more record of `cost` bytes fits within `max_records` and `max_bytes`.
    #[inline]
    pub fn fits(&self, cost: usize, max_records: usize, max_bytes: usize) -> bool {
        self.count < max_records && self.payload_bytes + cost <= max_bytes
    }

    /// Appends one record and returns where its base64 data sits in the body.
    pub fn push(
        &mut self,
        data: &[u8],
        partition_key: &[u8],
        explicit_hash_key: Option<&str>,
    ) -> Span {
        self.push_with(data.len(), partition_key, explicit_hash_key, |body| {
            // Appends into spare capacity: no zero-fill of bytes about to be overwritten (3% of the batcher).
            base64_simd::STANDARD.encode_append(data, body);
        })
    }

    /// Rewrites the base64 of a pushed record's data from byte `changed_from` on, after the caller changed
    /// those bytes (`data` is the record's whole new data, of the length it was pushed with). Only the
    /// 4-character groups from the one holding `changed_from` are re-encoded: a KPL aggregate is pushed
    /// with a zero MD5 trailer and its last 24 characters fixed once the trailer is known.
    pub fn rewrite_tail(&mut self, span: Span, data: &[u8], changed_from: usize) {
        let group = changed_from.min(data.len()) / 3;
        let start = span.start as usize + 4 * group;
        let end = span.start as usize + span.len as usize;
        let written = base64_simd::STANDARD.encode(
            &data[3 * group..],
            base64_simd::Out::from_slice(&mut self.body[start..end]),
        );
        debug_assert_eq!(written.len(), end - start);
    }

    #[inline]
    fn push_with(
        &mut self,
        data_len: usize,
        partition_key: &[u8],
        explicit_hash_key: Option<&str>,
        write_data: impl FnOnce(&mut Vec<u8>),
    ) -> Span {
        if self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(b"{\"Data\":\"");
        let start = self.body.len();
        let encoded = base64_simd::STANDARD.encoded_length(data_len);
        write_data(&mut self.body);
        debug_assert_eq!(self.body.len(), start + encoded);
        self.body.extend_from_slice(b"\",\"PartitionKey\":");
        write_json_string(&mut self.body, partition_key);
        if let Some(ehk) = explicit_hash_key {
            self.body.extend_from_slice(b",\"ExplicitHashKey\":\"");
            self.body.extend_from_slice(ehk.as_bytes());
            self.body.push(b'"');
        }
        self.body.push(b'}');
        self.count += 1;
        self.payload_bytes += Self::record_cost(data_len, partition_key.len());
        Span {
            start: start as u32,
            len: encoded as u32,
        }
    }

    /// Closes the body and returns it; the builder is ready for the next request.
    pub fn finish(&mut self) -> Vec<u8> {
        let next = Vec::with_capacity(self.body.capacity());
        self.finish_into_next(next)
    }

    /// Like [`finish`](Self::finish), continuing in `next` (a recycled buffer: fresh multi-megabyte buffers
    /// cost a page fault per 4 KiB written).
    pub fn finish_into_next(&mut self, mut next: Vec<u8>) -> Vec<u8> {
        self.body.extend_from_slice(b"]}");
        next.clear();
        next.extend_from_slice(&self.prefix);
        self.count = 0;
        self.payload_bytes = 0;
        std::mem::replace(&mut self.body, next)
    }
}

/// Decodes the data of one record back out of a sealed body.
pub fn recover_data(body: &[u8], span: Span) -> Result<Vec<u8>, CoreError> {
    let start = span.start as usize;
    let end = start + span.len as usize;
    let text = body
        .get(start..end)
        .ok_or_else(|| CoreError::Malformed("span outside the body".into()))?;
    base64_simd::STANDARD
        .decode_to_vec(text)
        .map_err(|e| CoreError::Malformed(format!("base64: {e}")))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` (UTF-8) as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[run..i]);
        if escape.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.extend_from_slice(escape);
        }
        run = i + 1;
    }
    out.extend_from_slice(&s[run..]);
    out.push(b'"');
}

/// What Kinesis said of one record of a PutRecords request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    Ok {
        shard_id: String,
        sequence_number: String,
    },
    Failed {
        error_code: String,
        error_message: String,
    },
}

impl RecordOutcome {
    pub fn is_throttle(&self) -> bool {
        matches!(self, Self::Failed { error_code, .. } if error_code == THROTTLED)
    }
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<RawRecord<'a>>,
}

#[derive(Deserialize)]
struct RawRecord<'a> {
    #[serde(rename = "ShardId", borrow, default)]
    shard_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "SequenceNumber", borrow, default)]
    sequence_number: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "ErrorCode", borrow, default)]
    error_code: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "ErrorMessage", borrow, default)]
    error_message: Option<std::borrow::Cow<'a, str>>,
}

/// Parses a successful (HTTP 200) PutRecords response; `expected` is the number of records sent.
pub fn parse_put_records(body: &[u8], expected: usize) -> Result<Vec<RecordOutcome>, CoreError> {
    let raw: RawResponse<'_> = serde_json::from_slice(body)
        .map_err(|e| CoreError::Malformed(format!("PutRecords response: {e}")))?;
    if raw.records.len() != expected {
        return Err(CoreError::Malformed(format!(
            "PutRecords response has {} results for {expected} records",
            raw.records.len()
        )));
    }
    Ok(raw
        .records
        .into_iter()
        .map(|r| match (r.error_code, r.sequence_number) {
            (Some(code), _) => RecordOutcome::Failed {
                error_code: code.into_owned(),
                error_message: r
                    .error_message
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default(),
            },
            (None, Some(seq)) => RecordOutcome::Ok {
                shard_id: r
                    .shard_id
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default(),
                sequence_number: seq.into_owned(),
            },
            (None, None) => RecordOutcome::Failed {
                error_code: "MalformedResult".into(),
                error_message: "result has neither SequenceNumber nor ErrorCode".into(),
            },
        })
        .collect())
}

/// The `__type` of a JSON error response (`"...#ProvisionedThroughputExceededException"` -> the last part).
pub fn error_type(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Err<'a> {
        #[serde(rename = "__type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let e: Err<'_> = serde_json::from_slice(body).ok()?;
    let kind = e.kind?;
    Some(kind.rsplit('#').next().unwrap_or(&kind).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_valid_json_and_recoverable() {
        let mut b = RequestBuilder::new("my \"stream\"", false);
        let s1 = b.push(b"hello", "k\u{e9}y\n\"".as_bytes(), None);
        let s2 = b.push(b"", b"k2", Some("12345"));
        assert_eq!(b.len(), 2);
        let body = b.finish();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["StreamName"], "my \"stream\"");
        assert_eq!(v["Records"][0]["Data"], "aGVsbG8=");
        assert_eq!(v["Records"][0]["PartitionKey"], "k\u{e9}y\n\"");
        assert_eq!(v["Records"][1]["Data"], "");
        assert_eq!(v["Records"][1]["ExplicitHashKey"], "12345");
        assert_eq!(recover_data(&body, s1).unwrap(), b"hello");
        assert_eq!(recover_data(&body, s2).unwrap(), b"");
        assert!(b.is_empty());
        let next = b.finish();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&next).unwrap()["Records"],
            serde_json::json!([])
        );
    }

    #[test]
    fn control_characters_escaped() {
        let mut out = Vec::new();
        write_json_string(&mut out, b"a\x01b\x1f");
        assert_eq!(out, b"\"a\\u0001b\\u001f\"");
    }

    #[test]
    fn parses_mixed_response() {
        let body = br#"{"FailedRecordCount":1,"Records":[{"SequenceNumber":"1","ShardId":"shardId-0"},{"ErrorCode":"ProvisionedThroughputExceededException","ErrorMessage":"slow"}]}"#;
        let out = parse_put_records(body, 2).unwrap();
        assert!(matches!(&out[0], RecordOutcome::Ok { shard_id, .. } if shard_id == "shardId-0"));
        assert!(out[1].is_throttle());
        assert!(parse_put_records(body, 3).is_err());
        assert!(parse_put_records(b"{", 1).is_err());
    }

    #[test]
    fn error_type_strips_namespace() {
        assert_eq!(
            error_type(br#"{"__type":"com.amazonaws#ResourceNotFoundException","message":"x"}"#)
                .as_deref(),
            Some("ResourceNotFoundException")
        );
        assert_eq!(error_type(b"<html>"), None);
    }
}
