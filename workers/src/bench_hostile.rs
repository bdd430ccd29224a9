//! The hostile client of `tideway bench serve --hostile`: while the measured streams run, one
//! client identity attacks the server the ways issue 16 found it could be hurt, each attack a
//! task that repeats until the row ends:
//! - giant requests: a `ModelInfer` of 1.1M token ids (8.8 MB raw), over `--max-request-tokens`;
//! - a gzip bomb: a `Jobs.Submit` whose 1 GiB of zero tokens is ~1 MB gzipped on the wire,
//!   sent as a pre-built gRPC frame (decompressing stops at `--max-request-bytes`);
//! - a long job: 10^6 tokens asking for one chunk of 10^6 (the server runs it in its own bounded
//!   steps), submitted again as soon as it finishes;
//! - a session flood: `ModelInfer` sequence starts with fresh ids, never ended, past the
//!   per-client session limit.
//!
//! Each attack counts its calls and the status codes it got back.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use tonic::Code;
use tonic::transport::Channel;
use tower_service::Service;

use tideway_proto::inference as kserve;
use tideway_proto::tideway::v1 as pb;

use crate::bench_serve::with_token;

/// Token ids in the giant request: over any sensible `--max-request-tokens`.
const GIANT_TOKENS: usize = 1_100_000;
/// Decompressed size of the gzip bomb's message.
const BOMB_BYTES: usize = 1 << 30;
/// Tokens of the long job.
const JOB_TOKENS: usize = 1_000_000;

/// What each attack did: calls made, and how the server answered them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AttackTally {
    pub calls: u64,
    pub codes: BTreeMap<String, u64>,
}

impl AttackTally {
    fn record(&mut self, code: Code) {
        self.calls += 1;
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
    }
}

/// One of the hostile client's attacks (`--attacks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// `ModelInfer` of 1.1M token ids.
    Giant,
    /// `Jobs.Submit` of 1 GiB of zero tokens, ~1 MB gzipped.
    Bomb,
    /// A 10^6-token job asking for one chunk of 10^6.
    Job,
    /// Sequence starts with fresh ids, never ended.
    Flood,
}

/// The attacks' pre-built messages (built once, before any row runs).
pub struct Hostile {
    attacks: Vec<Attack>,
    channel: Channel,
    model: String,
    token: Option<String>,
    giant: kserve::ModelInferRequest,
    bomb: Bytes,
}

impl Hostile {
    pub async fn new(
        url: &str,
        model: &str,
        token: Option<String>,
        attacks: Vec<Attack>,
    ) -> Result<Hostile> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        Ok(Hostile {
            channel,
            model: model.to_string(),
            token,
            giant: infer_request(model, &vec![1; GIANT_TOKENS], ""),
            bomb: if attacks.contains(&Attack::Bomb) {
                gzip_bomb(model)?
            } else {
                Bytes::new()
            },
            attacks,
        })
    }

    /// Runs every attack until `stop` is set; returns each attack's tally.
    pub async fn run(&self, stop: Arc<AtomicBool>) -> BTreeMap<&'static str, AttackTally> {
        let giant = self.repeat(Attack::Giant, stop.clone(), {
            let request = self.giant.clone();
            move |channel, token, _| {
                let request = request.clone();
                async move {
                    let mut client = with_token(
                        channel,
                        token,
                        kserve::grpc_inference_service_client::GrpcInferenceServiceClient::with_interceptor,
                    )
                    .max_encoding_message_size(usize::MAX);
                    client.model_infer(request).await.map(|_| ())
                }
            }
        });
        let bomb = self.repeat(Attack::Bomb, stop.clone(), {
            let bomb = self.bomb.clone();
            move |channel, token, _| send_gzip_frame(channel, token, bomb.clone())
        });
        let job = self.repeat(Attack::Job, stop.clone(), {
            let (model, stop) = (self.model.clone(), stop.clone());
            move |channel, token, _| run_job(channel, token, model.clone(), stop.clone())
        });
        let flood = self.repeat(Attack::Flood, stop.clone(), {
            let model = self.model.clone();
            move |channel, token, n| {
                let request = infer_request(&model, &[1], &format!("flood-{n}"));
                async move {
                    let mut client = with_token(
                        channel,
                        token,
                        kserve::grpc_inference_service_client::GrpcInferenceServiceClient::with_interceptor,
                    );
                    client.model_infer(request).await.map(|_| ())
                }
            }
        });
        let (giant, bomb, job, flood) = tokio::join!(giant, bomb, job, flood);
        [
            ("giant request", giant),
            ("gzip bomb", bomb),
            ("long job", job),
            ("session flood", flood),
        ]
        .into_iter()
        .filter_map(|(name, tally)| Some((name, tally?)))
        .collect()
    }

    /// Calls `attack` (if chosen) again and again (its `n`-th call gets `n`) until `stop`.
    async fn repeat<F, Fut>(
        &self,
        which: Attack,
        stop: Arc<AtomicBool>,
        attack: F,
    ) -> Option<AttackTally>
    where
        F: Fn(Channel, Option<String>, u64) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        if !self.attacks.contains(&which) {
            return None;
        }
        let mut tally = AttackTally::default();
        while !stop.load(Ordering::Relaxed) {
            let result = attack(self.channel.clone(), self.token.clone(), tally.calls).await;
            let code = result.err().map_or(Code::Ok, |s| s.code());
            tally.record(code);
            if code == Code::Unavailable {
                // The connection itself failed: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some(tally)
    }
}

