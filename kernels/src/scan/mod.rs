//! The selective-scan recurrence of Mamba (Gu & Dao 2023, Algorithm 2; `selective_scan_ref`
//! in state-spaces/mamba, `MambaMixer.slow_forward` in HF transformers), fused with the skip
//! term and the output gate:
//!
//! ```text
//! Δ_t = softplus(δ_t)                              (δ: dt_proj's output with its bias)
//! h_t = exp(Δ_t·A) ⊙ h_{t-1} + (Δ_t·x_t)·B_t        (per channel c: h ∈ R^N)
//! y_t = ⟨h_t, C_t⟩ + D·x_t
//! y_t ← y_t · silu(z_t)
//! ```
//!
//! The kernel runs over a *packed* batch: the rows of many sessions back to back, each session
//! a segment of consecutive rows with its own state. A decode step is a batch of one-row
//! segments; a prefill chunk is one long segment. Work is split over (segment, channel block)
//! pairs, which are independent, and run on the rayon pool.
//!
//! The softplus is the kernel's, as `selective_scan_fn(…, delta_softplus=True)` of the
//! reference: each job takes its own rows' and channels' Δ out of it just before using them,
//! where a pass of its own over the batch was one more hand-off of the pool a layer (0.7 ms
//! of a batch-32 mamba-130m step).
//!
//! The decay is computed as `2^((Δ_t·log₂e)·A)` ([`exp2_decay`]: no Cody–Waite reduction, a
//! quarter fewer operations in the kernel's inner loop, which its arithmetic bounds).
//!
//! Layout: the state and `A` are stored state-index-major, `[N, E]`, so that the inner loop
//! runs over contiguous channels (one SIMD lane per channel, no horizontal sums); `B_t` and
//! `C_t` are then scalars in that loop.
//!
//! Kernels: `avx512.rs` and `avx2.rs` in intrinsics, which walk a job the same way
//! (`walk.rs`), and the portable body below for other CPUs; all three give the same bits.

use std::f32::consts::LOG2_E;
use std::ops::Range;

use rayon::prelude::*;

use crate::activation::{exp2_decay, silu, softplus_into};
use crate::matmul::MatRef;
use crate::simd::prefetch;

/// Per-layer constants of the SSM.
#[derive(Clone, Copy, Debug)]
pub struct SsmParams<'a> {
    /// `A = -exp(A_log)` transposed to `[N, E]`: never above 0, which the AVX-512 kernel's
    /// decays take for granted (`avx512::exp2_decay16`).
    pub a_t: &'a [f32],
    /// Skip weights `D`, `[E]`.
    pub d: &'a [f32],
    /// Channels `E`.
    pub channels: usize,
    /// State size `N`.
    pub state_size: usize,
}

/// The per-row inputs of a packed batch of `M` rows.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    /// Conv output after SiLU, `[M, E]`.
    pub x: &'a [f32],
    /// `δ`, `[M, E]`: `Δ` before its softplus, which the scan applies.
    pub delta: &'a [f32],
    /// `B_t`, `M × N` (usually columns of `x_proj`'s output).
    pub b: MatRef<'a>,
    /// `C_t`, `M × N`.
    pub c: MatRef<'a>,
    /// The gate `z`, `M × E` (the second half of `in_proj`'s output).
    pub z: MatRef<'a>,
}

/// One session's rows in the packed batch and its SSM state (`[N, E]`, updated in place).
pub struct ScanSegment<'s> {
    pub rows: Range<usize>,
    pub state: &'s mut [f32],
}

