//! `tideway demo` and `tideway stream`: a live audio stream over the real gRPC streaming API.
//!
//! `demo` starts a server in this process with the embedded keyword spotter
//! ([`crate::default_model`]) and streams the bundled clip (or `--audio FILE.wav`) to it;
//! `stream` does the same against a running server. The audio goes in chunks of `--chunk-ms`
//! (paced at 1x with `--realtime`); detections are printed as their outputs come back, then a
//! summary: frames/s and decision latency.
//!
//! Detection follows how the keyword spotter was trained (1.3 s clips from a fresh state, scored
//! by the mean of the per-frame outputs): every 0.25 s a window session opens on the server
//! and receives the next 1.3 s of the feed as it arrives; its scores are read when it ends.
//! Each session's state lives on the server like any stream's. One unbounded session per feed
//! would be cheaper, but this model's per-frame outputs on running speech were not reliable
//! enough to spot keywords (it was never trained on running state), so the demo does not.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tideway_operators::tokenizers::audio::read_wav;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::detect::WindowDetector;

/// Window sessions: the model's clip length (1.3 s = 128 frames) every `HOP_S`.
const WINDOW_S: f64 = 1.3;
const HOP_S: f64 = 0.25;

#[derive(Args, Clone)]
pub struct ClientOptions {
    /// A WAV recording (PCM or float, any rate and channel count; resampled by the server).
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Pace the chunks at the audio's own speed (1x), as a live microphone would.
    #[arg(long)]
    realtime: bool,
    /// Concurrent copies of the stream (detections are printed for the first).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Milliseconds of audio per chunk.
    #[arg(long, default_value_t = 20.0)]
    chunk_ms: f64,
}

/// `demo --prune` without a value: skip a frame whose cosine with the last kept one is at least
/// this (BENCHMARKS.md: the held-out accuracy against the frames kept, by setting).
pub const DEFAULT_PRUNE: &str = "0.99";

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// Frame pruning (the model's tideway_frame_gate): skip a frame whose cosine with the last
    /// kept one is at least SIMILARITY, or whose mean (normalised log-mel) is below QUIET.
    /// `--prune` alone takes the default setting.
    #[arg(long, value_name = "SIMILARITY[,QUIET]", num_args = 0..=1, default_missing_value = DEFAULT_PRUNE)]
    prune: Option<String>,
}

/// `SIMILARITY[,QUIET]` as the config.json block, checked.
fn prune_block(setting: &str) -> Result<serde_json::Value> {
    let (similarity, quiet) = match setting.split_once(',') {
        Some((s, q)) => (s, Some(q)),
        None => (setting, None),
    };
    let similarity: f32 = similarity
        .trim()
        .parse()
        .with_context(|| format!("--prune: similarity {similarity:?} is not a number"))?;
    let quiet: Option<f32> = quiet
        .map(|q| q.trim().parse())
        .transpose()
        .with_context(|| format!("--prune: quiet floor {quiet:?} is not a number"))?;
    let gate =
        tideway_operators::prune::frames::FrameGate::new(similarity, quiet).context("--prune")?;
    let mut block = serde_json::json!({ "similarity": gate.similarity });
    if let Some(q) = gate.quiet_below {
        block["quiet_below"] = q.into();
    }
    Ok(block)
}

#[derive(Args)]
pub struct StreamArgs {
    /// The server's gRPC address (host:port).
    #[arg(long)]
    server: String,
    /// The model to stream to.
    #[arg(long, default_value = crate::default_model::NAME)]
    model: String,
    #[command(flatten)]
    client: ClientOptions,
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let dir = match &args.prune {
        Some(setting) => {
            crate::default_model::materialize_with("tideway_frame_gate", prune_block(setting)?)?
        }
        None => crate::default_model::materialize()?,
    };
    let addr =
        crate::serve::start_in_process(vec![(crate::default_model::NAME.to_string(), dir)], 1)?;
    eprintln!(
        "tideway demo: server on {addr} (in this process), model {:?}",
        crate::default_model::NAME
    );
    run_client(
        &format!("http://{addr}"),
        crate::default_model::NAME,
        args.client,
    )
}

pub fn stream(args: StreamArgs) -> Result<()> {
    let url = if args.server.starts_with("http") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    run_client(&url, &args.model, args.client)
}

