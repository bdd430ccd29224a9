//! The tiles that read their panel in 256-bit halves ([`super::OneRowWalk::HalfVectors`]: a
//! decode step's products at batch 1-4 on Intel's cores, as [`takes`] says), for f32 and
//! bf16 (int8 read slower this way: its weights, 130 MB for mamba-130m, sit partly in this
//! Xeon's 480 MiB L3).
//!
//! Measured on an Intel Xeon (2 vCPUs, AVX-512, 2026-12-05): streaming 512 MB of panels
//! from memory (a scratch loop, two threads, multiply-adds as the tile's, best of 5) read
//! 28-33 GB/s in 512-bit vectors, two or four segments, and 35-39 GB/s in 256-bit halves,
//! the same bytes in the same order. `Linear::forward` on weights from memory, the walks
//! alternated product by product in one process (GB/s of weights, medians): lm_head 31.5
//! (four 512-bit segments, as before) → 33.0 (two segments of halves) → 34.7 (three) →
//! 33.1 (four); in_proj 30.5 → 32.0 / 33.2 / 32.8; out_proj 24.7 → 26.6 → 27.3. One
//! segment of halves read 27. The cause is not known (the VM exposes no counters).

use std::arch::x86_64::*;

use super::PanelFormat;
use super::avx512::{Bf16ByFmaLanes, Bf16Lanes, F32Lanes, Lanes, TileArgs, write_row};

/// Segments a panel is walked as: three sequential streams that the core's L2 prefetcher
/// follows (no prefetch instructions).
const SEGMENTS: usize = 3;

/// Whether this CPU runs these tiles (AVX-512VL, which every AVX-512 core but Xeon Phi has;
/// without it the walk is [`super::OneRowWalk::HardwareStreams`]'s).
fn available() -> bool {
    crate::cpu::avx512() && std::is_x86_feature_detected!("avx512vl")
}

/// How a row's step of activations and 8 lanes of a panel's vector add into 8 sums: the
/// 256-bit counterpart of a format's [`Lanes`] (its parts of a step the same), which
/// finishes and writes the sums.
trait HalfLanes {
    type Whole: Lanes;

    /// Parts a step is done in, as [`Lanes::HALVES`].
    const HALVES: usize = 1;

    /// The panel's 8 lanes at `w` as `madd` takes them in part `half` of a step.
    #[inline(always)]
    unsafe fn weights(w: *const __m256i, _half: usize) -> __m256i {
        unsafe { _mm256_load_si256(w) }
    }

    unsafe fn madd(acc: __m256, x: __m256i, w: __m256i) -> __m256;
}

impl HalfLanes for F32Lanes {
    type Whole = F32Lanes;

    #[inline(always)]
    unsafe fn madd(acc: __m256, x: __m256i, w: __m256i) -> __m256 {
        unsafe { _mm256_fmadd_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(w), acc) }
    }
}

impl HalfLanes for Bf16Lanes {
    type Whole = Bf16Lanes;

    #[inline(always)]
    unsafe fn madd(acc: __m256, x: __m256i, w: __m256i) -> __m256 {
        unsafe {
            _mm256_dpbf16_ps(
                acc,
                std::mem::transmute::<__m256i, __m256bh>(x),
                std::mem::transmute::<__m256i, __m256bh>(w),
            )
        }
    }
}

/// As [`Bf16ByFmaLanes`]: the odd inputs' weights (the lanes' high halves) first, then the
/// even ones' moved up, the products added as `vdpbf16ps` adds them (the same bits as
/// [`Bf16Lanes`] here, which the panel tests hold them to).
impl HalfLanes for Bf16ByFmaLanes {
    type Whole = Bf16ByFmaLanes;
    const HALVES: usize = 2;

    #[inline(always)]
    unsafe fn weights(w: *const __m256i, half: usize) -> __m256i {
        unsafe {
            let w = _mm256_load_si256(w);
            if half == 0 {
                _mm256_and_si256(w, _mm256_set1_epi32(0xffff_0000_u32 as i32))
            } else {
                _mm256_slli_epi32::<16>(w)
            }
        }
    }