/// Runs the recurrence for every segment and writes the gated output `y` (`[M, E]`).
pub fn selective_scan(
    params: SsmParams<'_>,
    inputs: ScanInputs<'_>,
    segments: &mut [ScanSegment<'_>],
    y: &mut [f32],
) {
    let (e, n) = (params.channels, params.state_size);
    assert_eq!(params.a_t.len(), e * n);
    assert_eq!(params.d.len(), e);
    let m = segments.iter().map(|s| s.rows.end).max().unwrap_or(0);
    assert!(inputs.x.len() >= m * e && inputs.delta.len() >= m * e && y.len() >= m * e);
    for mat in [inputs.b, inputs.c] {
        assert!(mat.rows >= m && mat.cols == n);
    }
    assert!(inputs.z.rows >= m && inputs.z.cols == e);

    // Enough (segment, channel block) jobs to keep every thread busy, in whole SIMD widths.
    let threads = rayon::current_num_threads();
    let blocks_per_segment = (4 * threads).div_ceil(segments.len().max(1)).max(1);
    let block = e
        .div_ceil(blocks_per_segment)
        .next_multiple_of(16)
        .min(e)
        .max(1);

    let y_ptr = SendPtr(y.as_mut_ptr());
    let mut jobs = Vec::new();
    for seg in segments.iter_mut() {
        assert_eq!(seg.state.len(), e * n, "SSM state is not [{n}, {e}]");
        let state = SendPtr(seg.state.as_mut_ptr());
        for c0 in (0..e).step_by(block) {
            jobs.push(BlockJob {
                rows: seg.rows.clone(),
                channels: c0..(c0 + block).min(e),
                state,
            });
        }
    }
    let run = |job: &BlockJob| scan_block(&params, &inputs, job, y_ptr);
    if jobs.len() == 1 || m * e * n < 1 << 14 {
        jobs.iter().for_each(run);
    } else {
        jobs.par_iter().for_each(run);
    }
}

/// One segment's rows over one block of channels. `state` points at the segment's `[N, E]`
/// state; the job touches only its own channel columns of it.
struct BlockJob {
    rows: Range<usize>,
    channels: Range<usize>,
    state: SendPtr,
}

/// A raw pointer that jobs on other threads write through. Jobs write only the cells of their
/// own (segment, channel block) — of `y` and of the segment's state — and those never overlap.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see the type's comment: writes through it are disjoint, and `selective_scan` holds
// the unique borrows of `y` and of every state until all jobs have finished.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod walk;

/// One job: the AVX-512 kernel where the CPU has it, else the AVX2 one, else the portable
/// body. All give the same bits.
fn scan_block(params: &SsmParams<'_>, inputs: &ScanInputs<'_>, job: &BlockJob, y: SendPtr) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx512() && std::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has AVX-512F and DQ; the job's cells are its own (`SendPtr`).
            return unsafe { avx512::scan_block(params, inputs, job, y) };
        }
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the job's cells are its own (`SendPtr`).
            return unsafe { avx2::scan_block(params, inputs, job, y) };
        }
    }
    // CPUs without AVX2 (and other architectures): the plain body, whose x86 baseline is
    // SSE2; every x86 CPU with AVX2 takes a kernel above.
    scan_block_body(params, inputs, job, y)
}

/// Channels handled together in registers: four vectors, so that a block's softplus and
/// gate (chains of ~80 cycles) overlap more of its recurrence. `PREFILL=1
/// examples/scan_step 512`, alternated (Intel Xeon, 2026-12-05): 32 channels 47.2 / 44.6 /
/// 44.4 ms, 48 41.1 / 41.7 / 47.3, 64 41.6 / 42.0 / 43.9, 96 45.6-47.2, 128 58.8-62.9 (the
/// registers spill).
const CHANNELS: usize = 64;

/// Blocks of channels whose state and `A` are asked for ahead of the one computed.
const PREFETCH_BLOCKS: usize = 2;

/// Asks for the state and `A` of the channel block at `c0` (nothing past the job's channels).
///
/// The state and `A` are read once a step, long after the last step evicted them (the layers'
/// weights stream through every cache in between), as N strided lines per block: fetched
/// `PREFETCH_BLOCKS` blocks ahead, they arrive together instead of one miss after another.
/// Later rows of a segment find them in L1.
#[inline(always)]
fn fetch_block(params: &SsmParams<'_>, job: &BlockJob, c0: usize) {
    let (e, n) = (params.channels, params.state_size);
    if c0 < job.channels.end {
        for k in 0..n {
            let at = k * e + c0;
            for line in (0..CHANNELS).step_by(16) {
                prefetch(params.a_t.as_ptr().wrapping_add(at + line));
                prefetch(job.state.0.wrapping_add(at + line));
            }
        }
    }
}

