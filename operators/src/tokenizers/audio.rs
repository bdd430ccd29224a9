//! The audio front end: WAV decoding (the `hound` crate: 8/16/24/32-bit PCM and 32-bit float,
//! channels mixed down to mono), resampling to the model's rate (the `rubato` crate's FFT
//! resampler), Kaldi fbank features ([`super::fbank`]) and the model's normalisation, as the
//! `frontend` object of an LMUFormer `config.json` describes it (`shared/SPEC-MODELS.md` §9):
//! samples in [-1, 1], mean removed, `(fbank − norm_mean) / (2·norm_std)`.
//!
//! Mean removal: the reference subtracts the utterance's mean from the waveform before the
//! fbank. Kaldi's fbank then removes each frame's own mean (DC offset) before anything else,
//! which cancels any constant offset exactly, so the utterance mean has no effect on the
//! features (beyond float rounding) and a stream does not need it. Tideway therefore skips the
//! waveform-level subtraction in both whole inputs and streams: one code path, and a stream cut
//! anywhere gives exactly the features of the whole input.

use std::path::Path;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler as _};

use crate::error::LoadError;
use crate::models::config::ConfigJson;
use crate::state_tensors::{StateError, StateTensors};
use crate::tokenizers::fbank::{Fbank, FbankOptions, FbankOptionsError, FbankStream};

/// Audio that cannot be turned into features.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum AudioError {
    #[error("{path}: {reason}")]
    Wav { path: String, reason: String },
    #[error("sample {index} is NaN or infinite; audio samples must be finite")]
    NonFinite { index: usize },
    #[error(
        "a sample rate of {rate} Hz cannot be resampled to {target} Hz (rates from 1 Hz to 1 MHz are accepted)"
    )]
    BadRate { rate: u32, target: u32 },
    #[error(
        "a sample rate of {rate} Hz is outside the accepted range, {min} to {max} Hz (the server's --min-sample-rate / --max-sample-rate)"
    )]
    RateOutOfRange { rate: u64, min: u32, max: u32 },
    #[error(
        "a sample rate of {rate} Hz resamples to {target} Hz in the ratio {up}:{down}; rates whose ratio to {target} Hz reduces to terms of at most {max_term} are accepted (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000 Hz …)"
    )]
    RateRatio {
        rate: u32,
        target: u32,
        up: u32,
        down: u32,
        max_term: u32,
    },
    #[error(
        "the stream's audio is at {first} Hz; a chunk at {now} Hz was sent (a stream keeps one sample rate: start a new stream for another)"
    )]
    RateChanged { first: u32, now: u32 },
    #[error(
        "a chunk of {samples} samples at {rate} Hz is {resampled} samples at the model's {target} Hz; at most {max} are accepted per chunk (the server's --max-chunk-samples): send shorter chunks"
    )]
    ChunkTooLong {
        samples: usize,
        rate: u32,
        target: u32,
        resampled: u64,
        max: usize,
    },
    #[error("the stream has ended; start a new one to send more audio")]
    Ended,
}

/// Decoded audio, mono, scaled to [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

/// Reads a WAV file: integer PCM scaled by 2^(bits−1) (int16 / 32768, as torchaudio loads it),
/// float as stored; several channels are averaged.
pub fn read_wav(path: &Path) -> Result<Audio, AudioError> {
    let bad = |reason: String| AudioError::Wav {
        path: path.display().to_string(),
        reason,
    };
    let mut reader = hound::WavReader::open(path).map_err(|e| {
        bad(match e {
            hound::Error::Unsupported => {
                "unsupported WAV encoding: Tideway reads PCM (8, 16, 24 or 32-bit integer) and 32-bit IEEE float".into()
            }
            other => format!("not a readable WAV file: {other}"),
        })
    })?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f64;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| (v as f64 * scale) as f32))
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("cannot read samples: {e}")))?
        }
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("cannot read samples: {e}")))?,
    };
    if let Some(index) = interleaved.iter().position(|v| !v.is_finite()) {
        return Err(AudioError::NonFinite { index });
    }
    let samples = if channels == 1 {
        interleaved
    } else {
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect()
    };
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
    })
}

/// Input samples per resampler chunk.
const RESAMPLER_CHUNK: usize = 1024;

