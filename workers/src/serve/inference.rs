//! `inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol with Triton's
//! extensions, as `tritonclient[grpc]` speaks it (`shared/PROTOCOL.md`). Sequences
//! (`sequence_id`, `sequence_start`, `sequence_end`) map onto Tideway sessions; outputs are
//! always raw; every request gets exactly one answer; on streams an error is an
//! `error_message` and the stream stays open (unless the client asked for
//! `triton_grpc_error: true`).
//!
//! Length: ~750 lines: the whole KServe v2 service (metadata, config, statistics, infer, the
//! decoupled stream with sequences) in one place, each RPC mapping onto the request layer in
//! `requests.rs`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use pb::infer_parameter::ParameterChoice;
use pb::model_infer_request::InferInputTensor;
use tideway_proto::inference as pb;

use super::auth::Identity;
use super::engine::Engine;
use super::messages::{self, Op, StepInput, owned_session_key};
use super::outbound;
use super::requests::{LengthLimit, answer, check_answer, check_ids, tensor_specs};
use super::status::{inbound_error, op_status, shutting_down, status_message, submit_status};

const STREAM_CREDIT: usize = 64;

/// Per-model counters for `ModelStatistics`.
#[derive(Default)]
struct Counters {
    success: AtomicU64,
    success_ns: AtomicU64,
    fail: AtomicU64,
    fail_ns: AtomicU64,
    last_ms: AtomicU64,
}

pub struct InferenceService {
    pub engine: Arc<Engine>,
    counters: Arc<Vec<Counters>>,
}

/// The raw bytes of input `i`, if the request sends its inputs raw.
fn raw_input(request: &pb::ModelInferRequest, i: usize) -> Result<Option<&Vec<u8>>, Status> {
    if request.raw_input_contents.is_empty() {
        return Ok(None);
    }
    request.raw_input_contents.get(i).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{} inputs but {} raw_input_contents",
            request.inputs.len(),
            request.raw_input_contents.len()
        ))
    })
}

/// The values of an FP32 (or, for audio, INT16) input, from raw bytes or typed contents.
fn float_values(
    input: &InferInputTensor,
    raw: Option<&Vec<u8>>,
    count: usize,
) -> Result<Vec<f32>, Status> {
    let name = &input.name;
    let values: Vec<f32> = match (input.datatype.as_str(), raw) {
        ("FP32", Some(bytes)) if bytes.len() == count * 4 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        ("INT16", Some(bytes)) if name == "audio" && bytes.len() == count * 2 => bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes(b.try_into().expect("2 bytes")) as f32 / 32768.0)
            .collect(),
        ("FP32", None) => input
            .contents
            .as_ref()
            .map_or(Vec::new(), |c| c.fp32_contents.clone()),
        ("INT16", None) if name == "audio" => {
            input.contents.as_ref().map_or(Ok(Vec::new()), |c| {
                c.int_contents
                    .iter()
                    .map(|&v| {
                        i16::try_from(v).map(|v| v as f32 / 32768.0).map_err(|_| {
                            Status::invalid_argument(format!(
                                "input \"audio\": {v} is outside the int16 range"
                            ))
                        })
                    })
                    .collect()
            })?
        }
        (dt @ ("FP32" | "INT16"), Some(bytes)) => {
            return Err(Status::invalid_argument(format!(
                "input {name:?}: {} raw bytes for {count} values of {dt}",
                bytes.len()
            )));
        }
        (other, _) => {
            let allowed = if name == "audio" {
                "\"FP32\", \"INT16\""
            } else {
                "\"FP32\""
            };
            return Err(Status::invalid_argument(format!(
                "input {name:?} has datatype {other:?}; allowed: {allowed}"
            )));
        }
    };
    check_count(input, values.len(), count)?;
    Ok(values)
}

