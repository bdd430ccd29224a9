//! `tideway.v1.Generation`: a generating session that steps itself through the dataflow.
//!
//! The prompt enters as one step of a fresh session (the chunked form); each answer's last
//! row of logits gives the next token (`tideway_operators::generate`: sampling, streamed
//! text, stop conditions), which enters as the session's next step. Steps of every session
//! and stream of the model that reach a worker in the same epoch run as one batch, so
//! generations batch continuously with each other and with streams. A client that cancels
//! stops its generation at the next answer (within one epoch); its session is freed. A
//! native stream continues into a generation from its own state the same way
//! ([`continue_generating`]).

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use tideway_operators::generate::{
    FinishReason, GenerateError, Generation, GenerationParams, SamplingParams,
};
use tideway_proto::tideway::v1 as pb;

use super::auth::{Identity, random_id};
use super::engine::Engine;
use super::messages::{Op, StepInput, owned_session_key};
use super::requests::answer;
use super::served::ServedKind;
use super::status::{op_status, shutting_down, submit_status};

/// New tokens when a request leaves `max_tokens` at 0.
const DEFAULT_MAX_TOKENS: usize = 128;

pub struct GenerationService {
    pub engine: Arc<Engine>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let owner = Identity::of(&request).name;
        let asked = Asked::parse(&self.engine, request.into_inner())?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(drive(self.engine.clone(), owner, asked, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A checked generation request.
pub struct Asked {
    pub model: u32,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

impl Asked {
    /// Checks `request` against the model and the server's limits: NOT_FOUND for an unknown
    /// model, RESOURCE_EXHAUSTED over a limit, INVALID_ARGUMENT for anything else wrong.
    pub fn parse(engine: &Engine, request: pb::GenerateRequest) -> Result<Asked, Status> {
        let model = engine.model_index(&request.model).ok_or_else(|| {
            let names: Vec<&str> = engine.models.iter().map(|m| m.name.as_str()).collect();
            Status::not_found(format!(
                "unknown model {:?}; served models: {}",
                request.model,
                names.join(", ")
            ))
        })?;
        let served = &engine.models[model as usize];
        let ServedKind::Language { info, tokenizer } = &served.kind else {
            return Err(Status::invalid_argument(format!(
                "model {:?} is a feature model: only language models generate",
                served.name
            )));
        };
        let limits = &engine.config.limits;
        let vocab = info.vocab_size;
        let prompt = match (request.text.is_empty(), request.tokens.is_empty()) {
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give the prompt as text or as tokens, not both",
                ));
            }
            (true, true) => {
                return Err(Status::invalid_argument(
                    "the prompt is empty: give text or tokens",
                ));
            }
            (false, true) => {
                let Some(tokenizer) = tokenizer else {
                    return Err(Status::invalid_argument(format!(
                        "model {:?} has no tokenizer.json: give the prompt as tokens",
                        served.name
                    )));
                };
                tokenizer
                    .encode(&request.text)
                    .map_err(|e| Status::invalid_argument(format!("text: {e}")))?
            }
            (true, false) => request
                .tokens
                .iter()
                .map(|&t| {
                    u32::try_from(t).ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "prompt token {t} is not in the model's vocabulary of {vocab} (0 to {})",
                            vocab - 1
                        ))
                    })
                })
                .collect::<Result<Vec<u32>, Status>>()?,
        };
        let params = Self::params(engine, model, request.clone())?;
        // Checks every parameter against the prompt's model.
        Generation::new(
            params.clone(),
            &prompt,
            &info.end_tokens,
            tokenizer.as_deref(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if prompt.len() > limits.max_request_tokens {
            return Err(Status::resource_exhausted(format!(
                "the prompt has {} tokens; at most {} are allowed (--max-request-tokens)",
                prompt.len(),
                limits.max_request_tokens
            )));
        }
        Ok(Asked {
            model,
            prompt,
            params,
        })
    }

    /// The settings of `request` (not its prompt), checked against model `model`.
    pub fn params(
        engine: &Engine,
        model: u32,
        request: pb::GenerateRequest,
    ) -> Result<GenerationParams, Status> {
        let limits = &engine.config.limits;
        let served = &engine.models[model as usize];
        let vocab = served.vocab_size();
        let max_new_tokens = match request.max_tokens as usize {
            0 => DEFAULT_MAX_TOKENS.min(limits.max_new_tokens),
            n if n > limits.max_new_tokens => {
                return Err(Status::resource_exhausted(
                    GenerateError::TooManyTokens {
                        asked: n,
                        limit: limits.max_new_tokens,
                    }
                    .to_string(),
                ));
            }
            n => n,
        };
        let stop_token_ids = request
            .stop_token_ids
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "stop token id {t} is not in the model's vocabulary of {vocab}"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>, Status>>()?;
        Ok(GenerationParams {
            sampling: SamplingParams {
                temperature: request.temperature.unwrap_or(1.0),
                top_k: request.top_k as usize,
                top_p: request.top_p.unwrap_or(1.0),
                min_p: request.min_p,
                repetition_penalty: request.repetition_penalty.unwrap_or(1.0),
                presence_penalty: request.presence_penalty,
                seed: request.seed.unwrap_or_else(rand_seed),
            },
            max_new_tokens,
            stop_token_ids,
            stop_strings: request.stop,
            ignore_eos: request.ignore_eos,
        })
    }
}

