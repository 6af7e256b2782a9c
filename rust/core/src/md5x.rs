//! Multi-buffer MD5: the digests of many independent messages at once, one message per SIMD lane.
//!
//! MD5 is serial within a message (every step needs the one before), so one message cannot beat the scalar
//! dependency chain (~565 MiB/s with the md-5 crate here). The batcher, though, seals many aggregates
//! together (one per shard), and independent messages can share the vector unit: 8 lanes of `u32` with AVX2
//! (or 16, as two groups of 8 stepped together so their dependency chains overlap), 16 with AVX-512F, as
//! Intel ISA-L's `md5_mb` and minio's md5-simd do. Each lane runs the same RFC 1321 step
//! on its own message, so a vector step costs about what a scalar step does and the throughput grows with the
//! lanes.
//!
//! Scheduling: messages are taken longest first; each lane walks its own list of blocks (the message's whole
//! 64-byte blocks, then one or two padding blocks built in the lane's scratch), all lanes step in lockstep,
//! and a lane whose message ends writes its digest and takes the next message from the queue. An idle lane
//! hashes a zero block whose result is never read. Once the queue is empty and only a lane or so is still
//! busy, the rest finishes on the scalar compression function, faster then than a mostly empty vector.
//!
//! The CPU's features are detected once per process. A batch of more than 8 messages runs on AVX-512F where
//! present, else on AVX2's 16 lanes; 2 to 8 on AVX2's 8 lanes (16 would sit half idle); the md-5 crate serves single messages, non-x86_64
//! targets and CPUs without AVX2. The AVX-512 module needs Rust 1.89 (its intrinsics' stabilization), above
//! the workspace's declared `rust-version`.
//!
//! Panics: [`md5_many_into`] panics when `out.len() != messages.len()`.

use std::sync::OnceLock;

use md5::{Digest, Md5};

/// The initial chaining value (RFC 1321, 3.3), as the words A, B, C, D.
const IV: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// The additive constants `floor(abs(sin(i + 1)) * 2^32)` (RFC 1321, 3.4).
#[rustfmt::skip]
const K: [u32; 64] = [
    0xd76a_a478, 0xe8c7_b756, 0x2420_70db, 0xc1bd_ceee,
    0xf57c_0faf, 0x4787_c62a, 0xa830_4613, 0xfd46_9501,
    0x6980_98d8, 0x8b44_f7af, 0xffff_5bb1, 0x895c_d7be,
    0x6b90_1122, 0xfd98_7193, 0xa679_438e, 0x49b4_0821,
    0xf61e_2562, 0xc040_b340, 0x265e_5a51, 0xe9b6_c7aa,
    0xd62f_105d, 0x0244_1453, 0xd8a1_e681, 0xe7d3_fbc8,
    0x21e1_cde6, 0xc337_07d6, 0xf4d5_0d87, 0x455a_14ed,
    0xa9e3_e905, 0xfcef_a3f8, 0x676f_02d9, 0x8d2a_4c8a,
    0xfffa_3942, 0x8771_f681, 0x6d9d_6122, 0xfde5_380c,
    0xa4be_ea44, 0x4bde_cfa9, 0xf6bb_4b60, 0xbebf_bc70,
    0x289b_7ec6, 0xeaa1_27fa, 0xd4ef_3085, 0x0488_1d05,
    0xd9d4_d039, 0xe6db_99e5, 0x1fa2_7cf8, 0xc4ac_5665,
    0xf429_2244, 0x432a_ff97, 0xab94_23a7, 0xfc93_a039,
    0x655b_59c3, 0x8f0c_cc92, 0xffef_f47d, 0x8584_5dd1,
    0x6fa8_7e4f, 0xfe2c_e6e0, 0xa301_4314, 0x4e08_11a1,
    0xf753_7e82, 0xbd3a_f235, 0x2ad7_d2bb, 0xeb86_d391,
];

