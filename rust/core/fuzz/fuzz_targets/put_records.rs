//! Fuzzes the PutRecords response parsers (`treasure_core::wire::parse_put_records` and `error_type`):
//! `cargo +nightly fuzz run put_records` from `rust/core`.
//!
//! The first input byte picks a mode:
//! * bit 0 set: the rest is a response body as it comes (`dicts/put_records.dict` helps the fuzzer write
//!   JSON), parsed for 0..=3 expected records and as an error body. Nothing may panic, and a parse that
//!   succeeds has exactly the expected number of outcomes.
//! * bit 0 clear: the rest describes a well-formed response (per record: which of `SequenceNumber`,
//!   `ShardId`, `ErrorCode`, `ErrorMessage` are there, with text that needs JSON escapes, and unknown fields)
//!   that the harness writes as JSON. Every record's outcome must follow from its fields: an `ErrorCode`
//!   makes it failed (whatever else it has), a `SequenceNumber` alone makes it delivered, neither makes it a
//!   `MalformedResult` failure; a count other than the records sent is an error. The same text as an error
//!   body's `__type` gives its part after the last `#`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use treasure_core::wire::{error_type, parse_put_records, RecordOutcome};

fn json_string(s: &str, ascii: bool) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
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

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn text(&mut self) -> String {
        let n = usize::from(self.byte() % 48).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(head).into_owned()
    }
}

fn structured(mut input: Input<'_>) {
    let n = usize::from(input.byte() % 12);
    let ascii = input.byte() & 1 == 1;
    let mut expected = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let fields = input.byte();
        let mut parts = Vec::new();
        let seq = (fields & 1 != 0).then(|| input.text());
        let shard = (fields & 2 != 0).then(|| input.text());
        let code = (fields & 4 != 0).then(|| input.text());
        let message = (fields & 8 != 0).then(|| input.text());
        for (name, value) in [
            ("SequenceNumber", &seq),
            ("ShardId", &shard),
            ("ErrorCode", &code),
            ("ErrorMessage", &message),
        ] {
            if let Some(v) = value {
                parts.push(format!("\"{name}\":{}", json_string(v, ascii)));
            }
        }
        if fields & 16 != 0 {
            parts.push("\"Unknown\":[{\"x\":1e3},null]".to_owned());
        }
        if fields & 32 != 0 {
            parts.reverse();
        }
        records.push(format!("{{{}}}", parts.join(",")));
        expected.push(match (code, seq) {
            (Some(error_code), _) => RecordOutcome::Failed {
                error_code,
                error_message: message.unwrap_or_default(),
            },
            (None, Some(sequence_number)) => RecordOutcome::Ok {
                shard_id: shard.unwrap_or_default(),
                sequence_number,
            },
            (None, None) => RecordOutcome::Failed {
                error_code: "MalformedResult".into(),
                error_message: "result has neither SequenceNumber nor ErrorCode".into(),
            },
        });
    }
    let failed = expected
        .iter()
        .filter(|o| matches!(o, RecordOutcome::Failed { .. }))
        .count();
    let body = format!(
        "{{\"FailedRecordCount\":{failed},\"Records\":[{}],\"EncryptionType\":\"KMS\"}}",
        records.join(",")
    );
    match parse_put_records(body.as_bytes(), n) {
        Ok(got) => assert_eq!(got, expected, "{body}"),
        Err(e) => panic!("a well-formed body did not parse: {e}\n{body}"),
    }
    assert!(parse_put_records(body.as_bytes(), n + 1).is_err());
    if n > 0 {
        assert!(parse_put_records(body.as_bytes(), n - 1).is_err());
    }
    for o in &expected {
        let throttled = matches!(o, RecordOutcome::Failed { error_code, .. }
            if error_code == "ProvisionedThroughputExceededException");
        assert_eq!(o.is_throttle(), throttled);
    }

    let kind = input.text();
    let error = format!("{{\"message\":\"m\",\"__type\":{}}}", json_string(&kind, ascii));
    let want = kind.rsplit('#').next().unwrap_or(&kind).to_owned();
    assert_eq!(error_type(error.as_bytes()), Some(want));
    assert_eq!(error_type(b"{\"message\":\"no type\"}"), None);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        for expected in 0..=3 {
            if let Ok(outcomes) = parse_put_records(rest, expected) {
                assert_eq!(outcomes.len(), expected);
                for o in &outcomes {
                    let _ = o.is_throttle();
                }
            }
        }
        let _ = error_type(rest);
    } else {
        structured(Input(rest));
    }
});
