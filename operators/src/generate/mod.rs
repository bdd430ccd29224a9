//! Text generation without a model inside: a request's parameters, and the per-step work
//! after the logits (sampling, detokenization, stop conditions), shared by `tideway generate`,
//! the engine's generating sessions and their tests.
//!
//! ```
//! use tideway_operators::generate::{FinishReason, Generation, GenerationParams};
//! let params = GenerationParams { max_new_tokens: 2, ..GenerationParams::greedy() };
//! let mut generation = Generation::new(params, &[1, 2], &[], None).unwrap();
//! assert_eq!(generation.step(&[0.0, 3.0, 1.0], None).unwrap().token, 1);
//! let last = generation.step(&[5.0, 3.0, 1.0], None).unwrap();
//! assert_eq!((last.token, last.finished), (0, Some(FinishReason::Length)));
//! ```

mod detokenize;
mod sampling;
mod stop;

pub use detokenize::Detokenizer;
pub use sampling::{Sampler, SamplingError, SamplingParams};
pub use stop::{StopScan, StopStrings};
/// The first largest logit's index, greedy decoding's choice (the kernels' vectorised one).
pub use tideway_kernels::argmax::argmax;

use crate::tokenizers::text::{TextError, TextTokenizer};

/// What one generation asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Tokens that end the generation (besides the model's end token unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Texts that end the generation (matched on the detokenized text; not released).
    pub stop_strings: Vec<String>,
    /// Go on past the model's end-of-sequence token.
    pub ignore_eos: bool,
}

impl GenerationParams {
    pub fn greedy() -> Self {
        GenerationParams {
            sampling: SamplingParams::greedy(),
            max_new_tokens: 16,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` were made.
    Length,
    /// The model's end token or a stop token id was made (it is the last token).
    StopToken(u32),
    /// The stop string of this index was found in the text.
    StopString(usize),
    /// The client went away or cancelled.
    Cancelled,
}

impl FinishReason {
    /// The name clients see: `length`, `stop` (a token or a string) or `cancelled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A request that cannot be generated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("max_tokens {asked} is over this server's limit of {limit} (--max-new-tokens)")]
    TooManyTokens { asked: usize, limit: usize },
    #[error("stop strings need text, and this model has no tokenizer.json: give stop token ids")]
    StopStringsWithoutTokenizer,
    #[error("stop token id {id} is not in the model's vocabulary of {vocab}")]
    StopTokenOutOfRange { id: u32, vocab: usize },
}

/// One step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedStep {
    pub token: u32,
    /// Text released by this step (empty while a character or a possible stop string is
    /// unfinished, and for models without a tokenizer).
    pub text: String,
    pub finished: Option<FinishReason>,
}

/// One generation's progress after its prompt.
#[derive(Debug, Clone)]
pub struct Generation {
    params: GenerationParams,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopStrings,
    /// Tokens that end the generation: the stop ids and the end token.
    end_tokens: Vec<u32>,
    tokens: Vec<u32>,
    finished: Option<FinishReason>,
}

impl Generation {
    /// A generation after `prompt`; `eos` are the model's end tokens ([`end_tokens`]);
    /// `tokenizer` the model's (stop strings need it).
    pub fn new(
        params: GenerationParams,
        prompt: &[u32],
        eos: &[u32],
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<Self, GenerateError> {
        params.sampling.validate()?;
        if params.max_new_tokens == 0 {
            return Err(GenerateError::NoTokens);
        }
        if !params.stop_strings.is_empty() && tokenizer.is_none() {
            return Err(GenerateError::StopStringsWithoutTokenizer);
        }
        let mut end_tokens = params.stop_token_ids.clone();
        if !params.ignore_eos {
            end_tokens.extend_from_slice(eos);
        }
        Ok(Generation {
            sampler: Sampler::new(params.sampling.clone(), prompt),
            stops: StopStrings::new(params.stop_strings.clone()),
            detokenizer: Detokenizer::default(),
            end_tokens,
            tokens: Vec::new(),
            finished: None,
            params,
        })
    }

    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    /// The tokens made so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Samples the next token from `logits` (the last position's row) and says what it
    /// releases. Not to be called after the generation finished.
    pub fn step(
        &mut self,
        logits: &[f32],
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<GeneratedStep, TextError> {
        debug_assert!(self.finished.is_none(), "step after the generation ended");
        let token = self.sampler.sample(logits);
        self.tokens.push(token);
        let mut finished = None;
        let mut text = String::new();
        let ended_by_token = self.end_tokens.contains(&token);
        if let Some(tokenizer) = tokenizer {
            // An end token's own text (usually a special token, decoded as nothing) is not
            // released.
            let mut piece = if ended_by_token {
                String::new()
            } else {
                self.detokenizer.push(tokenizer, token)?
            };
            let last = ended_by_token || self.tokens.len() >= self.params.max_new_tokens;
            if last {
                piece.push_str(&self.detokenizer.finish(tokenizer)?);
            }
            match self.stops.push(&piece) {
                StopScan::Stopped { text: before, stop } => {
                    text = before;
                    finished = Some(FinishReason::StopString(stop));
                }
                StopScan::Release(released) => text = released,
            }
            if last && finished.is_none() {
                text.push_str(&self.stops.finish());
            }
        }
        if finished.is_none() {
            if ended_by_token {
                finished = Some(FinishReason::StopToken(token));
            } else if self.tokens.len() >= self.params.max_new_tokens {
                finished = Some(FinishReason::Length);
            }
        }
        self.finished = finished;
        Ok(GeneratedStep {
            token,
            text,
            finished,
        })
    }

    /// Ends the generation early (the client cancelled); the text still held back.
    pub fn cancel(&mut self, tokenizer: Option<&TextTokenizer>) -> Result<String, TextError> {
        self.finished = Some(FinishReason::Cancelled);
        let Some(tokenizer) = tokenizer else {
            return Ok(String::new());
        };
        let piece = self.detokenizer.finish(tokenizer)?;
        Ok(match self.stops.push(&piece) {
            StopScan::Stopped { text, .. } => text,
            StopScan::Release(mut text) => {
                text.push_str(&self.stops.finish());
                text
            }
        })
    }
}

/// The model's end-of-sequence tokens: `eos_token_id` of its config.json (one id or a list;
/// none when absent or null).
pub fn end_tokens(dir: &std::path::Path) -> Result<Vec<u32>, crate::LoadError> {
    let config = crate::models::config::ConfigJson::read(dir)?;
    let bad = || config.malformed("eos_token_id must be a token id, a list of them, or null");
    let as_id = |v: &serde_json::Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    match config.raw("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(ids)) => {
            ids.iter().map(|v| as_id(v).ok_or_else(bad)).collect()
        }
        Some(v) => Ok(vec![as_id(v).ok_or_else(bad)?]),
    }
}
