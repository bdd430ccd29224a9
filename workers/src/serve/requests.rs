//! The request layer every transport shares (`tideway.v1`, the inference protocol, jobs):
//! token ids decoded and checked once at the edge, the tensors a model takes and answers,
//! and the wait for the dataflow's answer. Transports use this and never each other.

use tokio::sync::oneshot;
use tonic::Status;

use tideway_operators::tokenizers::Frontend;

use super::messages::{OpError, Reply, Response};
use super::served::{ServedKind, ServedModel};

/// A request that cannot run, found at the edge before it reaches a session.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("token id {id} at position {position} is out of range: the vocabulary has {vocab} ids (0..={max})", max = vocab - 1)]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab: usize,
    },
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// Checks ids against a vocabulary at the edge, with the same message the model gives: the
/// only check token ids get on their way to the model.
pub fn check_ids(ids: &[i64], vocab: usize) -> Result<Vec<u32>, RequestError> {
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