/// The 64 steps of one block, shared by every backend: `$f`, `$g`, `$h`, `$i` are the backend's step macros
/// for the four rounds, called as `step!(w, k, a, b, c, d, step_index, shift)` and updating `a`, where `w`
/// holds the block's words and `k` the constants [`K`].
macro_rules! md5_steps {
    ($f:ident, $g:ident, $h:ident, $i:ident, $w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {
        $f!($w, $k, $a, $b, $c, $d, 0, 7);
        $f!($w, $k, $d, $a, $b, $c, 1, 12);
        $f!($w, $k, $c, $d, $a, $b, 2, 17);
        $f!($w, $k, $b, $c, $d, $a, 3, 22);
        $f!($w, $k, $a, $b, $c, $d, 4, 7);
        $f!($w, $k, $d, $a, $b, $c, 5, 12);
        $f!($w, $k, $c, $d, $a, $b, 6, 17);
        $f!($w, $k, $b, $c, $d, $a, 7, 22);
        $f!($w, $k, $a, $b, $c, $d, 8, 7);
        $f!($w, $k, $d, $a, $b, $c, 9, 12);
        $f!($w, $k, $c, $d, $a, $b, 10, 17);
        $f!($w, $k, $b, $c, $d, $a, 11, 22);
        $f!($w, $k, $a, $b, $c, $d, 12, 7);
        $f!($w, $k, $d, $a, $b, $c, 13, 12);
        $f!($w, $k, $c, $d, $a, $b, 14, 17);
        $f!($w, $k, $b, $c, $d, $a, 15, 22);

        $g!($w, $k, $a, $b, $c, $d, 16, 5);
        $g!($w, $k, $d, $a, $b, $c, 17, 9);
        $g!($w, $k, $c, $d, $a, $b, 18, 14);
        $g!($w, $k, $b, $c, $d, $a, 19, 20);
        $g!($w, $k, $a, $b, $c, $d, 20, 5);
        $g!($w, $k, $d, $a, $b, $c, 21, 9);
        $g!($w, $k, $c, $d, $a, $b, 22, 14);
        $g!($w, $k, $b, $c, $d, $a, 23, 20);
        $g!($w, $k, $a, $b, $c, $d, 24, 5);
        $g!($w, $k, $d, $a, $b, $c, 25, 9);
        $g!($w, $k, $c, $d, $a, $b, 26, 14);
        $g!($w, $k, $b, $c, $d, $a, 27, 20);
        $g!($w, $k, $a, $b, $c, $d, 28, 5);
        $g!($w, $k, $d, $a, $b, $c, 29, 9);
        $g!($w, $k, $c, $d, $a, $b, 30, 14);
        $g!($w, $k, $b, $c, $d, $a, 31, 20);

        $h!($w, $k, $a, $b, $c, $d, 32, 4);
        $h!($w, $k, $d, $a, $b, $c, 33, 11);
        $h!($w, $k, $c, $d, $a, $b, 34, 16);
        $h!($w, $k, $b, $c, $d, $a, 35, 23);
        $h!($w, $k, $a, $b, $c, $d, 36, 4);
        $h!($w, $k, $d, $a, $b, $c, 37, 11);
        $h!($w, $k, $c, $d, $a, $b, 38, 16);
        $h!($w, $k, $b, $c, $d, $a, 39, 23);
        $h!($w, $k, $a, $b, $c, $d, 40, 4);
        $h!($w, $k, $d, $a, $b, $c, 41, 11);
        $h!($w, $k, $c, $d, $a, $b, 42, 16);
        $h!($w, $k, $b, $c, $d, $a, 43, 23);
        $h!($w, $k, $a, $b, $c, $d, 44, 4);
        $h!($w, $k, $d, $a, $b, $c, 45, 11);
        $h!($w, $k, $c, $d, $a, $b, 46, 16);
        $h!($w, $k, $b, $c, $d, $a, 47, 23);

        $i!($w, $k, $a, $b, $c, $d, 48, 6);
        $i!($w, $k, $d, $a, $b, $c, 49, 10);
        $i!($w, $k, $c, $d, $a, $b, 50, 15);
        $i!($w, $k, $b, $c, $d, $a, 51, 21);
        $i!($w, $k, $a, $b, $c, $d, 52, 6);
        $i!($w, $k, $d, $a, $b, $c, 53, 10);
        $i!($w, $k, $c, $d, $a, $b, 54, 15);
        $i!($w, $k, $b, $c, $d, $a, 55, 21);
        $i!($w, $k, $a, $b, $c, $d, 56, 6);
        $i!($w, $k, $d, $a, $b, $c, 57, 10);
        $i!($w, $k, $c, $d, $a, $b, 58, 15);
        $i!($w, $k, $b, $c, $d, $a, 59, 21);
        $i!($w, $k, $a, $b, $c, $d, 60, 6);
        $i!($w, $k, $d, $a, $b, $c, 61, 10);
        $i!($w, $k, $c, $d, $a, $b, 62, 15);
        $i!($w, $k, $b, $c, $d, $a, 63, 21);
    };
}

/// The message word each step reads: round 1 in order, rounds 2 to 4 by the RFC's permutations.
const fn word(step: usize) -> usize {
    match step / 16 {
        0 => step,
        1 => (5 * step + 1) % 16,
        2 => (3 * step + 5) % 16,
        _ => (7 * step) % 16,
    }
}

/// Computes the MD5 digest of every message, several at a time in SIMD lanes where the CPU allows.
pub fn md5_many(messages: &[&[u8]]) -> Vec<[u8; 16]> {
    let mut out = vec![[0; 16]; messages.len()];
    md5_many_into(messages, &mut out);
    out
}

/// Same as [`md5_many`], writing into `out` (`out.len() == messages.len()`, else this panics).
pub fn md5_many_into(messages: &[&[u8]], out: &mut [[u8; 16]]) {
    assert_eq!(
        out.len(),
        messages.len(),
        "md5_many_into: one digest slot per message"
    );
    run(pick(messages.len()), messages, out);
}

/// Messages [`md5_many`] hashes side by side on this CPU's widest backend (1 without SIMD): batches of a
/// multiple of this keep every lane busy.
pub fn lanes() -> usize {
    match supported()[0] {
        Backend::Scalar => 1,
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => avx2::LANES,
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2x2 => avx2::LANES2,
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => avx512::LANES,
    }
}

/// Which implementation [`md5_many`] uses on this CPU: `"avx512"`, `"avx2x2"`, `"avx2"` or `"scalar"`.
/// That is for batches of more than 8 messages; smaller batches may take a narrower one (see `pick`).
pub fn backend() -> &'static str {
    supported()[0].name()
}

