//! fla's `ShortConvolution` (`fla/modules/conv/short_conv.py`): a causal depthwise conv with
//! an optional SiLU, run per session over its rows with a rolling window kept in the session
//! state (`shared/SPEC-MODELS.md` §3.0).

use std::ops::Range;

use tideway_kernels::matmul::MatRef;
use tideway_kernels::{StateBuffer, Weight};

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::segments::CausalConv;

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

    pub fn new_window(&self) -> StateBuffer {
        StateBuffer::zeroed(self.channels * self.kernel)
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
        windows: &mut [&mut StateBuffer],
    ) {
        let conv = CausalConv {
            weight: self.weight.as_slice(),
            kernel: self.kernel,
            bias: self.bias.as_ref().map(Weight::as_slice),
            silu: self.silu,
        };
        let m = segments.last().map_or(0, |s| s.end);
        let windows = windows.iter_mut().map(|w| &mut w[..]).collect();
        conv.run(
            MatRef::dense(input, m, self.channels),
            segments,
            windows,
            out,
        );
    }
}
