//! The selective scan's job in AVX2 and FMA intrinsics, for CPUs without AVX-512: the
//! portable body's arithmetic, operation for operation (the same bits), with a block's sums,
//! `Δ·x` and `Δ·log₂e` in registers, as `avx512.rs` keeps them, eight channels a vector.
//!
//! LLVM's vectorisation of the portable body for AVX2 kept the sums and `Δ·x` of a block's
//! 64 channels on the stack (a load and a store of each sum per cell) and built `2ⁿ` with
//! three integer operations and a multiply: `PREFILL=1 TIDEWAY_SIMD=avx2 examples/scan_step
//! 512` read 95-97 ms against the AVX-512 kernel's 37-39 (Intel Xeon, 2026-12-06).

use std::arch::x86_64::*;
use std::ops::Range;

use std::f32::consts::LOG2_E;

use super::walk::{ChunkRows, RowInputs, one_row_by_state_rows, rows_by_blocks};
use super::{BlockJob, ScanInputs, SendPtr, SsmParams, prefetch};

/// Channels a block's registers hold: 16 vector registers take four vectors each of the
/// sums, `Δ·x` and `Δ·log₂e` and leave four for a cell's arithmetic. A block of the walk
/// (`CHANNELS`) is two of these.
const HALF: usize = 32;

/// Vectors of a [`HALF`].
const V: usize = HALF / 8;

/// `2ⁿ` for `shifted = n + ROUND` (`activation::two_to_rounded`): the integer `n` sits in
/// `shifted`'s low mantissa bits, and the upper bits of `0x4B40_0000` fall out of a shift by
/// 23, so `shifted << 23` is `n`'s place in an exponent, and `2ⁿ`'s bits are that plus 127's.
#[inline(always)]
unsafe fn two_to_rounded8(shifted: __m256) -> __m256 {
    unsafe {
        let n_bits = _mm256_slli_epi32::<23>(_mm256_castps_si256(shifted));
        _mm256_castsi256_ps(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127 << 23)))
    }
}

/// `exp_fast` (activation.rs) on 8 lanes: the same operations in the same order.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    use crate::activation::exp_consts::*;
    unsafe {
        // `vmaxps`/`vminps` return their second operand where either is NaN: a NaN stays
        // NaN, as through `clamp` in the body.
        let x = _mm256_max_ps(_mm256_set1_ps(MIN), x);
        let x = _mm256_min_ps(_mm256_set1_ps(MAX), x);
        let shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUND));
        let n = _mm256_sub_ps(shifted, _mm256_set1_ps(ROUND));
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
        let y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        // A multiply, as the body's: `y · 2ⁿ` may be subnormal here (`n` = −126, `y` < 1).
        _mm256_mul_ps(y, two_to_rounded8(shifted))
    }
}

/// `exp2_decay` (activation.rs) on 8 lanes for `t = Δ·log₂e·A`, which is never above 0
/// (`Δ` out of softplus ≥ 0, `A` ≤ 0: [`SsmParams::a_t`]): the same values without the clamp
/// at 0. `y · 2ⁿ` is an integer addition to `y`'s exponent: `y` is in [2^-½, 2^½] and `n`
/// ≥ −126, and `n` = −126 only where `t` ∈ [−126, −125.5], which makes `y` ≥ 1, so the
/// product is a normal number and the addition gives the body's multiplication's bits,
/// with one operation fewer on the multiply ports that bound the loop. A NaN (`0·∞`)
/// becomes `MIN` as there.
#[inline(always)]
unsafe fn exp2_decay8(t: __m256) -> __m256 {
    use crate::activation::exp2_consts::*;
    unsafe {
        let t = _mm256_max_ps(t, _mm256_set1_ps(MIN));
        let shifted = _mm256_add_ps(t, _mm256_set1_ps(ROUND));
        let n = _mm256_sub_ps(shifted, _mm256_set1_ps(ROUND));
        let f = _mm256_sub_ps(t, n);
        let mut p = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(f, p, _mm256_set1_ps(1.0));
        let n_bits = _mm256_slli_epi32::<23>(_mm256_castps_si256(shifted));
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), n_bits))
    }
}

/// `softplus` (activation.rs) on 8 lanes: `max(δ, 0) + ln(1 + e^{−|δ|})`, the same
/// operations in the same order.
#[inline(always)]
unsafe fn softplus8(x: __m256) -> __m256 {
    use crate::activation::LOG1P_POLY;
    unsafe {
        let neg_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0));
        let v = exp8(neg_abs);
        let mut p = _mm256_set1_ps(LOG1P_POLY[0]);
        for c in &LOG1P_POLY[1..] {
            p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(*c));
        }
        _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_mul_ps(p, v))
    }
}

