//! What fla's token mixers (GLA / RetNet, DeltaNet, Gated DeltaNet, linear attention; one file
//! each) have in common: one session's state in one layer, and the trait the model's blocks
//! call them through.

use std::ops::Range;

use tideway_kernels::StateBuffer;
use tideway_kernels::matmul::MatRef;

use super::graphs::HeadMixing;
use crate::layers::qkv::Qkv;

/// One session's state in one fla layer: the short convs' windows for q, k and v (empty
/// without them), the matrix state `S` (`[H, dk, dv]`; `[H, f, dv]` over a feature map of
/// width f) and linear attention's normaliser `z` (`[H, f]`; empty for the others).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlaLayerState {
    pub conv: [StateBuffer; 3],
    pub s: StateBuffer,
    pub z: StateBuffer,
}

impl FlaLayerState {
    /// A fresh state: `qkv`'s conv windows, zero `S` of `s` values and `z` of `z` values.
    pub fn new(qkv: &Qkv, s: usize, z: usize) -> Self {
        FlaLayerState {
            conv: qkv.new_windows(),
            s: StateBuffer::zeroed(s),
            z: StateBuffer::zeroed(z),
        }
    }

    pub fn size_bytes(&self) -> usize {
        4 * (self.s.len() + self.z.len() + self.conv.iter().map(|w| w.len()).sum::<usize>())
    }
}

impl crate::state_tensors::LayerFields for FlaLayerState {
    fn fields(&self) -> Vec<(&'static str, &[f32])> {
        let [q, k, v] = &self.conv;
        vec![
            ("conv_q", q),
            ("conv_k", k),
            ("conv_v", v),
            ("s", &self.s),
            ("z", &self.z),
        ]
    }

    fn fields_mut(&mut self) -> Vec<(&'static str, &mut [f32])> {
        let [q, k, v] = &mut self.conv;
        vec![
            ("conv_q", q),
            ("conv_k", k),
            ("conv_v", v),
            ("s", &mut self.s),
            ("z", &mut self.z),
        ]
    }
}

/// The (`S`, `z`) pair of each session, as the head kernels take them.
pub(crate) fn matrices<'a>(
    states: &'a mut [&mut FlaLayerState],
) -> Vec<(&'a mut [f32], &'a mut [f32])> {
    states
        .iter_mut()
        .map(|s| (&mut s.s[..], &mut s.z[..]))
        .collect()
}

/// q, k and v of the packed rows `x`, advancing each session's conv windows.
pub(crate) fn project(
    qkv: &Qkv,
    x: MatRef<'_>,
    segments: &[Range<usize>],
    states: &mut [&mut FlaLayerState],
) -> [Vec<f32>; 3] {
    let mut windows: Vec<&mut [StateBuffer; 3]> = states.iter_mut().map(|s| &mut s.conv).collect();
    qkv.forward(x, segments, &mut windows)
}

/// An fla token mixer: one layer's recurrence over a packed batch.
pub(crate) trait TokenMixer: Send + Sync {
    /// A fresh session's state for this layer.
    fn new_state(&self) -> FlaLayerState;

    /// Bytes of the layer's parameters.
    fn weight_bytes(&self) -> usize;

    /// Session `i` owns rows `segments[i]` of `u` (`[M, D]`), the first of them at position
    /// `starts[i]` of its sequence (RoPE reads it); the mixer's output goes to `out`
    /// (`[M, D]`).
    fn forward(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        starts: &[usize],
        states: &mut [&mut FlaLayerState],
        out: &mut [f32],
    );

    /// The layer's heads over the input `u` (`[T, D]`) from a fresh state, as the pruner reads
    /// them (`graphs.rs`), where built.
    fn head_mixing<'a>(&'a self, _u: &[f32]) -> Option<Box<dyn HeadMixing + 'a>> {
        None
    }
}