/// The backends this CPU can run, best first (the last is always `"scalar"`); for tests and benchmarks.
#[doc(hidden)]
pub fn backends() -> Vec<&'static str> {
    supported().iter().map(|b| b.name()).collect()
}

/// [`md5_many`] on the named backend, even for fewer than two messages; `None` when the name is unknown or
/// this CPU cannot run it. For tests and benchmarks.
#[doc(hidden)]
pub fn md5_many_with(backend: &str, messages: &[&[u8]]) -> Option<Vec<[u8; 16]>> {
    let chosen = *supported().iter().find(|b| b.name() == backend)?;
    let mut out = vec![[0; 16]; messages.len()];
    run(chosen, messages, &mut out);
    Some(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// The md-5 crate, one message after another.
    Scalar,
    /// 8 lanes in `__m256i`.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16 lanes in two interleaved groups of `__m256i`.
    #[cfg(target_arch = "x86_64")]
    Avx2x2,
    /// 16 lanes in `__m512i`.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2x2 => "avx2x2",
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => "avx512",
        }
    }
}

/// The backends this CPU supports, best first, detected once. A SIMD `Backend` value is only ever taken from
/// this list, which is what makes calling its `#[target_feature]` functions sound.
fn supported() -> &'static [Backend] {
    static SUPPORTED: OnceLock<Vec<Backend>> = OnceLock::new();
    SUPPORTED.get_or_init(|| {
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                found.push(Backend::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                found.push(Backend::Avx2x2);
                found.push(Backend::Avx2);
            }
        }
        found.push(Backend::Scalar);
        found
    })
}