/// An input's values must be as many as its shape says.
fn check_count(input: &InferInputTensor, found: usize, count: usize) -> Result<(), Status> {
    if found != count {
        return Err(Status::invalid_argument(format!(
            "input {:?} holds {found} values but its shape {:?} says {count}",
            input.name, input.shape
        )));
    }
    Ok(())
}

/// A feature model's request: `input` (FP32, [T, C] or [1, T, C]) or `audio` (FP32 or INT16,
/// [S] or [1, S], with the request parameter `sample_rate`).
fn feature_input(
    request: &pb::ModelInferRequest,
    served: &super::served::ServedModel,
    engine: &Engine,
) -> Result<StepInput, Status> {
    let board = &engine.board;
    let allowed = "\"input\" (FP32, [T, C]) or \"audio\" (FP32 or INT16 samples, [S], with a \"sample_rate\" parameter)";
    let [input] = request.inputs.as_slice() else {
        return Err(Status::invalid_argument(format!(
            "model {:?} takes one input: {allowed}",
            served.name
        )));
    };
    let raw = raw_input(request, 0)?;
    match input.name.as_str() {
        "input" => {
            let (t, c) = match input.shape.as_slice() {
                [t, c] | [1, t, c] if *t >= 0 && *c > 0 => (*t as usize, *c as usize),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "input \"input\" has shape {other:?}; allowed: [T, C] or [1, T, C]"
                    )));
                }
            };
            LengthLimit::request(&engine.config.limits)
                .check("frames", t)
                .map_err(|e| e.refuse(board))?;
            Ok(StepInput::Frames {
                values: float_values(input, raw, t * c)?,
                width: c as u32,
            })
        }
        "audio" => {
            let s = match input.shape.as_slice() {
                [s] | [1, s] if *s >= 0 => *s as usize,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "input \"audio\" has shape {other:?}; allowed: [S] or [1, S]"
                    )));
                }
            };
            let rate = match param(&request.parameters, "sample_rate") {
                Some(ParameterChoice::Int64Param(r)) if *r > 0 => *r as u64,
                Some(ParameterChoice::Uint64Param(r)) if *r > 0 => *r,
                _ => {
                    return Err(Status::invalid_argument(
                        "input \"audio\" needs the request parameter \"sample_rate\" (a positive integer, Hz)",
                    ));
                }
            };
            // Checked whole, before any narrowing (2^32 + 1 is not 1 Hz).
            let rate = match &served.kind {
                super::served::ServedKind::Features(f) => match f.audio_frontend() {
                    Some(audio) => audio.check_rate(rate).map_err(|e| {
                        board.count_limit("sample_rate");
                        Status::invalid_argument(e.to_string())
                    })?,
                    // The front-end stage refuses audio for a model without an audio front end.
                    None => rate.min(u32::MAX as u64) as u32,
                },
                super::served::ServedKind::Language { .. } => rate.min(u32::MAX as u64) as u32,
            };
            Ok(StepInput::Audio {
                samples: float_values(input, raw, s)?,
                rate,
            })
        }
        other => Err(Status::invalid_argument(format!(
            "unknown input {other:?}; model {:?} takes {allowed}",
            served.name
        ))),
    }
}

impl InferenceService {
    pub fn new(engine: Arc<Engine>) -> Self {
        let counters = Arc::new(
            (0..engine.models.len())
                .map(|_| Counters::default())
                .collect(),
        );
        InferenceService { engine, counters }
    }
}

/// A request checked and turned into a session operation.
struct Prepared {
    model: u32,
    key: u64,
    op: Op,
    id: String,
    model_name: String,
}

fn param<'a>(
    map: &'a HashMap<String, pb::InferParameter>,
    key: &str,
) -> Option<&'a ParameterChoice> {
    map.get(key).and_then(|p| p.parameter_choice.as_ref())
}

