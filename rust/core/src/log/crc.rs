//! CRC32C for frames. The crc32c crate runs one chain of `crc32` instructions up to 768 bytes, and each
//! instruction waits for the one before (3 cycles of latency, 1 of throughput): for the few-hundred-byte payloads
//! the log mostly holds, this runs three chains over thirds of the payload and joins them with a carry-less
//! multiply, about twice as fast. Longer payloads, shorter ones and CPUs without SSE 4.2 and PCLMULQDQ go to the
//! crate; the result is the same CRC either way (checked against the crate in the tests).

/// Payloads of at least this many bytes take the three-chain path...
const MIN: usize = 48;
/// ...and below this many (from here on the crate interleaves too).
const MAX: usize = 768;
/// Reflected CRC32C (Castagnoli) polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the polynomial, both reflected (bit 31 is x^0).
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// x^e modulo the polynomial, reflected.
const fn x_pow(mut e: u64) -> u32 {
    let mut result: u32 = 1 << 31;
    let mut square: u32 = 1 << 30;
    while e > 0 {
        if e & 1 != 0 {
            result = mul_mod(result, square);
        }
        square = mul_mod(square, square);
        e >>= 1;
    }
    result
}

const WORDS: usize = MAX / 24;

/// `SHIFT[k]` = the constants that move a CRC register past 8k and 16k bytes: x^(64k - 33) and
/// x^(128k - 33) (the carry-less product is one bit short, and the `crc32` reduction multiplies by x^32).
const SHIFT: [(u32, u32); WORDS + 1] = {
    let mut table = [(0, 0); WORDS + 1];
    let mut k = 1;
    while k <= WORDS {
        table[k] = (x_pow(64 * k as u64 - 33), x_pow(128 * k as u64 - 33));
        k += 1;
    }
    table
};

pub(super) fn compute(len_bytes: &[u8], payload: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if (MIN..MAX).contains(&payload.len())
        && std::arch::is_x86_feature_detected!("sse4.2")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
    {
        // SAFETY: the CPU has the two features the function is compiled for (checked just above).
        return unsafe { three_chains(len_bytes, payload) };
    }
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), payload)
}

/// The CRC32C of a frame (its length bytes, then its payload) whose payload is two little-endian words, then
/// `bytes`, then `ehk` (little-endian) if given, then `data`: computed from those pieces where they are, so that
/// the copy of them into the frame is never read back (a load of bytes just stored waits for the stores).
pub fn pieces(len: u32, words: [u64; 2], bytes: &[u8], ehk: Option<u128>, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
    {
        // SAFETY: the CPU has the two features the function is compiled for (checked just above).
        return unsafe { pieces_hw(len, words, bytes, ehk, data) };
    }
    let mut crc = crc32c::crc32c(&len.to_le_bytes());
    for w in words {
        crc = crc32c::crc32c_append(crc, &w.to_le_bytes());
    }
    crc = crc32c::crc32c_append(crc, bytes);
    if let Some(h) = ehk {
        crc = crc32c::crc32c_append(crc, &h.to_le_bytes());
    }
    crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2,pclmulqdq")]
fn pieces_hw(len: u32, words: [u64; 2], bytes: &[u8], ehk: Option<u128>, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8};
    let mut crc = u64::from(_mm_crc32_u32(u32::MAX, len));
    for w in words {
        crc = _mm_crc32_u64(crc, w);
    }
    let mut chunks = bytes.chunks_exact(8);
    for w in chunks.by_ref() {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(w.try_into().unwrap_or_default()));
    }
    for &b in chunks.remainder() {
        crc = u64::from(_mm_crc32_u8(crc as u32, b));
    }
    if let Some(h) = ehk {
        crc = _mm_crc32_u64(crc, h as u64);
        crc = _mm_crc32_u64(crc, (h >> 64) as u64);
    }
    if (MIN..MAX).contains(&data.len()) {
        return three_chains_from(crc, data);
    }
    crc32c::crc32c_append(!(crc as u32), data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2,pclmulqdq")]
fn three_chains(head: &[u8], data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u8};
    let mut crc: u64 = u64::from(u32::MAX);
    if let Ok(len) = <[u8; 4]>::try_from(head) {
        crc = u64::from(_mm_crc32_u32(crc as u32, u32::from_le_bytes(len)));
    } else {
        for &b in head {
            crc = u64::from(_mm_crc32_u8(crc as u32, b));
        }
    }
    three_chains_from(crc, data)
}