/// The backend for a batch of `count` messages: the md-5 crate for fewer than two (nothing to run beside),
/// AVX2 up to 8 (AVX-512's 16 lanes would be half idle, and on Zen 4, which splits 512-bit operations in two,
/// a 16-lane step costs about 1.25 times an 8-lane one), else the best this CPU has.
fn pick(count: usize) -> Backend {
    let supported = supported();
    if count < 2 {
        return Backend::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    if count <= avx2::LANES && supported.contains(&Backend::Avx2) {
        return Backend::Avx2;
    }
    supported[0]
}

fn run(backend: Backend, messages: &[&[u8]], out: &mut [[u8; 16]]) {
    match backend {
        Backend::Scalar => {
            for (message, digest) in messages.iter().zip(out.iter_mut()) {
                *digest = Md5::digest(message).into();
            }
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => {
            run_lanes::<{ avx2::LANES }>(messages, out, avx2::DRAIN_AT, |state, blocks| {
                // SAFETY: `Backend::Avx2` comes only from `supported()`, which found AVX2 on this CPU.
                unsafe { avx2::compress(state, blocks) }
            });
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2x2 => {
            run_lanes::<{ avx2::LANES2 }>(messages, out, avx2::DRAIN_AT, |state, blocks| {
                // SAFETY: `Backend::Avx2x2` comes only from `supported()`, which found AVX2 on this CPU.
                unsafe { avx2::compress2(state, blocks) }
            });
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => {
            run_lanes::<{ avx512::LANES }>(messages, out, avx512::DRAIN_AT, |state, blocks| {
                // SAFETY: `Backend::Avx512` comes only from `supported()`, which found AVX-512F on this CPU.
                unsafe { avx512::compress(state, blocks) }
            });
        }
    }
}

/// A zero block for idle lanes to hash; their result is never read.
static ZERO_BLOCK: [u8; 64] = [0; 64];

/// One lane's message and its place in it.
struct Lane<'a> {
    /// Index of the lane's message in the caller's slice, `None` while idle.
    msg: Option<usize>,
    /// The message's whole 64-byte blocks not hashed yet.
    body: &'a [u8],
    /// The final partial block, the 0x80 marker, zeros and the length in bits: one block or two.
    tail: [[u8; 64]; 2],
    tail_blocks: usize,
    tail_done: usize,
}

impl<'a> Lane<'a> {
    fn idle() -> Self {
        Lane {
            msg: None,
            body: &[],
            tail: [[0; 64]; 2],
            tail_blocks: 0,
            tail_done: 0,
        }
    }

    fn load(&mut self, index: usize, message: &'a [u8]) {
        let whole = message.len() - message.len() % 64;
        let (body, rest) = message.split_at(whole);
        self.tail_blocks = if rest.len() < 56 { 1 } else { 2 };
        let tail = &mut self.tail.as_flattened_mut()[..64 * self.tail_blocks];
        tail.fill(0);
        tail[..rest.len()].copy_from_slice(rest);
        tail[rest.len()] = 0x80;
        let bits = (message.len() as u64).wrapping_mul(8);
        let end = tail.len();
        tail[end - 8..].copy_from_slice(&bits.to_le_bytes());
        self.body = body;
        self.tail_done = 0;
        self.msg = Some(index);
    }

    /// The block this lane hashes next.
    fn block(&self) -> &[u8; 64] {
        if let Some((first, _)) = self.body.split_first_chunk::<64>() {
            first
        } else if self.tail_done < self.tail_blocks {
            &self.tail[self.tail_done]
        } else {
            &ZERO_BLOCK
        }
    }

    /// Moves past the current block of a busy lane; true when that block was the message's last.
    fn advance(&mut self) -> bool {
        if self.body.len() >= 64 {
            self.body = &self.body[64..];
            false
        } else {
            self.tail_done += 1;
            self.tail_done == self.tail_blocks
        }
    }
}

/// Hashes `messages` in `N` lockstep lanes with `compress`, which applies one block per lane to the
/// transposed state (`state[word][lane]`); lanes refill from the queue as their messages end.
fn run_lanes<const N: usize>(
    messages: &[&[u8]],
    out: &mut [[u8; 16]],
    drain_at: usize,
    mut compress: impl FnMut(&mut [[u32; N]; 4], &[&[u8; 64]; N]),
) {
    // Longest first, so the lanes run out of work at about the same time.
    let mut order: Vec<usize> = (0..messages.len()).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(messages[i].len()));
    let mut queue = order.into_iter();

    let mut state = [[0u32; N]; 4];
    let mut lanes: [Lane<'_>; N] = std::array::from_fn(|_| Lane::idle());
    for (l, lane) in lanes.iter_mut().enumerate() {
        if let Some(m) = queue.next() {
            lane.load(m, messages[m]);
            set_column(&mut state, l, IV);
        }
    }

    loop {
        let busy = lanes.iter().filter(|lane| lane.msg.is_some()).count();
        if busy == 0 {
            return;
        }
        if queue.len() == 0 && busy <= drain_at {
            for (l, lane) in lanes.iter_mut().enumerate() {
                if let Some(m) = lane.msg {
                    let mut words = column(&state, l);
                    loop {
                        compress_scalar(&mut words, lane.block());
                        if lane.advance() {
                            break;
                        }
                    }
                    out[m] = to_digest(words);
                }
            }
            return;
        }

        let blocks: [&[u8; 64]; N] = std::array::from_fn(|l| lanes[l].block());
        compress(&mut state, &blocks);

        for (l, lane) in lanes.iter_mut().enumerate() {
            let Some(m) = lane.msg else { continue };
            if lane.advance() {
                out[m] = to_digest(column(&state, l));
                if let Some(next) = queue.next() {
                    lane.load(next, messages[next]);
                    set_column(&mut state, l, IV);
                } else {
                    lane.msg = None;
                }
            }
        }
    }
}

fn column<const N: usize>(state: &[[u32; N]; 4], lane: usize) -> [u32; 4] {
    [
        state[0][lane],
        state[1][lane],
        state[2][lane],
        state[3][lane],
    ]
}

fn set_column<const N: usize>(state: &mut [[u32; N]; 4], lane: usize, words: [u32; 4]) {
    for (row, word) in state.iter_mut().zip(words) {
        row[lane] = word;
    }
}

fn to_digest(words: [u32; 4]) -> [u8; 16] {
    let mut digest = [0; 16];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(words) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
    digest
}

/// The MD5 compression function on one block, for lanes finished off the vector unit.
#[allow(clippy::many_single_char_names)] // the RFC's names
fn compress_scalar(state: &mut [u32; 4], block: &[u8; 64]) {
    macro_rules! step {
        ($w:ident, $k:ident, $a:ident, $b:ident, $fx:expr, $i:literal, $s:literal) => {
            $a = $b.wrapping_add(
                $a.wrapping_add($fx)
                    .wrapping_add($k[$i])
                    .wrapping_add($w[word($i)])
                    .rotate_left($s),
            );
        };
    }
    macro_rules! f {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $d ^ ($b & ($c ^ $d)), $i, $s)
        };
    }
    macro_rules! g {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, ($b & $d) | ($c & !$d), $i, $s)
        };
    }
    macro_rules! h {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $b ^ $c ^ $d, $i, $s)
        };
    }
    macro_rules! i {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $c ^ ($b | !$d), $i, $s)
        };
    }

    let mut w = [0u32; 16];
    for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let k = &K;
    let [mut a, mut b, mut c, mut d] = *state;
    md5_steps!(f, g, h, i, w, k, a, b, c, d);
    state[0] = state[0].wrapping_add(a);
    state[1] = state[1].wrapping_add(b);
    state[2] = state[2].wrapping_add(c);
    state[3] = state[3].wrapping_add(d);
}

