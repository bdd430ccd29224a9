//! The tokenizer stage: what turns raw user input into what a model consumes, per session
//! and streaming (a stream cut anywhere gives the features of the whole input).
//!
//! - [`fbank`]: Kaldi filterbank features of audio;
//! - [`audio`]: WAV decoding, mixing down and resampling, and the audio front end of a model
//!   (`frontend` in its `config.json`).

pub mod audio;
pub mod fbank;
