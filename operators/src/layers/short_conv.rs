//! fla's `ShortConvolution` (`fla/modules/conv/short_conv.py`): a causal depthwise conv with
//! an optional SiLU, run per session over its rows with a rolling window kept in the session
//! state (`shared/SPEC-MODELS.md` §3.0).

use std::ops::Range;

use rayon::prelude::*;

use tideway_kernels::activation::silu_inplace;
use tideway_kernels::conv::{causal_conv1d_seq, causal_conv1d_step};
use tideway_kernels::matmul::MatRef;
use tideway_kernels::{Weight, written_zeros};

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::segments::rows_of;

pub struct ShortConv {
    weight: Weight,
    bias: Option<Weight>,
    pub channels: usize,
    pub kernel: usize,
    silu: bool,
}

impl ShortConv {
    /// Loads `{name}.weight` (`[C, 1, K]`) and, with `bias`, `{name}.bias`.
    pub fn load(
        checkpoint: &Checkpoint,
        name: &str,
        channels: usize,
        kernel: usize,
        bias: bool,
        silu: bool,
    ) -> Result<Self, LoadError> {
        Ok(ShortConv {
            weight: checkpoint.load(&format!("{name}.weight"), &[channels, 1, kernel])?,
            bias: if bias {
                Some(checkpoint.load(&format!("{name}.bias"), &[channels])?)
            } else {
                None
            },
            channels,
            kernel,
            silu,
        })
    }

    pub fn new_window(&self) -> Vec<f32> {
        written_zeros(self.channels * self.kernel)
    }

    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes() + self.bias.as_ref().map_or(0, Weight::size_bytes)
    }

    /// Runs the conv over `input` (`[M, C]`, packed sessions) into `out`, per session.
    pub fn forward(
        &self,
        input: &[f32],
        out: &mut [f32],
        segments: &[Range<usize>],
        windows: &mut [&mut Vec<f32>],
    ) {
        let ch = self.channels;
        let (weight, bias) = (
            self.weight.as_slice(),
            self.bias.as_ref().map(Weight::as_slice),
        );
        let conv = |((rows, window), dst): ((&Range<usize>, &mut &mut Vec<f32>), &mut [f32])| {
            if rows.len() == 1 {
                let x = &input[rows.start * ch..][..ch];
                causal_conv1d_step(x, weight, self.kernel, bias, window, dst);
            } else {
                let src = MatRef::dense(&input[rows.start * ch..rows.end * ch], rows.len(), ch);
                causal_conv1d_seq(src, weight, self.kernel, bias, window, dst);
            }
        };
        let per_segment = segments
            .iter()
            .zip(windows.iter_mut())
            .zip(rows_of(out, segments, ch));
        // Sessions in parallel, as the Mamba mixer's conv (a batch's loop over them on one
        // thread left the other idle).
        if segments.len() > 1 {
            per_segment
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(conv);
        } else {
            per_segment.for_each(conv);
        }
        if self.silu {
            silu_inplace(out);
        }
    }
}
