//! The one-row tile that reads its panel in 256-bit halves
//! ([`super::OneRowWalk::HalfVectors`]: a batch-1 decode step's products on Intel's cores),
//! for f32 and bf16 (int8 read slower this way: its weights, 130 MB for mamba-130m, sit
//! partly in this Xeon's 480 MiB L3).
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

use super::avx512::{Bf16ByFmaLanes, Bf16Lanes, F32Lanes, Lanes, TileArgs, write_row};

/// Segments a panel is walked as: three sequential streams that the core's L2 prefetcher
/// follows (no prefetch instructions).
const SEGMENTS: usize = 3;

/// Whether this CPU runs these tiles (AVX-512VL, which every AVX-512 core but Xeon Phi has;
/// without it the walk is [`super::OneRowWalk::HardwareStreams`]'s).
pub(super) fn available() -> bool {
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

/// `a.len` steps of an f32 panel `nv` 16-lane vectors wide against one row of activations.
///
/// # Safety
/// As the tiles of `avx512.rs`: `a` from its block loop, for one row, on a CPU with
/// AVX-512F and AVX-512VL.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn tile_f32(nv: usize, rows: usize, a: TileArgs) {
    debug_assert_eq!(rows, 1);
    unsafe { tile_of::<F32Lanes>(nv, a) }
}

/// As [`tile_f32`] for bf16 pairs (`vdpbf16ps` on 8 lanes), on a CPU with AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
pub(super) unsafe fn tile_bf16(nv: usize, rows: usize, a: TileArgs) {
    debug_assert_eq!(rows, 1);
    unsafe { tile_of::<Bf16Lanes>(nv, a) }
}

/// As [`tile_f32`] for bf16 pairs against activations widened to f32, two lanes a step
/// (multiplied by FMAs: [`super::bf16_by_fma`]).
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn tile_bf16_by_fma(nv: usize, rows: usize, a: TileArgs) {
    debug_assert_eq!(rows, 1);
    unsafe { tile_of::<Bf16ByFmaLanes>(nv, a) }
}

#[inline(always)]
unsafe fn tile_of<L: HalfLanes>(nv: usize, a: TileArgs) {
    unsafe {
        match nv {
            1 => tile::<L, 1>(a),
            2 => tile::<L, 2>(a),
            3 => tile::<L, 3>(a),
            _ => tile::<L, 4>(a),
        }
    }
}

/// The tile of a panel `NV` 16-lane vectors wide: `SEGMENTS × 2 × NV` sums of 8 lanes (24
/// registers at most), each segment's halves joined and the segments added at the end.
#[inline(always)]
unsafe fn tile<L: HalfLanes, const NV: usize>(a: TileArgs) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 8]; SEGMENTS];
        let segment = a.len / SEGMENTS;
        for p in 0..segment {
            for (s, acc) in acc.iter_mut().enumerate() {
                step::<L, NV>(acc, &a, s * segment + p);
            }
        }
        for p in SEGMENTS * segment..a.len {
            step::<L, NV>(&mut acc[0], &a, p);
        }
        let mut sums = [_mm512_setzero_ps(); NV];
        for (c, sum) in sums.iter_mut().enumerate() {
            for (s, acc) in acc.iter().enumerate() {
                let (low, high) = (
                    _mm256_castps_pd(acc[2 * c]),
                    _mm256_castps_pd(acc[2 * c + 1]),
                );
                let whole =
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(low), high));
                *sum = if s == 0 {
                    whole
                } else {
                    L::Whole::add(*sum, whole)
                };
            }
        }
        write_row::<L::Whole, NV>(&sums, &a, 0);
    }
}

/// Step `p`: the row's step of activations against the panel's `2 × NV` halves, added to
/// `acc`, in `L::HALVES` parts.
#[inline(always)]
unsafe fn step<L: HalfLanes, const NV: usize>(acc: &mut [__m256; 8], a: &TileArgs, p: usize) {
    unsafe {
        let w = a.panel.add(p * 16 * NV).cast::<__m256i>();
        for half in 0..L::HALVES {
            // Part `half` reads lane `HALVES - 1 - half` of the step, as the 512-bit tiles.
            let lane = L::HALVES * p + L::HALVES - 1 - half;
            let xb = _mm256_set1_epi32(*a.x.add(lane) as i32);
            for (h, acc) in acc.iter_mut().take(2 * NV).enumerate() {
                *acc = L::madd(*acc, xb, L::weights(w.add(h), half));
            }
        }
    }
}