    #[inline(always)]
    unsafe fn madd(acc: __m256, x: __m256i, w: __m256i) -> __m256 {
        unsafe { <F32Lanes as HalfLanes>::madd(acc, x, w) }
    }
}

/// Most rows a tile in halves holds ([`takes`]).
const MAX_ROWS: usize = 4;

/// Whether a product of `rows` rows of a `format` panel is one tile in halves: one row of
/// f32 or bf16, and up to 4 rows of f32 or 2 of bf16 (more take the 512-bit tiles, whose
/// blocks the tiles of rows share). Its segments add into one set of `rows × 2 × NV` sums
/// (a row keeps a set a segment: one row's 8 sums a set would wait on each other's latency).
///
/// Measured on the Intel Xeon (2 vCPUs, 2026-12-06), `examples/linear_shapes f32 cold`, the
/// 512-bit tile streaming with prefetches (`TIDEWAY_ONE_ROW_WALK=hardware`) against the
/// tile in halves, GFLOP/s at 2 / 3 / 4 / 5 rows, two rounds: in_proj 27.4 / 38.4 / 51.1 /
/// 63.9 and 27.6 / 39.7 / 51.9 / 66.0 → 30.5 / 42.8 / 58.2 / 64.5 and 27.6 / 39.2 / 58.2 /
/// 65.6; out_proj 26.9 / 39.1 / 52.4 / 61.0 and 28.3 / 37.5 / 53.6 / 65.3 → 30.0 / 43.0 /
/// 57.6 / 63.6 and 31.1 / 42.7 / 59.5 / 57.4; lm_head 28.5 / 39.5 / 54.8 / 67.9 and 27.7 /
/// 38.4 / 53.0 / 63.9 → 31.2 / 43.7 / 60.4 / 66.8 and 31.7 / 44.7 / 59.8 / 65.0 (5 rows
/// take the 512-bit tile in both: the noise). bf16 widened (two FMAs a pair,
/// [`super::bf16_by_fma`]), 2 rows: 49.4 / 34.1 / 46.4 and 47.6 / 51.6 / 45.9 → 54.1 /
/// 49.3 / 54.3 and 55.0 / 47.8 / 53.8; 3 rows the same, 4 rows slower (98.0 / 89.8 / 93.2
/// → 77.8 / 76.0 / 75.4: its 32 sums and the weights' two forms spill). `tideway bench
/// --batches 2,3,4` (mamba-130m f32, the same override, three rounds, tok/s): 101.1 / 102.8
/// / 101.5 → 110.0 / 110.1 / 113.1 at batch 2, 141.6 / 144.2 / 142.2 → 156.0 / 154.1 /
/// 154.5 at 3, 186.3 / 189.3 / 188.0 → 200.3 / 194.2 / 197.9 at 4. In a scratch version,
/// 5-6 rows in halves (40 and 48 sums, spilled) read the same as the 512-bit tile; tiles of
/// 2-3 rows in halves sharing a product of 4-6 rows (the second from L2, or both over
/// blocks in L1), and the 512-bit tiles of 2-6 rows walked as 2-4 segments into one set
/// without prefetches, read 5-25% slower.
pub(super) fn takes(format: PanelFormat, rows: usize) -> bool {
    let most = match format {
        PanelFormat::F32 => MAX_ROWS,
        PanelFormat::Bf16 => 2,
        PanelFormat::Int8 => 0,
    };
    rows <= most && available()
}

/// `a.len` steps of an f32 panel `nv` 16-lane vectors wide against `rows` rows of
/// activations (1..=[`MAX_ROWS`], as [`takes`] says).
///
/// # Safety
/// As the tiles of `avx512.rs`: `a` from its block loop, on a CPU with AVX-512F and
/// AVX-512VL.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn tile_f32(nv: usize, rows: usize, a: TileArgs) {
    unsafe { tile_of::<F32Lanes>(nv, rows, a) }
}