/// What one stream measured.
struct StreamReport {
    frames: usize,
    /// Frames the model's frame gate skipped.
    skipped: usize,
    latencies: Vec<Duration>,
}

fn run_client(url: &str, model: &str, options: ClientOptions) -> Result<()> {
    if options.streams == 0 || !options.chunk_ms.is_finite() || options.chunk_ms <= 0.0 {
        bail!("--streams and --chunk-ms must be positive");
    }
    let wav = match &options.audio {
        Some(path) => path.clone(),
        None => crate::default_model::demo_wav()?,
    };
    let audio = read_wav(&wav)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let channel = tonic::transport::Channel::from_shared(url.to_string())?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let info = pb::models_client::ModelsClient::new(channel.clone())
            .describe(pb::DescribeModelRequest { name: model.to_string() })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let classes = info.outputs.first().and_then(|o| o.shape.last().copied()).unwrap_or(0);
        let labels = if info.labels.is_empty() {
            (0..classes).map(|i| format!("class {i}")).collect()
        } else {
            info.labels.clone()
        };
        println!(
            "streaming {} ({:.2} s at {} Hz) to {model:?} in {} ms chunks{}{}",
            wav.display(),
            audio.samples.len() as f64 / audio.sample_rate as f64,
            audio.sample_rate,
            options.chunk_ms,
            if options.realtime { ", paced at 1x" } else { "" },
            if options.streams > 1 { format!(", {} concurrent streams", options.streams) } else { String::new() }
        );
        let chunk = ((audio.sample_rate as f64 * options.chunk_ms / 1000.0).round() as usize).max(1);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..options.streams {
            let channel = channel.clone();
            let samples = audio.samples.clone();
            let (rate, model, labels) = (audio.sample_rate, model.to_string(), labels.clone());
            let (realtime, chunk_ms) = (options.realtime, options.chunk_ms);
            tasks.push(tokio::spawn(async move {
                one_stream(channel, &model, &samples, rate, chunk, chunk_ms, realtime, (s == 0).then_some(labels)).await
            }));
        }
        let mut frames = 0;
        let mut skipped = 0;
        let mut latencies = Vec::new();
        for task in tasks {
            let report = task.await??;
            frames += report.frames;
            skipped += report.skipped;
            latencies.extend(report.latencies);
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
        println!(
            "summary: {} stream(s), {frames} frames in {elapsed:.2} s = {:.0} frames/s; decision latency (window's last chunk sent -> its scores back) p50 {:.2} ms, p99 {:.2} ms",
            options.streams,
            frames as f64 / elapsed,
            pct(0.5),
            pct(0.99)
        );
        if !info.pruning.is_empty() {
            println!(
                "frame pruning ({}): kept {:.1}% of the frames ({} of {frames})",
                info.pruning,
                100.0 * (frames - skipped) as f64 / frames.max(1) as f64,
                frames - skipped
            );
        }
        Ok(())
    })
}

/// A window's output rows, each with whether the frame gate skipped it.
type WindowRows = Vec<(Vec<f32>, bool)>;

/// One window session: its stream's sender, and the task collecting its output rows.
struct Window {
    start: usize,
    end: usize,
    tx: mpsc::Sender<pb::StreamRequest>,
    /// Every output row with whether the frame gate skipped it, and when the last message
    /// arrived.
    outputs: tokio::task::JoinHandle<Result<(WindowRows, Instant)>>,
    ended_at: Option<Instant>,
}

