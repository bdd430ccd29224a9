//! `tideway bench serve`: a load generator for a running server. N concurrent streams each
//! send a chunk every 1/`--rate` seconds through `Streams.Open` (the real gRPC API), and every
//! answer's latency (send → output) is recorded. A chunk carries what the model takes
//! (`Feed`): `--frame` token ids for a language model, `--audio-ms` of audio for an audio
//! model, `--frame` feature frames for a model of frames. Prints throughput and p50/p99
//! per-chunk latency for each N. With `--hostile`, each N runs twice: quiet, then beside a
//! hostile client (`bench_hostile`), and the table gives the p99 ratio.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use tideway_proto::tideway::v1 as pb;

use crate::bench_feed::Feed;
use crate::bench_hostile::{Attack, AttackTally, Hostile};

#[derive(Args, Clone)]
pub struct ServeBenchArgs {
    /// The server's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Model name on the server.
    #[arg(long)]
    model: String,
    /// Concurrent stream counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    streams: Vec<usize>,
    /// Chunks per second per stream.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Tokens per chunk (a language model), or feature frames per chunk (a model that takes
    /// frames, `input` [T, C]).
    #[arg(long, default_value_t = 1)]
    frame: usize,
    /// Milliseconds of audio per chunk (a model that takes audio): 20 at `--rate 50` is a
    /// live feed.
    #[arg(long, default_value_t = 20)]
    audio_ms: usize,
    /// The audio's sample rate, Hz.
    #[arg(long, default_value_t = 16_000)]
    sample_rate: u32,
    /// Seconds of load per stream count.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Bearer token of the measured streams (a server with `--auth`).
    #[arg(long)]
    token: Option<String>,
    /// Run each stream count again beside a hostile client (giant requests, a gzip bomb, a
    /// long job, a session flood) and compare the p99 latency with the quiet run's.
    #[arg(long)]
    hostile: bool,
    /// Bearer token of the hostile client (another identity than `--token`'s, so that its
    /// session flood meets its own per-client limit).
    #[arg(long, requires = "hostile")]
    hostile_token: Option<String>,
    /// The hostile client's attacks.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "giant,bomb,job,flood",
        requires = "hostile"
    )]
    attacks: Vec<Attack>,
}

/// Sends `authorization: Bearer TOKEN` with every call (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of `channel` made by `make` (a generated client's `with_interceptor`) that sends
/// `token`.
pub fn with_token<C>(
    channel: tonic::transport::Channel,
    token: Option<String>,
    make: impl FnOnce(tonic::transport::Channel, Bearer) -> C,
) -> C {
    let value = token.and_then(|t| format!("Bearer {t}").parse().ok());
    make(channel, Bearer(value))
}

#[derive(Serialize, Default)]
struct LoadResult {
    streams: usize,
    /// Whether the hostile client ran beside the streams, and what it did.
    hostile: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    attacks: Option<BTreeMap<&'static str, AttackTally>>,
    rate_per_stream: f64,
    /// What a chunk carries: "tokens", "audio ms" or "frames", `per_chunk` of them.
    unit: &'static str,
    per_chunk: usize,
    seconds: f64,
    chunks_sent: u64,
    chunks_answered: u64,
    /// The answers' output rows: logits rows, or a feature model's frames.
    rows_answered: u64,
    /// Streams that ended with an error, and how many of each status code (the first
    /// message of each is printed on stderr).
    errors: u64,
    error_codes: BTreeMap<String, u64>,
    chunks_per_s: f64,
    /// The input answered a second: tokens, frames, or seconds of audio (`Feed::input_per_s`).
    input_per_s: f64,
    /// `rows_answered` a second.
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The p99 of the chunks sent after the first period, when every stream has opened and
    /// sent (the start-up transient left out; the p99 above includes it).
    p99_after_start_ms: f64,
    /// Per second of the load (by when each chunk was sent): how the latency moved, so that
    /// a start-up transient shows apart from the steady state.
    timeline: Vec<SecondOfLoad>,
}

/// The chunks sent in one second of a load and their latencies.
#[derive(Serialize, Default)]
struct SecondOfLoad {
    second: usize,
    chunks_answered: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The `q` quantile of sorted `seconds`, in milliseconds (NaN when there are none).
fn quantile_ms(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] * 1e3
}

/// Latencies grouped by the second of the load their chunk was sent in.
fn timeline(samples: &[Sample]) -> Vec<SecondOfLoad> {
    let mut seconds: Vec<Vec<f64>> = Vec::new();
    for s in samples {
        let at = s.sent_s.max(0.0) as usize;
        if seconds.len() <= at {
            seconds.resize_with(at + 1, Vec::new);
        }
        seconds[at].push(s.latency_s);
    }
    seconds
        .into_iter()
        .enumerate()
        .map(|(second, mut l)| {
            l.sort_by(f64::total_cmp);
            SecondOfLoad {
                second,
                chunks_answered: l.len(),
                p50_ms: quantile_ms(&l, 0.5),
                p99_ms: quantile_ms(&l, 0.99),
                max_ms: quantile_ms(&l, 1.0),
            }
        })
        .collect()
}