/// As [`tile_f32`] for bf16 pairs (`vdpbf16ps` on 8 lanes), on a CPU with AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
pub(super) unsafe fn tile_bf16(nv: usize, rows: usize, a: TileArgs) {
    unsafe { tile_of::<Bf16Lanes>(nv, rows, a) }
}

/// As [`tile_f32`] for bf16 pairs against activations widened to f32, two lanes a step
/// (multiplied by FMAs: [`super::bf16_by_fma`]).
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn tile_bf16_by_fma(nv: usize, rows: usize, a: TileArgs) {
    unsafe { tile_of::<Bf16ByFmaLanes>(nv, rows, a) }
}

#[inline(always)]
unsafe fn tile_of<L: HalfLanes>(nv: usize, rows: usize, a: TileArgs) {
    debug_assert!((1..=MAX_ROWS).contains(&rows));
    unsafe {
        match rows {
            1 => rows_of::<L, 1, SEGMENTS>(nv, a),
            2 => rows_of::<L, 2, 1>(nv, a),
            3 => rows_of::<L, 3, 1>(nv, a),
            _ => rows_of::<L, MAX_ROWS, 1>(nv, a),
        }
    }
}

#[inline(always)]
unsafe fn rows_of<L: HalfLanes, const MR: usize, const SETS: usize>(nv: usize, a: TileArgs) {
    unsafe {
        match nv {
            1 => tile::<L, MR, 1, SETS>(a),
            2 => tile::<L, MR, 2, SETS>(a),
            3 => tile::<L, MR, 3, SETS>(a),
            _ => tile::<L, MR, 4, SETS>(a),
        }
    }
}

/// The tile of `MR` rows and a panel `NV` 16-lane vectors wide: segment `s` adds into set
/// `s % SETS` of `MR × 2 × NV` sums of 8 lanes, each row's halves joined and its sets
/// added at the end.
#[inline(always)]
unsafe fn tile<L: HalfLanes, const MR: usize, const NV: usize, const SETS: usize>(a: TileArgs) {
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); 8]; MR]; SETS];
        let segment = a.len / SEGMENTS;
        for p in 0..segment {
            for s in 0..SEGMENTS {
                step::<L, MR, NV>(&mut acc[s % SETS], &a, s * segment + p);
            }
        }
        for p in SEGMENTS * segment..a.len {
            step::<L, MR, NV>(&mut acc[0], &a, p);
        }
        for i in 0..MR {
            let mut sums = [_mm512_setzero_ps(); NV];
            for (c, sum) in sums.iter_mut().enumerate() {
                for (s, set) in acc.iter().enumerate() {
                    let (low, high) = (
                        _mm256_castps_pd(set[i][2 * c]),
                        _mm256_castps_pd(set[i][2 * c + 1]),
                    );
                    let whole = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                        _mm512_castpd256_pd512(low),
                        high,
                    ));
                    *sum = if s == 0 {
                        whole
                    } else {
                        L::Whole::add(*sum, whole)
                    };
                }
            }
            write_row::<L::Whole, NV>(&sums, &a, i);
        }
    }
}

/// Step `p`: each row's step of activations against the panel's `2 × NV` halves, added to
/// `acc`, in `L::HALVES` parts; each half loaded once for the rows.
#[inline(always)]
unsafe fn step<L: HalfLanes, const MR: usize, const NV: usize>(
    acc: &mut [[__m256; 8]; MR],
    a: &TileArgs,
    p: usize,
) {
    unsafe {
        let w = a.panel.add(p * 16 * NV).cast::<__m256i>();
        for half in 0..L::HALVES {
            // Part `half` reads lane `HALVES - 1 - half` of the step, as the 512-bit tiles.
            let lane = L::HALVES * p + L::HALVES - 1 - half;
            for h in 0..2 * NV {
                let wv = L::weights(w.add(h), half);
                for (i, sums) in acc.iter_mut().enumerate() {
                    let xb = _mm256_set1_epi32(*a.x.add(i * a.x_stride + lane) as i32);
                    sums[h] = L::madd(sums[h], xb, wv);
                }
            }
        }
    }
}
