//! The selective scan's job in AVX-512 intrinsics: the portable body's arithmetic, operation
//! for operation (the same bits; `vrndscaleps` does the rounding that the body does in two
//! additions, exactly), with the block's 64 channels in four registers.
//!
//! LLVM's vectorisation of the portable body kept the block's sums and `Δ·x` on the stack
//! and built `2ⁿ` from integer shifts: ~5 cycles a (row, channel, state) cell on Zen 4, 0.5 ms
//! a row for mamba-130m's step, as much as a batch-8 step's products. Here the sums stay in
//! registers and `vscalefps` scales by `2ⁿ`.

use std::arch::x86_64::*;
use std::ops::Range;

use std::f32::consts::LOG2_E;

use super::walk::{ChunkRows, RowInputs, one_row_by_state_rows, rows_by_blocks};
use super::{BlockJob, CHANNELS, ScanInputs, SendPtr, SsmParams, prefetch};

/// `exp_fast` (activation.rs) on 16 lanes: the same range reduction and polynomial; `y · 2ⁿ`
/// by `vscalefps`, exact like the body's multiplication by `2ⁿ` built from its bits (`n` is
/// an integer in [-126, 127] after the clamp).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    use crate::activation::exp_consts::*;
    unsafe {
        // The bound first: `vmaxps`/`vminps` return their second operand where either is
        // NaN, so a NaN stays NaN, as through `clamp` in the body.
        let x = _mm512_max_ps(_mm512_set1_ps(MIN), x);
        let x = _mm512_min_ps(_mm512_set1_ps(MAX), x);
        let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND));
        let n = _mm512_sub_ps(shifted, _mm512_set1_ps(ROUND));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
        _mm512_scalef_ps(_mm512_add_ps(y, _mm512_set1_ps(1.0)), n)
    }
}

/// `exp2_decay` (activation.rs) on 16 lanes for `t = Δ·log₂e·A`, which is never above 0
/// (`Δ` out of softplus ≥ 0, `A` ≤ 0: [`SsmParams::a_t`]): the same values without the clamp
/// at 0, one of the ~16 operations a cell takes; `y · 2ⁿ` by `vscalefps` (exact like the
/// body's multiplication by `2ⁿ`, `n` ∈ [-126, 0]). A NaN (`0·∞`) becomes `MIN` as there.
#[inline(always)]
unsafe fn exp2_decay16(t: __m512) -> __m512 {
    use crate::activation::exp2_consts::*;
    unsafe {
        let t = _mm512_max_ps(t, _mm512_set1_ps(MIN));
        // `f = t − round(t)` (to the nearest, ties to even) in one instruction, and `n =
        // t − f`: both exact, the body's `n = (t + ROUND) − ROUND` (exact for |t| < 2²²) and
        // `f = t − n`. `vreduceps` is one operation where `vrndscaleps` is two: the scan
        // alone (`PREFILL=1 examples/scan_step 512`, alternated, Intel Xeon, 2026-12-05):
        // 38.3 / 39.0 / 38.7 / 45.2 / 37.1 → 36.6 / 36.2 / 36.1 / 36.6 / 36.1 ms.
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let n = _mm512_sub_ps(t, f);
        let mut p = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        let y = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }
}

/// `silu` (activation.rs) on 16 lanes: `z / (1 + e⁻ᶻ)`.
#[inline(always)]
unsafe fn silu16(z: __m512) -> __m512 {
    unsafe {
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), z));
        _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }
}

/// One vector of the recurrence's cells, `(k, c..c + 16)` of a row (the body's inner loop):
/// `h ← 2^((Δ·log₂e)·A)·h + (Δ·x)·B_k` in place, returned for the sum. `cells` are the
/// cells' `A`, their state and the lanes in use; `dt2` is `Δ·log₂e`, `dtx` is `Δ·x`.
///
/// # Safety
/// AVX-512F; the masked lanes of `a` and `h` are in bounds and `h`'s are the caller's alone.
#[inline(always)]
unsafe fn update16(
    (a, h, mask): (*const f32, *mut f32, __mmask16),
    dt2: __m512,
    dtx: __m512,
    bk: __m512,
) -> __m512 {
    unsafe {
        let decay = exp2_decay16(_mm512_mul_ps(dt2, load(mask, a)));
        let hv = _mm512_fmadd_ps(decay, load(mask, h), _mm512_mul_ps(dtx, bk));
        store(mask, h, hv);
        hv
    }
}