/// `silu` (activation.rs) on 8 lanes: `z / (1 + e⁻ᶻ)`.
#[inline(always)]
unsafe fn silu8(z: __m256) -> __m256 {
    unsafe {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
        _mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }
}

/// Lanes of a vector in use: all eight, or the first `n` (a job's last, partial vector).
#[derive(Clone, Copy)]
enum Lanes {
    All,
    First(__m256i),
}

impl Lanes {
    /// The lanes of vector `v` of a block `len` channels long (none past its end).
    #[inline(always)]
    fn of(len: usize, v: usize) -> Lanes {
        match len.saturating_sub(8 * v).min(8) {
            8 => Lanes::All,
            n => {
                // SAFETY: AVX, which every caller's target features include.
                let lane = unsafe { _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) };
                Lanes::First(unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane) })
            }
        }
    }
}

/// The lanes in use at `p`, zero elsewhere.
#[inline(always)]
unsafe fn load(lanes: Lanes, p: *const f32) -> __m256 {
    unsafe {
        match lanes {
            Lanes::All => _mm256_loadu_ps(p),
            Lanes::First(mask) => _mm256_maskload_ps(p, mask),
        }
    }
}

/// `v`'s lanes in use to `p`.
#[inline(always)]
unsafe fn store(lanes: Lanes, p: *mut f32, v: __m256) {
    unsafe {
        match lanes {
            Lanes::All => _mm256_storeu_ps(p, v),
            Lanes::First(mask) => _mm256_maskstore_ps(p, mask, v),
        }
    }
}

/// One vector of the recurrence's cells, `(k, c..c + 8)` of a row: `h ← 2^((Δ·log₂e)·A)·h
/// + (Δ·x)·B_k` in place, returned for the sum (`avx512::update16`).
///
/// # Safety
/// AVX2 and FMA; the lanes in use of `a` and `h` are in bounds and `h`'s are the caller's
/// alone.
#[inline(always)]
unsafe fn update8(
    (a, h, lanes): (*const f32, *mut f32, Lanes),
    dt2: __m256,
    dtx: __m256,
    bk: __m256,
) -> __m256 {
    unsafe {
        let decay = exp2_decay8(_mm256_mul_ps(dt2, load(lanes, a)));
        let hv = _mm256_fmadd_ps(decay, load(lanes, h), _mm256_mul_ps(dtx, bk));
        store(lanes, h, hv);
        hv
    }
}

/// A row's output for 8 channels: `y = (Σ_k h·C_k + D·x) · silu(z)` from the sum `acc` and
/// `x`, with `D` and `z` read at `d` and `z`.
///
/// # Safety
/// AVX2 and FMA; the lanes in use of `d`, `z` and `y` are in bounds and `y`'s are the
/// caller's alone.
#[inline(always)]
unsafe fn gated_output8(
    acc: __m256,
    (d, x, z): (*const f32, __m256, *const f32),
    y: *mut f32,
    lanes: Lanes,
) {
    unsafe {
        let (d, z) = (load(lanes, d), load(lanes, z));
        store(
            lanes,
            y,
            _mm256_mul_ps(_mm256_fmadd_ps(d, x, acc), silu8(z)),
        );
    }
}

/// One job (`scan_block_body` in the parent module, in registers).
///
/// # Safety
/// The CPU has AVX2 and FMA; the job's cells of the state and of `y` are written by no one
/// else while it runs, and are in bounds (`selective_scan` asserts the shapes).
#[target_feature(enable = "avx2,fma")]
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
        for h0 in (c0..c0 + len).step_by(HALF) {
            let half = HALF.min(c0 + len - h0);
            // SAFETY: as this function's; `h0..h0 + half` are the job's channels.
            unsafe {
                if half == HALF {
                    block_row::<true>(params, r, job, h0, half);
                } else {
                    block_row::<false>(params, r, job, h0, half);
                }
            }
        }
    });
}

