//! Running a per-head recurrence for every (session, head) pair of a packed batch in parallel.
//!
//! Each pair owns its slice of the session's state and writes its outputs into a buffer of
//! its own (`[rows, dv]`), scattered into the packed `[M, H·dv]` output afterwards: the pairs
//! share nothing, so they run on the rayon pool without locks or unsafe aliasing.

use std::ops::Range;

use rayon::prelude::*;

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
        let mut extras: Vec<&'s mut [f32]> = if extra.is_empty() {
            (0..heads).map(|_| <&mut [f32]>::default()).collect()
        } else {
            extra.chunks_mut(extra_per_head).collect()
        };
        for (head, s) in state.chunks_mut(per_head).enumerate().take(heads) {
            jobs.push(HeadJob {
                rows: rows.clone(),
                head,
                state: s,
                extra: std::mem::take(&mut extras[head]),
            });
        }
    }
    jobs
}

/// Runs `f(job, out)` for every job (in parallel when there is enough work), where `out` is
/// the job's `[rows, dv]` output, and scatters the outputs into `o` (`[M, heads·dv]`).
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
    let total_rows: usize = jobs.iter().map(|j| j.rows.len()).sum();
    let run = |mut job: HeadJob<'_>| {
        let mut out = vec![0.0f32; job.rows.len() * dv];
        f(&mut job, &mut out);
        (job.rows, job.head, out)
    };
    let results: Vec<(Range<usize>, usize, Vec<f32>)> =
        if jobs.len() > 1 && total_rows * work_per_row >= 1 << 16 {
            jobs.into_par_iter().map(run).collect()
        } else {
            jobs.into_iter().map(run).collect()
        };
    let heads_width = heads * dv;
    for (rows, head, out) in results {
        for (t, row) in rows.clone().zip(out.chunks_exact(dv)) {
            o[t * heads_width + head * dv..][..dv].copy_from_slice(row);
        }
    }
}