/// 8 lanes of `u32` in `__m256i`: rotations are two shifts and an or.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_andnot_si256, _mm256_loadu_si256,
        _mm256_or_si256, _mm256_permute2x128_si256, _mm256_set1_epi32, _mm256_setzero_si256,
        _mm256_slli_epi32, _mm256_srli_epi32, _mm256_storeu_si256, _mm256_unpackhi_epi32,
        _mm256_unpackhi_epi64, _mm256_unpacklo_epi32, _mm256_unpacklo_epi64, _mm256_xor_si256,
    };

    use std::arch::asm;

    use super::{word, K};

    pub(super) const LANES: usize = 8;
    /// With one busy lane left a vector step costs more than the scalar one; with two it costs less.
    pub(super) const DRAIN_AT: usize = 1;

    macro_rules! step {
        ($w:ident, $k:ident, $a:ident, $b:ident, $fx:expr, $i:literal, $s:literal) => {
            // a + (w + k) does not wait for b; only F does. The empty `asm!` hides the sum from LLVM,
            // which would otherwise move the constant's add after F, onto the critical path.
            let mut early = _mm256_add_epi32(
                $a,
                _mm256_add_epi32($w[word($i)], _mm256_set1_epi32($k[$i] as i32)),
            );
            asm!("/* {0} */", inout(ymm_reg) early, options(pure, nomem, nostack, preserves_flags));
            let x = _mm256_add_epi32(early, $fx);
            $a = _mm256_add_epi32(
                $b,
                _mm256_or_si256(
                    _mm256_slli_epi32::<$s>(x),
                    _mm256_srli_epi32::<{ 32 - $s }>(x),
                ),
            );
        };
    }
    // The four round functions of RFC 1321, on one vector each.
    macro_rules! fun_f {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256($d, _mm256_and_si256($b, _mm256_xor_si256($c, $d)))
        };
    }
    macro_rules! fun_g {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_or_si256(_mm256_and_si256($b, $d), _mm256_andnot_si256($d, $c))
        };
    }
    macro_rules! fun_h {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256($b, _mm256_xor_si256($c, $d))
        };
    }
    macro_rules! fun_i {
        ($b:expr, $c:expr, $d:expr) => {
            _mm256_xor_si256(
                $c,
                _mm256_or_si256($b, _mm256_xor_si256($d, _mm256_set1_epi32(-1))),
            )
        };
    }
    // A step with round function `$fun`.
    macro_rules! round {
        ($fun:ident, $w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $fun!($b, $c, $d), $i, $s)
        };
    }
    macro_rules! f {
        ($($t:tt)*) => { round!(fun_f, $($t)*) };
    }
    macro_rules! g {
        ($($t:tt)*) => { round!(fun_g, $($t)*) };
    }
    macro_rules! h {
        ($($t:tt)*) => { round!(fun_h, $($t)*) };
    }
    macro_rules! i {
        ($($t:tt)*) => { round!(fun_i, $($t)*) };
    }

    /// Transposes 8 rows of 8 words: `$rows[lane][j]` becomes `$out[j][lane]`. A macro rather than a function
    /// so that it runs inside the caller's `unsafe` block, as Rust before 1.86 requires of intrinsics.
    macro_rules! transpose {
        ($rows:expr, $out:expr) => {{
            let rows: &[__m256i; 8] = $rows;
            let out: &mut [__m256i] = $out;
            let mut t = [_mm256_setzero_si256(); 8];
            for i in 0..4 {
                t[2 * i] = _mm256_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
            }
            // u[4q + m], 128-bit half k: column 4k + m of rows 4q..4q + 4.
            let mut u = [_mm256_setzero_si256(); 8];
            for q in 0..2 {
                u[4 * q] = _mm256_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
                u[4 * q + 1] = _mm256_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
                u[4 * q + 2] = _mm256_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
                u[4 * q + 3] = _mm256_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
            }
            for m in 0..4 {
                out[m] = _mm256_permute2x128_si256::<0x20>(u[m], u[4 + m]);
                out[4 + m] = _mm256_permute2x128_si256::<0x31>(u[m], u[4 + m]);
            }
        }};
    }

    /// Applies one block per lane to the transposed state.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::many_single_char_names)] // the RFC's names
    pub(super) unsafe fn compress(state: &mut [[u32; LANES]; 4], blocks: &[&[u8; 64]; LANES]) {
        // SAFETY: AVX2 is present (the caller's contract). Every load reads 32 bytes at offset 0 or
        // 32 of a `&[u8; 64]`, and every state load or store covers exactly one `[u32; 8]` row: all
        // in bounds, and the `loadu`/`storeu` forms need no alignment. The `asm!` in each step is
        // empty: it emits no instruction and touches no memory, stack or flags.
        unsafe {
            let mut w = [_mm256_setzero_si256(); 16];
            for half in 0..2 {
                let mut rows = [_mm256_setzero_si256(); 8];
                for (row, block) in rows.iter_mut().zip(blocks) {
                    *row = _mm256_loadu_si256(block.as_ptr().add(32 * half).cast());
                }
                transpose!(&rows, &mut w[8 * half..8 * half + 8]);
            }
            let mut a = _mm256_loadu_si256(state[0].as_ptr().cast());
            let mut b = _mm256_loadu_si256(state[1].as_ptr().cast());
            let mut c = _mm256_loadu_si256(state[2].as_ptr().cast());
            let mut d = _mm256_loadu_si256(state[3].as_ptr().cast());
            let (a0, b0, c0, d0) = (a, b, c, d);
            let k = &K;
            md5_steps!(f, g, h, i, w, k, a, b, c, d);
            _mm256_storeu_si256(state[0].as_mut_ptr().cast(), _mm256_add_epi32(a, a0));
            _mm256_storeu_si256(state[1].as_mut_ptr().cast(), _mm256_add_epi32(b, b0));
            _mm256_storeu_si256(state[2].as_mut_ptr().cast(), _mm256_add_epi32(c, c0));
            _mm256_storeu_si256(state[3].as_mut_ptr().cast(), _mm256_add_epi32(d, d0));
        }
    }

    /// Lanes of [`compress2`]: two groups of 8.
    pub(super) const LANES2: usize = 16;

    // Two independent groups of 8 lanes stepped together: one group's step is a chain of dependent
    // operations (F, add, rotate, add) that leaves most of the vector ports idle; the other group's step
    // fills them. `$a`..`$d` are `[__m256i; 2]`, `$w` is `[[__m256i; 16]; 2]`.
    macro_rules! step2 {
        ($w:ident, $k:ident, $a:ident, $b:ident, $fx0:expr, $fx1:expr, $i:literal, $s:literal) => {
            let kk = _mm256_set1_epi32($k[$i] as i32);
            let mut e0 = _mm256_add_epi32($a[0], _mm256_add_epi32($w[0][word($i)], kk));
            let mut e1 = _mm256_add_epi32($a[1], _mm256_add_epi32($w[1][word($i)], kk));
            // As in `step!`: keeps the early sums off the critical path.
            asm!(
                "/* {0} {1} */",
                inout(ymm_reg) e0,
                inout(ymm_reg) e1,
                options(pure, nomem, nostack, preserves_flags)
            );
            let x0 = _mm256_add_epi32(e0, $fx0);
            let x1 = _mm256_add_epi32(e1, $fx1);
            $a[0] = _mm256_add_epi32(
                $b[0],
                _mm256_or_si256(
                    _mm256_slli_epi32::<$s>(x0),
                    _mm256_srli_epi32::<{ 32 - $s }>(x0),
                ),
            );
            $a[1] = _mm256_add_epi32(
                $b[1],
                _mm256_or_si256(
                    _mm256_slli_epi32::<$s>(x1),
                    _mm256_srli_epi32::<{ 32 - $s }>(x1),
                ),
            );
        };
    }
    // A step of both groups with round function `$fun`.
    macro_rules! round2 {
        ($fun:ident, $w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step2!(
                $w,
                $k,
                $a,
                $b,
                $fun!($b[0], $c[0], $d[0]),
                $fun!($b[1], $c[1], $d[1]),
                $i,
                $s
            )
        };
    }
    macro_rules! f2 {
        ($($t:tt)*) => { round2!(fun_f, $($t)*) };
    }
    macro_rules! g2 {
        ($($t:tt)*) => { round2!(fun_g, $($t)*) };
    }
    macro_rules! h2 {
        ($($t:tt)*) => { round2!(fun_h, $($t)*) };
    }
    macro_rules! i2 {
        ($($t:tt)*) => { round2!(fun_i, $($t)*) };
    }

    /// Applies one block per lane to the transposed state of 16 lanes, as two interleaved groups of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::many_single_char_names)] // the RFC's names
    pub(super) unsafe fn compress2(state: &mut [[u32; LANES2]; 4], blocks: &[&[u8; 64]; LANES2]) {
        // SAFETY: as in `compress`: every load reads 32 bytes at offset 0 or 32 of a `&[u8; 64]`, and every
        // state load or store covers the first or the second 8 words of one `[u32; 16]` row.
        unsafe {
            let mut w = [[_mm256_setzero_si256(); 16]; 2];
            for (g, wg) in w.iter_mut().enumerate() {
                for half in 0..2 {
                    let mut rows = [_mm256_setzero_si256(); 8];
                    for (row, block) in rows.iter_mut().zip(&blocks[8 * g..8 * g + 8]) {
                        *row = _mm256_loadu_si256(block.as_ptr().add(32 * half).cast());
                    }
                    transpose!(&rows, &mut wg[8 * half..8 * half + 8]);
                }
            }
            let load = |row: &[u32; LANES2]| {
                [
                    _mm256_loadu_si256(row.as_ptr().cast()),
                    _mm256_loadu_si256(row.as_ptr().add(8).cast()),
                ]
            };
            let mut a = load(&state[0]);
            let mut b = load(&state[1]);
            let mut c = load(&state[2]);
            let mut d = load(&state[3]);
            let start = [a, b, c, d];
            let k = &K;
            md5_steps!(f2, g2, h2, i2, w, k, a, b, c, d);
            for (row, (end, begin)) in state.iter_mut().zip([a, b, c, d].into_iter().zip(start)) {
                _mm256_storeu_si256(row.as_mut_ptr().cast(), _mm256_add_epi32(end[0], begin[0]));
                _mm256_storeu_si256(
                    row.as_mut_ptr().add(8).cast(),
                    _mm256_add_epi32(end[1], begin[1]),
                );
            }
        }
    }
}