/// A streaming resampler with the output of a whole-input one: it consumes fixed chunks
/// whatever sizes the samples arrive in, drops the filter's delay, and at the end flushes
/// until `ceil(ratio · input)` samples have come out.
pub struct StreamResampler {
    inner: Fft<f32>,
    ratio: f64,
    pending: Vec<f32>,
    to_skip: usize,
    consumed: usize,
    produced: usize,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("ratio", &self.ratio)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        if from == 0 || from > 1_000_000 {
            return Err(AudioError::BadRate {
                rate: from,
                target: to,
            });
        }
        let inner = Fft::<f32>::new(
            from as usize,
            to as usize,
            RESAMPLER_CHUNK,
            1,
            FixedSync::Input,
        )
        .map_err(|_| AudioError::BadRate {
            rate: from,
            target: to,
        })?;
        let to_skip = inner.output_delay();
        Ok(StreamResampler {
            inner,
            ratio: to as f64 / from as f64,
            pending: Vec::new(),
            to_skip,
            consumed: 0,
            produced: 0,
        })
    }

    fn run_chunk(&mut self, valid: usize, out: &mut Vec<f32>) {
        let need = self.inner.input_frames_next();
        let mut input = vec![0.0f32; need];
        input[..valid].copy_from_slice(&self.pending[..valid]);
        self.pending.drain(..valid);
        let mut output = vec![0.0f32; self.inner.output_frames_max()];
        let max = output.len();
        let input_adapter = InterleavedSlice::new(&input[..], 1, need).expect("sized");
        let mut output_adapter = InterleavedSlice::new_mut(&mut output[..], 1, max).expect("sized");
        let indexing = Indexing {
            partial_len: (valid < need).then_some(valid),
            ..Indexing::default()
        };
        let (_, written) = self
            .inner
            .process_into_buffer(&input_adapter, &mut output_adapter, Some(&indexing))
            .expect("buffers sized by the resampler");
        let skip = self.to_skip.min(written);
        self.to_skip -= skip;
        out.extend_from_slice(&output[skip..written]);
    }

    /// Feeds samples; returns the resampled samples now complete.
    pub fn push(&mut self, samples: &[f32]) -> Vec<f32> {
        self.pending.extend_from_slice(samples);
        self.consumed += samples.len();
        let mut out = Vec::new();
        while self.pending.len() >= self.inner.input_frames_next() {
            let need = self.inner.input_frames_next();
            self.run_chunk(need, &mut out);
        }
        self.produced += out.len();
        out
    }

    /// Ends the input: the rest of the output.
    pub fn finish(&mut self) -> Vec<f32> {
        let expected = (self.ratio * self.consumed as f64).ceil() as usize;
        let mut out = Vec::new();
        let valid = self.pending.len();
        self.run_chunk(valid, &mut out);
        while self.produced + out.len() < expected {
            self.run_chunk(0, &mut out);
        }
        out.truncate(expected.saturating_sub(self.produced));
        self.produced += out.len();
        out
    }
}

/// The `frontend` object of a model's `config.json`, kind `kaldi_fbank`.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFrontendConfig {
    pub fbank: FbankOptions,
    pub norm_mean: f32,
    pub norm_std: f32,
}

