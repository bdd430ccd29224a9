//! Typed errors of the model stages. Each message says what was wrong and what is allowed.

use std::path::PathBuf;

/// A checkpoint directory that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The io::Error is part of the message rather than a `source`, so that printing the
    // error chain does not repeat it.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path} is not a directory (a model is a directory holding config.json and *.safetensors)"
    )]
    NotADirectory { path: PathBuf },
    #[error("no config.json in {dir} (a checkpoint directory holds config.json and *.safetensors)")]
    MissingConfig { dir: PathBuf },
    #[error("{path}: malformed config.json: {reason}")]
    MalformedConfig { path: PathBuf, reason: String },
    #[error(
        "{path}: unknown model_type {model_type:?}; supported: \"mamba\" (or a state-spaces Mamba config with d_model and n_layer), \"gla\", \"delta_net\", \"gated_deltanet\", \"retnet\", \"linear_attn\", \"lmuformer\""
    )]
    UnknownModelType { path: PathBuf, model_type: String },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("no *.safetensors files in {dir}")]
    NoWeights { dir: PathBuf },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor {name:?} is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name:?} has dtype {dtype}; supported: F32, BF16, F16")]
    UnsupportedDtype { name: String, dtype: String },
}

/// Input that a loaded model cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum InputError {
    #[error("token id {token} at position {position} is out of range: the vocabulary has {vocab} ids (0..={max})", max = vocab - 1)]
    TokenOutOfRange {
        token: u64,
        position: usize,
        vocab: usize,
    },
    #[error("empty input: at least one token is needed")]
    Empty,
    #[error("a session state of another model family was passed to this model")]
    WrongState,
    #[error("{sessions} sessions but {tokens} tokens: a step takes one token per session")]
    BatchMismatch { sessions: usize, tokens: usize },
    #[error("frames have {found} channels; the model takes {expected}")]
    WrongWidth { expected: usize, found: usize },
    #[error("frame {frame}, channel {channel} is NaN or infinite; features must be finite")]
    NonFinite { frame: usize, channel: usize },
    #[error("the stream has ended; start a new one to send more frames")]
    Ended,
    /// A pipeline stage was asked for a piece of the model that another stage holds.
    #[error("this placement does not hold the model's {piece}; another pipeline stage runs it")]
    NotHeld { piece: ModelPiece },
    /// A pipeline stage got the output of a stage that does not come before it.
    #[error("layers {layers:?} got input of another kind than the stage before hands on")]
    StageMismatch { layers: std::ops::Range<usize> },
}

/// A piece of a model that a pipeline stage may or may not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelPiece {
    Embedding,
    Head,
}

impl std::fmt::Display for ModelPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelPiece::Embedding => "embedding",
            ModelPiece::Head => "head",
        })
    }
}

/// A forward pass that failed: bad input, or (on a tensor-parallel rank) a collective that
/// could not complete because a peer or the transport failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Group(#[from] tideway_kernels::collective::CollectiveError),
    /// The device (a GPU) failed; the message says how.
    #[error("{0}")]
    Device(String),
}