/// `Δ = softplus(δ)` of row `row` over `channels` into `deltas[..channels.len()]`.
#[inline(always)]
fn row_deltas(
    inputs: &ScanInputs<'_>,
    e: usize,
    row: usize,
    channels: Range<usize>,
    deltas: &mut [f32],
) {
    // In one pass: a copy, then softplus in place, took ~1% of a prefill chunk's time for
    // the copy alone (perf, mamba-130m, 512 rows, 2026-12-05).
    softplus_into(
        &inputs.delta[row * e..][channels.clone()],
        &mut deltas[..channels.len()],
    );
}

#[inline(always)]
fn scan_block_body(params: &SsmParams<'_>, inputs: &ScanInputs<'_>, job: &BlockJob, y: SendPtr) {
    let (e, n) = (params.channels, params.state_size);
    for c in 0..PREFETCH_BLOCKS {
        fetch_block(params, job, job.channels.start + c * CHANNELS);
    }
    let mut deltas = vec![0.0f32; job.channels.len()];
    for row in job.rows.clone() {
        let first_row = row == job.rows.start;
        row_deltas(inputs, e, row, job.channels.clone(), &mut deltas);
        let b_t = &inputs.b.data[row * inputs.b.row_stride..][..n];
        let c_t = &inputs.c.data[row * inputs.c.row_stride..][..n];
        let z_row = &inputs.z.data[row * inputs.z.row_stride..][..e];
        for c0 in job.channels.clone().step_by(CHANNELS) {
            let len = CHANNELS.min(job.channels.end - c0);
            if first_row {
                fetch_block(params, job, c0 + PREFETCH_BLOCKS * CHANNELS);
            }
            let dt = &deltas[c0 - job.channels.start..][..len];
            let xv = &inputs.x[row * e + c0..][..len];
            let (mut dtx, mut dt2) = ([0.0f32; CHANNELS], [0.0f32; CHANNELS]);
            for i in 0..len {
                dtx[i] = dt[i] * xv[i];
                dt2[i] = dt[i] * LOG2_E;
            }
            let mut acc = [0.0f32; CHANNELS];
            for k in 0..n {
                let a = &params.a_t[k * e + c0..][..len];
                // SAFETY: cells (k, c0..c0+len) of this segment's [N, E] state belong to this
                // job alone (see `SendPtr`), and are in bounds (asserted by the caller).
                let h = unsafe { std::slice::from_raw_parts_mut(job.state.0.add(k * e + c0), len) };
                let (bk, ck) = (b_t[k], c_t[k]);
                for i in 0..len {
                    let hv = exp2_decay(dt2[i] * a[i]).mul_add(h[i], dtx[i] * bk);
                    h[i] = hv;
                    acc[i] = hv.mul_add(ck, acc[i]);
                }
            }
            for i in 0..len {
                let ch = c0 + i;
                let out = params.d[ch].mul_add(xv[i], acc[i]) * silu(z_row[ch]);
                // SAFETY: (row, ch) is inside this job's segment rows and channel block, which
                // no other job writes, and `row * e + ch < M·E <= y.len()`.
                unsafe { *y.0.add(row * e + ch) = out };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo;

    /// The recurrence written out in f64, one step at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        d: &[f32],
        e: usize,
        n: usize,
        x: &[f32],
        delta: &[f32],
        b: &[f32],
        c: &[f32],
        z: &[f32],
        rows: usize,
        h: &mut [f64],
    ) -> Vec<f32> {
        let mut y = vec![0.0; rows * e];
        for t in 0..rows {
            for ch in 0..e {
                let raw = delta[t * e + ch] as f64;
                let dt = if raw > 20.0 { raw } else { raw.exp().ln_1p() };
                let xv = x[t * e + ch] as f64;
                let mut acc = 0.0;
                for i in 0..n {
                    // `a` and `h` are [N, E], as the kernel keeps them.
                    let hv = (dt * a[i * e + ch] as f64).exp() * h[i * e + ch]
                        + dt * b[t * n + i] as f64 * xv;
                    h[i * e + ch] = hv;
                    acc += hv * c[t * n + i] as f64;
                }
                let zv = z[t * e + ch] as f64;
                y[t * e + ch] = ((acc + d[ch] as f64 * xv) * zv / (1.0 + (-zv).exp())) as f32;
            }
        }
        y
    }

    /// Where a case's pseudo-random values lie: `A` in `-a.1..-a.0`, the rest as given (`D`,
    /// `B` and `C` in -1..1).
    struct Ranges {
        a: (f32, f32),
        x: (f32, f32),
        delta: (f32, f32),
        z: (f32, f32),
    }

    /// A layer's constants and `rows` dense rows of inputs, from seeds `seed..seed + 7`.
    struct Case {
        e: usize,
        n: usize,
        rows: usize,
        a: Vec<f32>,
        d: Vec<f32>,
        x: Vec<f32>,
        delta: Vec<f32>,
        b: Vec<f32>,
        c: Vec<f32>,
        z: Vec<f32>,
    }

    impl Case {
        fn new((e, n, rows): (usize, usize, usize), seed: u64, r: Ranges) -> Case {
            let a = pseudo(e * n, seed, r.a.0, r.a.1);
            Case {
                e,
                n,
                rows,
                a: a.iter().map(|v| -v).collect(),
                d: pseudo(e, seed + 1, -1.0, 1.0),
                x: pseudo(rows * e, seed + 2, r.x.0, r.x.1),
                delta: pseudo(rows * e, seed + 3, r.delta.0, r.delta.1),
                b: pseudo(rows * n, seed + 4, -1.0, 1.0),
                c: pseudo(rows * n, seed + 5, -1.0, 1.0),
                z: pseudo(rows * e, seed + 6, r.z.0, r.z.1),
            }
        }

        fn params(&self) -> SsmParams<'_> {
            SsmParams {
                a_t: &self.a,
                d: &self.d,
                channels: self.e,
                state_size: self.n,
            }
        }

        fn inputs(&self) -> ScanInputs<'_> {
            let (rows, e, n) = (self.rows, self.e, self.n);
            ScanInputs {
                x: &self.x,
                delta: &self.delta,
                b: MatRef::dense(&self.b, rows, n),
                c: MatRef::dense(&self.c, rows, n),
                z: MatRef::dense(&self.z, rows, e),
            }
        }
    }

    #[test]
    fn packed_segments_match_reference_run_alone() {
        for &(e, n) in &[(5usize, 3usize), (40, 16), (70, 21), (100, 16)] {
            let lens = [7usize, 1, 12, 1, 3];
            let m: usize = lens.iter().sum();
            let ranges = Ranges {
                a: (0.1, 3.0),
                x: (-2.0, 2.0),
                delta: (-4.0, 1.5),
                z: (-3.0, 3.0),
            };
            let case = Case::new((e, n, m), 1, ranges);
            let Case {
                a,
                d,
                x,
                delta,
                b,
                c,
                z,
                ..
            } = &case;
            let init: Vec<Vec<f32>> = (0..lens.len())
                .map(|i| pseudo(e * n, 10 + i as u64, -0.5, 0.5))
                .collect();

            let mut states = init.clone();
            let mut starts = vec![0];
            for l in lens {
                starts.push(starts.last().unwrap() + l);
            }
            let mut segments: Vec<ScanSegment<'_>> = states
                .iter_mut()
                .enumerate()
                .map(|(i, s)| ScanSegment {
                    rows: starts[i]..starts[i + 1],
                    state: s,
                })
                .collect();
            let mut y = vec![f32::NAN; m * e];
            selective_scan(case.params(), case.inputs(), &mut segments, &mut y);
            for (i, len) in lens.iter().enumerate() {
                let r = starts[i]..starts[i + 1];
                let mut h: Vec<f64> = init[i].iter().map(|&v| v as f64).collect();
                let want = reference(
                    a,
                    d,
                    e,
                    n,
                    &x[r.start * e..],
                    &delta[r.start * e..],
                    &b[r.start * n..],
                    &c[r.start * n..],
                    &z[r.start * e..],
                    *len,
                    &mut h,
                );
                for (k, w) in want.iter().enumerate() {
                    let got = y[r.start * e + k];
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "e={e} n={n} seg {i}: {got} vs {w}"
                    );
                }
                for (got, w) in states[i].iter().zip(&h) {
                    assert!((*got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()));
                }
            }
        }
    }

    /// A NaN in δ (a broken activation upstream) comes out as NaN in its channel's output,
    /// in every row after it, from both kernels: never a plausible number.
    #[test]
    fn a_nan_delta_stays_nan() {
        let (e, n, rows) = (40usize, 16usize, 3usize);
        let ranges = Ranges {
            a: (0.1, 3.0),
            x: (-2.0, 2.0),
            delta: (-4.0, 1.5),
            z: (0.5, 3.0),
        };
        let mut case = Case::new((e, n, rows), 31, ranges);
        case.delta[5] = f32::NAN;
        let mut state = vec![0.0f32; e * n];
        let mut y = vec![0.0f32; rows * e];
        let segment = ScanSegment {
            rows: 0..rows,
            state: &mut state,
        };
        selective_scan(case.params(), case.inputs(), &mut [segment], &mut y);
        for row in 0..rows {
            assert!(y[row * e + 5].is_nan(), "row {row}: {}", y[row * e + 5]);
            assert!(y[row * e + 6].is_finite());
        }
    }

    /// The AVX-512 and AVX2 kernels give the portable body's bits, for whole and partial
    /// blocks, one row (their own loop order) and many, including the exp's clamps (large
    /// Δ·A) and z far in both tails. Each kernel is compared where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_simd_kernels_give_the_portable_bits() {
        let has_avx512 =
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq");
        let has_avx2 =
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if !has_avx2 {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        // One row (the state-index order, `one_row`): mamba-130m's shape, partial vectors,
        // and jobs longer than its chunk of sums; more rows: the block order, with blocks
        // whole, split and partial (`avx2`'s halves of a block at 100 and 120 channels).
        for &(e, n, rows) in &[
            (1536usize, 16usize, 1usize),
            (70, 21, 1),
            (5, 3, 1),
            (4200, 2, 1),
            (40, 16, 3),
            (70, 21, 5),
            (5, 3, 2),
            (100, 16, 4),
            (120, 5, 2),
        ] {
            // δ across softplus's threshold (20) and far below it.
            let ranges = Ranges {
                a: (0.01, 40.0),
                x: (-3.0, 3.0),
                delta: (-30.0, 25.0),
                z: (-100.0, 100.0),
            };
            let case = Case::new((e, n, rows), 21, ranges);
            let init = pseudo(e * n, 28, -2.0, 2.0);
            let (params, inputs) = (case.params(), case.inputs());
            // Two jobs over the channels, the second starting mid-block, and one job holding
            // whole rows (the one-row kernel then takes the state rows in pairs).
            let split = (e / 2).max(1);
            let (halves, whole) = ([0..split, split..e], 0..e);
            for jobs in [&halves[..], std::slice::from_ref(&whole)] {
                let run = |kernel: &dyn Fn(&BlockJob, SendPtr)| {
                    let mut state = init.clone();
                    let mut y = vec![f32::NAN; rows * e];
                    for channels in jobs.iter().cloned() {
                        let job = BlockJob {
                            rows: 0..rows,
                            channels,
                            state: SendPtr(state.as_mut_ptr()),
                        };
                        kernel(&job, SendPtr(y.as_mut_ptr()));
                    }
                    (state, y)
                };
                let portable = run(&|job, y| scan_block_body(&params, &inputs, job, y));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let case = format!("e={e} n={n} rows={rows} jobs={}", jobs.len());
                // SAFETY: the CPU has AVX2 and FMA (checked above); each job owns its cells.
                let avx2 = run(&|job, y| unsafe { avx2::scan_block(&params, &inputs, job, y) });
                assert_eq!(bits(&avx2.0), bits(&portable.0), "AVX2 state, {case}");
                assert_eq!(bits(&avx2.1), bits(&portable.1), "AVX2 y, {case}");
                if has_avx512 {
                    // SAFETY: the CPU has AVX-512F and DQ (checked above).
                    let avx512 =
                        run(&|job, y| unsafe { avx512::scan_block(&params, &inputs, job, y) });
                    assert_eq!(bits(&avx512.0), bits(&portable.0), "AVX-512 state, {case}");
                    assert_eq!(bits(&avx512.1), bits(&portable.1), "AVX-512 y, {case}");
                }
            }
        }
    }
}