fn bool_param(map: &HashMap<String, pb::InferParameter>, key: &str) -> Result<bool, Status> {
    match param(map, key) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(other) => Err(Status::invalid_argument(format!(
            "parameter {key:?} must be a bool_param, found {other:?}"
        ))),
    }
}

/// The sequence id as a string ("" when the request is not part of a sequence; 0 means none,
/// as in Triton).
fn sequence_id(map: &HashMap<String, pb::InferParameter>) -> Result<String, Status> {
    match param(map, "sequence_id") {
        None => Ok(String::new()),
        Some(ParameterChoice::Int64Param(0)) | Some(ParameterChoice::Uint64Param(0)) => {
            Ok(String::new())
        }
        Some(ParameterChoice::Int64Param(v)) => Ok(v.to_string()),
        Some(ParameterChoice::Uint64Param(v)) => Ok(v.to_string()),
        Some(ParameterChoice::StringParam(s)) => Ok(s.clone()),
        Some(other) => Err(Status::invalid_argument(format!(
            "parameter \"sequence_id\" must be an int64, uint64 or string parameter, found {other:?}"
        ))),
    }
}

fn input_ids(input: &InferInputTensor, raw: Option<&Vec<u8>>) -> Result<Vec<i64>, Status> {
    let count = match input.shape.as_slice() {
        [t] if *t >= 0 => *t as usize,
        [1, t] if *t >= 0 => *t as usize,
        other => {
            return Err(Status::invalid_argument(format!(
                "input \"input_ids\" has shape {other:?}; allowed: [T] or [1, T]"
            )));
        }
    };
    let ids: Vec<i64> = match (input.datatype.as_str(), raw) {
        ("INT64", Some(bytes)) => {
            if bytes.len() != count * 8 {
                return Err(Status::invalid_argument(format!(
                    "input \"input_ids\": {} raw bytes for shape {:?} of INT64 (needs {})",
                    bytes.len(),
                    input.shape,
                    count * 8
                )));
            }
            bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        }
        ("INT32", Some(bytes)) => {
            if bytes.len() != count * 4 {
                return Err(Status::invalid_argument(format!(
                    "input \"input_ids\": {} raw bytes for shape {:?} of INT32 (needs {})",
                    bytes.len(),
                    input.shape,
                    count * 4
                )));
            }
            bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect()
        }
        ("INT64", None) => input
            .contents
            .as_ref()
            .map_or(Vec::new(), |c| c.int64_contents.clone()),
        ("INT32", None) => input.contents.as_ref().map_or(Vec::new(), |c| {
            c.int_contents.iter().map(|&v| v as i64).collect()
        }),
        (other, _) => {
            return Err(Status::invalid_argument(format!(
                "input \"input_ids\" has datatype {other:?}; allowed: \"INT64\", \"INT32\""
            )));
        }
    };
    check_count(input, ids.len(), count)?;
    Ok(ids)
}

