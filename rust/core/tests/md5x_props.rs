//! Property tests of the multi-buffer MD5: on every backend this CPU runs, any batch of messages gets exactly
//! the md-5 crate's digests, in order, whatever the mix of lengths (lanes ending at different blocks, idle
//! lanes, refills, the scalar finish).

use md5::{Digest, Md5};
use proptest::prelude::*;
use treasure_core::md5x;

/// Bytes from a seed (splitmix64), so cases are cheap to make and shrink by length and seed.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn check(specs: &[(usize, u64)]) -> Result<(), TestCaseError> {
    let owned: Vec<Vec<u8>> = specs.iter().map(|&(len, seed)| bytes(len, seed)).collect();
    let messages: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    let want: Vec<[u8; 16]> = messages.iter().map(|m| Md5::digest(m).into()).collect();
    prop_assert_eq!(
        &md5x::md5_many(&messages),
        &want,
        "md5_many on {}",
        md5x::backend()
    );
    let mut into = vec![[0; 16]; messages.len()];
    md5x::md5_many_into(&messages, &mut into);
    prop_assert_eq!(&into, &want);
    for name in md5x::backends() {
        prop_assert_eq!(
            &md5x::md5_many_with(name, &messages).unwrap(),
            &want,
            "backend {}",
            name
        );
    }
    Ok(())
}

/// Lengths around block and padding edges, as likely as any other.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        0..5000usize,
        (
            0..80usize,
            prop::sample::select(vec![0usize, 1, 55, 56, 63, 64, 119, 120, 127, 128])
        )
            .prop_map(|(blocks, edge)| blocks * 64 + edge),
    ]
}

proptest! {
    #[test]
    fn many_small_messages_match_the_crate(specs in prop::collection::vec((length(), any::<u64>()), 0..40)) {
        check(&specs)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// KPL-sized aggregates (~50 KiB), some mixed with small messages so lanes refill mid-batch.
    #[test]
    fn aggregates_match_the_crate(
        big in prop::collection::vec((45_000..52_000usize, any::<u64>()), 1..20),
        small in prop::collection::vec((0..3000usize, any::<u64>()), 0..10),
    ) {
        let mut specs = big;
        specs.extend(small);
        check(&specs)?;
    }
}

#[test]
fn backends_are_known_and_scalar_is_always_there() {
    let names = md5x::backends();
    assert!(
        names
            .iter()
            .all(|n| ["avx512", "avx2x2", "avx2", "scalar"].contains(n)),
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"scalar"));
    assert_eq!(md5x::backend(), names[0]);
}
