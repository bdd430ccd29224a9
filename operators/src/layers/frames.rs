//! Frame streams of several sessions packed together, and the stages of a streaming
//! convolutional front end that need to look ahead: a non-causal `Conv1d(k = 3, padding = 1)`
//! and the one-frame delay that keeps a residual aligned with it.
//!
//! A non-causal convolution's output for frame `t` needs frame `t + 1`, so in a stream it is
//! emitted one frame late; at the end of the stream the last output is emitted with the zero
//! padding the whole-clip convolution sees. Feeding a clip in any chunking therefore gives the
//! same frames as the whole clip at once.

use std::ops::Range;

use tideway_kernels::Weight;
use tideway_kernels::matmul::{Linear, MatRef};

use crate::error::LoadError;
use crate::state_dict::StateDict;
use crate::state_tensors::{StateError, StateTensors};

/// Rows of several sessions, `width` values each; session `i` owns the next `counts[i]` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub data: Vec<f32>,
    pub width: usize,
    pub counts: Vec<usize>,
}

impl Frames {
    pub fn rows(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Each session's row range.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.counts
            .iter()
            .map(|&n| {
                start += n;
                start - n..start
            })
            .collect()
    }

    /// The same sessions with the rows of `f` applied to all of them (a per-row layer).
    pub fn map_data(self, data: Vec<f32>, width: usize) -> Frames {
        debug_assert_eq!(data.len(), self.rows() * width);
        Frames {
            data,
            width,
            counts: self.counts,
        }
    }

    /// A linear layer on every row (one GEMM over all sessions' rows).
    pub fn linear(&self, layer: &Linear) -> Frames {
        let m = self.rows();
        let mut out = vec![0.0f32; m * layer.out_features()];
        layer.forward(MatRef::dense(&self.data, m, self.width), &mut out);
        Frames {
            data: out,
            width: layer.out_features(),
            counts: self.counts.clone(),
        }
    }
}

/// The last two frames a [`FrameConv`] has seen in one stream, its left zero padding
/// included: a fresh window holds one zero frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvWindow {
    frames: Vec<f32>,
    filled: usize,
}

impl ConvWindow {
    pub fn new(channels: usize) -> Self {
        ConvWindow {
            frames: vec![0.0; 2 * channels],
            filled: 1,
        }
    }

    pub fn size_bytes(&self) -> usize {
        4 * self.frames.len()
    }

    /// Writes the window as `{name}.frames` and `{name}.filled`.
    pub fn export(&self, name: &str, out: &mut StateTensors) {
        out.put_f32(format!("{name}.frames"), &self.frames);
        out.put_u64(format!("{name}.filled"), self.filled as u64);
    }

    /// Takes the window from `{name}.frames` and `{name}.filled`.
    pub fn import(&mut self, name: &str, from: &StateTensors) -> Result<(), StateError> {
        from.take_f32(&format!("{name}.frames"), &mut self.frames)?;
        self.filled = (from.u64(&format!("{name}.filled"))? as usize).min(2);
        Ok(())
    }
}

/// `Conv1d(c_in, c_out, kernel_size = 3, padding = 1, bias = False)` over frame streams.
#[derive(Debug, Clone)]
pub struct FrameConv {
    /// The kernel as a linear layer on `[x_{t−1}, x_t, x_{t+1}]` (3·c_in inputs).
    pub(crate) taps: Linear,
    pub(crate) c_in: usize,
}

impl FrameConv {
    /// PyTorch's `weight` `[c_out, c_in, 3]` at `name`.
    pub fn load(
        dict: &StateDict,
        name: &str,
        c_in: usize,
        c_out: usize,
    ) -> Result<Self, LoadError> {
        let w = dict.load(name, &[c_out, c_in, 3])?;
        let w = w.as_slice();
        // Input index j·c_in + i of the unrolled window takes weight[o, i, j].
        let mut unrolled = vec![0.0f32; c_out * 3 * c_in];
        for o in 0..c_out {
            for i in 0..c_in {
                for j in 0..3 {
                    unrolled[o * 3 * c_in + j * c_in + i] = w[(o * c_in + i) * 3 + j];
                }
            }
        }
        let weight = Weight::from_vec(unrolled, &[c_out, 3 * c_in]).expect("shape");
        let taps = Linear::from_torch(&weight, None).expect("shape");
        Ok(FrameConv { taps, c_in })
    }

    pub fn out_channels(&self) -> usize {
        self.taps.out_features()
    }

    pub fn size_bytes(&self) -> usize {
        self.taps.size_bytes()
    }

    /// Feeds each session's new frames; emits every output whose right neighbour has arrived,
    /// and for sessions that `end`, the last one with zero padding.
    pub fn forward(&self, windows: &mut [&mut ConvWindow], x: &Frames, ends: &[bool]) -> Frames {
        let c = self.c_in;
        assert_eq!(x.width, c);
        let mut unrolled: Vec<f32> = Vec::with_capacity((x.rows() + windows.len()) * 3 * c);
        let mut counts = Vec::with_capacity(windows.len());
        for ((window, rows), &end) in windows.iter_mut().zip(x.ranges()).zip(ends) {
            let before = unrolled.len();
            for t in rows {
                let frame = &x.data[t * c..(t + 1) * c];
                if window.filled == 2 {
                    unrolled.extend_from_slice(&window.frames);
                    unrolled.extend_from_slice(frame);
                    window.frames.copy_within(c.., 0);
                } else {
                    window.filled = 2;
                }
                window.frames[c..].copy_from_slice(frame);
            }
            if end && window.filled == 2 {
                unrolled.extend_from_slice(&window.frames);
                unrolled.resize(unrolled.len() + c, 0.0);
                window.filled = 0;
            }
            counts.push((unrolled.len() - before) / (3 * c));
        }
        let m = unrolled.len() / (3 * c);
        let mut out = vec![0.0f32; m * self.out_channels()];
        self.taps
            .forward(MatRef::dense(&unrolled, m, 3 * c), &mut out);
        Frames {
            data: out,
            width: self.out_channels(),
            counts,
        }
    }
}

/// Delays a stream by one frame (and releases the held frame at the end), so that a residual
/// lines up with the output of a [`FrameConv`] over the same stream.
pub fn delay_one_frame(held: &mut [&mut Option<Vec<f32>>], x: &Frames, ends: &[bool]) -> Frames {
    let c = x.width;
    let mut data = Vec::with_capacity(x.data.len() + held.len() * c);
    let mut counts = Vec::with_capacity(held.len());
    for ((slot, rows), &end) in held.iter_mut().zip(x.ranges()).zip(ends) {
        let before = data.len();
        for t in rows {
            let frame = &x.data[t * c..(t + 1) * c];
            if let Some(previous) = slot.replace(frame.to_vec()) {
                data.extend_from_slice(&previous);
            }
        }
        if end && let Some(last) = slot.take() {
            data.extend_from_slice(&last);
        }
        counts.push((data.len() - before) / c);
    }
    Frames {
        data,
        width: c,
        counts,
    }
}