async fn open_window(
    channel: &tonic::transport::Channel,
    model: &str,
    start: usize,
    end: usize,
) -> Result<Window> {
    let mut client = pb::streams_client::StreamsClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.to_string(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let outputs = tokio::spawn(async move {
        let mut rows = Vec::new();
        let mut last = Instant::now();
        while let Some(message) = inbound.next().await {
            let message = message.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            let Some(pb::stream_response::Kind::Output(out)) = message.kind else {
                continue;
            };
            last = Instant::now();
            for tensor in out.outputs {
                let width = (*tensor.shape.last().unwrap_or(&1)).max(1) as usize;
                let values: Vec<f32> = tensor
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let skipped = out.skipped.iter().copied().chain(std::iter::repeat(false));
                rows.extend(values.chunks_exact(width).map(<[f32]>::to_vec).zip(skipped));
            }
        }
        Ok((rows, last))
    });
    Ok(Window {
        start,
        end,
        tx,
        outputs,
        ended_at: None,
    })
}

/// Streams `samples` as a live feed: every `hop` of audio a new window session of `length`
/// opens on the server, each receives exactly its samples as they arrive, and when a window
/// is complete its clip scores (the mean of its per-frame outputs) go to the detector.
#[allow(clippy::too_many_arguments)]
async fn one_stream(
    channel: tonic::transport::Channel,
    model: &str,
    samples: &[f32],
    rate: u32,
    chunk: usize,
    chunk_ms: f64,
    realtime: bool,
    labels: Option<Vec<String>>,
) -> Result<StreamReport> {
    let length = (WINDOW_S * rate as f64).round() as usize;
    let hop = (HOP_S * rate as f64).round() as usize;
    let mut detector = labels.map(WindowDetector::new);
    let mut report = StreamReport {
        frames: 0,
        skipped: 0,
        latencies: Vec::new(),
    };
    let mut windows: std::collections::VecDeque<Window> = Default::default();
    let mut next_start = 0;
    let t0 = Instant::now();
    for (i, piece_start) in (0..samples.len()).step_by(chunk).enumerate() {
        if realtime {
            let due = t0 + Duration::from_secs_f64(i as f64 * chunk_ms / 1e3);
            tokio::time::sleep_until(due.into()).await;
        }
        let piece_end = (piece_start + chunk).min(samples.len());
        // Windows that start within this chunk open now.
        while next_start < piece_end {
            let end = (next_start + length).min(samples.len());
            windows.push_back(open_window(&channel, model, next_start, end).await?);
            next_start += hop;
            if end == samples.len() {
                next_start = usize::MAX;
            }
        }
        for w in windows.iter_mut().filter(|w| w.ended_at.is_none()) {
            let (a, b) = (piece_start.max(w.start), piece_end.min(w.end));
            if a >= b && w.end > piece_end {
                continue;
            }
            let last = w.end <= piece_end;
            let message = pb::StreamRequest {
                kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
                    samples_f32: if a < b {
                        samples[a..b].to_vec()
                    } else {
                        Vec::new()
                    },
                    sample_rate: rate,
                    end: last,
                    ..Default::default()
                })),
            };
            if w.tx.send(message).await.is_err() {
                // The server ended the window's stream (a refusal under overload, say): the
                // outputs task holds its status, which says why; "channel closed" would not.
                return Err(match (&mut w.outputs).await {
                    Ok(Err(refused)) => refused,
                    _ => anyhow::anyhow!("the server ended a window's stream early"),
                });
            }
            if last {
                w.ended_at = Some(Instant::now());
            }
        }
        // Complete windows, in order, go to the detector as their outputs arrive.
        while windows.front().is_some_and(|w| {
            w.ended_at.is_some() && (w.outputs.is_finished() || piece_end == samples.len())
        }) {
            let w = windows.pop_front().expect("checked");
            let ended_at = w.ended_at.expect("checked");
            drop(w.tx);
            let (rows, arrived) = w.outputs.await??;
            report
                .latencies
                .push(arrived.saturating_duration_since(ended_at));
            let frames = rows.len();
            // The clip's scores are the mean over the frames the model kept.
            let kept: Vec<Vec<f32>> = rows
                .into_iter()
                .filter_map(|(row, skipped)| (!skipped).then_some(row))
                .collect();
            report.frames += frames;
            report.skipped += frames - kept.len();
            if let Some(d) = detector.as_mut()
                && let Some(det) = d.push_window(&kept, w.end as f64 / rate as f64)
            {
                println!(
                    "detected {:<6} at {:>6.2} s  (score {:.2})",
                    det.label, det.time_s, det.score
                );
            }
        }
    }
    if let Some(d) = detector.as_mut()
        && let Some(det) = d.push_window(&[], samples.len() as f64 / rate as f64)
    {
        println!(
            "detected {:<6} at {:>6.2} s  (score {:.2})",
            det.label, det.time_s, det.score
        );
    }
    Ok(report)
}
