//! The one-row f32 tile that reads its panel in 256-bit halves
//! ([`super::OneRowWalk::HalfVectors`]: a batch-1 decode step's products on Intel's cores).
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

use super::avx512::{F32Lanes, TileArgs, write_row};

/// Segments a panel is walked as: three sequential streams that the core's L2 prefetcher
/// follows (no prefetch instructions).
const SEGMENTS: usize = 3;

/// Whether this CPU runs [`tile_f32`] (AVX-512VL, which every AVX-512 core but Xeon Phi
/// has; without it the walk is [`super::OneRowWalk::HardwareStreams`]'s).
pub(super) fn available() -> bool {
    std::is_x86_feature_detected!("avx512vl")
}

/// `a.len` steps of an f32 panel `nv` 16-lane vectors wide against one row of activations.
///
/// # Safety
/// As the tiles of `avx512.rs`: `a` from its block loop, for one row, on a CPU with
/// AVX-512F and AVX-512VL.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn tile_f32(nv: usize, rows: usize, a: TileArgs) {
    debug_assert_eq!(rows, 1);
    unsafe {
        match nv {
            1 => tile::<1>(a),
            2 => tile::<2>(a),
            3 => tile::<3>(a),
            _ => tile::<4>(a),
        }
    }
}

/// The tile of a panel `NV` 16-lane vectors wide: `SEGMENTS × 2 × NV` sums of 8 lanes (24
/// registers at most), the segments' halves joined and added at the end.
#[inline(always)]
unsafe fn tile<const NV: usize>(a: TileArgs) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 8]; SEGMENTS];
        let segment = a.len / SEGMENTS;
        let (x, panel) = (a.x.cast::<f32>(), a.panel.cast::<f32>());
        for p in 0..segment {
            for (s, acc) in acc.iter_mut().enumerate() {
                step::<NV>(acc, x, panel, s * segment + p);
            }
        }
        for p in SEGMENTS * segment..a.len {
            step::<NV>(&mut acc[0], x, panel, p);
        }
        let mut sums = [_mm512_setzero_ps(); NV];
        for (c, sum) in sums.iter_mut().enumerate() {
            for acc in &acc {
                let (low, high) = (
                    _mm256_castps_pd(acc[2 * c]),
                    _mm256_castps_pd(acc[2 * c + 1]),
                );
                let whole = _mm512_insertf64x4::<1>(_mm512_castpd256_pd512(low), high);
                *sum = _mm512_add_ps(*sum, _mm512_castpd_ps(whole));
            }
        }
        write_row::<F32Lanes, NV>(&sums, &a, 0);
    }
}

/// Step `p`: the row's activation times the panel's `2 × NV` halves, added to `acc`.
#[inline(always)]
unsafe fn step<const NV: usize>(acc: &mut [__m256; 8], x: *const f32, panel: *const f32, p: usize) {
    unsafe {
        let xb = _mm256_set1_ps(*x.add(p));
        let w = panel.add(p * 16 * NV);
        for (h, acc) in acc.iter_mut().take(2 * NV).enumerate() {
            *acc = _mm256_fmadd_ps(xb, _mm256_load_ps(w.add(8 * h)), *acc);
        }
    }
}
