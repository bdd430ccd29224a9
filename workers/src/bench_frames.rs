//! `tideway bench --model DIR` for a feature model (LMUFormer): streams stepped together one
//! frame each (frames/s and the latency of one step at each batch size), the whole-clip
//! parallel form, and peak memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tideway_operators::layers::frames::Frames;
use tideway_operators::models::{LmuFormerState, load_lmuformer};

use crate::bench::peak_rss_bytes;

#[derive(Serialize)]
struct StreamResult {
    streams: usize,
    steps: usize,
    frames_per_s: f64,
    step_ms_p50: f64,
    step_ms_p99: f64,
}

#[derive(Serialize)]
struct ClipResult {
    frames: usize,
    runs: usize,
    frames_per_s: f64,
    seconds: f64,
}

#[derive(Serialize)]
struct FrameBenchReport {
    model: String,
    family: &'static str,
    threads: usize,
    load_s: f64,
    weight_bytes: usize,
    state_bytes_per_session: usize,
    streams: Vec<StreamResult>,
    clip: ClipResult,
    peak_rss_bytes: Option<u64>,
}

/// Deterministic features in [-1.5, 1.5) (an LCG), so runs are comparable.
fn features(count: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect()
}

pub fn bench_frames(
    dir: &Path,
    batches: &[usize],
    min_time: Duration,
    threads: usize,
    json: bool,
) -> Result<()> {
    let started = Instant::now();
    let model =
        load_lmuformer(dir).with_context(|| format!("cannot load model from {}", dir.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let say = |line: String| {
        if !json {
            eprintln!("{line}");
        }
    };
    let family = match model.config().variant {
        tideway_operators::models::lmuformer::Variant::Plain => "lmuformer",
        tideway_operators::models::lmuformer::Variant::Spiking => "spiking lmuformer",
    };
    say(format!(
        "model {} ({family}), {threads} threads, weights {:.2} MiB, state {:.1} KiB/stream, loaded in {load_s:.2}s",
        dir.display(),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        model.state_bytes() as f64 / 1024.0
    ));
    let c = model.in_channels();
    let mut streams = Vec::new();
    for &batch in batches {
        let mut states: Vec<LmuFormerState> = (0..batch).map(|_| model.new_state()).collect();
        let mut refs: Vec<&mut LmuFormerState> = states.iter_mut().collect();
        let ends = vec![false; batch];
        let step_input = |seed: u64| Frames {
            data: features(batch * c, seed),
            width: c,
            counts: vec![1; batch],
        };
        // Fill the patch embedding's lookahead so that every step emits a frame per stream.
        for i in 0..8 {
            model.forward(&mut refs, &step_input(i), &ends)?;
        }
        let inputs: Vec<Frames> = (0..16).map(|i| step_input(100 + i)).collect();
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 5 || start.elapsed() < min_time {
            let t0 = Instant::now();
            model.forward(&mut refs, &inputs[times.len() % inputs.len()], &ends)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        let total: f64 = times.iter().sum();
        let steps = times.len();
        times.sort_by(f64::total_cmp);
        let result = StreamResult {
            streams: batch,
            steps,
            frames_per_s: (batch * steps) as f64 / total,
            step_ms_p50: 1e3 * times[steps / 2],
            step_ms_p99: 1e3 * times[(steps * 99 / 100).min(steps - 1)],
        };
        say(format!(
            "{batch:>5} streams: {:>10.1} frames/s (step p50 {:.3} ms, p99 {:.3} ms, {steps} steps)",
            result.frames_per_s, result.step_ms_p50, result.step_ms_p99
        ));
        streams.push(result);
    }
    // The whole-clip (parallel) form on the reference's 128-frame clips.
    let frames = 128;
    let clip = features(frames * c, 7);
    model.run_clip(&mut model.new_state(), &clip)?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < min_time && times.len() < 1000) {
        let t0 = Instant::now();
        model.run_clip(&mut model.new_state(), &clip)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let clip = ClipResult {
        frames,
        runs: times.len(),
        frames_per_s: frames as f64 / median,
        seconds: median,
    };
    say(format!(
        "clip of {frames} frames (parallel form): {:.1} frames/s ({:.3} ms per clip, {} runs)",
        clip.frames_per_s,
        1e3 * clip.seconds,
        clip.runs
    ));
    let report = FrameBenchReport {
        model: dir.display().to_string(),
        family,
        threads,
        load_s,
        weight_bytes: model.weight_bytes(),
        state_bytes_per_session: model.state_bytes(),
        streams,
        clip,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("| measurement | frames/s | detail |");
    println!("|---|---:|---|");
    for s in &report.streams {
        println!(
            "| {} streams, one frame each per step | {:.1} | step p50 {:.3} ms, p99 {:.3} ms |",
            s.streams, s.frames_per_s, s.step_ms_p50, s.step_ms_p99
        );
    }
    println!(
        "| clip of {} frames, parallel form | {:.1} | {:.3} ms/clip |",
        report.clip.frames,
        report.clip.frames_per_s,
        1e3 * report.clip.seconds
    );
    match report.peak_rss_bytes {
        Some(b) => println!(
            "| peak memory (RSS) | | {:.1} MiB |",
            b as f64 / (1 << 20) as f64
        ),
        None => println!("| peak memory (RSS) | | not available on this OS |"),
    }
    Ok(())
}