/// One answered chunk: when it was sent (seconds into the load), how long its answer took
/// and the output rows it held.
struct Sample {
    sent_s: f64,
    latency_s: f64,
    rows: u64,
}

pub fn bench_serve(args: ServeBenchArgs) -> Result<()> {
    if args.streams.is_empty()
        || args.streams.contains(&0)
        || args.rate.is_nan()
        || args.rate <= 0.0
        || args.frame == 0
    {
        bail!("--streams takes positive counts, --rate and --frame must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let url = format!("http://{}", args.addr);
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.addr))?;
        let mut models = with_token(
            channel,
            args.token.clone(),
            pb::models_client::ModelsClient::with_interceptor,
        );
        let info = models
            .describe(pb::DescribeModelRequest { name: args.model.clone() })
            .await
            .with_context(|| format!("model {:?} on {}", args.model, args.addr))?
            .into_inner();
        let feed = Feed::for_model(&info, args.frame, args.audio_ms, args.sample_rate)
            .with_context(|| format!("model {:?} on {}", args.model, args.addr))?;
        let hostile = if args.hostile {
            eprintln!("building the hostile client's messages (a 1 GiB gzip bomb) ...");
            Some(Arc::new(
                Hostile::new(&url, &args.model, args.hostile_token.clone(), args.attacks.clone()).await?,
            ))
        } else {
            None
        };
        let mut results = Vec::new();
        for &n in &args.streams {
            let mut rows = vec![run_load(&url, &args, n, feed).await?];
            if let Some(hostile) = &hostile {
                let stop = Arc::new(AtomicBool::new(false));
                let attacking = tokio::spawn({
                    let (hostile, stop) = (hostile.clone(), stop.clone());
                    async move { hostile.run(stop).await }
                });
                let mut r = run_load(&url, &args, n, feed).await?;
                stop.store(true, Ordering::Relaxed);
                r.hostile = true;
                r.attacks = Some(attacking.await?);
                rows.push(r);
            }
            for r in rows {
                if !args.json {
                    eprintln!(
                        "{n:>5} streams{}: {:>9.1} chunks/s, {:>9.1} {}, p50 {:>8.2} ms, p99 {:>8.2} ms, errors {}",
                        if r.hostile { " + hostile client" } else { "" },
                        r.chunks_per_s, r.input_per_s, feed.rate_label(), r.p50_ms, r.p99_ms, r.errors
                    );
                }
                results.push(r);
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        } else {
            let ((unit, _), rate) = (feed.unit(), feed.rate_label());
            println!("| streams | client beside them | rate/stream | {unit}/chunk | chunks/s | {rate} | output rows/s | p50 ms | p99 ms | max ms | p99 after the starts ms | errors |");
            println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for r in &results {
                println!(
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                    r.streams, if r.hostile { "hostile" } else { "none (quiet)" },
                    r.rate_per_stream, r.per_chunk, r.chunks_per_s, r.input_per_s, r.rows_per_s,
                    r.p50_ms, r.p99_ms, r.max_ms, r.p99_after_start_ms, r.errors
                );
            }
            for pair in results.windows(2) {
                if let [quiet, hostile] = pair
                    && hostile.hostile
                {
                    println!(
                        "\n{} streams: p99 beside the hostile client / quiet = {:.2} / {:.2} ms = {:.2}×",
                        quiet.streams, hostile.p99_ms, quiet.p99_ms, hostile.p99_ms / quiet.p99_ms
                    );
                    for (attack, t) in hostile.attacks.iter().flatten() {
                        let codes: Vec<String> =
                            t.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
                        println!("- {attack}: {} calls ({})", t.calls, codes.join(", "));
                    }
                }
            }
        }
        Ok(())
    })
}

