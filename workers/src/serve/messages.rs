//! The records that flow through the dataflow. They cross process boundaries (bincode, via
//! timely's cluster transport), so they are plain serde types: no prost messages, no
//! `skip_serializing_if`, no untagged enums.

use serde::{Deserialize, Serialize};
use tideway_operators::{ForwardError, InputError};

use super::stages::frontend::FrontendError;
use super::state_blob::SessionSnapshot;
use crate::device::SessionStartError;
use tideway_operators::state_tensors::StateError;

/// A session's placement key: a well-mixed 64-bit hash of (model, session name).
pub type SessionKey = u64;

/// One request for one session, from the gRPC edge into the dataflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unique within the origin process; the response carries it back.
    pub id: u64,
    /// Global index of the worker that took the request in; the response returns there.
    pub origin: u32,
    pub session: SessionKey,
    /// Which front end takes it (see [`Route`]).
    pub route: Route,
    pub op: Op,
}

/// How a request finds its session's owner. Sessions are placed by hash; a session that
/// moved (a drain, a rebalance) is in every worker's routing table, which its origin reads
/// as the request enters the graph (see `stages::migration`). `moves` counts the session's
/// moves up to the one that made `worker` its owner, so that a worker a session left and
/// later comes back to tells the requests of its earlier stay from those of the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// To the hash owner (the session key modulo the workers): the session never moved, as
    /// far as the origin knows.
    Hash,
    /// To the owner in the origin's routing table (the worker the session moved to).
    Table { worker: u32, moves: u32 },
    /// Re-sent by the session's old owner to the worker it moved to: it was on its way before
    /// the origin learned of the move, so it runs before the origin's later requests.
    Forwarded { worker: u32, moves: u32 },
    /// To this worker, whatever the tables say: a fence to a session's old owner, or the
    /// state of a session moving in.
    To(u32),
}

impl Route {
    /// The global index of the worker whose front end takes the request.
    pub fn worker(self, session: SessionKey, workers: usize) -> u64 {
        match self {
            Route::Hash => session % workers as u64,
            Route::Table { worker, .. } | Route::Forwarded { worker, .. } | Route::To(worker) => {
                worker as u64
            }
        }
    }

    /// The session's moves this route knows of (0: none).
    pub fn moves(self) -> u32 {
        match self {
            Route::Table { moves, .. } | Route::Forwarded { moves, .. } => moves,
            Route::Hash | Route::To(_) => 0,
        }
    }
}

/// What a step feeds a session (decoded at the gRPC edge; it travels with the request).
pub use tideway_proto::decode::StepInput;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Runs `input` through the session. `start` creates the session (replacing a live one of
    /// the same name); without it the session must be live. `end` frees it afterwards (and
    /// flushes front ends and lookahead: the rest of the outputs come with it).
    Step {
        model: u32,
        name: String,
        /// The identity making the request (a start counts against its session limit).
        owner: String,
        input: StepInput,
        start: bool,
        end: bool,
        /// Answer only the last row of logits (a generation needs no other).
        last_only: bool,
    },
    /// Reports whether the session lives, and where it is (for a resume).
    Probe { model: u32, name: String },
    /// Frees the session if it lives.
    End { name: String },
    /// Answers the session's whole state (every stage's part) as a snapshot.
    Export { model: u32, name: String },
    /// Starts session `snapshot.name` (replacing a live one) from a snapshot: an import, or
    /// a restore from the store. The snapshot was checked against the model at the edge.
    Restore {
        model: u32,
        snapshot: Box<SessionSnapshot>,
        /// The snapshot comes from this server's store (it need not be written again).
        stored: bool,
    },
    /// Origin worker `origin` has routed the session's later requests to its new owner: the
    /// old owner hands this on behind whatever of the origin's it forwarded.
    Fence { origin: u32 },
    /// A session moving in from worker `from` (its `moves`-th move): its whole state, taken
    /// after its last request there (`sent_unix`: when it left, for the migration-time
    /// metric).
    MoveIn {
        model: u32,
        snapshot: Box<SessionSnapshot>,
        from: u32,
        moves: u32,
        sent_unix: f64,
    },
}

