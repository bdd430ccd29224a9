//! A packed batch's rows cut per session, and the per-session work that runs on them in
//! parallel: the causal conv, each session continuing its own window.

use std::ops::Range;

use rayon::prelude::*;
use tideway_kernels::activation::{silu_inplace, silu_slice};
use tideway_kernels::conv::{causal_conv1d_seq, causal_conv1d_step, window_before};
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
    /// also applies the SiLU to its rows (a pass of its own was one more hand-off of the pool
    /// a layer): a step's after the conv, while in L1, several rows' in the conv's registers
    /// before they are stored. One session's rows (a prefill chunk) are cut in runs of rows
    /// that run in parallel (`CausalConv::run_sequence`).
    pub fn run(
        &self,
        x: MatRef<'_>,
        segments: &[Range<usize>],
        windows: Vec<&mut [f32]>,
        out: &mut [f32],
    ) {
        let c = x.cols;
        assert_eq!(windows.len(), segments.len());
        if let ([rows], [_]) = (segments, &windows[..])
            && rows.len() >= 2 * SEQUENCE_ROWS_PER_TASK
            && c > 0
        {
            let window = windows.into_iter().next().expect("one window");
            let rows = MatRef {
                data: &x.data[rows.start * x.row_stride..],
                rows: rows.len(),
                ..x
            };
            return self.run_sequence(rows, window, &mut out[..rows.rows * c]);
        }
        // A step's SiLU in its session's task where sessions run in parallel.
        let silu_per_step = self.silu && segments.len() > 1;
        let conv = |((rows, window), dst): ((&Range<usize>, &mut [f32]), &mut [f32])| {
            let data = &x.data[rows.start * x.row_stride..];
            if rows.len() == 1 {
                causal_conv1d_step(&data[..c], self.weight, self.kernel, self.bias, window, dst);
                if silu_per_step {
                    silu_slice(dst);
                }
            } else {
                let rows = MatRef {
                    data,
                    rows: rows.len(),
                    ..x
                };
                causal_conv1d_seq(
                    rows,
                    self.weight,
                    self.kernel,
                    self.bias,
                    self.silu,
                    window,
                    dst,
                );
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
            // One session's step: its SiLU on the pool (several rows took it in the conv).
            if self.silu && segments.first().is_some_and(|s| s.len() == 1) {
                silu_inplace(&mut out[..c]);
            }
        }
    }

    /// One session's rows `x` (`T × C`, a prefill chunk) continuing `window`, in runs of rows
    /// on every thread: each run starts from a window of the `K` inputs before its first row
    /// (the session's window, then `x`'s own rows), and the session's next window is the `K`
    /// inputs before row `T`, built the same way. Every output is the
    /// serial kernel's, the same operations in the same order: the same bits. Each run's
    /// conv also takes the SiLU of its outputs before storing them. On one thread the conv
    /// was 3.5% of a 512-token mamba-130m prefill, the other thread idle meanwhile.
    fn run_sequence(&self, x: MatRef<'_>, window: &mut [f32], out: &mut [f32]) {
        let (t_len, c, k) = (x.rows, x.cols, self.kernel);
        let threads = rayon::current_num_threads();
        let per_task = t_len.div_ceil(4 * threads).max(SEQUENCE_ROWS_PER_TASK);
        let before: &[f32] = window;
        out.par_chunks_mut(per_task * c)
            .enumerate()
            .for_each(|(task, dst)| {
                let start = task * per_task;
                let rows = dst.len() / c;
                let mut run_window = window_before(x, before, k, start);
                let run = MatRef {
                    data: &x.data[start * x.row_stride..],
                    rows,
                    ..x
                };
                causal_conv1d_seq(
                    run,
                    self.weight,
                    k,
                    self.bias,
                    self.silu,
                    &mut run_window,
                    dst,
                );
            });
        // The last K inputs: the session's next window.
        let next = window_before(x, before, k, t_len);
        window.copy_from_slice(&next);
    }
}

