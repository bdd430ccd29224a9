//! Running a per-head recurrence for every (session, head) pair of a packed batch in parallel.
//!
//! Each pair owns its slice of the session's state and writes its outputs into a piece of a
//! buffer of its own (`[rows, dv]`), scattered into the packed `[M, H·dv]` output afterwards:
//! the pairs share nothing, so they run on the rayon pool without locks or unsafe aliasing.

use std::ops::Range;

use rayon::prelude::*;
use tideway_kernels::zeroed::zeroed;

/// One (session, head) job: the session's rows, the head index and its state slices.
pub struct HeadJob<'s> {
    pub rows: Range<usize>,
    pub head: usize,
    pub state: &'s mut [f32],
    /// A second per-head state (linear attention's `z`), possibly empty.
    pub extra: &'s mut [f32],
}

/// Builds the jobs: `states[i]` holds `heads` consecutive slices of `per_head` values (and
/// `extras[i]`, when non-empty, `heads` slices of `extra_per_head`).
pub fn head_jobs<'s>(
    segments: &[Range<usize>],
    states: Vec<(&'s mut [f32], &'s mut [f32])>,
    heads: usize,
    per_head: usize,
    extra_per_head: usize,
) -> Vec<HeadJob<'s>> {
    let mut jobs = Vec::with_capacity(segments.len() * heads);
    for (rows, (state, extra)) in segments.iter().zip(states) {
        // Empty where the heads have no second state (nothing to cut: every head gets `[]`).
        let mut extras = extra.chunks_mut(extra_per_head.max(1));
        for (head, s) in state.chunks_mut(per_head).enumerate().take(heads) {
            jobs.push(HeadJob {
                rows: rows.clone(),
                head,
                state: s,
                extra: extras.next().unwrap_or_default(),
            });
        }
    }
    jobs
}

/// Runs `f(job, out)` for every job (in parallel when there is enough work), where `out` is
/// the job's `[rows, dv]` output, and scatters the outputs into `o` (`[M, heads·dv]`).
///
/// The jobs' outputs are pieces of one buffer, zeroed and scattered by every thread: one
/// buffer a job, each zeroed by `calloc`, and the scatter on the calling thread were ~1.3% of
/// a 512-token DeltaNet prefill (perf, 2026-12-05).
pub fn run_heads<F>(
    jobs: Vec<HeadJob<'_>>,
    heads: usize,
    dv: usize,
    o: &mut [f32],
    work_per_row: usize,
    f: F,
) where
    F: Fn(&mut HeadJob<'_>, &mut [f32]) + Sync,
{
    // Rows of all jobs: each session's rows once for each head.
    let total_rows: usize = jobs.iter().map(|j| j.rows.len()).sum();
    let mut outputs = zeroed(total_rows * dv);
    // (rows, head, where its output starts in `outputs`) of each job, for the scatter.
    let mut pieces = Vec::with_capacity(jobs.len());
    let mut work = Vec::with_capacity(jobs.len());
    let mut rest = &mut outputs[..];
    for job in jobs {
        let (out, tail) = std::mem::take(&mut rest).split_at_mut(job.rows.len() * dv);
        pieces.push((
            job.rows.clone(),
            job.head,
            total_rows * dv - tail.len() - out.len(),
        ));
        work.push((job, out));
        rest = tail;
    }
    let run = |(mut job, out): (HeadJob<'_>, &mut [f32])| f(&mut job, out);
    if work.len() > 1 && total_rows * work_per_row >= 1 << 16 {
        work.into_par_iter().for_each(run);
    } else {
        work.into_iter().for_each(run);
    }
    let heads_width = heads * dv;
    let scatter = |first: usize, o_rows: &mut [f32]| {
        let block_rows = first..first + o_rows.len() / heads_width.max(1);
        for (rows, head, start) in &pieces {
            for t in rows.start.max(block_rows.start)..rows.end.min(block_rows.end) {
                let from = &outputs[start + (t - rows.start) * dv..][..dv];
                o_rows[(t - first) * heads_width + head * dv..][..dv].copy_from_slice(from);
            }
        }
    };
    // Blocks of rows on the pool where a few sessions have many rows (a prefill); each block
    // looks at every job, so a decode step's many one-row jobs stay in one pass.
    if heads_width > 0 && o.len() / heads_width >= 2 * SCATTER_ROWS && pieces.len() <= 64 {
        o.par_chunks_mut(SCATTER_ROWS * heads_width)
            .enumerate()
            .for_each(|(block, o_rows)| scatter(block * SCATTER_ROWS, o_rows));
    } else {
        scatter(0, o);
    }
}

/// Rows of `o` a task of [`run_heads`]'s scatter fills.
const SCATTER_ROWS: usize = 64;