/// The answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub origin: u32,
    pub result: Result<Reply, OpError>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Session position of the first output row.
    pub position: u64,
    pub rows: u32,
    pub width: u32,
    /// `[rows, width]` outputs (`logits` of a language model, `output` of a feature model).
    pub logits: Vec<f32>,
    /// Session position after this request.
    pub position_after: u64,
    pub state_bytes: u64,
    /// Global index of the worker that owns the session.
    pub worker: u32,
    /// The session no longer lives (ended by this request, or never did for a probe).
    pub ended: bool,
    /// Requests with input the session has taken (after this one).
    pub chunks: u64,
    /// The session's state, for an [`Op::Export`].
    pub state: Option<Box<SessionSnapshot>>,
    /// Rows a frame gate skipped (each repeats the last kept row); empty: none.
    pub skipped: Vec<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OpError {
    /// No live session of that name, and the request did not start one.
    UnknownSession { name: String },
    /// The session was freed after being idle.
    Expired {
        name: String,
        idle_limit_secs: f64,
        expired_unix_secs: f64,
    },
    /// The session lives but belongs to another model.
    WrongModel { name: String },
    /// The model refused the input.
    Input(InputError),
    /// The model's front end (tokenizer, audio or sensor front end) refused the input.
    Frontend(FrontendError),
    /// The node cannot serve any more (a peer of the cluster or tensor-parallel group was
    /// lost, or the device failed: the transport's or the driver's own words); retry
    /// elsewhere.
    Unavailable(String),
    /// No room for another session: the device's state pool holds `slots`.
    Capacity { slots: usize },
    /// The server holds its limit of live sessions (`--max-sessions`).
    TooManySessions { limit: usize },
    /// The client holds its limit of live sessions (`--max-sessions-per-client`).
    TooManyClientSessions { limit: usize, owner: String },
    /// A state could not be exported or taken in (the reason names the tensor or the kind
    /// of session).
    State(StateError),
    /// The prompt's pruning failed inside the model (`tideway_prune`; e.g. a token graph
    /// that is not finite): the pruner's own words.
    Pruning(String),
}

impl OpError {
    /// The server limit that refused the request, if one did (for the metric).
    pub fn limit(&self) -> Option<&'static str> {
        use tideway_operators::tokenizers::audio::AudioError;
        match self {
            OpError::Frontend(FrontendError::Audio(a)) => match a {
                AudioError::RateOutOfRange { .. }
                | AudioError::RateRatio { .. }
                | AudioError::RateChanged { .. } => Some("sample_rate"),
                AudioError::ChunkTooLong { .. } => Some("chunk_samples"),
                _ => None,
            },
            OpError::Frontend(FrontendError::Text(
                tideway_operators::tokenizers::text::TextError::HeldTooLong { .. },
            )) => Some("held_text"),
            OpError::Capacity { .. } => Some("device_sessions"),
            OpError::TooManySessions { .. } => Some("sessions"),
            OpError::TooManyClientSessions { .. } => Some("client_sessions"),
            _ => None,
        }
    }
}

impl From<InputError> for OpError {
    fn from(e: InputError) -> Self {
        OpError::Input(e)
    }
}

impl From<ForwardError> for OpError {
    /// A model's failure as the client sees it: its input, or the group or device it runs on.
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Input(e) => OpError::Input(e),
            ForwardError::Group(e) => OpError::Unavailable(e.to_string()),
            ForwardError::Device(e) => OpError::Unavailable(e),
        }
    }
}

impl From<SessionStartError> for OpError {
    fn from(e: SessionStartError) -> Self {
        match e {
            SessionStartError::PoolFull { slots } => OpError::Capacity { slots },
            SessionStartError::Device(e) => OpError::Unavailable(e),
        }
    }
}

/// A change to the set of live sessions, for the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionEvent {
    pub session: SessionKey,
    pub worker: u32,
    pub model: u32,
    pub state_bytes: u64,
    /// +1 when a session starts, -1 when it ends or expires.
    pub delta: i64,
    pub expired: bool,
}

/// The key of session `name` of `model` owned by identity `owner`: the same name under
/// another identity is another session (so one client cannot resume or end another's).
pub fn owned_session_key(model: u32, owner: &str, name: &str) -> SessionKey {
    session_key(model, &format!("{owner}\u{0}{name}"))
}

/// The first 64 bits of a well-mixed hash (FNV-1a folded through a SplitMix64 finaliser):
/// stable across processes and runs, as placement must be.
pub fn session_key(model: u32, name: &str) -> SessionKey {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