/// A seed for a request that gave none.
fn rand_seed() -> u64 {
    let id = random_id();
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for b in id.bytes() {
        seed = (seed ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    seed
}

/// A live session a generation steps.
pub struct SessionRef {
    pub worker: usize,
    pub key: u64,
    pub model: u32,
    pub name: String,
    pub owner: String,
}

/// Where a generation stopped, and the session's position after it.
pub struct Stopped {
    /// None: the server failed the generation (the error was sent).
    pub finish: Option<FinishReason>,
    pub position_after: Option<u64>,
}

/// Runs one generation on a fresh session: a response per token, then the finish.
pub async fn drive(
    engine: Arc<Engine>,
    owner: String,
    asked: Asked,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
) {
    let _open = engine.track_stream();
    let Asked {
        model,
        prompt,
        params,
    } = asked;
    let served = &engine.models[model as usize];
    let ServedKind::Language { info, tokenizer } = &served.kind else {
        return;
    };
    let mut generation =
        match Generation::new(params, &prompt, &info.end_tokens, tokenizer.as_deref()) {
            Ok(g) => g,
            Err(e) => {
                let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                return;
            }
        };
    let name = format!("generate:{}", random_id());
    let session = SessionRef {
        worker: engine.pick_worker(),
        key: owned_session_key(model, &owner, &name),
        model,
        name,
        owner,
    };
    let first = step(&engine, &session, prompt.clone(), true).await;
    let stopped = match first {
        Ok(row) => continue_session(&engine, &session, &mut generation, row, false, &tx).await,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            Stopped {
                finish: None,
                position_after: None,
            }
        }
    };
    let _ = engine.submit(
        session.worker,
        session.key,
        Op::End { name: session.name },
        true,
    );
    if let Some(reason) = stopped.finish.filter(|r| *r != FinishReason::Cancelled) {
        let _ = tx
            .send(Ok(finished(&generation, prompt.len(), reason)))
            .await;
    }
}

/// The last response of a generation.
pub fn finished(
    generation: &Generation,
    prompt_tokens: usize,
    reason: FinishReason,
) -> pb::GenerateResponse {
    pb::GenerateResponse {
        tokens: Vec::new(),
        text: String::new(),
        finished: Some(pb::GenerateFinished {
            finish_reason: reason.as_str().to_string(),
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: generation.tokens().len() as u32,
            seed: generation.params().sampling.seed,
        }),
    }
}

/// Feeds `tokens` to the session (starting it if `start`); the last row of logits.
async fn step(
    engine: &Engine,
    session: &SessionRef,
    tokens: Vec<u32>,
    start: bool,
) -> Result<(Vec<f32>, u64), Status> {
    let op = Op::Step {
        model: session.model,
        name: session.name.clone(),
        owner: session.owner.clone(),
        input: StepInput::Tokens(tokens),
        start,
        end: false,
        last_only: true,
    };
    let rx = engine
        .submit(session.worker, session.key, op, true)
        .map_err(submit_status)?;
    let closing = engine.closing();
    let reply = tokio::select! {
        r = answer(rx) => r.and_then(|r| r.map_err(|e| op_status(&e, Code::NotFound)))?,
        _ = closing => return Err(shutting_down()),
    };
    let width = reply.width as usize;
    Ok((
        reply.logits[reply.logits.len() - width..].to_vec(),
        reply.position_after,
    ))
}

/// Generates from `first` (the logits after the session's last input, and its position)
/// on, feeding every token back to the session (the last one too if `feed_last`: a stream
/// goes on from there), until the generation finishes, the client goes (`tx` closed:
/// Cancelled) or the server fails (the error is sent).
pub async fn continue_session(
    engine: &Engine,
    session: &SessionRef,
    generation: &mut Generation,
    first: (Vec<f32>, u64),
    feed_last: bool,
    tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
) -> Stopped {
    let served = &engine.models[session.model as usize];
    let tokenizer = match &served.kind {
        ServedKind::Language { tokenizer, .. } => tokenizer.as_deref(),
        ServedKind::Features(_) => None,
    };
    let (mut row, mut position_after) = first;
    loop {
        let made = match generation.step(&row, tokenizer) {
            Ok(made) => made,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("detokenizing: {e}"))))
                    .await;
                return Stopped {
                    finish: None,
                    position_after: Some(position_after),
                };
            }
        };
        let response = pb::GenerateResponse {
            tokens: vec![made.token as i64],
            text: made.text,
            finished: None,
        };
        if tx.send(Ok(response)).await.is_err() {
            return Stopped {
                finish: Some(FinishReason::Cancelled),
                position_after: Some(position_after),
            };
        }
        if made.finished.is_some() && !feed_last {
            return Stopped {
                finish: made.finished,
                position_after: Some(position_after),
            };
        }
        match step(engine, session, vec![made.token], false).await {
            Ok(_) if made.finished.is_some() => {
                return Stopped {
                    finish: made.finished,
                    position_after: Some(position_after + 1),
                };
            }
            Ok((next, after)) => (row, position_after) = (next, after),
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return Stopped {
                    finish: None,
                    position_after: Some(position_after),
                };
            }
        }
    }
}

