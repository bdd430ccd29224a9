//! The sensor front end: multichannel f32 frames, standardised per channel and optionally cut
//! into patches (PatchTST-style: `patch_len` frames every `stride` frames, flattened
//! frame-major into one feature row of `patch_len · channels` values), streaming with the
//! frames of the unfinished patch carried over. Configured by a model's `config.json`:
//! `"frontend": {"kind": "sensor", "channels": C, "patch_len": 1, "stride": 1,
//! "mean": [C values], "std": [C values]}` (patching and standardisation optional).

use crate::error::LoadError;
use crate::models::config::ConfigJson;
use crate::state_tensors::{StateError, StateTensors};

/// Sensor frames that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum SensorError {
    #[error("sensor frames have {found} channels; the model takes {expected}")]
    Channels { expected: usize, found: usize },
    #[error("{values} values are not a whole number of {channels}-channel frames")]
    Ragged { values: usize, channels: usize },
    #[error("frame {frame}, channel {channel} is NaN or infinite; sensor values must be finite")]
    NonFinite { frame: usize, channel: usize },
    #[error("the stream has ended; start a new one to send more frames")]
    Ended,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SensorFrontend {
    channels: usize,
    patch_len: usize,
    stride: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// One stream's frames of the unfinished patch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorStream {
    pending: Vec<f32>,
    /// Frames still to skip before the next patch starts (stride > patch_len).
    skip: usize,
    frames_seen: usize,
    ended: bool,
}

impl SensorStream {
    /// Writes the frames of the unfinished patch and the stride's position.
    pub fn export(&self, out: &mut StateTensors) {
        out.put_f32("frontend.sensor.pending", &self.pending);
        out.put_u64("frontend.sensor.skip", self.skip as u64);
        out.put_u64("frontend.sensor.frames_seen", self.frames_seen as u64);
        out.put_u64("frontend.sensor.ended", self.ended as u64);
    }

    /// The stream whose carry-over [`export`](Self::export) wrote.
    pub fn import(from: &StateTensors) -> Result<Self, StateError> {
        Ok(SensorStream {
            pending: from.f32s("frontend.sensor.pending")?.to_vec(),
            skip: from.u64("frontend.sensor.skip")? as usize,
            frames_seen: from.u64("frontend.sensor.frames_seen")? as usize,
            ended: from.u64("frontend.sensor.ended")? != 0,
        })
    }
}

impl SensorFrontend {
    pub fn new(
        channels: usize,
        patch_len: usize,
        stride: usize,
        mean: Option<Vec<f32>>,
        std: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        if channels == 0 || patch_len == 0 || stride == 0 {
            return Err("channels, patch_len and stride must be positive".into());
        }
        let mean = mean.unwrap_or_else(|| vec![0.0; channels]);
        let std = std.unwrap_or_else(|| vec![1.0; channels]);
        if mean.len() != channels || std.len() != channels {
            return Err(format!(
                "mean and std need {channels} values (one per channel), found {} and {}",
                mean.len(),
                std.len()
            ));
        }
        if std.iter().any(|&s| s <= 0.0 || !s.is_finite()) || mean.iter().any(|m| !m.is_finite()) {
            return Err("std values must be positive and mean values finite".into());
        }
        Ok(SensorFrontend {
            channels,
            patch_len,
            stride,
            mean,
            inv_std: std.iter().map(|s| 1.0 / s).collect(),
        })
    }