/// A row's output for 16 channels: `y = (Σ_k h·C_k + D·x) · silu(z)`, from the sum `acc`,
/// `D`'s and `z`'s lanes at `d` and `z`, and `x` (the body's last loop).
///
/// # Safety
/// AVX-512F; the masked lanes of `d`, `z` and `y` are in bounds and `y`'s are the caller's
/// alone.
#[inline(always)]
unsafe fn gated_output16(
    acc: __m512,
    (d, x, z): (*const f32, __m512, *const f32),
    y: *mut f32,
    mask: __mmask16,
) {
    unsafe {
        let (d, z) = (load(mask, d), load(mask, z));
        store(
            mask,
            y,
            _mm512_mul_ps(_mm512_fmadd_ps(d, x, acc), silu16(z)),
        );
    }
}

/// `mask`'s lanes at `p`, zero elsewhere: a plain load when all 16 are in use.
#[inline(always)]
unsafe fn load(mask: __mmask16, p: *const f32) -> __m512 {
    unsafe {
        if mask == 0xffff {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }
}

/// `v`'s `mask` lanes to `p`: a plain store when all 16 are in use.
#[inline(always)]
unsafe fn store(mask: __mmask16, p: *mut f32, v: __m512) {
    unsafe {
        if mask == 0xffff {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, mask, v)
        }
    }
}

/// The lanes of vector `v` (0 or 1) of a block `len` channels long.
#[inline(always)]
fn lanes(len: usize, v: usize) -> __mmask16 {
    match len.saturating_sub(16 * v).min(16) {
        16 => 0xffff,
        l => ((1u32 << l) - 1) as u16,
    }
}

/// One job (`scan_block_body` in the parent module, in registers).
///
/// # Safety
/// The CPU has AVX-512F; the job's cells of the state and of `y` are written by no one else
/// while it runs, and are in bounds (`selective_scan` asserts the shapes).
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) unsafe fn scan_block(
    params: &SsmParams<'_>,
    inputs: &ScanInputs<'_>,
    job: &BlockJob,
    y: SendPtr,
) {
    if job.rows.len() == 1 {
        // SAFETY: as this function's.
        return unsafe { one_row(params, inputs, job, y) };
    }
    rows_by_blocks(params, inputs, job, y, |r, c0, len| {
        // SAFETY: as this function's; `c0..c0 + len` are the job's channels.
        unsafe {
            if len == CHANNELS {
                block_row::<true>(params, r, job, c0, len);
            } else {
                block_row::<false>(params, r, job, c0, len);
            }
        }
    });
}

/// `softplus` (activation.rs) on 16 lanes: `max(δ, 0) + ln(1 + e^{−|δ|})`, the same
/// operations in the same order (the same bits).
#[inline(always)]
unsafe fn softplus16(x: __m512) -> __m512 {
    use crate::activation::LOG1P_POLY;
    unsafe {
        // The sign bit set: integer operations (`vorps` on zmm is AVX-512DQ).
        let sign = _mm512_set1_epi32(i32::MIN);
        let neg_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), sign));
        let v = exp16(neg_abs);
        let mut p = _mm512_set1_ps(LOG1P_POLY[0]);
        for c in &LOG1P_POLY[1..] {
            p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(*c));
        }
        _mm512_add_ps(_mm512_max_ps(x, _mm512_setzero_ps()), _mm512_mul_ps(p, v))
    }
}