/// The generation a chunk asks for (`StreamChunk.generate`), checked.
pub(super) fn continuation(
    engine: &Engine,
    model: u32,
    request: pb::GenerateRequest,
    input: &StepInput,
) -> Result<Generation, Status> {
    let served = &engine.models[model as usize];
    let ServedKind::Language { info, tokenizer } = &served.kind else {
        return Err(Status::invalid_argument(format!(
            "model {:?} is a feature model: only language models generate",
            served.name
        )));
    };
    let params = Asked::params(engine, model, request)?;
    let prompt = match input {
        StepInput::Tokens(t) => t.clone(),
        _ => Vec::new(),
    };
    Generation::new(params, &prompt, &info.end_tokens, tokenizer.as_deref())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Runs a stream's generation, its responses going out as `generated`.
pub(super) async fn continue_generating(
    engine: &Engine,
    session: &SessionRef,
    generation: &mut Generation,
    first: (Vec<f32>, u64),
    prompt_tokens: usize,
    out_tx: &super::outbound::Outbound<pb::StreamResponse>,
) -> Stopped {
    let (tx, mut rx) = mpsc::channel::<Result<pb::GenerateResponse, Status>>(16);
    let forward_tx = out_tx.clone();
    let forward = async move {
        let mut client_gone = false;
        while let Some(item) = rx.recv().await {
            let message = item.map(|g| pb::StreamResponse {
                kind: Some(pb::stream_response::Kind::Generated(g)),
            });
            if forward_tx.send(message).await.is_err() {
                client_gone = true;
                break;
            }
        }
        client_gone
    };
    let run = async {
        let stopped = continue_session(engine, session, generation, first, true, &tx).await;
        if let Some(reason) = stopped.finish.filter(|r| *r != FinishReason::Cancelled) {
            let _ = tx
                .send(Ok(finished(generation, prompt_tokens, reason)))
                .await;
        }
        drop(tx);
        stopped
    };
    let (mut stopped, client_gone) = tokio::join!(run, forward);
    if client_gone {
        stopped.finish = Some(FinishReason::Cancelled);
    }
    stopped
}