impl AudioFrontendConfig {
    /// Reads `frontend` (None when absent). Options Tideway does not implement are refused
    /// by name.
    pub fn from_config(config: &ConfigJson) -> Result<Option<Self>, LoadError> {
        if !config.has("frontend") {
            return Ok(None);
        }
        let f = config.section("frontend")?;
        match f.str_opt("kind")? {
            Some("kaldi_fbank") => {}
            Some(other) => {
                return Err(config.unsupported(format!(
                    "frontend kind {other:?} is not supported; supported: \"kaldi_fbank\""
                )));
            }
            None => {
                return Err(config.malformed("frontend: missing key \"kind\" (\"kaldi_fbank\")"));
            }
        }
        if let Some(w) = f.str_opt("window")?
            && w != "hanning"
        {
            return Err(config.unsupported(format!(
                "frontend window {w:?} is not supported; supported: \"hanning\""
            )));
        }
        if f.bool_opt("use_energy")? == Some(true) {
            return Err(config.unsupported("frontend use_energy true is not supported (the LMUFormer front end has no energy coefficient)"));
        }
        if f.f64_opt("dither")?.is_some_and(|d| d != 0.0) {
            return Err(config.unsupported(
                "frontend dither other than 0.0 is not supported (features must be reproducible)",
            ));
        }
        // `remove_mean` needs nothing: per-frame DC removal cancels the waveform mean (module
        // documentation), so true and false give the same features.
        f.bool_opt("remove_mean")?;
        let rate = f.usize_opt("sample_rate")?.unwrap_or(16000);
        let fbank = FbankOptions {
            sample_rate: u32::try_from(rate)
                .map_err(|_| config.malformed("frontend sample_rate is too large"))?,
            num_mel_bins: f.usize_req("num_mel_bins")?,
            frame_length_ms: f.f64_opt("frame_length_ms")?.unwrap_or(25.0),
            frame_shift_ms: f.f64_opt("frame_shift_ms")?.unwrap_or(10.0),
            low_freq: f.f64_opt("low_freq")?.unwrap_or(20.0),
            high_freq: f.f64_opt("high_freq")?.unwrap_or(0.0),
        };
        let norm_std = f.f64_opt("norm_std")?.unwrap_or(0.5);
        if norm_std <= 0.0 {
            return Err(config.malformed("frontend norm_std must be positive"));
        }
        Fbank::new(&fbank).map_err(|e| config.unsupported(e.to_string()))?;
        Ok(Some(AudioFrontendConfig {
            fbank,
            norm_mean: f.f64_opt("norm_mean")?.unwrap_or(0.0) as f32,
            norm_std: norm_std as f32,
        }))
    }
}

/// A model's audio front end.
#[derive(Debug, Clone)]
pub struct AudioFrontend {
    config: AudioFrontendConfig,
    fbank: Fbank,
    limits: AudioLimits,
}

/// What audio a front end accepts, so that no chunk costs more than its size promises: a
/// sample rate of 1 Hz resamples ×16000, a prime rate makes an FFT resampler of that many
/// points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLimits {
    /// Accepted sample rates, Hz.
    pub min_rate: u32,
    pub max_rate: u32,
    /// Samples per chunk after resampling to the model's rate.
    pub max_chunk_samples: usize,
}

impl Default for AudioLimits {
    fn default() -> Self {
        AudioLimits {
            min_rate: 8_000,
            max_rate: 192_000,
            // A minute at 16 kHz.
            max_chunk_samples: 960_000,
        }
    }
}

/// The largest term of a rate's reduced ratio to the model's rate: the resampler's FFTs are
/// that many points (every common rate to 16 kHz reduces to terms of at most 640).
pub const MAX_RATIO_TERM: u32 = 1024;

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One stream's carry-over through the front end.
#[derive(Debug)]
pub struct AudioStream {
    /// The sample rate of the stream's first chunk: every chunk's.
    rate: Option<u32>,
    resampler: Option<StreamResampler>,
    fbank: FbankStream,
    ended: bool,
}

impl AudioStream {
    /// Writes the stream's carry-over as named tensors. A stream resampled from another rate
    /// cannot be: the resampler's buffers are private to `rubato` and cannot be rebuilt
    /// exactly from a bounded stretch of input.
    pub fn export(&self, out: &mut StateTensors) -> Result<(), StateError> {
        if let Some(rate) = self.rate
            && self.resampler.is_some()
        {
            return Err(StateError::Unsupported {
                what: format!("an audio stream resampled from {rate} Hz"),
            });
        }
        out.put_u64("frontend.audio.rate", self.rate.unwrap_or(0) as u64);
        out.put_u64("frontend.audio.ended", self.ended as u64);
        self.fbank.export(out);
        Ok(())
    }

    /// The stream whose carry-over [`export`](Self::export) wrote.
    pub fn import(from: &StateTensors) -> Result<Self, StateError> {
        let rate = from.u64("frontend.audio.rate")? as u32;
        Ok(AudioStream {
            rate: (rate != 0).then_some(rate),
            resampler: None,
            fbank: FbankStream::import(from)?,
            ended: from.u64("frontend.audio.ended")? != 0,
        })
    }
}