/// A row's block of channels `c0..c0 + len` (`len` = [`CHANNELS`] where `FULL`, which
/// takes plain loads and stores, no lane masks): Δ out of softplus in registers, then the
/// recurrence over the state index, then the gated output. Softplus here, not a pass of
/// its own over the row's channels before the blocks (`row_deltas`, a call through the
/// SIMD dispatch for each row and job): `examples/scan_step.rs`, 512 rows of one session,
/// one thread, alternated (2026-12-05): 0.329-0.341 → 0.288-0.289 ns a cell with the lane
/// masks of whole blocks known at compile time; 2-16 rows on two threads the same. A pass of
/// its own in registers, and the gate's SiLU in one after the blocks, did worse
/// (0.321-0.342); so did copying the job's state and `A` into a compact block for its rows
/// at 2-4 rows (0.19-0.27 → 0.24-0.36), for ~2% at 512.
///
/// # Safety
/// As [`scan_block`]'s; `c0..c0 + len` are channels of the job.
#[inline(always)]
unsafe fn block_row<const FULL: bool>(
    params: &SsmParams<'_>,
    r: &RowInputs<'_>,
    job: &BlockJob,
    c0: usize,
    len: usize,
) {
    const V: usize = CHANNELS / 16;
    let (e, n) = (params.channels, params.state_size);
    let mut masks = [0xffff_u16; V];
    if !FULL {
        for (v, m) in masks.iter_mut().enumerate() {
            *m = lanes(len, v);
        }
    }
    unsafe {
        let mut dt2 = [_mm512_setzero_ps(); V];
        let mut xv = [_mm512_setzero_ps(); V];
        let mut dtx = [_mm512_setzero_ps(); V];
        for v in 0..V {
            let at = c0 + 16 * v;
            let dt = softplus16(load(masks[v], r.delta.add(at)));
            dt2[v] = _mm512_mul_ps(dt, _mm512_set1_ps(LOG2_E));
            xv[v] = load(masks[v], r.x.add(at));
            dtx[v] = _mm512_mul_ps(dt, xv[v]);
        }
        let mut acc = [_mm512_setzero_ps(); V];
        // In locals: reached through a closure's captures, they lose the `noalias` of a
        // reference argument, and each store to the state would make LLVM load them again.
        let (a_t, state) = (params.a_t.as_ptr(), job.state.0);
        let (b_t, c_t) = (&r.b_t[..n], &r.c_t[..n]);
        for k in 0..n {
            let a = a_t.add(k * e + c0);
            let h = state.add(k * e + c0);
            let (bk, ck) = (_mm512_set1_ps(b_t[k]), _mm512_set1_ps(c_t[k]));
            for v in 0..V {
                let cells = (a.add(16 * v), h.add(16 * v), masks[v]);
                let hv = update16(cells, dt2[v], dtx[v], bk);
                acc[v] = _mm512_fmadd_ps(hv, ck, acc[v]);
            }
        }
        for v in 0..V {
            let at = c0 + 16 * v;
            let (d, z) = (params.d.as_ptr().add(at), r.z.add(at));
            gated_output16(acc[v], (d, xv[v], z), r.y.add(at), masks[v]);
        }
    }
}

/// A one-row job (a decode step's session) in the state-index order of
/// [`one_row_by_state_rows`], the state's rows in pairs ([`state_rows`]).
///
/// # Safety
/// As [`scan_block`]'s.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn one_row(params: &SsmParams<'_>, inputs: &ScanInputs<'_>, job: &BlockJob, y: SendPtr) {
    // SAFETY (both closures): the job's cells are its own and in bounds (the caller's
    // contract); the sums' and Δ's offsets are the chunk's channels.
    let state_rows_of = |rows: &ChunkRows<'_>, count: usize| unsafe {
        if count == 2 {
            state_rows::<2>(params, job, rows);
        } else {
            state_rows::<1>(params, job, rows);
        }
    };
    let outputs = |r: &RowInputs<'_>, channels: Range<usize>, sums: *const f32| unsafe {
        for c in channels.clone().step_by(16) {
            let mask = lanes(channels.end - c, 0);
            let acc = _mm512_maskz_loadu_ps(mask, sums.wrapping_add(c));
            let xv = _mm512_maskz_loadu_ps(mask, r.x.add(c));
            let (d, z) = (params.d.as_ptr().add(c), r.z.add(c));
            gated_output16(acc, (d, xv, z), r.y.add(c), mask);
        }
    };
    one_row_by_state_rows(params, inputs, job, y, state_rows_of, outputs);
}

