//! How the SIMD kernels (`avx512.rs`, `avx2.rs`) walk a job's rows, channels and state rows:
//! the order, the lines asked for ahead and the buffers, shared; each kernel passes the
//! arithmetic of a block or a state row in its own registers as a closure (a closure inherits
//! its function's target features and, called once per block, is inlined into this walk).

use std::ops::Range;

use super::{
    BlockJob, CHANNELS, PREFETCH_BLOCKS, ScanInputs, SendPtr, SsmParams, fetch_block, prefetch,
    row_deltas,
};

/// Rows ahead whose `δ`, `x` and `z` a multi-row job asks for, block by block.
const ROWS_AHEAD: usize = 2;

/// One row's inputs and output, each at its channel 0.
pub(super) struct RowInputs<'a> {
    pub b_t: &'a [f32],
    pub c_t: &'a [f32],
    pub delta: *const f32,
    pub x: *const f32,
    pub z: *const f32,
    pub y: *mut f32,
}

impl<'a> RowInputs<'a> {
    fn new(params: &SsmParams<'_>, inputs: &ScanInputs<'a>, row: usize, y: SendPtr) -> Self {
        let (e, n) = (params.channels, params.state_size);
        RowInputs {
            b_t: &inputs.b.data[row * inputs.b.row_stride..][..n],
            c_t: &inputs.c.data[row * inputs.c.row_stride..][..n],
            delta: inputs.delta[row * e..][..e].as_ptr(),
            x: inputs.x[row * e..][..e].as_ptr(),
            z: inputs.z.data[row * inputs.z.row_stride..][..e].as_ptr(),
            y: y.0.wrapping_add(row * e),
        }
    }
}

/// A job of several rows (a prefill chunk's session), row by row and, in each, block by
/// block of [`CHANNELS`]: `block(row, c0, len)` runs the recurrence of channels `c0..c0 +
/// len` of the row, Δ out of softplus and the gated output included. Each block's state
/// and `A` are asked for [`PREFETCH_BLOCKS`] blocks ahead in the first row (later rows find
/// them in L1), each block's `δ`, `x` and `z` [`ROWS_AHEAD`] rows ahead.
#[inline(always)]
pub(super) fn rows_by_blocks(
    params: &SsmParams<'_>,
    inputs: &ScanInputs<'_>,
    job: &BlockJob,
    y: SendPtr,
    mut block: impl FnMut(&RowInputs<'_>, usize, usize),
) {
    for c in 0..PREFETCH_BLOCKS {
        fetch_block(params, job, job.channels.start + c * CHANNELS);
    }
    for row in job.rows.clone() {
        let first_row = row == job.rows.start;
        let r = RowInputs::new(params, inputs, row, y);
        for c0 in job.channels.clone().step_by(CHANNELS) {
            let len = CHANNELS.min(job.channels.end - c0);
            if first_row {
                fetch_block(params, job, c0 + PREFETCH_BLOCKS * CHANNELS);
            }
            fetch_rows_ahead(params, inputs, &r, c0..c0 + len);
            block(&r, c0, len);
        }
    }
}

/// Asks for the lines of `channels` of `δ`, `x` and `z` [`ROWS_AHEAD`] rows after `r`'s
/// (past the job's last row they fall on other jobs' rows or outside: a prefetch never
/// faults). A job's rows of them are a few lines each, `E` floats apart, which the
/// prefetchers did not follow: `perf` put ~10% of the scan's samples on the first load of
/// a block's `x`. `PREFILL=1 examples/scan_step 512`, alternated (Intel Xeon, 2026-12-05):
/// 42.3 / 43.5 / 42.9 → 38.1 / 40.5 / 38.1 ms; 1 or 4 rows ahead the same as 2, the output
/// `y` asked for too (to read or to write) the same.
#[inline(always)]
fn fetch_rows_ahead(
    params: &SsmParams<'_>,
    inputs: &ScanInputs<'_>,
    r: &RowInputs<'_>,
    channels: Range<usize>,
) {
    let (e, z_stride) = (params.channels, inputs.z.row_stride);
    for c in channels.step_by(16) {
        prefetch(r.delta.wrapping_add(c + ROWS_AHEAD * e));
        prefetch(r.x.wrapping_add(c + ROWS_AHEAD * e));
        prefetch(r.z.wrapping_add(c + ROWS_AHEAD * z_stride));
    }
}

/// Channels whose sums and Δ a one-row job keeps at a time (16 KiB on the stack).
const ROW_CHUNK: usize = 2048;

/// What a kernel's state-row pass reads of a one-row job's chunk of channels.
pub(super) struct ChunkRows<'a> {
    /// The first of the state rows.
    pub k: usize,
    pub e: usize,
    pub channels: Range<usize>,
    pub b_t: &'a [f32],
    pub c_t: &'a [f32],
    /// Channel `c`'s Δ, `x` and sum at `dt_row + c`, `x_row + c`, `sums + c`.
    pub dt_row: *const f32,
    pub x_row: *const f32,
    pub sums: *mut f32,
}

/// A one-row job (a decode step's session) state index by state index: for each pair of
/// `k`, `state_rows(rows, 2)` runs the job's channels of the state's rows and of `A`'s, front
/// to back, the sums waiting in a stack buffer (`state_rows(rows, 1)` one row, where the job
/// holds part of the rows or `N` is odd); then `outputs(row, channels, sums)` writes the
/// gated outputs from the sums (`sums + c` for channel `c`). The `[N, E]` state and `A` are
/// then read as two sequential streams each, which the prefetchers follow, where the
/// channel-block order reads N lines `E` floats apart per block. Each cell's operations and
/// each sum's order (`k` ascending) are the block order's: the same bits.
#[inline(always)]
pub(super) fn one_row_by_state_rows(
    params: &SsmParams<'_>,
    inputs: &ScanInputs<'_>,
    job: &BlockJob,
    y: SendPtr,
    mut state_rows: impl FnMut(&ChunkRows<'_>, usize),
    mut outputs: impl FnMut(&RowInputs<'_>, Range<usize>, *const f32),
) {
    let (e, n) = (params.channels, params.state_size);
    let row = job.rows.start;
    let r = RowInputs::new(params, inputs, row, y);
    let (mut sums, mut deltas) = ([0.0f32; ROW_CHUNK], [0.0f32; ROW_CHUNK]);
    for c_start in job.channels.clone().step_by(ROW_CHUNK) {
        let c_end = (c_start + ROW_CHUNK).min(job.channels.end);
        let sums = &mut sums[..c_end - c_start];
        sums.fill(0.0);
        row_deltas(inputs, e, row, c_start..c_end, &mut deltas);
        // Channel `c`'s Δ and sum at `dt_row + c` and `sums_row + c`: the pointers sit before
        // their buffers, and offsets from them wrap.
        let dt_row = deltas.as_ptr().wrapping_sub(c_start);
        let sums_row = sums.as_mut_ptr().wrapping_sub(c_start);
        let whole_rows = job.channels.len() == e;
        let mut k = 0;
        while k < n {
            let rows = ChunkRows {
                k,
                e,
                channels: c_start..c_end,
                b_t: r.b_t,
                c_t: r.c_t,
                dt_row,
                x_row: r.x,
                sums: sums_row,
            };
            // Pairs where the job holds whole rows (a long stream per state row); a short
            // job's rows one at a time (alternated at one session, pairs read batch 1 in 5
            // of 6 rounds ~2% slower).
            let pair = whole_rows && k + 1 < n;
            let count = if pair { 2 } else { 1 };
            state_rows(&rows, count);
            k += count;
        }
        outputs(&r, c_start..c_end, sums_row);
    }
}
