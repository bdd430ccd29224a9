//! The request layer every transport shares (`tideway.v1`, the inference protocol, jobs):
//! token ids decoded and checked once at the edge, the tensors a model takes and answers,
//! and the wait for the dataflow's answer. Transports use this and never each other.

use tokio::sync::oneshot;
use tonic::Status;

use tideway_operators::tokenizers::Frontend;

use super::limits::Limits;
use super::messages::{OpError, Reply, Response};
use super::served::{ServedKind, ServedModel};
use super::stats::StatsBoard;

/// A request that cannot run, found at the edge before it reaches a session.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("token id {id} at position {position} is out of range: the vocabulary has {vocab} ids (0..={max})", max = vocab - 1)]
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

    /// The status to answer, counting a limit's refusal on `board`.
    pub fn refuse(self, board: &StatsBoard) -> Status {
        if let Some(limit) = self.limit() {
            board.count_limit(limit);
        }
        self.into()
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

/// How much one request may carry, and the flag that says so.
#[derive(Debug, Clone, Copy)]
pub struct LengthLimit {
    pub max: usize,
    pub unit: &'static str,
    pub flag: &'static str,
}

impl LengthLimit {
    /// A stream chunk's or an inference request's tokens or frames (`--max-request-tokens`).
    pub fn request(limits: &Limits) -> Self {
        LengthLimit {
            max: limits.max_request_tokens,
            unit: "request",
            flag: "--max-request-tokens",
        }
    }

    /// A job's tokens (`--max-job-tokens`).
    pub fn job(limits: &Limits) -> Self {
        LengthLimit {
            max: limits.max_job_tokens,
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

/// Awaits the dataflow's answer.
pub async fn answer(rx: oneshot::Receiver<Response>) -> Result<Result<Reply, OpError>, Status> {
    rx.await
        .map(|r| r.result)
        .map_err(|_| Status::unavailable("the worker owning this session stopped"))
}

/// A tensor a model takes or answers: name, datatype (protocol spelling) and shape (-1 for
/// any length).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// The tensors `m` takes (a feature model with an audio front end takes `audio` or `input`)
/// and the one it answers.
pub fn tensor_specs(m: &ServedModel) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name, datatype, shape| TensorSpec {
        name,
        datatype,
        shape,
    };
    let inputs = match &m.kind {
        ServedKind::Language { .. } => vec![spec("input_ids", "INT64", vec![-1])],
        ServedKind::Features(f) => match f.frontend() {
            Some(Frontend::Audio(_)) => vec![
                spec("audio", "FP32", vec![-1]),
                spec("input", "FP32", vec![-1, f.in_channels() as i64]),
            ],
            Some(Frontend::Sensor(s)) => vec![spec("input", "FP32", vec![-1, s.channels() as i64])],
            None => vec![spec("input", "FP32", vec![-1, f.in_channels() as i64])],
        },
    };
    let outputs = vec![spec(m.output_name(), "FP32", vec![-1, m.width() as i64])];
    (inputs, outputs)
}
