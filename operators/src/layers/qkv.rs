//! The q/k/v input end shared by fla's attention layers: three projections, each optionally
//! followed by a `ShortConvolution`, and the SiLUs each family applies (in the conv, or on
//! the projection when the layer has no convs).

use std::ops::Range;

use tideway_kernels::StateBuffer;
use tideway_kernels::activation::silu_inplace;
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::short_conv::ShortConv;

#[derive(Debug, Clone, Copy)]
pub struct QkvShape {
    pub d_model: usize,
    /// Output widths of q_proj, k_proj, v_proj.
    pub widths: [usize; 3],
    pub short_conv: bool,
    pub conv_size: usize,
    pub conv_bias: bool,
    /// SiLU inside each conv (q, k, v), when the layer has convs.
    pub conv_silu: [bool; 3],
    /// SiLU on each projection, when the layer has no convs.
    pub plain_silu: [bool; 3],
}

pub struct Qkv {
    shape: QkvShape,
    projections: [Linear; 3],
    convs: Option<[ShortConv; 3]>,
}

impl Qkv {
    /// Loads `{prefix}{q,k,v}_proj.weight` and, with short convs, `{prefix}{q,k,v}_conv1d.*`.
    pub fn load(checkpoint: &Checkpoint, prefix: &str, shape: QkvShape) -> Result<Self, LoadError> {
        let names = ["q", "k", "v"];
        let load = |i: usize| {
            let name = format!("{prefix}{}_proj.weight", names[i]);
            checkpoint.load_linear(&name, None, shape.widths[i], shape.d_model)
        };
        let conv = |i: usize| {
            let name = format!("{prefix}{}_conv1d", names[i]);
            let (width, silu) = (shape.widths[i], shape.conv_silu[i]);
            ShortConv::load(
                checkpoint,
                &name,
                width,
                shape.conv_size,
                shape.conv_bias,
                silu,
            )
        };
        Ok(Qkv {
            projections: [load(0)?, load(1)?, load(2)?],
            convs: if shape.short_conv {
                Some([conv(0)?, conv(1)?, conv(2)?])
            } else {
                None
            },
            shape,
        })
    }

    /// Fresh conv windows for one session (empty without convs).
    pub fn new_windows(&self) -> [StateBuffer; 3] {
        match &self.convs {
            Some(convs) => convs.each_ref().map(ShortConv::new_window),
            None => Default::default(),
        }
    }

    pub fn size_bytes(&self) -> usize {
        self.projections
            .iter()
            .map(Linear::size_bytes)
            .sum::<usize>()
            + self
                .convs
                .as_ref()
                .map_or(0, |c| c.iter().map(ShortConv::size_bytes).sum())
    }

    /// q, k, v for the packed rows `x`; session `i` owns rows `segments[i]` and the conv
    /// windows `windows[i]` (unused without convs).
    pub fn forward(
        &self,
        x: MatRef<'_>,
        segments: &[Range<usize>],
        windows: &mut [&mut [StateBuffer; 3]],
    ) -> [Vec<f32>; 3] {
        // Each projection into a buffer its product writes once (`forward_new`: a zeroed one
        // would cost a pass over it, 1.5 MB a projection for a 512-row chunk of a 130m-shaped
        // model); the conv's output is written whole too, but by the conv.
        std::array::from_fn(|i| {
            let mut projected = self.projections[i].forward_new(x);
            match &self.convs {
                Some(convs) => {
                    let mut values = zeroed(projected.len());
                    let mut w: Vec<&mut StateBuffer> =
                        windows.iter_mut().map(|s| &mut s[i]).collect();
                    convs[i].forward(&projected, &mut values, segments, &mut w);
                    values
                }
                None => {
                    if self.shape.plain_silu[i] {
                        silu_inplace(&mut projected);
                    }
                    projected
                }
            }
        })
    }
}
