//! The request layer every transport shares (`tideway.v1`, the inference protocol, jobs):
//! token ids decoded and checked once at the edge, the tensors a model takes and answers,
//! and the wait for the dataflow's answer. Transports use this and never each other.

use tokio::sync::oneshot;
use tonic::Status;

use tideway_operators::tokenizers::Frontend;

pub use tideway_proto::decode::{DecodeError, LengthLimit, RequestError, check_answer, check_ids};

use super::messages::{OpError, Reply, Response};
use super::served::{ServedKind, ServedModel};
use super::stats::StatsBoard;

/// A refusal at the edge answered as a status, counting the server limit that refused it
/// (if one did) on the stats board.
pub trait Refuse {
    fn refuse(self, board: &StatsBoard) -> Status;
}

impl Refuse for RequestError {
    fn refuse(self, board: &StatsBoard) -> Status {
        if let Some(limit) = self.limit() {
            board.count_limit(limit);
        }
        self.into()
    }
}

impl Refuse for DecodeError {
    fn refuse(self, board: &StatsBoard) -> Status {
        if let Some(limit) = self.limit() {
            board.count_limit(limit);
        }
        self.into()
    }
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
