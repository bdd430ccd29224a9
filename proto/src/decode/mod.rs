//! Requests of both APIs decoded into the engine's input, checked at the edge: shapes,
//! datatypes, token ids against the vocabulary, and the per-request limits. Pure functions of
//! a message and what the model takes, so that they can be fuzzed (`fuzz/`) without a server.
//!
//! - [`kserve`]: an inference-protocol `ModelInferRequest` (tensors, parameters);
//! - [`native`]: a `tideway.v1` stream chunk.

pub mod generate;
pub mod kserve;
pub mod native;

use serde::{Deserialize, Serialize};
use tonic::Status;

/// What a step feeds a session: raw input for the model's front end (tokenizer stage), which
/// runs at the session's owner, where its carry-over lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StepInput {
    /// Token ids (language models). Empty: no new input (a start, or an end).
    Tokens(Vec<u32>),
    /// UTF-8 bytes of text, possibly ending inside a character (models with a tokenizer).
    Text(Vec<u8>),
    /// Audio samples in [-1, 1] at `rate` Hz (models with an audio front end).
    Audio { samples: Vec<f32>, rate: u32 },
    /// Rows of `width` values: feature frames, or sensor frames for a sensor front end.
    Frames { values: Vec<f32>, width: u32 },
}

impl StepInput {
    /// A size for the epoch budget (tokens, bytes, samples / 160 or frames).
    pub fn weight(&self) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::Text(b) => b.len() / 4,
            StepInput::Audio { samples, .. } => samples.len() / 160,
            StepInput::Frames { values, width } => values.len() / (*width).max(1) as usize,
        }
    }
}

/// A model's sample-rate check: the rate as the client sent it (before any narrowing), the
/// rate accepted or why not.
pub type RateCheck<'a> = &'a dyn Fn(u64) -> Result<u32, String>;

/// What a model takes, as far as decoding a request needs it.
pub struct ModelInputs<'a> {
    pub name: &'a str,
    pub kind: InputKind<'a>,
}

pub enum InputKind<'a> {
    /// Token ids below `vocab`; each answers a row of `width` values.
    Language { vocab: usize, width: usize },
    /// Feature rows or audio; `check_rate` where the model has an audio front end.
    Features { check_rate: Option<RateCheck<'a>> },
}

/// The per-request limits (`--max-request-tokens`, `--max-message-bytes`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_request_tokens: usize,
    pub max_message_bytes: usize,
}

/// A request that cannot run, found at the edge before it reaches a session.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("token id {id} at position {position} is out of range: the vocabulary has {vocab} ids (0..={max})", max = vocab.saturating_sub(1))]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab: usize,
    },
    #[error(
        "{count} {what} in one {unit}; at most {max} are accepted ({flag}){hint}",
        hint = if *unit == "job" { "" } else { ": send them in several, or run a long sequence as a job" }
    )]
    TooLong {
        what: &'static str,
        unit: &'static str,
        count: usize,
        max: usize,
        flag: &'static str,
    },
    #[error(
        "the answer would be {bytes} bytes ([{rows}, {width}] FP32); at most {max} are sent in one message (--max-message-bytes): send fewer tokens per request{hint}",
        hint = if *job { ", or ask a job for the last position's outputs only" } else { "" }
    )]
    AnswerTooLarge {
        rows: usize,
        width: usize,
        bytes: usize,
        max: usize,
        job: bool,
    },
}

impl RequestError {
    /// The server limit that refused the request, if one did (for the metric).
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            RequestError::TooLong { unit: "job", .. } => Some("job_tokens"),
            RequestError::TooLong { .. } => Some("request_tokens"),
            RequestError::AnswerTooLarge { .. } => Some("message_bytes"),
            RequestError::TokenOutOfRange { .. } => None,
        }
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::TooLong { .. } | RequestError::AnswerTooLarge { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            RequestError::TokenOutOfRange { .. } => Status::invalid_argument(e.to_string()),
        }
    }
}

/// A request that does not decode into a step.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A malformed request: the message says what is wrong and what is allowed.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A sample rate the model's front end does not take.
    #[error("{0}")]
    SampleRate(String),
}

impl DecodeError {
    /// The server limit that refused the request, if one did (for the metric).
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            DecodeError::Invalid(_) => None,
            DecodeError::Request(e) => e.limit(),
            DecodeError::SampleRate(_) => Some("sample_rate"),
        }
    }
}

impl From<DecodeError> for Status {
    fn from(e: DecodeError) -> Status {
        match e {
            DecodeError::Request(e) => e.into(),
            DecodeError::Invalid(m) | DecodeError::SampleRate(m) => Status::invalid_argument(m),
        }
    }
}

/// Shorthand for a malformed request.
fn invalid(message: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(message.into())
}

/// How much one request may carry, and the flag that says so.
#[derive(Debug, Clone, Copy)]
pub struct LengthLimit {
    pub max: usize,
    pub unit: &'static str,
    pub flag: &'static str,
}

impl LengthLimit {
    /// A stream chunk's or an inference request's tokens or frames (`--max-request-tokens`).
    pub fn request(max: usize) -> Self {
        LengthLimit {
            max,
            unit: "request",
            flag: "--max-request-tokens",
        }
    }

    /// A job's tokens (`--max-job-tokens`).
    pub fn job(max: usize) -> Self {
        LengthLimit {
            max,
            unit: "job",
            flag: "--max-job-tokens",
        }
    }

    /// Refuses `count` `what` (tokens, frames) over the limit.
    pub fn check(&self, what: &'static str, count: usize) -> Result<(), RequestError> {
        if count > self.max {
            return Err(RequestError::TooLong {
                what,
                unit: self.unit,
                count,
                max: self.max,
                flag: self.flag,
            });
        }
        Ok(())
    }
}

/// Checks ids against a length limit and a vocabulary at the edge, with the same message the
/// model gives: the only check token ids get on their way to the model.
pub fn check_ids(ids: &[i64], vocab: usize, limit: LengthLimit) -> Result<Vec<u32>, RequestError> {
    limit.check("tokens", ids.len())?;
    ids.iter()
        .enumerate()
        .map(|(position, &id)| {
            if id < 0 || id as u64 >= vocab as u64 {
                Err(RequestError::TokenOutOfRange {
                    id,
                    position,
                    vocab,
                })
            } else {
                Ok(id as u32)
            }
        })
        .collect()
}

/// Refuses `rows` rows of `width` FP32 outputs that no message of `max_bytes` could carry
/// (checked before the model computes them).
pub fn check_answer(
    rows: usize,
    width: usize,
    max_bytes: usize,
    job: bool,
) -> Result<(), RequestError> {
    // The tensor's bytes and a little for its name and shape.
    let bytes = rows.saturating_mul(width).saturating_mul(4);
    if bytes.saturating_add(1024) > max_bytes {
        return Err(RequestError::AnswerTooLarge {
            rows,
            width,
            bytes,
            max: max_bytes,
            job,
        });
    }
    Ok(())
}

/// A language model's token ids checked against its vocabulary, the request limit and the
/// size of the answer they would make.
fn language_tokens(
    ids: &[i64],
    vocab: usize,
    width: usize,
    limits: &RequestLimits,
) -> Result<Vec<u32>, RequestError> {
    let ids = check_ids(ids, vocab, LengthLimit::request(limits.max_request_tokens))?;
    check_answer(ids.len(), width, limits.max_message_bytes, false)?;
    Ok(ids)
}
