//! A packed batch's rows cut per session, and the per-session work that runs on them in
//! parallel: the causal conv, each session continuing its own window.

use std::ops::Range;

use rayon::prelude::*;
use tideway_kernels::activation::{silu_inplace, silu_slice};
use tideway_kernels::conv::{causal_conv1d_seq, causal_conv1d_step};
use tideway_kernels::matmul::MatRef;

/// `data`'s rows (`width` values each) cut at the segments' bounds, one slice a segment
/// (segments lie back to back from row 0, in order, as the models' `forward` takes them).
fn rows_of<'d>(
    mut data: &'d mut [f32],
    segments: &[Range<usize>],
    width: usize,
) -> Vec<&'d mut [f32]> {
    let mut next = 0;
    segments
        .iter()
        .map(|rows| {
            assert_eq!(rows.start, next, "segments lie back to back from row 0");
            next = rows.end;
            let (segment, rest) = std::mem::take(&mut data).split_at_mut(rows.len() * width);
            data = rest;
            segment
        })
        .collect()
}

/// A causal depthwise conv's parameters (`weight` `[C, K]`, `bias` `[C]`), run over a packed
/// batch by [`CausalConv::run`]: Mamba's conv and fla's short convolutions.
#[derive(Clone, Copy, Debug)]
pub struct CausalConv<'a> {
    pub weight: &'a [f32],
    pub kernel: usize,
    pub bias: Option<&'a [f32]>,
    /// SiLU on the output (Mamba's conv activation; fla's `ShortConvolution(activation="silu")`).
    pub silu: bool,
}

impl CausalConv<'_> {
    /// Session `i` owns rows `segments[i]` of `x` (`M × C`) and continues `windows[i]`
    /// (`[C, K]`); its outputs go to the same rows of `out` (dense `[M, C]`). One row is a
    /// step, more a sequence. Sessions run in parallel: at batch 32 a loop over them on one
    /// thread was 4% of a Mamba step, the other thread idle meanwhile. Each session's task
    /// also applies the SiLU to its rows while they are in L1 (a pass of its own was one more
    /// hand-off of the pool a layer); one session's rows (a prefill chunk) take it in parallel
    /// after the conv.
    pub fn run(
        &self,
        x: MatRef<'_>,
        segments: &[Range<usize>],
        windows: Vec<&mut [f32]>,
        out: &mut [f32],
    ) {
        let c = x.cols;
        assert_eq!(windows.len(), segments.len());
        let silu_per_session = self.silu && segments.len() > 1;
        let conv = |((rows, window), dst): ((&Range<usize>, &mut [f32]), &mut [f32])| {
            let data = &x.data[rows.start * x.row_stride..];
            if rows.len() == 1 {
                causal_conv1d_step(&data[..c], self.weight, self.kernel, self.bias, window, dst);
            } else {
                let rows = MatRef {
                    data,
                    rows: rows.len(),
                    ..x
                };
                causal_conv1d_seq(rows, self.weight, self.kernel, self.bias, window, dst);
            }
            if silu_per_session {
                silu_slice(dst);
            }
        };
        let per_segment = segments.iter().zip(windows).zip(rows_of(out, segments, c));
        if segments.len() > 1 {
            per_segment
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(conv);
        } else {
            per_segment.for_each(conv);
            if self.silu {
                let rows = segments.first().map_or(0, |s| s.end);
                silu_inplace(&mut out[..rows * c]);
            }
        }
    }
}