/// State rows `k..k + R` of a chunk of channels, front to back: the cells of the `R` rows
/// side by side, sharing `Δ·x` and `Δ·log₂e` and one load and store of the sums, each
/// channel's sum taking row `k`'s term before row `k + 1`'s, as the body's order does.
///
/// The scan is bound by its arithmetic even at 32 sessions, whose 75 MB of state stream
/// from memory (`examples/scan_step.rs`: ~0.23 ns a cell on two threads whether the states
/// come from memory or sit in L2). Rows in pairs, plain loads and stores for whole vectors
/// and `vrndscaleps` in the decay (2026-12-04, alternated runs, ms a step): 32 sessions
/// 4.99 / 5.13 / 5.74 / 5.04 → 4.16 / 4.49 / 4.38 / 4.63, 8 sessions in L2 (one layer)
/// 0.225-0.238 → 0.194-0.215 ns a cell. Asking for the next pair into L2 instead of L1
/// did worse (4.38-4.80).
///
/// # Safety
/// As [`one_row`]'s, rows `k..k + R` below `N`.
#[inline(always)]
unsafe fn state_rows<const R: usize>(params: &SsmParams<'_>, job: &BlockJob, r: &ChunkRows<'_>) {
    let e = r.e;
    unsafe {
        // No closures (`array::from_fn`): this body is compiled where it is inlined, with
        // that function's instructions, and a closure need not be inlined with it.
        let (mut bk, mut ck) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        for i in 0..R {
            bk[i] = _mm512_set1_ps(r.b_t[r.k + i]);
            ck[i] = _mm512_set1_ps(r.c_t[r.k + i]);
        }
        let a_k = params.a_t.as_ptr().add(r.k * e);
        let h_k = job.state.0.add(r.k * e);
        for c in r.channels.clone().step_by(16) {
            let mask = lanes(r.channels.end - c, 0);
            for i in 0..R {
                // The same channels of the next rows: a short job (a few sessions' channel
                // blocks) reads rows E floats apart, which the prefetchers do not follow; a
                // whole row reads on from here anyway.
                prefetch(a_k.wrapping_add(c + (R + i) * e));
                prefetch(h_k.wrapping_add(c + (R + i) * e));
                // And the state further ahead into L2: at 32 sessions the scan streams 150
                // MB a step, and requests from L1 alone keep too few lines in flight
                // (`examples/scan_step.rs` alternated with and without, 2026-12-04: 32 rows
                // 5.47 → 5.07 and 5.68 → 5.34 ms, 8 rows 1.31 → 1.27, 2 rows 0.39 → 0.34).
                _mm_prefetch::<_MM_HINT_T1>(h_k.wrapping_add(c + (2 * R + i) * e).cast());
            }
            // `dt_row` and `sums` point before their buffers (at channel 0): offsets wrap.
            let dt = load(mask, r.dt_row.wrapping_add(c));
            let dtx = _mm512_mul_ps(dt, load(mask, r.x_row.add(c)));
            let dt2 = _mm512_mul_ps(dt, _mm512_set1_ps(LOG2_E));
            let mut hv = [_mm512_setzero_ps(); R];
            for i in 0..R {
                let cells = (a_k.add(c + i * e), h_k.add(c + i * e), mask);
                hv[i] = update16(cells, dt2, dtx, bk[i]);
            }
            let sum = r.sums.wrapping_add(c);
            let mut acc = load(mask, sum);
            for i in 0..R {
                acc = _mm512_fmadd_ps(hv[i], ck[i], acc);
            }
            store(mask, sum, acc);
        }
    }
}