/// Goes on from the CRC register `crc` over `data` (`MIN..MAX` bytes) in three chains; the final CRC.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2,pclmulqdq")]
fn three_chains_from(mut crc: u64, data: &[u8]) -> u32 {
    use std::arch::x86_64::{
        _mm_clmulepi64_si128, _mm_crc32_u64, _mm_crc32_u8, _mm_cvtsi128_si64, _mm_cvtsi32_si128,
    };
    /// The register `c` moved past as many zero bytes as the constant `k` stands for.
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    fn shift(c: u64, k: u32) -> u64 {
        let product = _mm_clmulepi64_si128(
            _mm_cvtsi32_si128(c as u32 as i32),
            _mm_cvtsi32_si128(k as i32),
            0,
        );
        _mm_crc32_u64(0, _mm_cvtsi128_si64(product) as u64)
    }
    fn word(bytes: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        u64::from_le_bytes(w)
    }
    let k = data.len() / 24;
    let (a, rest) = data.split_at(8 * k);
    let (b, rest) = rest.split_at(8 * k);
    let (c, tail) = rest.split_at(8 * k);
    let (mut c0, mut c1, mut c2) = (crc, 0u64, 0u64);
    for ((wa, wb), wc) in a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .zip(c.chunks_exact(8))
    {
        c0 = _mm_crc32_u64(c0, word(wa));
        c1 = _mm_crc32_u64(c1, word(wb));
        c2 = _mm_crc32_u64(c2, word(wc));
    }
    let (by_one, by_two) = SHIFT[k];
    crc = shift(c0, by_two) ^ shift(c1, by_one) ^ c2;
    let mut words = tail.chunks_exact(8);
    for w in words.by_ref() {
        crc = _mm_crc32_u64(crc, word(w));
    }
    for &b in words.remainder() {
        crc = u64::from(_mm_crc32_u8(crc as u32, b));
    }
    !(crc as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_crc_as_the_crate_for_every_length() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let data: Vec<u8> = (0..2 * super::MAX)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for start in [0, 1, 3, 7] {
            for len in 0..=super::MAX + 64 {
                let payload = &data[start..start + len];
                let head = (len as u32).to_le_bytes();
                let want = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
                assert_eq!(super::compute(&head, payload), want, "len {len} at {start}");
            }
        }
        for len in [0, 1, 47, 48, 100, 767, 768, 900] {
            for key_len in [0, 1, 7, 8, 9, 23] {
                for ehk in [None, Some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128)] {
                    let (key, rest) = data.split_at(key_len);
                    let payload = &rest[..len];
                    let words = [0x1122_3344_5566_7788_u64, key_len as u64 | 1 << 16];
                    let mut whole = Vec::new();
                    whole.extend_from_slice(&words[0].to_le_bytes());
                    whole.extend_from_slice(&words[1].to_le_bytes());
                    whole.extend_from_slice(key);
                    if let Some(h) = ehk {
                        whole.extend_from_slice(&h.to_le_bytes());
                    }
                    whole.extend_from_slice(payload);
                    let head = (whole.len() as u32).to_le_bytes();
                    let want = crc32c::crc32c_append(crc32c::crc32c(&head), &whole);
                    let got = super::pieces(whole.len() as u32, words, key, ehk, payload);
                    assert_eq!(got, want, "len {len} key {key_len} ehk {}", ehk.is_some());
                }
            }
        }
        assert_eq!(super::x_pow(0), 1 << 31);
        assert_eq!(super::mul_mod(1 << 31, 0x1234_5678), 0x1234_5678);
    }
}