impl InferenceService {
    fn model(&self, name: &str, version: &str) -> Result<u32, Status> {
        let index = self.engine.model_index(name).ok_or_else(|| {
            Status::not_found(format!(
                "unknown model {name:?}; served models: {}",
                self.engine
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if !version.is_empty() && version != "1" {
            return Err(Status::not_found(format!(
                "model {name:?} has no version {version:?}; its only version is \"1\""
            )));
        }
        Ok(index)
    }

    fn prepare(
        &self,
        request: pb::ModelInferRequest,
        owner: &Identity,
    ) -> Result<Prepared, Status> {
        let model = self.model(&request.model_name, &request.model_version)?;
        let served = &self.engine.models[model as usize];
        let output_name = served.output_name();
        for out in &request.outputs {
            if out.name != output_name {
                return Err(Status::invalid_argument(format!(
                    "unknown output {:?}; model {:?} has one output, {output_name:?}",
                    out.name, served.name
                )));
            }
        }
        let input = if served.is_language() {
            StepInput::Tokens(self.token_input(&request, served)?)
        } else {
            feature_input(&request, served, &self.engine)?
        };
        let sequence = sequence_id(&request.parameters)?;
        let (name, start, end) = if sequence.is_empty() {
            // Not a sequence: a session of one request.
            static ONE_SHOT: AtomicU64 = AtomicU64::new(0);
            let n = ONE_SHOT.fetch_add(1, Ordering::Relaxed);
            (format!("request:{}:{n}", std::process::id()), true, true)
        } else {
            (
                format!("sequence:{sequence}"),
                bool_param(&request.parameters, "sequence_start")?,
                bool_param(&request.parameters, "sequence_end")?,
            )
        };
        Ok(Prepared {
            model,
            key: owned_session_key(model, &owner.name, &name),
            op: Op::Step {
                model,
                name,
                owner: owner.name.clone(),
                input,
                start,
                end,
            },
            id: request.id,
            model_name: request.model_name,
        })
    }

    /// `input_ids` of a language model's request.
    fn token_input(
        &self,
        request: &pb::ModelInferRequest,
        served: &super::served::ServedModel,
    ) -> Result<Vec<u32>, Status> {
        let mut tokens = None;
        for (i, input) in request.inputs.iter().enumerate() {
            if input.name != "input_ids" {
                return Err(Status::invalid_argument(format!(
                    "unknown input {:?}; model {:?} takes \"input_ids\" (INT64 or INT32, [T] or [1, T])",
                    input.name, served.name
                )));
            }
            let limits = &self.engine.config.limits;
            tokens = Some(
                check_ids(
                    &input_ids(input, raw_input(request, i)?)?,
                    served.vocab_size(),
                    LengthLimit::request(limits),
                )
                .and_then(|ids| {
                    check_answer(ids.len(), served.width(), limits.max_message_bytes, false)?;
                    Ok(ids)
                })
                .map_err(|e| e.refuse(&self.engine.board))?,
            );
        }
        tokens.ok_or_else(|| {
            Status::invalid_argument("missing input \"input_ids\" (INT64 or INT32, [T] or [1, T])")
        })
    }

    fn respond(
        prepared_id: String,
        model_name: String,
        output_name: &str,
        reply: &messages::Reply,
    ) -> pb::ModelInferResponse {
        pb::ModelInferResponse {
            model_name,
            model_version: "1".into(),
            id: prepared_id,
            parameters: HashMap::new(),
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: output_name.into(),
                datatype: "FP32".into(),
                shape: vec![reply.rows as i64, reply.width as i64],
                parameters: HashMap::new(),
                contents: None,
            }],
            raw_output_contents: vec![reply.logits.iter().flat_map(|v| v.to_le_bytes()).collect()],
        }
    }

    fn count(&self, model: u32, started: Instant, ok: bool) {
        let c = &self.counters[model as usize];
        let ns = started.elapsed().as_nanos() as u64;
        if ok {
            c.success.fetch_add(1, Ordering::Relaxed);
            c.success_ns.fetch_add(ns, Ordering::Relaxed);
        } else {
            c.fail.fetch_add(1, Ordering::Relaxed);
            c.fail_ns.fetch_add(ns, Ordering::Relaxed);
        }
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        c.last_ms.store(ms, Ordering::Relaxed);
    }

    /// An error answered inside a `ModelStreamInfer` stream (as Triton does, in a response's
    /// `error_message`): the call itself succeeds, so the server's error-metrics layer does
    /// not see it; counted here.
    fn stream_error(&self, status: Status) -> Status {
        self.engine.board.count_grpc_error(
            "inference.GRPCInferenceService",
            "ModelStreamInfer",
            status.code(),
        );
        status
    }
}

/// Runs one prepared request to its answer.
async fn finish(rx: oneshot::Receiver<messages::Response>) -> Result<messages::Reply, Status> {
    answer(rx)
        .await?
        .map_err(|e| op_status(&e, Code::InvalidArgument))
}

type InferStream = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _r: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _r: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: !self.engine.is_draining(),
        }))
    }

    async fn model_ready(
        &self,
        r: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.model(&r.name, &r.version).is_ok() && !self.engine.is_draining();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _r: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "tideway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: [
                "binary_tensor_data",
                "sequence",
                "statistics",
                "model_configuration",
            ]
            .map(String::from)
            .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let index = self.model(&r.name, &r.version)?;
        let m = &self.engine.models[index as usize];
        let (inputs, outputs) = tensor_specs(m);
        use pb::model_metadata_response::TensorMetadata;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec!["1".into()],
            platform: format!("tideway_{}", m.family()),
            inputs: inputs
                .into_iter()
                .map(|t| TensorMetadata {
                    name: t.name.into(),
                    datatype: t.datatype.into(),
                    shape: t.shape,
                })
                .collect(),
            outputs: outputs
                .into_iter()
                .map(|t| TensorMetadata {
                    name: t.name.into(),
                    datatype: t.datatype.into(),
                    shape: t.shape,
                })
                .collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let started = Instant::now();
        let owner = Identity::of(&request);
        let prepared = self.prepare(request.into_inner(), &owner)?;
        let worker = self.engine.pick_worker();
        let rx = self
            .engine
            .submit(worker, prepared.key, prepared.op, false)
            .map_err(submit_status)?;
        let result = finish(rx).await;
        self.count(prepared.model, started, result.is_ok());
        let reply = result?;
        let output = self.engine.models[prepared.model as usize].output_name();
        Ok(Response::new(Self::respond(
            prepared.id,
            prepared.model_name,
            output,
            &reply,
        )))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let owner = Identity::of(&request);
        let errors_end_stream = request
            .metadata()
            .get("triton_grpc_error")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let mut inbound = request.into_inner();
        let service = InferenceService {
            engine: self.engine.clone(),
            counters: self.counters.clone(),
        };
        let (tx, rx) = outbound::channel(
            self.engine.config.limits.max_stream_buffer_bytes,
            STREAM_CREDIT,
        );
        tokio::spawn(async move {
            let _open = service.engine.track_stream();
            let closing = service.engine.closing();
            tokio::pin!(closing);
            let worker = service.engine.pick_worker();
            // Answers in request order: either an immediate error or a pending reply.
            type Pending = Result<
                (
                    String,
                    String,
                    u32,
                    Instant,
                    oneshot::Receiver<messages::Response>,
                ),
                (String, Status),
            >;
            let (order_tx, mut order_rx) = mpsc::channel::<Pending>(STREAM_CREDIT);
            let writer_tx = tx.clone();
            let counters_service = InferenceService {
                engine: service.engine.clone(),
                counters: service.counters.clone(),
            };
            let writer = tokio::spawn(async move {
                while let Some(pending) = order_rx.recv().await {
                    let (id, result) = match pending {
                        Ok((id, model_name, model, started, rx)) => {
                            let result = finish(rx).await;
                            counters_service.count(model, started, result.is_ok());
                            let output =
                                counters_service.engine.models[model as usize].output_name();
                            (
                                id.clone(),
                                result.map(|reply| Self::respond(id, model_name, output, &reply)),
                            )
                        }
                        Err((id, status)) => (id, Err(status)),
                    };
                    let message = match result {
                        Ok(response) => Ok(pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        }),
                        Err(status) => {
                            if errors_end_stream {
                                let _ = writer_tx.send(Err(status)).await;
                                return;
                            }
                            let status = counters_service.stream_error(status);
                            Ok(pb::ModelStreamInferResponse {
                                error_message: status_message(&status),
                                infer_response: Some(pb::ModelInferResponse {
                                    id,
                                    ..Default::default()
                                }),
                            })
                        }
                    };
                    if writer_tx.send(message).await.is_err() {
                        return;
                    }
                }
            });
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = &mut closing => {
                        let _ = tx.send(Err(shutting_down())).await;
                        break;
                    }
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        if let Some(answer) = inbound_error(&status) {
                            let _ = tx.send(Err(answer)).await;
                        }
                        break;
                    }
                };
                let id = request.id.clone();
                let pending = match service.prepare(request, &owner) {
                    Ok(p) => match service.engine.submit(worker, p.key, p.op, false) {
                        Ok(rx) => Ok((p.id, p.model_name, p.model, Instant::now(), rx)),
                        Err(e) => Err((id, submit_status(e))),
                    },
                    Err(status) => Err((id, status)),
                };
                if order_tx.send(pending).await.is_err() {
                    break;
                }
            }
            drop(order_tx);
            let _ = writer.await;
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let index = self.model(&r.name, &r.version)?;
        let m = &self.engine.models[index as usize];
        let idle_us = self.engine.config.idle_limit.as_micros() as u64;
        // The same tensors ModelMetadata lists (a feature model takes `input` or `audio`).
        let (inputs, outputs) = tensor_specs(m);
        let data_type = |name: &str| match name {
            "INT64" => pb::DataType::TypeInt64,
            "INT32" => pb::DataType::TypeInt32,
            "INT16" => pb::DataType::TypeInt16,
            _ => pb::DataType::TypeFp32,
        } as i32;
        let alternatives = inputs.len() > 1;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(pb::ModelConfig {
                name: m.name.clone(),
                platform: format!("tideway_{}", m.family()),
                backend: "tideway".into(),
                max_batch_size: 0,
                input: inputs
                    .iter()
                    .map(|t| pb::ModelInput {
                        name: t.name.into(),
                        data_type: data_type(t.datatype),
                        dims: t.shape.clone(),
                        optional: alternatives,
                    })
                    .collect(),
                output: outputs
                    .iter()
                    .map(|t| pb::ModelOutput {
                        name: t.name.into(),
                        data_type: data_type(t.datatype),
                        dims: t.shape.clone(),
                    })
                    .collect(),
                scheduling_choice: Some(pb::model_config::SchedulingChoice::SequenceBatching(
                    pb::ModelSequenceBatching {
                        max_sequence_idle_microseconds: idle_us,
                        strategy_choice: Some(pb::model_sequence_batching::StrategyChoice::Direct(
                            pb::model_sequence_batching::StrategyDirect {
                                max_queue_delay_microseconds: self.engine.config.tick.as_micros()
                                    as u64,
                                minimum_slot_utilization: 0.0,
                            },
                        )),
                    },
                )),
            }),
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = r.into_inner();
        let indices: Vec<u32> = if r.name.is_empty() {
            (0..self.engine.models.len() as u32).collect()
        } else {
            vec![self.model(&r.name, &r.version)?]
        };
        let duration = |count: &AtomicU64, ns: &AtomicU64| pb::StatisticDuration {
            count: count.load(Ordering::Relaxed),
            ns: ns.load(Ordering::Relaxed),
        };
        let model_stats = indices
            .into_iter()
            .map(|i| {
                let c = &self.counters[i as usize];
                let success = c.success.load(Ordering::Relaxed);
                pb::ModelStatistics {
                    name: self.engine.models[i as usize].name.clone(),
                    version: "1".into(),
                    last_inference: c.last_ms.load(Ordering::Relaxed),
                    inference_count: success,
                    execution_count: success,
                    inference_stats: Some(pb::InferStatistics {
                        success: Some(duration(&c.success, &c.success_ns)),
                        fail: Some(duration(&c.fail, &c.fail_ns)),
                        ..Default::default()
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        _r: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self
            .engine
            .models
            .iter()
            .map(|m| pb::repository_index_response::ModelIndex {
                name: m.name.clone(),
                version: "1".into(),
                state: "READY".into(),
                reason: String::new(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }
}
