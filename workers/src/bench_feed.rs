//! What each chunk of a `tideway bench serve` stream carries, chosen from what the model
//! takes (`DescribeModel`): token ids, audio samples or feature frames, drawn from a seeded
//! xorshift so that a load is the same from run to run.

use anyhow::{Result, bail};

use tideway_proto::tideway::v1 as pb;

/// What each chunk of a stream carries, chosen from what the model takes (`DescribeModel`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Feed {
    /// `per_chunk` token ids below `vocab` (a language model).
    Tokens { vocab: u64, per_chunk: usize },
    /// `ms` milliseconds of audio at `rate` Hz, as f32 samples (a model with `audio`).
    Audio { rate: u32, ms: usize },
    /// `per_chunk` frames of `channels` features (a model with `input`, [T, C]).
    Frames { channels: usize, per_chunk: usize },
}

impl Feed {
    /// The feed for `info`'s model: token ids where it has a vocabulary, else audio where it
    /// takes audio, else frames of its `input`'s width.
    pub fn for_model(
        info: &pb::ModelInfo,
        frame: usize,
        audio_ms: usize,
        sample_rate: u32,
    ) -> Result<Feed> {
        if info.vocab_size > 0 {
            return Ok(Feed::Tokens {
                vocab: info.vocab_size,
                per_chunk: frame,
            });
        }
        if info.inputs.iter().any(|t| t.name == "audio") {
            if audio_ms == 0 || sample_rate == 0 {
                bail!("--audio-ms and --sample-rate must be positive");
            }
            return Ok(Feed::Audio {
                rate: sample_rate,
                ms: audio_ms,
            });
        }
        match info
            .inputs
            .iter()
            .find(|t| t.name == "input")
            .map(|t| &t.shape[..])
        {
            Some(&[_, c]) if c > 0 => Ok(Feed::Frames {
                channels: c as usize,
                per_chunk: frame,
            }),
            _ => {
                let inputs: Vec<String> = info
                    .inputs
                    .iter()
                    .map(|t| format!("{} ({} {:?})", t.name, t.datatype, t.shape))
                    .collect();
                bail!(
                    "model {:?} takes {}: `tideway bench serve` drives token ids, audio or \
                     frames of a fixed width",
                    info.name,
                    inputs.join(", ")
                )
            }
        }
    }

    /// What a chunk's size counts, and how many of them it holds.
    pub fn unit(&self) -> (&'static str, usize) {
        match *self {
            Feed::Tokens { per_chunk, .. } => ("tokens", per_chunk),
            Feed::Audio { ms, .. } => ("audio ms", ms),
            Feed::Frames { per_chunk, .. } => ("frames", per_chunk),
        }
    }

    /// The table's name for the input's rate.
    pub fn rate_label(&self) -> &'static str {
        match *self {
            Feed::Tokens { .. } => "tokens/s",
            Feed::Audio { .. } => "audio s/s",
            Feed::Frames { .. } => "frames/s",
        }
    }

    /// The input of `chunks_per_s` chunks a second, in `rate_label`'s unit: audio in seconds
    /// a second (how many times real time).
    pub fn input_per_s(&self, chunks_per_s: f64) -> f64 {
        let (_, per_chunk) = self.unit();
        let per_s = chunks_per_s * per_chunk as f64;
        match *self {
            Feed::Audio { .. } => per_s / 1e3,
            Feed::Tokens { .. } | Feed::Frames { .. } => per_s,
        }
    }

    /// The bytes of one answer's outputs, as far as they are large: a language model's logits.
    pub fn answer_bytes(&self) -> usize {
        match *self {
            Feed::Tokens { vocab, per_chunk } => vocab as usize * 4 * per_chunk,
            Feed::Audio { .. } | Feed::Frames { .. } => 0,
        }
    }

    /// The next chunk, its values drawn from the xorshift state `s` (never 0).
    pub fn chunk(&self, s: &mut u64) -> pb::StreamChunk {
        // Values in [-0.25, 0.25): quiet noise for audio, small features for frames.
        let small = |s: &mut u64| (xorshift(s) % 2000) as f32 / 4000.0 - 0.25;
        match *self {
            Feed::Tokens { vocab, per_chunk } => pb::StreamChunk {
                tokens: (0..per_chunk)
                    .map(|_| (xorshift(s) % vocab) as i64)
                    .collect(),
                ..Default::default()
            },
            Feed::Audio { rate, ms } => pb::StreamChunk {
                samples_f32: (0..rate as usize * ms / 1000).map(|_| small(s)).collect(),
                sample_rate: rate,
                ..Default::default()
            },
            Feed::Frames {
                channels,
                per_chunk,
            } => pb::StreamChunk {
                frames: (0..channels * per_chunk).map(|_| small(s)).collect(),
                channels: channels as u32,
                ..Default::default()
            },
        }
    }
}

/// Marsaglia's xorshift64: the next value of `s` (never 0 once it is not).
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vocab_size: u64, inputs: &[(&str, &[i64])]) -> pb::ModelInfo {
        pb::ModelInfo {
            name: "m".into(),
            vocab_size,
            inputs: inputs
                .iter()
                .map(|(name, shape)| pb::TensorSpec {
                    name: name.to_string(),
                    datatype: "FP32".into(),
                    shape: shape.to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_feed_follows_what_the_model_takes() {
        let language = info(50280, &[("input_ids", &[-1])]);
        let audio = info(0, &[("audio", &[-1]), ("input", &[-1, 80])]);
        let frames = info(0, &[("input", &[-1, 16])]);
        assert_eq!(
            Feed::for_model(&language, 2, 20, 16_000).unwrap(),
            Feed::Tokens {
                vocab: 50280,
                per_chunk: 2
            }
        );
        assert_eq!(
            Feed::for_model(&audio, 2, 20, 16_000).unwrap(),
            Feed::Audio {
                rate: 16_000,
                ms: 20
            }
        );
        assert_eq!(
            Feed::for_model(&frames, 3, 20, 16_000).unwrap(),
            Feed::Frames {
                channels: 16,
                per_chunk: 3
            }
        );
        let err = Feed::for_model(&info(0, &[("pixels", &[-1, 3, 8, 8])]), 1, 20, 16_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("takes pixels (FP32 [-1, 3, 8, 8])"), "{err}");
        assert!(Feed::for_model(&audio, 1, 0, 16_000).is_err());
    }

    #[test]
    fn chunks_hold_what_their_unit_says() {
        let mut s = 1;
        let tokens = Feed::Tokens {
            vocab: 7,
            per_chunk: 5,
        }
        .chunk(&mut s);
        assert_eq!(tokens.tokens.len(), 5);
        assert!(tokens.tokens.iter().all(|&t| (0..7).contains(&t)));
        let audio = Feed::Audio {
            rate: 16_000,
            ms: 20,
        };
        let chunk = audio.chunk(&mut s);
        assert_eq!((chunk.samples_f32.len(), chunk.sample_rate), (320, 16_000));
        assert!(chunk.samples_f32.iter().all(|v| (-0.25..0.25).contains(v)));
        // 50 chunks of 20 ms a second are one second of audio a second.
        assert_eq!(audio.input_per_s(50.0), 1.0);
        let frames = Feed::Frames {
            channels: 16,
            per_chunk: 3,
        }
        .chunk(&mut s);
        assert_eq!((frames.frames.len(), frames.channels), (48, 16));
    }
}
