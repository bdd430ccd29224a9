//! The multi-step leaky integrate-and-fire neuron of the spiking LMUFormer: spikingjelly
//! 0.0.0.0.14's `MultiStepLIFNode(tau, v_threshold, v_reset = 0, decay_input = True)`
//! (`shared/SPEC-MODELS.md` §4.3). Time is the frame axis; each channel keeps its membrane
//! across frames (and across the chunks of a stream).
//!
//! ```text
//! H_t = V_{t−1} + (X_t − V_{t−1}) / τ        charge
//! S_t = 1[H_t ≥ V_th]                        fire
//! V_t = H_t · (1 − S_t)                      hard reset to 0
//! ```

use std::collections::BTreeMap;

use crate::layers::frames::Frames;

/// One LIF population's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lif {
    pub tau: f32,
    pub threshold: f32,
}

impl Lif {
    /// Runs `rows` frames of `membrane.len()` channels in time order: reads `values`
    /// (`[rows, C]`) and overwrites them with the spikes (0.0 or 1.0), updating the membrane.
    pub fn fire(&self, membrane: &mut [f32], values: &mut [f32]) {
        let c = membrane.len();
        debug_assert_eq!(values.len() % c.max(1), 0);
        for frame in values.chunks_exact_mut(c) {
            for (v, x) in membrane.iter_mut().zip(frame.iter_mut()) {
                // Same operations, same order as spikingjelly's charge: v + (x − v) / τ.
                let h = *v + (*x - *v) / self.tau;
                let spike = h >= self.threshold;
                *v = if spike { 0.0 } else { h };
                *x = if spike { 1.0 } else { 0.0 };
            }
        }
    }
}

/// One LIF population of a model: its constants, its name in the reference (for spike logs)
/// and the slot of its membranes in each session's [`Membranes`].
#[derive(Debug, Clone)]
pub struct LifLayer {
    pub name: String,
    pub lif: Lif,
    pub slot: usize,
    pub channels: usize,
}

/// Allocates membrane slots while a model loads.
#[derive(Debug, Clone, Default)]
pub struct LifRegistry {
    channels: Vec<usize>,
    /// Each population's name in the reference, by slot.
    names: Vec<String>,
}

impl LifRegistry {
    pub fn add(&mut self, name: impl Into<String>, lif: Lif, channels: usize) -> LifLayer {
        let name = name.into();
        self.channels.push(channels);
        self.names.push(name.clone());
        LifLayer {
            name,
            lif,
            slot: self.channels.len() - 1,
            channels,
        }
    }

    /// Channels of each registered population, by slot.
    pub fn channels(&self) -> &[usize] {
        &self.channels
    }

    /// Each registered population's name, by slot.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Fresh (resting, zero) membranes for one session.
    pub fn new_membranes(&self) -> Membranes {
        Membranes {
            values: self.channels.iter().map(|&c| vec![0.0; c]).collect(),
            log: None,
        }
    }
}

/// One session's membranes of every LIF population, and optionally the spikes each one has
/// fired so far (`[frames, channels]` by layer name), for comparing spike trains.
#[derive(Debug, Clone, PartialEq)]
pub struct Membranes {
    pub values: Vec<Vec<f32>>,
    pub log: Option<BTreeMap<String, Vec<f32>>>,
}

impl Membranes {
    pub fn size_bytes(&self) -> usize {
        self.values.iter().map(|v| 4 * v.len()).sum()
    }
}

impl LifLayer {
    /// Fires every session's rows of `x` in place (`x.width == channels`).
    pub fn fire(&self, membranes: &mut [&mut Membranes], x: &mut Frames) {
        assert_eq!(x.width, self.channels);
        let ranges = x.ranges();
        for (m, rows) in membranes.iter_mut().zip(ranges) {
            let values = &mut x.data[rows.start * self.channels..rows.end * self.channels];
            self.lif.fire(&mut m.values[self.slot], values);
            if let Some(log) = &mut m.log {
                log.entry(self.name.clone())
                    .or_default()
                    .extend_from_slice(values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fires_and_resets_per_channel() {
        let lif = Lif {
            tau: 2.0,
            threshold: 1.0,
        };
        let mut membrane = vec![0.0f32; 2];
        // Channel 0 gets 1.5 each frame: H = 0.75 (no spike), then 0.75 + 0.375 = 1.125 (spike,
        // reset), then 0.75 again. Channel 1 gets 2.0: H = 1.0 fires at equality.
        let mut x = vec![1.5, 2.0, 1.5, 0.0, 1.5, 2.0];
        lif.fire(&mut membrane, &mut x);
        assert_eq!(x, vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(membrane, vec![0.75, 0.0]);
    }
}