/// A `ModelInfer` of `ids` (raw INT64); a sequence start when `sequence` is not empty.
fn infer_request(model: &str, ids: &[i64], sequence: &str) -> kserve::ModelInferRequest {
    use kserve::infer_parameter::ParameterChoice;
    let mut parameters = std::collections::HashMap::new();
    if !sequence.is_empty() {
        let param = |choice| kserve::InferParameter {
            parameter_choice: Some(choice),
        };
        parameters.insert(
            "sequence_id".to_string(),
            param(ParameterChoice::StringParam(sequence.to_string())),
        );
        parameters.insert(
            "sequence_start".to_string(),
            param(ParameterChoice::BoolParam(true)),
        );
    }
    kserve::ModelInferRequest {
        model_name: model.to_string(),
        parameters,
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![1, ids.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![ids.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    }
}

/// A gRPC frame (flag 1: compressed) holding a gzipped `JobRequest` whose `tokens` are
/// `BOMB_BYTES` zero varints.
fn gzip_bomb(model: &str) -> Result<Bytes> {
    let mut message = Vec::new();
    // JobRequest.model = 1 (string), .tokens = 2 (packed int64): tag, length, payload.
    message.push(0x0a);
    push_varint(&mut message, model.len() as u64);
    message.extend_from_slice(model.as_bytes());
    message.push(0x12);
    push_varint(&mut message, BOMB_BYTES as u64);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&message)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BOMB_BYTES / zeros.len() {
        gz.write_all(&zeros)?;
    }
    let compressed = gz.finish()?;
    let mut frame = Vec::with_capacity(compressed.len() + 5);
    frame.push(1);
    frame.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    frame.extend_from_slice(&compressed);
    Ok(Bytes::from(frame))
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Sends a pre-built compressed frame to `Jobs.Submit` as raw HTTP/2 (tonic would compress
/// the message itself) and reads the answer's `grpc-status`.
async fn send_gzip_frame(
    mut channel: Channel,
    token: Option<String>,
    frame: Bytes,
) -> Result<(), tonic::Status> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri("/tideway.v1.Jobs/Submit")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "gzip");
    if let Some(token) = &token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(tonic::body::Body::new(Full::new(frame)))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    // The refusal comes as a trailers-only answer: grpc-status in the headers.
    let (parts, body) = response.into_parts();
    let mut status = tonic::Status::from_header_map(&parts.headers);
    if status.is_none() {
        let collected = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        status = collected
            .trailers()
            .and_then(tonic::Status::from_header_map);
    }
    match status {
        Some(s) if s.code() != Code::Ok => Err(s),
        _ => Ok(()),
    }
}

/// Submits the long job and waits for it to finish, or cancels it when the row ends.
async fn run_job(
    channel: Channel,
    token: Option<String>,
    model: String,
    stop: Arc<AtomicBool>,
) -> Result<(), tonic::Status> {
    let mut jobs = with_token(
        channel,
        token,
        pb::jobs_client::JobsClient::with_interceptor,
    );
    let tokens = (0..JOB_TOKENS as i64).map(|i| i % 7).collect();
    let job = jobs
        .submit(pb::JobRequest {
            model,
            tokens,
            chunk: JOB_TOKENS as u32,
            outputs: pb::JobOutputs::Last as i32,
        })
        .await?
        .into_inner();
    let job = pb::JobRef { job_id: job.job_id };
    let mut events = jobs.watch(job.clone()).await?.into_inner();
    let mut check = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            event = tokio_stream::StreamExt::next(&mut events) => match event {
                Some(event) => { event?; }
                None => return Ok(()),
            },
            _ = check.tick() => if stop.load(Ordering::Relaxed) {
                jobs.cancel(job).await?;
                return Ok(());
            },
        }
    }
}
