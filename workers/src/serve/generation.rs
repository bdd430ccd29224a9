//! `tideway.v1.Generation`: a generating session that steps itself through the dataflow.
//!
//! The prompt enters as one step of a fresh session (the chunked form); each answer's last
//! row of logits gives the next token (`tideway_operators::generate`: sampling, streamed
//! text, stop conditions), which enters as the session's next step. Steps of every session
//! and stream of the model that reach a worker in the same epoch run as one batch, so
//! generations batch continuously with each other and with streams. A client that cancels
//! stops its generation at the next answer (within one epoch); its session is freed.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use tideway_operators::generate::{
    FinishReason, GenerateError, Generation, GenerationParams, SamplingParams,
};
use tideway_operators::tokenizers::text::TextTokenizer;
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
        if prompt.len() > limits.max_request_tokens {
            return Err(Status::resource_exhausted(format!(
                "the prompt has {} tokens; at most {} are allowed (--max-request-tokens)",
                prompt.len(),
                limits.max_request_tokens
            )));
        }
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
        let params = GenerationParams {
            sampling: SamplingParams {
                temperature: request.temperature.unwrap_or(1.0),
                top_k: request.top_k as usize,
                top_p: request.top_p.unwrap_or(1.0),
                min_p: request.min_p,
                repetition_penalty: request.repetition_penalty.unwrap_or(1.0),
                presence_penalty: request.presence_penalty,
                seed: request.seed.unwrap_or_else(|| rand_seed()),
            },
            max_new_tokens,
            stop_token_ids,
            stop_strings: request.stop,
            ignore_eos: request.ignore_eos,
        };
        // Checks every parameter (the generation itself is made again by `drive`).
        Generation::new(
            params.clone(),
            &prompt,
            &info.end_tokens,
            tokenizer.as_deref(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Asked {
            model,
            prompt,
            params,
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

/// Runs one generation, sending a response per token and a last one with the finish.
pub async fn drive(
    engine: Arc<Engine>,
    owner: String,
    asked: Asked,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
) {
    let _open = engine.track_stream();
    let closing = engine.closing();
    tokio::pin!(closing);
    let Asked {
        model,
        prompt,
        params,
    } = asked;
    let served = &engine.models[model as usize];
    let ServedKind::Language { info, tokenizer } = &served.kind else {
        return;
    };
    let tokenizer: Option<&TextTokenizer> = tokenizer.as_deref();
    let seed = params.sampling.seed;
    let mut generation = match Generation::new(params, &prompt, &info.end_tokens, tokenizer) {
        Ok(g) => g,
        Err(e) => {
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
    };
    let worker = engine.pick_worker();
    let name = format!("generate:{}", random_id());
    let key = owned_session_key(model, &owner, &name);
    let mut input = prompt.clone();
    let mut start = true;
    let finish = loop {
        let op = Op::Step {
            model,
            name: name.clone(),
            owner: owner.clone(),
            input: StepInput::Tokens(std::mem::take(&mut input)),
            start,
            end: false,
            last_only: true,
        };
        start = false;
        let reply = match engine.submit(worker, key, op, false) {
            Ok(rx) => tokio::select! {
                r = answer(rx) => r.and_then(|r| r.map_err(|e| op_status(&e, Code::NotFound))),
                _ = &mut closing => Err(shutting_down()),
            },
            Err(e) => Err(submit_status(e)),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                break None;
            }
        };
        let width = reply.width as usize;
        let row = &reply.logits[reply.logits.len() - width..];
        let step = match generation.step(row, tokenizer) {
            Ok(step) => step,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("detokenizing: {e}"))))
                    .await;
                break None;
            }
        };
        let response = pb::GenerateResponse {
            tokens: vec![step.token as i64],
            text: step.text,
            finished: None,
        };
        if tx.send(Ok(response)).await.is_err() {
            // The client cancelled or went away.
            break Some(FinishReason::Cancelled);
        }
        if let Some(reason) = step.finished {
            break Some(reason);
        }
        input = vec![step.token];
    };
    if !start {
        let _ = engine.submit(worker, key, Op::End { name }, true);
    }
    if let Some(reason) = finish.filter(|r| *r != FinishReason::Cancelled) {
        let finished = pb::GenerateFinished {
            finish_reason: reason.as_str().to_string(),
            prompt_tokens: prompt.len() as u32,
            completion_tokens: generation.tokens().len() as u32,
            seed,
        };
        let _ = tx
            .send(Ok(pb::GenerateResponse {
                tokens: Vec::new(),
                text: String::new(),
                finished: Some(finished),
            }))
            .await;
    }
}