/// 16 lanes of `u32` in `__m512i`: each round function is one `vpternlogd`, each rotation one `vprold`.
///
/// The AVX-512 intrinsics and `#[target_feature(enable = "avx512f")]` are stable since Rust 1.89, above the
/// workspace's declared `rust-version`; hence the module's own MSRV for clippy.
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod avx512 {
    use std::arch::x86_64::{
        __m512i, _mm512_add_epi32, _mm512_loadu_si512, _mm512_rol_epi32, _mm512_set1_epi32,
        _mm512_setzero_si512, _mm512_shuffle_i32x4, _mm512_storeu_si512, _mm512_ternarylogic_epi32,
        _mm512_unpackhi_epi32, _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
    };

    use std::arch::asm;

    use super::{word, K};

    pub(super) const LANES: usize = 16;
    /// As for AVX2: a lone busy lane finishes faster on the scalar path.
    pub(super) const DRAIN_AT: usize = 1;

    // Truth tables for `vpternlogd` with the operands (b, c, d) as (0xf0, 0xcc, 0xaa).
    /// F = (b & c) | (!b & d)
    const TT_F: i32 = 0xca;
    /// G = (b & d) | (c & !d)
    const TT_G: i32 = 0xe4;
    /// H = b ^ c ^ d
    const TT_H: i32 = 0x96;
    /// I = c ^ (b | !d)
    const TT_I: i32 = 0x39;

    macro_rules! step {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $tt:expr, $i:literal, $s:literal) => {
            // a + (w + k) does not wait for b; only F does. The empty `asm!` hides the sum from LLVM,
            // which would otherwise move the constant's add after F, onto the critical path.
            let mut early = _mm512_add_epi32(
                $a,
                _mm512_add_epi32($w[word($i)], _mm512_set1_epi32($k[$i] as i32)),
            );
            asm!("/* {0} */", inout(zmm_reg) early, options(pure, nomem, nostack, preserves_flags));
            let x = _mm512_add_epi32(early, _mm512_ternarylogic_epi32::<{ $tt }>($b, $c, $d));
            $a = _mm512_add_epi32($b, _mm512_rol_epi32::<$s>(x));
        };
    }
    macro_rules! f {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $c, $d, TT_F, $i, $s)
        };
    }
    macro_rules! g {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $c, $d, TT_G, $i, $s)
        };
    }
    macro_rules! h {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $c, $d, TT_H, $i, $s)
        };
    }
    macro_rules! i {
        ($w:ident, $k:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:literal, $s:literal) => {
            step!($w, $k, $a, $b, $c, $d, TT_I, $i, $s)
        };
    }

    /// Transposes 16 rows of 16 words: `$rows[lane][j]` becomes `$out[j][lane]`.
    macro_rules! transpose {
        ($rows:expr, $out:expr) => {{
            let rows: &[__m512i; 16] = $rows;
            let out: &mut [__m512i; 16] = $out;
            let mut t = [_mm512_setzero_si512(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
            }
            // u[4q + m], 128-bit block k: column 4k + m of rows 4q..4q + 4.
            let mut u = [_mm512_setzero_si512(); 16];
            for q in 0..4 {
                u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
                u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
                u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
                u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
            }
            // Column 4k + m gathers block k of u[m], u[4 + m], u[8 + m], u[12 + m], in two block shuffles.
            for m in 0..4 {
                let v0 = _mm512_shuffle_i32x4::<0x88>(u[m], u[4 + m]);
                let v1 = _mm512_shuffle_i32x4::<0xdd>(u[m], u[4 + m]);
                let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + m], u[12 + m]);
                let v3 = _mm512_shuffle_i32x4::<0xdd>(u[8 + m], u[12 + m]);
                out[m] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
                out[4 + m] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
                out[8 + m] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
                out[12 + m] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
            }
        }};
    }

    /// Applies one block per lane to the transposed state.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::many_single_char_names)] // the RFC's names
    pub(super) unsafe fn compress(state: &mut [[u32; LANES]; 4], blocks: &[&[u8; 64]; LANES]) {
        // SAFETY: AVX-512F is present (the caller's contract). Every load reads one whole
        // `&[u8; 64]`, and every state load or store covers exactly one `[u32; 16]` row: all in
        // bounds, and the `loadu`/`storeu` forms need no alignment. The `asm!` in each step is
        // empty: it emits no instruction and touches no memory, stack or flags.
        unsafe {
            let mut rows = [_mm512_setzero_si512(); 16];
            for (row, block) in rows.iter_mut().zip(blocks) {
                *row = _mm512_loadu_si512(block.as_ptr().cast());
            }
            let mut w = [_mm512_setzero_si512(); 16];
            transpose!(&rows, &mut w);
            let mut a = _mm512_loadu_si512(state[0].as_ptr().cast());
            let mut b = _mm512_loadu_si512(state[1].as_ptr().cast());
            let mut c = _mm512_loadu_si512(state[2].as_ptr().cast());
            let mut d = _mm512_loadu_si512(state[3].as_ptr().cast());
            let (a0, b0, c0, d0) = (a, b, c, d);
            let k = &K;
            md5_steps!(f, g, h, i, w, k, a, b, c, d);
            _mm512_storeu_si512(state[0].as_mut_ptr().cast(), _mm512_add_epi32(a, a0));
            _mm512_storeu_si512(state[1].as_mut_ptr().cast(), _mm512_add_epi32(b, b0));
            _mm512_storeu_si512(state[2].as_mut_ptr().cast(), _mm512_add_epi32(c, c0));
            _mm512_storeu_si512(state[3].as_mut_ptr().cast(), _mm512_add_epi32(d, d0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(digest: &[u8; 16]) -> String {
        format!("{:032x}", u128::from_be_bytes(*digest))
    }

    /// RFC 1321, A.5.
    const RFC_VECTORS: [(&str, &str); 7] = [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ];

    fn reference(messages: &[&[u8]]) -> Vec<[u8; 16]> {
        messages.iter().map(|m| Md5::digest(m).into()).collect()
    }

    /// Bytes that differ by position and seed, so a lane reading another lane's block shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    #[test]
    fn rfc_vectors_on_every_backend() {
        let messages: Vec<&[u8]> = RFC_VECTORS.iter().map(|(m, _)| m.as_bytes()).collect();
        for name in backends() {
            let digests = md5_many_with(name, &messages).unwrap();
            for ((message, want), got) in RFC_VECTORS.iter().zip(&digests) {
                assert_eq!(hex(got), *want, "{name} on {message:?}");
            }
            // One at a time too: a single busy lane, the rest idle.
            for (message, want) in RFC_VECTORS {
                assert_eq!(
                    hex(&md5_many_with(name, &[message.as_bytes()]).unwrap()[0]),
                    want,
                    "{name}"
                );
            }
        }
        assert_eq!(hex(&md5_many(&messages)[2]), RFC_VECTORS[2].1);
    }

    #[test]
    fn padding_edges_on_every_backend() {
        let lengths = [
            0, 1, 55, 56, 57, 62, 63, 64, 65, 119, 120, 121, 127, 128, 129, 191, 192, 1000, 4096,
        ];
        let owned: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(k, &len)| pattern(len, k as u8))
            .collect();
        let messages: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let want = reference(&messages);
        for name in backends() {
            assert_eq!(md5_many_with(name, &messages).unwrap(), want, "{name}");
            // Every count of messages from 0 to all, so lanes sit idle in every pattern.
            for n in 0..=messages.len() {
                assert_eq!(
                    md5_many_with(name, &messages[..n]).unwrap(),
                    want[..n],
                    "{name}, {n} messages"
                );
            }
        }
    }

    #[test]
    fn equal_lengths_fill_every_lane() {
        let owned: Vec<Vec<u8>> = (0..40).map(|k| pattern(51_200, k)).collect();
        let messages: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let want = reference(&messages);
        for name in backends() {
            assert_eq!(md5_many_with(name, &messages).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn into_matches_many_and_backend_is_the_best() {
        let messages: [&[u8]; 3] = [b"x", b"yy", b"zzz"];
        let mut out = [[0; 16]; 3];
        md5_many_into(&messages, &mut out);
        assert_eq!(out.to_vec(), reference(&messages));
        assert_eq!(backend(), backends()[0]);
        assert_eq!(pick(0), Backend::Scalar);
        assert_eq!(pick(1), Backend::Scalar);
        assert_eq!(pick(100), supported()[0]);
        assert_eq!(backends().last(), Some(&"scalar"));
        assert!(md5_many_with("sse9", &messages).is_none());
        assert!(md5_many(&[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "one digest slot per message")]
    fn into_checks_the_output_length() {
        md5_many_into(&[b"a"], &mut [[0; 16]; 2]);
    }

    #[test]
    fn scalar_compression_matches_the_crate() {
        let message = pattern(640, 7);
        let mut lane = Lane::idle();
        lane.load(0, &message);
        let mut words = IV;
        loop {
            compress_scalar(&mut words, lane.block());
            if lane.advance() {
                break;
            }
        }
        assert_eq!(to_digest(words), <[u8; 16]>::from(Md5::digest(&message)));
    }
}
