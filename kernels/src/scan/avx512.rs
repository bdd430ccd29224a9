//! The selective scan's job in AVX-512 intrinsics: the portable body's arithmetic, operation
//! for operation (the same bits), with the block's 32 channels in two registers.
//!
//! LLVM's vectorisation of the portable body kept the block's sums and `Δ·x` on the stack
//! and built `2ⁿ` from integer shifts: ~5 cycles a (row, channel, state) cell on Zen 4, 0.5 ms
//! a row for mamba-130m's step, as much as a batch-8 step's products. Here the sums stay in
//! registers and `vscalefps` scales by `2ⁿ`.

use std::arch::x86_64::*;

use std::f32::consts::LOG2_E;

use super::{
    BlockJob, CHANNELS, PREFETCH_BLOCKS, ScanInputs, SendPtr, SsmParams, fetch_block, row_deltas,
};

/// `exp_fast` (activation.rs) on 16 lanes: the same range reduction and polynomial; `y · 2ⁿ`
/// by `vscalefps`, exact like the body's multiplication by `2ⁿ` built from its bits (`n` is
/// an integer in [-126, 127] after the clamp).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    use crate::activation::exp_consts::*;
    unsafe {
        let x = _mm512_max_ps(x, _mm512_set1_ps(MIN));
        let x = _mm512_min_ps(x, _mm512_set1_ps(MAX));
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

/// `exp2_decay` (activation.rs) on 16 lanes: the same operations, `y · 2ⁿ` by `vscalefps`
/// (exact like the body's multiplication by `2ⁿ`, `n` ∈ [-126, 0]).
#[inline(always)]
unsafe fn exp2_decay16(t: __m512) -> __m512 {
    use crate::activation::exp2_consts::*;
    unsafe {
        let t = _mm512_max_ps(t, _mm512_set1_ps(MIN));
        let t = _mm512_min_ps(t, _mm512_setzero_ps());
        let n = _mm512_sub_ps(
            _mm512_add_ps(t, _mm512_set1_ps(ROUND)),
            _mm512_set1_ps(ROUND),
        );
        let f = _mm512_sub_ps(t, n);
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
        let decay = exp2_decay16(_mm512_mul_ps(dt2, _mm512_maskz_loadu_ps(mask, a)));
        let hv = _mm512_fmadd_ps(
            decay,
            _mm512_maskz_loadu_ps(mask, h),
            _mm512_mul_ps(dtx, bk),
        );
        _mm512_mask_storeu_ps(h, mask, hv);
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
        let d = _mm512_maskz_loadu_ps(mask, d);
        let z = _mm512_maskz_loadu_ps(mask, z);
        let out = _mm512_mul_ps(_mm512_fmadd_ps(d, x, acc), silu16(z));
        _mm512_mask_storeu_ps(y, mask, out);
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
#[target_feature(enable = "avx512f")]
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
    const V: usize = CHANNELS / 16;
    let (e, n) = (params.channels, params.state_size);
    for c in 0..PREFETCH_BLOCKS {
        fetch_block(params, job, job.channels.start + c * CHANNELS);
    }
    let mut deltas = vec![0.0f32; job.channels.len()];
    unsafe {
        for row in job.rows.clone() {
            let first_row = row == job.rows.start;
            row_deltas(inputs, e, row, job.channels.clone(), &mut deltas);
            let b_t = &inputs.b.data[row * inputs.b.row_stride..][..n];
            let c_t = &inputs.c.data[row * inputs.c.row_stride..][..n];
            let z_row = inputs.z.data[row * inputs.z.row_stride..][..e].as_ptr();
            // Channel `c`'s Δ at `dt_row + c`.
            let dt_row = deltas.as_ptr().wrapping_sub(job.channels.start);
            let x_row = inputs.x[row * e..][..e].as_ptr();
            for c0 in job.channels.clone().step_by(CHANNELS) {
                let len = CHANNELS.min(job.channels.end - c0);
                if first_row {
                    fetch_block(params, job, c0 + PREFETCH_BLOCKS * CHANNELS);
                }
                let masks = [lanes(len, 0), lanes(len, 1)];
                let mut dt2 = [_mm512_setzero_ps(); V];
                let mut xv = [_mm512_setzero_ps(); V];
                let mut dtx = [_mm512_setzero_ps(); V];
                for v in 0..V {
                    let at = c0 + 16 * v;
                    let dt = _mm512_maskz_loadu_ps(masks[v], dt_row.add(at));
                    dt2[v] = _mm512_mul_ps(dt, _mm512_set1_ps(LOG2_E));
                    xv[v] = _mm512_maskz_loadu_ps(masks[v], x_row.add(at));
                    dtx[v] = _mm512_mul_ps(dt, xv[v]);
                }
                let mut acc = [_mm512_setzero_ps(); V];
                for k in 0..n {
                    let a = params.a_t.as_ptr().add(k * e + c0);
                    let h = job.state.0.add(k * e + c0);
                    let (bk, ck) = (_mm512_set1_ps(b_t[k]), _mm512_set1_ps(c_t[k]));
                    for v in 0..V {
                        let cells = (a.add(16 * v), h.add(16 * v), masks[v]);
                        let hv = update16(cells, dt2[v], dtx[v], bk);
                        acc[v] = _mm512_fmadd_ps(hv, ck, acc[v]);
                    }
                }
                for v in 0..V {
                    let at = c0 + 16 * v;
                    let (d, z) = (params.d.as_ptr().add(at), z_row.add(at));
                    gated_output16(acc[v], (d, xv[v], z), y.0.add(row * e + at), masks[v]);
                }
            }
        }
    }
}

/// Channels whose sums and Δ a one-row job keeps at a time (16 KiB on the stack).
const ROW_CHUNK: usize = 2048;

/// A one-row job (a decode step's session) state index by state index: for each `k`, the
/// job's channels of the state's row `k` and of `A`'s, front to back, the sums waiting in a
/// stack buffer. The `[N, E]` state and `A` are then read as one sequential stream each (a
/// whole-row job's rows `k` and `k + 1` are adjacent), which the prefetchers follow, where
/// the channel-block order reads N lines `E` floats apart per block: at 32 sessions a step's
/// 75 MB of state are the scan's cost. Each cell's operations and each sum's order (`k`
/// ascending) are the block order's: the same bits.
///
/// # Safety
/// As [`scan_block`]'s.
#[target_feature(enable = "avx512f")]
unsafe fn one_row(params: &SsmParams<'_>, inputs: &ScanInputs<'_>, job: &BlockJob, y: SendPtr) {
    let (e, n) = (params.channels, params.state_size);
    let row = job.rows.start;
    let b_t = &inputs.b.data[row * inputs.b.row_stride..][..n];
    let c_t = &inputs.c.data[row * inputs.c.row_stride..][..n];
    let z_row = inputs.z.data[row * inputs.z.row_stride..][..e].as_ptr();
    let x_row = inputs.x[row * e..][..e].as_ptr();
    let (mut sums, mut deltas) = ([0.0f32; ROW_CHUNK], [0.0f32; ROW_CHUNK]);
    for c_start in job.channels.clone().step_by(ROW_CHUNK) {
        let c_end = (c_start + ROW_CHUNK).min(job.channels.end);
        let sums = &mut sums[..c_end - c_start];
        sums.fill(0.0);
        row_deltas(inputs, e, row, c_start..c_end, &mut deltas);
        // Channel `c`'s Δ at `dt_row + c`.
        let dt_row = deltas.as_ptr().wrapping_sub(c_start);
        // SAFETY: the job's cells are its own and in bounds (the caller's contract); the
        // sums' indices are below `c_end - c_start`; a prefetch never faults.
        unsafe {
            for k in 0..n {
                let (bk, ck) = (_mm512_set1_ps(b_t[k]), _mm512_set1_ps(c_t[k]));
                let a_k = params.a_t.as_ptr().add(k * e);
                let h_k = job.state.0.add(k * e);
                for c in (c_start..c_end).step_by(16) {
                    let mask = lanes(c_end - c, 0);
                    // The same channels of the next state row: a short job (a few
                    // sessions' channel blocks) reads rows E floats apart, which the
                    // prefetchers do not follow; a whole row reads on from here anyway.
                    super::prefetch(a_k.wrapping_add(c + e));
                    super::prefetch(h_k.wrapping_add(c + e));
                    // And the state two rows ahead into L2: at 32 sessions the scan streams
                    // 150 MB a step, and requests from L1 alone keep too few lines in flight
                    // (`examples/scan_step.rs` alternated with and without, 2026-12-04:
                    // 32 rows 5.47 → 5.07 and 5.68 → 5.34 ms, 8 rows 1.31 → 1.27, 2 rows
                    // 0.39 → 0.34; three or four rows ahead, or `A` as well, did the same).
                    _mm_prefetch::<_MM_HINT_T1>(h_k.wrapping_add(c + 2 * e).cast());
                    let dt = _mm512_maskz_loadu_ps(mask, dt_row.add(c));
                    let dtx = _mm512_mul_ps(dt, _mm512_maskz_loadu_ps(mask, x_row.add(c)));
                    let dt2 = _mm512_mul_ps(dt, _mm512_set1_ps(LOG2_E));
                    let hv = update16((a_k.add(c), h_k.add(c), mask), dt2, dtx, bk);
                    let sum = sums.as_mut_ptr().add(c - c_start);
                    let acc = _mm512_fmadd_ps(hv, ck, _mm512_maskz_loadu_ps(mask, sum));
                    _mm512_mask_storeu_ps(sum, mask, acc);
                }
            }
            for c in (c_start..c_end).step_by(16) {
                let mask = lanes(c_end - c, 0);
                let acc = _mm512_maskz_loadu_ps(mask, sums.as_ptr().add(c - c_start));
                let xv = _mm512_maskz_loadu_ps(mask, x_row.add(c));
                let (d, z) = (params.d.as_ptr().add(c), z_row.add(c));
                gated_output16(acc, (d, xv, z), y.0.add(row * e + c), mask);
            }
        }
    }
}
