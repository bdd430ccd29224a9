//! `tideway bench store`: what session snapshots cost. An engine in this process (one worker,
//! as `serve --store` runs it) holds N sessions of the model, each advanced by one chunk per
//! round (a language model: `--tokens` ids; a feature model: `--audio-ms` of audio at its
//! rate); after each round every session is snapshotted through the stages and committed by
//! the store's writer, and the table gives the wall time of that flush, the writer's own
//! encode-and-commit time and the bytes. Then a fresh engine restores them all from the store.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::serve::engine::{Engine, RuntimeConfig};
use crate::serve::limits::Limits;
use crate::serve::messages::{Op, StepInput, session_key};
use crate::serve::recovery::restore;
use crate::serve::requests::answer;
use crate::serve::served::{Placement, ServedKind, ServedModel};
use crate::serve::stages::snapshot::SnapshotSink;
use crate::serve::store::SessionStore;

#[derive(Args, Clone)]
pub struct StoreBenchArgs {
    /// The model's checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Sessions held.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Rounds: each advances every session by one chunk, then snapshots them all.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tokens per chunk (language models).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Milliseconds of audio per chunk (feature models with an audio front end).
    #[arg(long, default_value_t = 100)]
    audio_ms: usize,
    /// The store's directory (default: a fresh one under the system's temp dir, removed
    /// afterwards).
    #[arg(long)]
    store: Option<PathBuf>,
}

fn config(plan: crate::serve::stages::Plan, snapshots: SnapshotSink) -> RuntimeConfig {
    RuntimeConfig {
        threads: 1,
        process: 0,
        hosts: Vec::new(),
        process_binary: false,
        tick: Duration::from_millis(1),
        epoch_tokens: 0,
        idle_limit: Duration::from_secs(24 * 3600),
        queue_capacity: 1 << 20,
        plan,
        limits: Limits::default(),
        snapshots: Some(snapshots),
        prefix_cache: None,
        rebalance_every: None,
    }
}

/// A chunk of session `i`'s input in round `round`.
fn chunk(served: &ServedModel, args: &StoreBenchArgs, i: usize, round: usize) -> StepInput {
    let seed = (i * 7919 + round * 104_729) as u64 + 1;
    match &served.kind {
        ServedKind::Language { info, .. } => {
            StepInput::Tokens(crate::bench::token_ids(args.tokens, info.vocab_size, seed))
        }
        ServedKind::Features(f) => match f.audio_frontend() {
            Some(a) => {
                let n = a.sample_rate() as usize * args.audio_ms / 1000;
                let mut s = seed;
                let samples = (0..n)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s % 2000) as f32 / 4000.0 - 0.25
                    })
                    .collect();
                StepInput::Audio {
                    samples,
                    rate: a.sample_rate(),
                }
            }
            None => StepInput::Frames {
                values: vec![0.1; f.in_channels() * 4],
                width: f.in_channels() as u32,
            },
        },
    }
}

pub fn bench_store(args: StoreBenchArgs) -> Result<()> {
    if args.sessions == 0 || args.rounds == 0 {
        bail!("--sessions and --rounds must be at least 1");
    }
    let scratch = args.store.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tideway-bench-store-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let placement = Placement::cpu(1);
    let name = args
        .model
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let store = SessionStore::open(&scratch, 0)?;
    let sink = SnapshotSink::new(
        Duration::from_secs(24 * 3600),
        store.start_writer(),
        store.stats.clone(),
        1,
    );
    let served = placement.load(name.clone(), &args.model)?;
    let state_bytes = served.state_bytes();
    let engine = Engine::start(vec![served], config(placement.plan, sink.clone()))
        .map_err(anyhow::Error::msg)?;
    println!(
        "model {name}: {} sessions, {state_bytes} bytes of state each ({:.1} MiB in all); store {}",
        args.sessions,
        (args.sessions * state_bytes) as f64 / (1 << 20) as f64,
        store.path().display()
    );
    println!("| round | snapshot wall ms | writer ms | MiB written | MiB/s |");
    println!("|---:|---:|---:|---:|---:|");
    for round in 0..args.rounds {
        runtime.block_on(async {
            let mut waiting = Vec::with_capacity(args.sessions);
            for i in 0..args.sessions {
                let op = Op::Step {
                    model: 0,
                    name: format!("bench-{i}"),
                    owner: "bench".into(),
                    input: chunk(&engine.models[0], &args, i, round),
                    start: round == 0,
                    end: false,
                    last_only: true,
                };
                let key = session_key(0, &format!("bench-{i}"));
                waiting.push(
                    engine
                        .submit(0, key, op, false)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                );
            }
            for rx in waiting {
                answer(rx)
                    .await
                    .map_err(|s| anyhow::anyhow!("{s}"))?
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            anyhow::Ok(())
        })?;
        let (bytes, micros) = (
            store.stats.bytes.load(Ordering::Relaxed),
            store.stats.commit_micros.load(Ordering::Relaxed),
        );
        let started = Instant::now();
        engine
            .flush_snapshots(Duration::from_secs(3600))
            .map_err(anyhow::Error::msg)?;
        let wall = started.elapsed().as_secs_f64();
        let written = (store.stats.bytes.load(Ordering::Relaxed) - bytes) as f64 / (1 << 20) as f64;
        let writer = (store.stats.commit_micros.load(Ordering::Relaxed) - micros) as f64 / 1e3;
        println!(
            "| {round} | {:.1} | {writer:.1} | {written:.1} | {:.0} |",
            wall * 1e3,
            written / wall
        );
    }
    engine.shutdown();
    drop((engine, sink));
    let file = std::fs::metadata(store.path()).map_or(0, |m| m.len());
    if !store.close(Duration::from_secs(30)) {
        bail!("the store's writer did not finish");
    }

    // A fresh engine, as a restarted server: every session back from the store.
    let store = SessionStore::open(&scratch, 0)?;
    let sink = SnapshotSink::new(
        Duration::from_secs(24 * 3600),
        store.start_writer(),
        store.stats.clone(),
        1,
    );
    let served = placement.load(name, &args.model)?;
    let engine =
        Engine::start(vec![served], config(placement.plan, sink)).map_err(anyhow::Error::msg)?;
    let restored = runtime.block_on(restore(&engine, &store))?;
    println!(
        "restore: {} sessions in {:.1} ms ({:.1} MiB read; store file {:.1} MiB){}",
        restored.sessions,
        restored.millis,
        restored.bytes as f64 / (1 << 20) as f64,
        file as f64 / (1 << 20) as f64,
        match restored.refused.first() {
            Some((_, why)) => format!("; {} refused: {why}", restored.refused.len()),
            None => String::new(),
        }
    );
    engine.shutdown();
    if args.store.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}
