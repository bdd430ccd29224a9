//! Turning engine and dataflow errors into gRPC statuses (DESIGN.md, "gRPC status codes").

use tonic::Status;

use super::engine::SubmitError;
use tideway_operators::state_tensors::StateError;
use tideway_operators::tokenizers::audio::AudioError;
use tideway_operators::tokenizers::text::TextError;

use super::messages::OpError;
use super::stages::frontend::FrontendError;
use crate::device::SessionStartError;

pub fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull { capacity } => Status::resource_exhausted(format!(
            "the server's request queue is full ({capacity} waiting per worker); retry later or raise --queue-capacity"
        )),
        SubmitError::Draining => {
            Status::unavailable("the server is draining: it accepts no new requests")
        }
        SubmitError::Stopped => Status::unavailable(
            "this node is stopping (shut down, or it lost a peer of its cluster); retry",
        ),
    }
}

/// What open streams are told when the server shuts down after its drain's grace.
pub fn shutting_down() -> Status {
    Status::unavailable(
        "the server is shutting down: resume the session on another node, or here after the restart",
    )
}

/// `unknown_code` is what an unknown session maps to: FAILED_PRECONDITION on `tideway.v1`,
/// INVALID_ARGUMENT on the inference protocol (as Triton answers).
pub fn op_status(e: &OpError, unknown_code: tonic::Code) -> Status {
    match e {
        OpError::UnknownSession { name } => Status::new(
            unknown_code,
            format!(
                "session {name:?} is not live: the first request of a session must start it (sequence_start / a stream's start)"
            ),
        ),
        OpError::Expired {
            name,
            idle_limit_secs,
            expired_unix_secs,
        } => Status::new(
            unknown_code,
            format!(
                "session {name:?} expired: it was idle for more than {idle_limit_secs} s and its state was freed at unix time {expired_unix_secs:.3}; start it again"
            ),
        ),
        OpError::WrongModel { name } => {
            Status::invalid_argument(format!("session {name:?} belongs to another model"))
        }
        OpError::Input(e) => Status::invalid_argument(e.to_string()),
        OpError::Frontend(
            e @ (FrontendError::Audio(AudioError::ChunkTooLong { .. })
            | FrontendError::Text(TextError::HeldTooLong { .. })),
        ) => Status::resource_exhausted(e.to_string()),
        OpError::Frontend(e) => Status::invalid_argument(e.to_string()),
        OpError::Unavailable(message) => Status::unavailable(message.clone()),
        OpError::Capacity { slots } => {
            Status::resource_exhausted(SessionStartError::PoolFull { slots: *slots }.to_string())
        }
        OpError::TooManyClientSessions { limit, owner } => Status::resource_exhausted(format!(
            "identity {owner:?} holds its limit of {limit} live sessions (--max-sessions-per-client); end some or let idle ones expire, then retry"
        )),
        OpError::TooManySessions { limit } => Status::resource_exhausted(format!(
            "the server holds its limit of {limit} live sessions (--max-sessions); end sessions or let idle ones expire, then retry"
        )),
        OpError::State(e @ StateError::Unsupported { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        OpError::State(e) => Status::invalid_argument(format!("session state refused: {e}")),
        OpError::Pruning(reason) => {
            Status::internal(format!("the prompt's pruning failed: {reason}"))
        }
    }
}

/// The message of a status, for `error_message` on inference streams.
pub fn status_message(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The status to answer when reading a client stream fails with `status`: tonic reports a
/// message over the size limit as OUT_OF_RANGE; DESIGN.md answers limits with
/// RESOURCE_EXHAUSTED. `None` when the client went away (nothing to answer).
pub fn inbound_error(status: &Status) -> Option<Status> {
    match status.code() {
        tonic::Code::OutOfRange => Some(Status::resource_exhausted(format!(
            "{} (the server's --max-request-bytes: send smaller messages, or a long job in pieces with Jobs.SubmitStream)",
            status.message()
        ))),
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable => None,
        _ => Some(status.clone()),
    }
}