impl AudioFrontend {
    pub fn new(config: AudioFrontendConfig) -> Result<Self, FbankOptionsError> {
        let fbank = Fbank::new(&config.fbank)?;
        Ok(AudioFrontend {
            config,
            fbank,
            limits: AudioLimits::default(),
        })
    }

    /// The front end `config.json` describes, if any.
    pub fn load(config: &ConfigJson) -> Result<Option<Self>, LoadError> {
        let Some(c) = AudioFrontendConfig::from_config(config)? else {
            return Ok(None);
        };
        let fbank = Fbank::new(&c.fbank).map_err(|e| config.unsupported(e.to_string()))?;
        Ok(Some(AudioFrontend {
            config: c,
            fbank,
            limits: AudioLimits::default(),
        }))
    }

    pub fn limits(&self) -> AudioLimits {
        self.limits
    }

    pub fn set_limits(&mut self, limits: AudioLimits) {
        self.limits = limits;
    }

    /// Whether `rate` (as the client sent it, before any narrowing) is accepted.
    pub fn check_rate(&self, rate: u64) -> Result<u32, AudioError> {
        let l = &self.limits;
        if rate < l.min_rate as u64 || rate > l.max_rate as u64 {
            return Err(AudioError::RateOutOfRange {
                rate,
                min: l.min_rate,
                max: l.max_rate,
            });
        }
        let (rate, target) = (rate as u32, self.sample_rate());
        let g = gcd(rate, target);
        let (up, down) = (target / g, rate / g);
        if up.max(down) > MAX_RATIO_TERM {
            return Err(AudioError::RateRatio {
                rate,
                target,
                up,
                down,
                max_term: MAX_RATIO_TERM,
            });
        }
        Ok(rate)
    }

    pub fn sample_rate(&self) -> u32 {
        self.config.fbank.sample_rate
    }

    pub fn num_mel_bins(&self) -> usize {
        self.fbank.num_mel_bins()
    }

    pub fn new_stream(&self) -> AudioStream {
        AudioStream {
            rate: None,
            resampler: None,
            fbank: FbankStream::default(),
            ended: false,
        }
    }

    fn normalise(&self, features: &mut [f32]) {
        let (mean, scale) = (self.config.norm_mean, 2.0 * self.config.norm_std);
        features.iter_mut().for_each(|v| *v = (*v - mean) / scale);
    }

    /// Feeds a stream's samples at `rate` Hz (the first call fixes the stream's rate; rates
    /// and chunk sizes within the front end's [`AudioLimits`]); returns the normalised feature
    /// frames now complete (`[frames, mel]`), all of them when `end`.
    pub fn push(
        &self,
        stream: &mut AudioStream,
        samples: &[f32],
        rate: u32,
        end: bool,
    ) -> Result<Vec<f32>, AudioError> {
        if stream.ended {
            return Err(AudioError::Ended);
        }
        if let Some(index) = samples.iter().position(|v| !v.is_finite()) {
            return Err(AudioError::NonFinite { index });
        }
        let target = self.sample_rate();
        let rate = self.check_rate(rate as u64)?;
        match stream.rate {
            Some(first) if first != rate => {
                return Err(AudioError::RateChanged { first, now: rate });
            }
            _ => stream.rate = Some(rate),
        }
        let resampled = samples.len() as u64 * target as u64 / rate as u64;
        if resampled > self.limits.max_chunk_samples as u64 {
            return Err(AudioError::ChunkTooLong {
                samples: samples.len(),
                rate,
                target,
                resampled,
                max: self.limits.max_chunk_samples,
            });
        }
        let mut resampled;
        let at_rate: &[f32] = if rate == target {
            samples
        } else {
            if stream.resampler.is_none() {
                stream.resampler = Some(StreamResampler::new(rate, target)?);
            }
            let resampler = stream.resampler.as_mut().expect("set above");
            resampled = resampler.push(samples);
            if end {
                resampled.extend(resampler.finish());
            }
            &resampled
        };
        let mut features = self.fbank.push(&mut stream.fbank, at_rate);
        stream.ended = end;
        self.normalise(&mut features);
        Ok(features)
    }

    /// The normalised features of a whole recording.
    pub fn features(&self, audio: &Audio) -> Result<Vec<f32>, AudioError> {
        self.push(
            &mut self.new_stream(),
            &audio.samples,
            audio.sample_rate,
            true,
        )
    }
}
