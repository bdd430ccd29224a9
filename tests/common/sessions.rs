//! Sessions driven chunk by chunk through `Streams.Open`, for the tests of state that
//! survives (`serve --store`): a mix of models and kinds of state, references from an
//! uninterrupted run, and resuming every session from the chunk it reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{Server, f32s, fixtures_dir, pseudo_random};

pub fn kws_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kws")
}

/// Three families, three kinds of state: Mamba tokens, GLA tokens, LMUFormer audio (with the
/// front end's carry-over of samples between windows).
pub fn model_args() -> Vec<String> {
    vec![
        "--model".into(),
        format!(
            "mamba={}",
            fixtures_dir().join("mamba/hf_k4_sharded").display()
        ),
        "--model".into(),
        format!("gla={}", fixtures_dir().join("fla/gla_basic").display()),
        "--model".into(),
        format!("kws={}", kws_dir().display()),
    ]
}

/// One stream's model and chunks.
#[derive(Clone)]
pub struct Plan {
    pub model: &'static str,
    pub chunks: Vec<pb::StreamRequest>,
}

pub fn chunk(tokens: Option<Vec<u64>>, samples: Option<Vec<f32>>, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens: tokens
                .unwrap_or_default()
                .iter()
                .map(|&t| t as i64)
                .collect(),
            samples_f32: samples.clone().unwrap_or_default(),
            sample_rate: if samples.is_some() { 16_000 } else { 0 },
            end,
            ..Default::default()
        })),
    }
}

/// Stream `i` of a mix: token streams of Mamba and GLA, audio streams of the spotter; uneven
/// chunk sizes (audio chunks end inside fbank windows, so the carry-over matters).
pub fn plan(i: usize, chunks: usize) -> Plan {
    let seed = 1000 + i as u64;
    let sizes = pseudo_random(chunks, 9, seed);
    let (model, vocab) = match i % 5 {
        0..=2 => ("mamba", 64),
        3 => ("gla", 50),
        _ => ("kws", 0),
    };
    let chunks = sizes
        .iter()
        .enumerate()
        .map(|(c, &s)| {
            let end = c + 1 == chunks;
            if vocab > 0 {
                let tokens = pseudo_random(s as usize + 1, vocab, seed * 31 + c as u64);
                chunk(Some(tokens), None, end)
            } else {
                let n = 137 + 211 * s as usize;
                let samples = pseudo_random(n, 1000, seed * 17 + c as u64)
                    .iter()
                    .map(|&v| (v as f32 - 500.0) / 2000.0)
                    .collect();
                chunk(None, Some(samples), end)
            }
        })
        .collect();
    Plan { model, chunks }
}

pub fn start(model: &str, resume: &str, state: Vec<u8>) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            resume_session_id: resume.into(),
            state,
            ..Default::default()
        })),
    }
}

/// A stream driven one chunk at a time: each chunk waits for its output.
pub struct Driven {
    pub opened: pb::StreamOpened,
    /// Output rows (flattened) of each chunk answered, in order.
    pub outputs: Vec<Vec<f64>>,
    pub rows: Vec<u64>,
    pub error: Option<tonic::Status>,
}

/// Opens a stream with `first`, then sends `chunks` one at a time (pausing `pause` between
/// them) until they are all answered or the stream fails; a resumed stream sends them from
/// the index its session reports.
pub async fn drive(
    url: &str,
    first: pb::StreamRequest,
    chunks: &[pb::StreamRequest],
    pause: Duration,
) -> Result<Driven, tonic::Status> {
    let resumed = matches!(&first.kind, Some(pb::stream_request::Kind::Start(s)) if !s.resume_session_id.is_empty());
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let opened = match inbound.next().await {
        Some(Ok(pb::StreamResponse {
            kind: Some(pb::stream_response::Kind::Opened(o)),
        })) => o,
        Some(Err(e)) => return Err(e),
        other => panic!("expected opened, got {other:?}"),
    };
    let mut driven = Driven {
        opened,
        outputs: Vec::new(),
        rows: Vec::new(),
        error: None,
    };
    // A resumed session takes the chunks from the index it reports.
    let skip = if resumed {
        driven.opened.chunks as usize
    } else {
        0
    };
    for c in &chunks[skip.min(chunks.len())..] {
        if tx.send(c.clone()).await.is_err() {
            driven.error = Some(tonic::Status::unavailable("the request stream closed"));
            break;
        }
        match inbound.next().await {
            Some(Ok(pb::StreamResponse {
                kind: Some(pb::stream_response::Kind::Output(o)),
            })) => {
                driven.rows.push(o.outputs[0].shape[0] as u64);
                driven.outputs.push(f32s(&o.outputs[0].data));
            }
            Some(Err(e)) => {
                driven.error = Some(e);
                return Ok(driven);
            }
            other => {
                driven.error = Some(tonic::Status::unknown(format!("{other:?}")));
                return Ok(driven);
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(driven)
}

/// Every chunk's outputs from an uninterrupted run on a server without a store.
pub async fn references(plans: &[Plan]) -> Vec<Driven> {
    let mut args = model_args();
    args.extend(["--workers".into(), "2".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&refs);
    let url = server.url();
    let runs = plans.iter().map(|p| {
        let url = url.clone();
        let p = p.clone();
        tokio::spawn(async move {
            drive(
                &url,
                start(p.model, "", Vec::new()),
                &p.chunks,
                Duration::ZERO,
            )
            .await
            .unwrap()
        })
    });
    let mut out = Vec::new();
    for run in runs {
        let d = run.await.unwrap();
        assert!(d.error.is_none(), "{:?}", d.error);
        out.push(d);
    }
    out
}

pub fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: chunks answered");
    for (c, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: chunk {c} values");
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{what}: chunk {c} differs by {worst:e}");
    }
}

/// Resumes every session after a restart: each reports the chunks and position it resumed
/// from (its last snapshot), takes the chunks from there, and answers what an
/// uninterrupted run answered.
pub async fn resume_all(url: &str, plans: &[Plan], ids: &[String], refs: &[Driven]) -> Vec<u64> {
    let runs = plans.iter().zip(ids).map(|(p, id)| {
        let (url, p, id) = (url.to_string(), p.clone(), id.clone());
        tokio::spawn(async move {
            let d = drive(
                &url,
                start(p.model, &id, Vec::new()),
                &p.chunks,
                Duration::ZERO,
            )
            .await
            .unwrap_or_else(|e| panic!("session {id} was not restored: {e}"));
            (d.opened.chunks as usize, d.opened.clone(), d)
        })
    });
    let mut resumed_from = Vec::new();
    for ((run, r), id) in runs.zip(refs).zip(ids) {
        let (from, opened, d) = run.await.unwrap();
        assert!(d.error.is_none(), "{id}: {:?}", d.error);
        assert!(opened.resumed);
        let position: u64 = r.rows[..from].iter().sum();
        assert_eq!(
            opened.position, position,
            "{id}: position after {from} chunks"
        );
        assert_close(&d.outputs, &r.outputs[from..], id);
        resumed_from.push(from as u64);
    }
    resumed_from
}

/// Streams whose sessions outlive their stream (a kept session, until the restart).
pub fn keep_start(model: &str) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            keep: true,
            ..Default::default()
        })),
    }
}