async fn run_load(url: &str, args: &ServeBenchArgs, n: usize, feed: Feed) -> Result<LoadResult> {
    write_receive_memory(n, feed.answer_bytes());
    let connections = n.div_ceil(args.streams_per_connection.max(1));
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            tonic::transport::Endpoint::from_shared(url.to_string())?
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?,
        );
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let channel = channels[i % connections].clone();
        let model = args.model.clone();
        let token = args.token.clone();
        // Streams start spread over one period, as independent feeds do.
        let offset = period.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            run_stream(
                channel, token, model, feed, period, offset, duration, started, i as u64,
            )
            .await
        }));
    }
    let mut samples = Vec::new();
    let (mut sent, mut errors, mut error_codes) = (0u64, 0u64, BTreeMap::new());
    for t in tasks {
        let (stream_samples, s, error) = t.await?;
        samples.extend(stream_samples);
        sent += s;
        if let Some(status) = error {
            errors += 1;
            let code = format!("{:?}", status.code());
            if !error_codes.contains_key(&code) {
                eprintln!(
                    "{n} streams: a stream ended with {code}: {}",
                    status.message()
                );
            }
            *error_codes.entry(code).or_default() += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = samples.iter().map(|s| s.latency_s).collect();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| quantile_ms(&latencies, q);
    let mut after_start: Vec<f64> = samples
        .iter()
        .filter(|s| s.sent_s >= period.as_secs_f64())
        .map(|s| s.latency_s)
        .collect();
    after_start.sort_by(f64::total_cmp);
    let answered = latencies.len() as u64;
    let rows: u64 = samples.iter().map(|s| s.rows).sum();
    let (unit, per_chunk) = feed.unit();
    Ok(LoadResult {
        streams: n,
        hostile: false,
        attacks: None,
        rate_per_stream: args.rate,
        unit,
        per_chunk,
        seconds: elapsed,
        chunks_sent: sent,
        chunks_answered: answered,
        rows_answered: rows,
        errors,
        error_codes,
        chunks_per_s: answered as f64 / elapsed,
        input_per_s: feed.input_per_s(answered as f64 / elapsed),
        rows_per_s: rows as f64 / elapsed,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
        p99_after_start_ms: quantile_ms(&after_start, 0.99),
        timeline: timeline(&samples),
    })
}

/// Writes, then frees, the memory that `streams` streams' receive buffers will take (tonic
/// keeps one per stream, as large as its largest answer: ~200 KB at the 130m vocabulary), so
/// that this process's first touch of it happens before the load and not during it, on cores
/// it may share with the server. (A first write of fresh memory costs this project's VM 2.3 s
/// per GB: 1000 streams' buffers took ~0.5 s of a core in the first seconds of a load.) The
/// binary keeps freed memory in its one heap (`keep_freed_activations_in_heap` in main.rs),
/// where the buffers find it.
fn write_receive_memory(streams: usize, answer_bytes: usize) {
    let bytes = streams.saturating_mul(answer_bytes).saturating_mul(2);
    drop(std::hint::black_box(vec![1u8; bytes]));
}

/// One stream: returns its answered chunks, the chunks it sent and the error that ended it.
#[allow(clippy::too_many_arguments)]
async fn run_stream(
    channel: tonic::transport::Channel,
    token: Option<String>,
    model: String,
    feed: Feed,
    period: Duration,
    offset: Duration,
    duration: Duration,
    load_started: Instant,
    seed: u64,
) -> (Vec<Sample>, u64, Option<tonic::Status>) {
    let mut client = with_token(
        channel,
        token,
        pb::streams_client::StreamsClient::with_interceptor,
    );
    let (tx, rx) = mpsc::channel(64);
    let start = pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model,
            resume_session_id: String::new(),
            keep: false,
            outputs: Vec::new(),
            state: Vec::new(),
        })),
    };
    if tx.send(start).await.is_err() {
        return (
            Vec::new(),
            0,
            Some(tonic::Status::internal("the stream's sender closed")),
        );
    }
    let mut inbound = match client.open(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), 0, Some(status)),
    };
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(offset).await;
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let begin = Instant::now();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        while begin.elapsed() < duration {
            ticker.tick().await;
            let chunk = pb::StreamRequest {
                kind: Some(pb::stream_request::Kind::Chunk(feed.chunk(&mut s))),
            };
            let _ = sent_tx.send(Instant::now());
            if tx.send(chunk).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut latencies = Vec::new();
    let mut error = None;
    while let Some(message) = inbound.next().await {
        match message {
            Ok(pb::StreamResponse {
                kind: Some(pb::stream_response::Kind::Output(output)),
            }) => {
                if let Some(at) = sent_rx.recv().await {
                    latencies.push(Sample {
                        sent_s: at.duration_since(load_started).as_secs_f64(),
                        latency_s: at.elapsed().as_secs_f64(),
                        rows: output
                            .outputs
                            .first()
                            .and_then(|t| t.shape.first())
                            .map_or(0, |&r| r.max(0) as u64),
                    });
                }
            }
            Ok(_) => {}
            Err(status) => {
                error = Some(status);
                break;
            }
        }
    }
    let sent = sender.await.unwrap_or(0);
    (latencies, sent, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_groups_chunks_by_the_second_they_were_sent_in() {
        let sample = |sent_s, latency_s| Sample {
            sent_s,
            latency_s,
            rows: 1,
        };
        // Second 0: 10, 30, 20 ms; second 1: none; second 2: 50 ms.
        let samples = [
            sample(0.1, 0.010),
            sample(0.9, 0.030),
            sample(0.5, 0.020),
            sample(2.2, 0.050),
        ];
        let seconds = timeline(&samples);
        assert_eq!(seconds.len(), 3);
        assert_eq!(seconds[0].chunks_answered, 3);
        assert_eq!((seconds[0].p50_ms, seconds[0].max_ms), (20.0, 30.0));
        assert_eq!(seconds[1].chunks_answered, 0);
        assert!(seconds[1].p99_ms.is_nan());
        assert_eq!((seconds[2].second, seconds[2].p99_ms), (2, 50.0));
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(|i| i as f64 / 1e3).collect();
        assert_eq!(quantile_ms(&sorted, 0.5), 51.0);
        assert_eq!(quantile_ms(&sorted, 0.99), 99.0);
        assert_eq!(quantile_ms(&sorted, 1.0), 100.0);
        assert!(quantile_ms(&[], 0.99).is_nan());
    }
}
