//! The Prometheus text endpoint (`--metrics ADDR`, path `/metrics`).
//!
//! Session counts are the control plane's cluster-wide view; queue depth, epochs, tokens,
//! latency, errors and disconnects are this process's own.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::routing::get;

use super::engine::Engine;

pub fn render(engine: &Engine) -> String {
    let board = &engine.board;
    let snap = board.snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    metric(
        "tideway_live_sessions",
        "gauge",
        "Sessions whose state lives, cluster-wide, by model.",
    );
    let mut text = String::new();
    for (i, live) in snap.per_model.iter().enumerate() {
        let _ = writeln!(
            text,
            "tideway_live_sessions{{model=\"{}\"}} {live}",
            board.model_names[i]
        );
    }
    out.push_str(&text);
    let metric_out = |out: &mut String, name: &str, kind: &str, help: &str, lines: &[String]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    };
    metric_out(
        &mut out,
        "tideway_worker_live_sessions",
        "gauge",
        "Live sessions by owning worker (global index) and process.",
        &snap
            .per_worker
            .iter()
            .map(|(w, live, _)| {
                format!(
                    "tideway_worker_live_sessions{{worker=\"{w}\",process=\"{}\"}} {live}",
                    *w as usize / board.threads.max(1)
                )
            })
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_state_bytes",
        "gauge",
        "Bytes of recurrent state held for live sessions, cluster-wide.",
        &[format!("tideway_state_bytes {}", snap.state_bytes)],
    );
    metric_out(
        &mut out,
        "tideway_stage_state_bytes",
        "gauge",
        "Bytes of session state held by this process's layers stages, by model and pipeline stage.",
        &board
            .stage_state()
            .into_iter()
            .map(|((model, stage), bytes)| {
                format!(
                    "tideway_stage_state_bytes{{model=\"{}\",stage=\"{stage}\"}} {bytes}",
                    board.model_names[model as usize]
                )
            })
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_expired_sessions_total",
        "counter",
        "Sessions freed after being idle longer than --idle-timeout-s, cluster-wide.",
        &[format!("tideway_expired_sessions_total {}", snap.expired)],
    );
    metric_out(
        &mut out,
        "tideway_queue_depth",
        "gauge",
        "Requests waiting in this process's worker queues.",
        &[format!("tideway_queue_depth {}", engine.queue_depth())],
    );
    metric_out(
        &mut out,
        "tideway_epochs_total",
        "counter",
        "Epochs that ran a batch on this process's workers.",
        &[format!(
            "tideway_epochs_total {}",
            board.epochs.load(Ordering::Relaxed)
        )],
    );
    metric_out(
        &mut out,
        "tideway_epoch_requests_total",
        "counter",
        "Requests run in those epochs (divided by tideway_epochs_total: the mean batch size).",
        &[format!(
            "tideway_epoch_requests_total {}",
            board.epoch_requests.load(Ordering::Relaxed)
        )],
    );
    metric_out(
        &mut out,
        "tideway_tokens_total",
        "counter",
        "Tokens run through the models on this process (rate(): tokens/s).",
        &[format!(
            "tideway_tokens_total {}",
            board.tokens.load(Ordering::Relaxed)
        )],
    );
    let (buckets, count, sum) = board.latency_histogram();
    let mut lines: Vec<String> = buckets
        .iter()
        .map(|(le, c)| format!("tideway_step_latency_seconds_bucket{{le=\"{le}\"}} {c}"))
        .collect();
    lines.push(format!(
        "tideway_step_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
    ));
    lines.push(format!("tideway_step_latency_seconds_sum {sum}"));
    lines.push(format!("tideway_step_latency_seconds_count {count}"));
    metric_out(
        &mut out,
        "tideway_step_latency_seconds",
        "histogram",
        "Compute time of one epoch's batch on one worker.",
        &lines,
    );
    metric_out(
        &mut out,
        "tideway_errors_total",
        "counter",
        "gRPC calls answered with an error, by service, method and status code (every API, refusals by the transport included).",
        &board
            .grpc_errors()
            .into_iter()
            .map(|((service, method, code), n)| {
                format!(
                    "tideway_errors_total{{service=\"{service}\",method=\"{method}\",code=\"{code}\"}} {n}"
                )
            })
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_limit_refusals_total",
        "counter",
        "Requests refused by a server limit (sample_rate: --min/--max-sample-rate and one rate per stream; chunk_samples: --max-chunk-samples; device_sessions: a GPU's state pool), by limit.",
        &board
            .limit_refusals()
            .into_iter()
            .map(|(limit, n)| format!("tideway_limit_refusals_total{{limit=\"{limit}\"}} {n}"))
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_frames_total",
        "counter",
        "Feature models' output frames, by model and fate: kept (through every layer) or skipped (by the model's frame gate, tideway_frame_gate in config.json).",
        &board
            .frames()
            .into_iter()
            .map(|((model, skipped), n)| {
                let name = board
                    .model_names
                    .get(model as usize)
                    .map_or("?", String::as_str);
                let fate = if skipped { "skipped" } else { "kept" };
                format!("tideway_frames_total{{model=\"{name}\",fate=\"{fate}\"}} {n}")
            })
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_prompt_tokens_total",
        "counter",
        "Tokens of the prompts a language model's tideway_prune (config.json) pruned, by model and fate: kept (reached the head) or pruned (dropped at a pruning layer).",
        &board
            .prompt_tokens()
            .into_iter()
            .map(|((model, pruned), n)| {
                let name = board
                    .model_names
                    .get(model as usize)
                    .map_or("?", String::as_str);
                let fate = if pruned { "pruned" } else { "kept" };
                format!("tideway_prompt_tokens_total{{model=\"{name}\",fate=\"{fate}\"}} {n}")
            })
            .collect::<Vec<_>>(),
    );
    metric_out(
        &mut out,
        "tideway_disconnects_total",
        "counter",
        "Streams whose client went away before ending them (their sessions are freed).",
        &[format!(
            "tideway_disconnects_total {}",
            board.disconnects.load(Ordering::Relaxed)
        )],
    );
    metric_out(
        &mut out,
        "tideway_draining",
        "gauge",
        "1 while the server refuses new work.",
        &[format!("tideway_draining {}", engine.is_draining() as u8)],
    );
    if let Some(cache) = &engine.config.prefix_cache {
        let stats = &cache.stats;
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_string();
        let series = [
            (
                "tideway_prefix_cache_hits_total",
                "counter",
                "Generations that started from a cached prompt prefix's state (--prefix-cache-mb).",
                count(&stats.hits),
            ),
            (
                "tideway_prefix_cache_misses_total",
                "counter",
                "Generations whose prompt had no cached prefix.",
                count(&stats.misses),
            ),
            (
                "tideway_prefix_cache_tokens_saved_total",
                "counter",
                "Prompt tokens that hits did not run.",
                count(&stats.tokens_saved),
            ),
            (
                "tideway_prefix_cache_evictions_total",
                "counter",
                "Entries evicted, least recently used first.",
                count(&stats.evictions),
            ),
            (
                "tideway_prefix_cache_bytes",
                "gauge",
                "Bytes of state the prefix cache holds.",
                cache.bytes().to_string(),
            ),
            (
                "tideway_prefix_cache_entries",
                "gauge",
                "Prefixes the cache holds.",
                cache.entries().to_string(),
            ),
        ];
        for (name, kind, help, value) in series {
            metric_out(&mut out, name, kind, help, &[format!("{name} {value}")]);
        }
    }
    if let Some(sink) = &engine.config.snapshots {
        let stats = &sink.stats;
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_string();
        let counters = [
            (
                "tideway_snapshots_total",
                "Session snapshots committed to the store (--store).",
                count(&stats.snapshots),
            ),
            (
                "tideway_snapshot_bytes_total",
                "Bytes of session snapshots committed to the store.",
                count(&stats.bytes),
            ),
            (
                "tideway_snapshot_commits_total",
                "Store commits (each a batch of snapshots and deletions).",
                count(&stats.commits),
            ),
            (
                "tideway_snapshot_commit_seconds_total",
                "Time the store's writer spent encoding and committing, off the request path.",
                (stats.commit_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
            ),
            (
                "tideway_snapshots_skipped_total",
                "Sessions not snapshotted: their state cannot be written yet (a resampled audio stream, a GPU or tensor-parallel session).",
                count(&stats.skipped),
            ),
        ];
        for (name, help, value) in counters {
            metric_out(
                &mut out,
                name,
                "counter",
                help,
                &[format!("{name} {value}")],
            );
        }
    }
    let moves = &engine.migrations;
    let name = "tideway_migrations_total";
    metric_out(
        &mut out,
        name,
        "counter",
        "Sessions moved live between workers (a drain, a rebalance), by direction.",
        &[
            format!(
                "{name}{{direction=\"out\"}} {}",
                moves.moved_out.load(Ordering::Relaxed)
            ),
            format!(
                "{name}{{direction=\"in\"}} {}",
                moves.moved_in.load(Ordering::Relaxed)
            ),
        ],
    );
    let name = "tideway_migration_seconds";
    metric_out(
        &mut out,
        name,
        "summary",
        "From a moving session's state leaving its old owner to its new owner taking it in.",
        &[
            format!("{name}_sum {}", *moves.seconds.lock().unwrap()),
            format!("{name}_count {}", moves.moved_in.load(Ordering::Relaxed)),
        ],
    );
    out
}

/// Serves `/metrics` until the process ends.
pub async fn serve_metrics(engine: Arc<Engine>, listener: tokio::net::TcpListener) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let engine = engine.clone();
            async move { render(&engine) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint failed: {e}");
    }
}
