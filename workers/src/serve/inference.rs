//! `inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol with Triton's
//! extensions, as `tritonclient[grpc]` speaks it (`shared/PROTOCOL.md`). Sequences
//! (`sequence_id`, `sequence_start`, `sequence_end`) map onto Tideway sessions; outputs are
//! always raw; every request gets exactly one answer, except a generation on a stream (the
//! `generate` parameter: one answer per token and a final one, `inference_generate.rs`); on
//! streams an error is an `error_message` and the stream stays open (unless the client asked
//! for `triton_grpc_error: true`).
//!
//! Length: ~600 lines: the whole KServe v2 service (metadata, config, statistics, infer, the
//! stream with sequences and generations) in one place, each RPC mapping onto the request
//! layer in `requests.rs`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use tideway_proto::decode::kserve;
use tideway_proto::inference as pb;

use super::auth::Identity;
use super::engine::Engine;
use super::inference_generate;
use super::messages::{self, Op, owned_session_key};
use super::outbound;
use super::requests::{Refuse, answer, tensor_specs};
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
        let limits = self.engine.config.limits.requests();
        let input = served
            .with_inputs(|inputs| kserve::infer_input(&request, inputs, &limits))
            .map_err(|e| e.refuse(&self.engine.board))?;
        let sequence = kserve::sequence_id(&request.parameters)?;
        let (name, start, end) = if sequence.is_empty() {
            // Not a sequence: a session of one request.
            static ONE_SHOT: AtomicU64 = AtomicU64::new(0);
            let n = ONE_SHOT.fetch_add(1, Ordering::Relaxed);
            (format!("request:{}:{n}", std::process::id()), true, true)
        } else {
            (
                format!("sequence:{sequence}"),
                kserve::bool_param(&request.parameters, "sequence_start")?,
                kserve::bool_param(&request.parameters, "sequence_end")?,
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
                last_only: false,
            },
            id: request.id,
            model_name: request.model_name,
        })
    }

    fn respond(
        prepared_id: String,
        model_name: String,
        output_name: &str,
        reply: &messages::Reply,
    ) -> pb::ModelInferResponse {
        // Where the session stands after this request: a client resuming a sequence after a
        // restart (an empty request tells it without moving it) resends from its chunk.
        let int = |v: u64| pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(v as i64)),
        };
        let parameters = HashMap::from([
            ("sequence_position".to_string(), int(reply.position_after)),
            ("sequence_chunks".to_string(), int(reply.chunks)),
        ]);
        pb::ModelInferResponse {
            model_name,
            model_version: "1".into(),
            id: prepared_id,
            parameters,
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

/// A stream's answer to one request, in request order: an immediate error, a pending
/// reply, or a generation's responses.
enum Pending {
    Failed(String, Status),
    Reply(
        String,
        String,
        u32,
        Instant,
        oneshot::Receiver<messages::Response>,
    ),
    Generation {
        id: String,
        model_name: String,
        generated: inference_generate::Generated,
    },
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
        let request = request.into_inner();
        if tideway_proto::decode::generate::is_generation(&request)? {
            return Err(Status::invalid_argument(
                "a generation is answered by several responses: send it on ModelStreamInfer (tritonclient: start_stream, then async_stream_infer)",
            ));
        }
        let prepared = self.prepare(request, &owner)?;
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
            let (order_tx, mut order_rx) = mpsc::channel::<Pending>(STREAM_CREDIT);
            let writer_tx = tx.clone();
            let counters_service = InferenceService {
                engine: service.engine.clone(),
                counters: service.counters.clone(),
            };
            let writer = tokio::spawn(async move {
                while let Some(pending) = order_rx.recv().await {
                    let (id, result) = match pending {
                        Pending::Generation {
                            id,
                            model_name,
                            mut generated,
                        } => {
                            // A decoupled answer: one response per token, the last flagged.
                            let has_text =
                                inference_generate::has_text(&counters_service.engine, &model_name);
                            while let Some(item) = generated.recv().await {
                                let message = match item {
                                    Ok(g) => Ok(pb::ModelStreamInferResponse {
                                        error_message: String::new(),
                                        infer_response: Some(inference_generate::response(
                                            &id,
                                            &model_name,
                                            has_text,
                                            g,
                                        )),
                                    }),
                                    Err(status) if errors_end_stream => Err(status),
                                    Err(status) => {
                                        let status = counters_service.stream_error(status);
                                        Ok(pb::ModelStreamInferResponse {
                                            error_message: status_message(&status),
                                            infer_response: Some(pb::ModelInferResponse {
                                                id: id.clone(),
                                                ..Default::default()
                                            }),
                                        })
                                    }
                                };
                                let ends = message.is_err();
                                if writer_tx.send(message).await.is_err() || ends {
                                    return;
                                }
                            }
                            continue;
                        }
                        Pending::Reply(id, model_name, model, started, rx) => {
                            let result = finish(rx).await;
                            counters_service.count(model, started, result.is_ok());
                            let output =
                                counters_service.engine.models[model as usize].output_name();
                            (
                                id.clone(),
                                result.map(|reply| Self::respond(id, model_name, output, &reply)),
                            )
                        }
                        Pending::Failed(id, status) => (id, Err(status)),
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
                let generation = tideway_proto::decode::generate::is_generation(&request)
                    .map_err(|e| e.refuse(&service.engine.board));
                let pending = match generation {
                    Ok(true) => {
                        match inference_generate::start(&service.engine, &owner, &request) {
                            Ok(generated) => Pending::Generation {
                                id,
                                model_name: request.model_name,
                                generated,
                            },
                            Err(status) => Pending::Failed(id, status),
                        }
                    }
                    Ok(false) => match service.prepare(request, &owner) {
                        Ok(p) => match service.engine.submit(worker, p.key, p.op, false) {
                            Ok(rx) => {
                                Pending::Reply(p.id, p.model_name, p.model, Instant::now(), rx)
                            }
                            Err(e) => Pending::Failed(id, submit_status(e)),
                        },
                        Err(status) => Pending::Failed(id, status),
                    },
                    Err(status) => Pending::Failed(id, status),
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