/// A row's channels `c0..c0 + len` (`len` = [`HALF`] where `FULL`, which takes plain loads
/// and stores): Δ out of softplus in registers, then the recurrence over the state index,
/// then the gated output (`avx512::block_row`).
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
    let (e, n) = (params.channels, params.state_size);
    let mut lanes = [Lanes::All; V];
    if !FULL {
        for (v, l) in lanes.iter_mut().enumerate() {
            *l = Lanes::of(len, v);
        }
    }
    unsafe {
        let mut dt2 = [_mm256_setzero_ps(); V];
        let mut dtx = [_mm256_setzero_ps(); V];
        for v in 0..V {
            let at = c0 + 8 * v;
            let dt = softplus8(load(lanes[v], r.delta.add(at)));
            dt2[v] = _mm256_mul_ps(dt, _mm256_set1_ps(LOG2_E));
            dtx[v] = _mm256_mul_ps(dt, load(lanes[v], r.x.add(at)));
        }
        let mut acc = [_mm256_setzero_ps(); V];
        for k in 0..n {
            let a = params.a_t.as_ptr().add(k * e + c0);
            let h = job.state.0.add(k * e + c0);
            let (bk, ck) = (_mm256_set1_ps(r.b_t[k]), _mm256_set1_ps(r.c_t[k]));
            for v in 0..V {
                let cells = (a.add(8 * v), h.add(8 * v), lanes[v]);
                let hv = update8(cells, dt2[v], dtx[v], bk);
                acc[v] = _mm256_fmadd_ps(hv, ck, acc[v]);
            }
        }
        for v in 0..V {
            let at = c0 + 8 * v;
            let xv = load(lanes[v], r.x.add(at));
            let (d, z) = (params.d.as_ptr().add(at), r.z.add(at));
            gated_output8(acc[v], (d, xv, z), r.y.add(at), lanes[v]);
        }
    }
}

/// A one-row job (a decode step's session) in the state-index order of
/// [`one_row_by_state_rows`], the state's rows in pairs ([`state_rows`]).
///
/// # Safety
/// As [`scan_block`]'s.
#[target_feature(enable = "avx2,fma")]
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
        for c in channels.clone().step_by(8) {
            let lanes = Lanes::of(channels.end - c, 0);
            let acc = load(lanes, sums.wrapping_add(c));
            let xv = load(lanes, r.x.add(c));
            let (d, z) = (params.d.as_ptr().add(c), r.z.add(c));
            gated_output8(acc, (d, xv, z), r.y.add(c), lanes);
        }
    };
    one_row_by_state_rows(params, inputs, job, y, state_rows_of, outputs);
}

/// State rows `k..k + R` of a chunk of channels, front to back, eight channels a turn
/// (`avx512::state_rows`, whose lines ahead it asks for alike).
///
/// # Safety
/// As [`one_row`]'s, rows `k..k + R` below `N`.
#[inline(always)]
unsafe fn state_rows<const R: usize>(params: &SsmParams<'_>, job: &BlockJob, r: &ChunkRows<'_>) {
    let e = r.e;
    unsafe {
        let (mut bk, mut ck) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        for i in 0..R {
            bk[i] = _mm256_set1_ps(r.b_t[r.k + i]);
            ck[i] = _mm256_set1_ps(r.c_t[r.k + i]);
        }
        let a_k = params.a_t.as_ptr().add(r.k * e);
        let h_k = job.state.0.add(r.k * e);
        for c in r.channels.clone().step_by(8) {
            let lanes = Lanes::of(r.channels.end - c, 0);
            // Once a line of 16 floats, as the AVX-512 kernel asks.
            if (c - r.channels.start).is_multiple_of(16) {
                for i in 0..R {
                    prefetch(a_k.wrapping_add(c + (R + i) * e));
                    prefetch(h_k.wrapping_add(c + (R + i) * e));
                    _mm_prefetch::<_MM_HINT_T1>(h_k.wrapping_add(c + (2 * R + i) * e).cast());
                }
            }
            let dt = load(lanes, r.dt_row.wrapping_add(c));
            let dtx = _mm256_mul_ps(dt, load(lanes, r.x_row.add(c)));
            let dt2 = _mm256_mul_ps(dt, _mm256_set1_ps(LOG2_E));
            let mut hv = [_mm256_setzero_ps(); R];
            for i in 0..R {
                let cells = (a_k.add(c + i * e), h_k.add(c + i * e), lanes);
                hv[i] = update8(cells, dt2, dtx, bk[i]);
            }
            let sum = r.sums.wrapping_add(c);
            let mut acc = load(lanes, sum);
            for i in 0..R {
                acc = _mm256_fmadd_ps(hv[i], ck[i], acc);
            }
            store(lanes, sum, acc);
        }
    }
}