/// Fewest rows per parallel run of [`CausalConv::run_sequence`]: each run rebuilds a window
/// and the kernel's tap-major weights (`C × K` values each) for `rows × C × K` multiply-adds.
const SEQUENCE_ROWS_PER_TASK: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` values spread over [-1, 1) (a multiplicative hash of the index).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| ((i * 2_654_435_761 + seed * 97) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// One session's sequence, cut in parallel runs, gives the serial kernel's bits: outputs
    /// (with and without SiLU and bias, rows further apart than their width) and the window
    /// left for the next chunk, for lengths that do and do not fill the runs evenly.
    #[test]
    fn a_sequence_in_parallel_runs_gives_the_serial_bits() {
        // 40 channels: the kernel's channels one at a time; 133: two 64-channel register
        // blocks (the SiLU taken there before the store), then five alone.
        for (c, t_len, k, silu, bias) in [
            (40, 32, 4, true, true),
            (40, 33, 4, false, true),
            (40, 100, 3, true, false),
            (40, 513, 4, true, true),
            (40, 70, 2, false, false),
            (133, 64, 4, true, true),
            (133, 100, 3, true, false),
            (133, 33, 4, false, true),
        ] {
            let stride = 2 * c;
            let x = values(t_len * stride, 1);
            let x = MatRef {
                data: &x,
                rows: t_len,
                cols: c,
                row_stride: stride,
            };
            let weight = values(c * k, 2);
            let bias_values = values(c, 3);
            let bias = bias.then_some(&bias_values[..]);
            let start = values(c * k, 4);
            let (mut want, mut want_window) = (vec![0.0f32; t_len * c], start.clone());
            causal_conv1d_seq(x, &weight, k, bias, false, &mut want_window, &mut want);
            if silu {
                silu_slice(&mut want);
            }
            let conv = CausalConv {
                weight: &weight,
                kernel: k,
                bias,
                silu,
            };
            let (mut got, mut got_window) = (vec![f32::NAN; t_len * c], start.clone());
            let one_session = 0..t_len;
            let segments = std::slice::from_ref(&one_session);
            conv.run(x, segments, vec![&mut got_window[..]], &mut got);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let case = format!("C={c} T={t_len} K={k} silu={silu} bias={}", bias.is_some());
            assert_eq!(bits(&got), bits(&want), "outputs, {case}");
            assert_eq!(bits(&got_window), bits(&want_window), "window, {case}");
        }
    }

    /// Sessions packed in one batch (a step, a short sequence, a longer one) each give the
    /// bits of their own serial conv followed by a SiLU pass of its own.
    #[test]
    fn packed_sessions_give_each_sessions_serial_bits() {
        let (c, k) = (133, 4);
        let segments = [0..1, 1..6, 6..46];
        let t_len = 46;
        let x = values(t_len * c, 5);
        let x = MatRef::dense(&x, t_len, c);
        let (weight, bias) = (values(c * k, 6), values(c, 7));
        let starts: Vec<Vec<f32>> = (0..3).map(|s| values(c * k, 8 + s)).collect();
        let mut want = vec![0.0f32; t_len * c];
        let mut want_windows = starts.clone();
        for (rows, window) in segments.iter().zip(&mut want_windows) {
            let part = MatRef {
                data: &x.data[rows.start * c..],
                rows: rows.len(),
                ..x
            };
            let dst = &mut want[rows.start * c..rows.end * c];
            causal_conv1d_seq(part, &weight, k, Some(&bias), false, window, dst);
            silu_slice(dst);
        }
        let conv = CausalConv {
            weight: &weight,
            kernel: k,
            bias: Some(&bias),
            silu: true,
        };
        let mut got = vec![f32::NAN; t_len * c];
        let mut got_windows = starts.clone();
        let windows = got_windows.iter_mut().map(|w| &mut w[..]).collect();
        conv.run(x, &segments, windows, &mut got);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(got_windows, want_windows);
    }
}