    /// `frontend` of kind `sensor` in `config.json`, if that is what it holds.
    pub fn load(config: &ConfigJson) -> Result<Option<Self>, LoadError> {
        if !config.has("frontend") {
            return Ok(None);
        }
        let f = config.section("frontend")?;
        if f.str_opt("kind")? != Some("sensor") {
            return Ok(None);
        }
        let floats = |key: &str| -> Result<Option<Vec<f32>>, LoadError> {
            match f.f64_list_opt(key)? {
                None => Ok(None),
                Some(v) => Ok(Some(v.into_iter().map(|x| x as f32).collect())),
            }
        };
        let patch_len = f.usize_opt("patch_len")?.unwrap_or(1);
        Self::new(
            f.usize_req("channels")?,
            patch_len,
            f.usize_opt("stride")?.unwrap_or(patch_len),
            floats("mean")?,
            floats("std")?,
        )
        .map(Some)
        .map_err(|reason| config.malformed(format!("frontend: {reason}")))
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Width of a feature row (`patch_len · channels`).
    pub fn feature_width(&self) -> usize {
        self.patch_len * self.channels
    }

    /// Feeds frames (`[n, channels]` row-major); returns the feature rows now complete.
    pub fn push(
        &self,
        stream: &mut SensorStream,
        frames: &[f32],
        width: usize,
        end: bool,
    ) -> Result<Vec<f32>, SensorError> {
        let c = self.channels;
        if stream.ended {
            return Err(SensorError::Ended);
        }
        if width != c {
            return Err(SensorError::Channels {
                expected: c,
                found: width,
            });
        }
        if !frames.len().is_multiple_of(c) {
            return Err(SensorError::Ragged {
                values: frames.len(),
                channels: c,
            });
        }
        if let Some(i) = frames.iter().position(|v| !v.is_finite()) {
            return Err(SensorError::NonFinite {
                frame: stream.frames_seen + i / c,
                channel: i % c,
            });
        }
        stream.frames_seen += frames.len() / c;
        stream.ended = end;
        for frame in frames.chunks_exact(c) {
            if stream.skip > 0 {
                stream.skip -= 1;
                continue;
            }
            stream.pending.extend(
                frame
                    .iter()
                    .zip(&self.mean)
                    .zip(&self.inv_std)
                    .map(|((x, m), s)| (x - m) * s),
            );
        }
        let mut out = Vec::new();
        let patch = self.patch_len * c;
        while stream.pending.len() >= patch {
            out.extend_from_slice(&stream.pending[..patch]);
            let step = self.stride.min(self.patch_len) * c;
            stream.pending.drain(..step);
            stream.skip += self.stride.saturating_sub(self.patch_len);
            // Frames to skip that are already pending.
            let drop = (stream.skip * c).min(stream.pending.len());
            stream.pending.drain(..drop);
            stream.skip -= drop / c;
        }
        // A trailing partial patch is dropped at the end, as unfold-based patching does.
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patches of a whole series by their definition: rows k·stride .. k·stride + patch_len.
    fn reference(x: &[f32], c: usize, p: usize, s: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
        let n = x.len() / c;
        let mut out = Vec::new();
        let mut start = 0;
        while start + p <= n {
            for t in start..start + p {
                for ch in 0..c {
                    out.push((x[t * c + ch] - mean[ch]) / std[ch]);
                }
            }
            start += s;
        }
        out
    }

    #[test]
    fn patches_equal_their_definition_for_any_chunking() {
        let c = 3;
        let x: Vec<f32> = (0..3 * 101)
            .map(|i| ((i * 13 % 29) as f32) - 14.0)
            .collect();
        let (mean, std) = (vec![1.0, -2.0, 0.5], vec![2.0, 4.0, 0.25]);
        for (p, s) in [(1, 1), (4, 4), (8, 3), (3, 5), (16, 16)] {
            let fe = SensorFrontend::new(c, p, s, Some(mean.clone()), Some(std.clone())).unwrap();
            let want = reference(&x, c, p, s, &mean, &std);
            for step in [1usize, 2, 7, 50, 101] {
                let mut stream = SensorStream::default();
                let mut got = Vec::new();
                let chunks: Vec<&[f32]> = x.chunks(step * c).collect();
                for (i, chunk) in chunks.iter().enumerate() {
                    got.extend(
                        fe.push(&mut stream, chunk, c, i + 1 == chunks.len())
                            .unwrap(),
                    );
                }
                let close = got.len() == want.len()
                    && got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs()));
                assert!(close, "patch {p} stride {s} chunks of {step}");
            }
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let fe = SensorFrontend::new(2, 1, 1, None, None).unwrap();
        let mut s = SensorStream::default();
        assert_eq!(
            fe.push(&mut s, &[0.0; 6], 3, false),
            Err(SensorError::Channels {
                expected: 2,
                found: 3
            })
        );
        assert_eq!(
            fe.push(&mut s, &[0.0, 1.0, f32::INFINITY, 2.0], 2, false),
            Err(SensorError::NonFinite {
                frame: 1,
                channel: 0
            })
        );
        assert!(SensorFrontend::new(2, 1, 1, Some(vec![0.0]), None).is_err());
    }
}
