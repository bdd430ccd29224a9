//! The tokenizer stage: what turns raw user input into what a model consumes, per session
//! and streaming (a stream cut anywhere gives the features of the whole input).
//!
//! - [`fbank`]: Kaldi filterbank features of audio;
//! - [`audio`]: WAV decoding, mixing down and resampling, and the audio front end of a model
//!   (`frontend` in its `config.json`);
//! - [`sensor`]: multichannel sensor frames, standardised and patched;
//! - [`text`]: token ids of text with a model's `tokenizer.json`.

pub mod audio;
pub mod fbank;
pub mod sensor;
pub mod text;

use crate::error::LoadError;
use crate::models::config::ConfigJson;

/// A model's front end, from the `frontend` object of its `config.json`.
#[derive(Debug, Clone)]
pub enum Frontend {
    Audio(audio::AudioFrontend),
    Sensor(sensor::SensorFrontend),
}

impl Frontend {
    /// None when `config.json` has no `frontend`; kinds other than `kaldi_fbank` and `sensor`
    /// are refused by name.
    pub fn load(config: &ConfigJson) -> Result<Option<Self>, LoadError> {
        if !config.has("frontend") {
            return Ok(None);
        }
        match config.section("frontend")?.str_opt("kind")? {
            Some("kaldi_fbank") => Ok(audio::AudioFrontend::load(config)?.map(Frontend::Audio)),
            Some("sensor") => Ok(sensor::SensorFrontend::load(config)?.map(Frontend::Sensor)),
            Some(other) => Err(config.unsupported(format!(
                "frontend kind {other:?} is not supported; supported: \"kaldi_fbank\", \"sensor\""
            ))),
            None => {
                Err(config
                    .malformed("frontend: missing key \"kind\" (\"kaldi_fbank\" or \"sensor\")"))
            }
        }
    }

    /// Values per feature row the front end emits (what the model's input must take).
    pub fn feature_width(&self) -> usize {
        match self {
            Frontend::Audio(a) => a.num_mel_bins(),
            Frontend::Sensor(s) => s.feature_width(),
        }
    }
}
