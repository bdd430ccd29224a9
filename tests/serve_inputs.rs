//! `tideway serve` with raw inputs on `tideway.v1` streams: audio samples (f32 and int16) into
//! an LMUFormer with an audio front end, text into a language model with a tokenizer, frames
//! into a feature model; each streamed in random chunks and equal to the references.

mod common;

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn chunk(c: pb::StreamChunk) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(c)),
    }
}

/// Sends the messages, half-closes, and returns the concatenated output rows and their name.
async fn stream(
    url: &str,
    messages: Vec<pb::StreamRequest>,
) -> Result<(String, Vec<f64>), tonic::Status> {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(messages.len() + 1);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let (mut name, mut values) = (String::new(), Vec::new());
    while let Some(message) = inbound.next().await {
        if let pb::stream_response::Kind::Output(out) = message?.kind.unwrap() {
            for t in out.outputs {
                name = t.name.clone();
                values.extend(
                    t.data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64),
                );
            }
        }
    }
    Ok((name, values))
}

/// Cut points in 1..=max from a seed.
fn cuts(total: usize, max: usize, seed: u64) -> Vec<std::ops::Range<usize>> {
    let (mut at, mut x, mut out) = (0, seed, Vec::new());
    while at < total {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (1 + (x >> 33) as usize % max).min(total - at);
        out.push(at..at + n);
        at += n;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_audio_text_and_frames_stream_to_the_reference_outputs() {
    let lmu = fixtures_dir().join("lmu/lmu_d16_c128_frontend");
    let server = Server::start(&[
        "--model",
        &format!("kws={}", lmu.join("checkpoint").display()),
        "--model",
        &format!("bpe={}", fixtures_dir().join("text/mamba_bpe").display()),
        "--model",
        &format!(
            "plain={}",
            fixtures_dir().join("lmu/lmu_d32_c16/checkpoint").display()
        ),
        "--workers",
        "2",
    ]);
    let url = server.url();

    // Audio: the chirp's samples in random chunks of up to 3000, as f32 and as int16.
    let samples = read_tensor(
        &fixtures_dir().join("audio/chirp_16k_s16.features.safetensors"),
        "samples",
    )
    .values;
    let want = read_tensor(&lmu.join("expected.safetensors"), "output").values;
    for (seed, int16) in [(1u64, false), (2, true)] {
        let ranges = cuts(samples.len(), 3000, seed);
        let last = ranges.len() - 1;
        let mut messages = vec![start_request("kws")];
        for (i, r) in ranges.into_iter().enumerate() {
            let piece = &samples[r];
            let mut c = pb::StreamChunk {
                sample_rate: 16000,
                end: i == last,
                ..Default::default()
            };
            if int16 {
                c.samples_i16 = piece
                    .iter()
                    .map(|&v| (v * 32768.0).round() as i32)
                    .collect();
            } else {
                c.samples_f32 = piece.iter().map(|&v| v as f32).collect();
            }
            messages.push(chunk(c));
        }
        let (name, got) = stream(&url, messages).await.unwrap();
        assert_eq!(name, "output");
        let err = relative_error(&got, &want);
        eprintln!("audio (int16: {int16}): relative error {err:.2e}");
        assert!(err <= 1e-4, "audio (int16: {int16}): {err:.3e}");
    }

    // Text: cut at random character boundaries (inside words).
    let text = std::fs::read_to_string(fixtures_dir().join("text/mamba_bpe.text.txt")).unwrap();
    let want = read_tensor(
        &fixtures_dir().join("text/mamba_bpe.expected.safetensors"),
        "logits",
    )
    .values;
    let chars: Vec<char> = text.chars().collect();
    let ranges = cuts(chars.len(), 5, 3);
    let last = ranges.len() - 1;
    let mut messages = vec![start_request("bpe")];
    for (i, r) in ranges.into_iter().enumerate() {
        messages.push(chunk(pb::StreamChunk {
            text: chars[r].iter().collect(),
            end: i == last,
            ..Default::default()
        }));
    }
    let (name, got) = stream(&url, messages).await.unwrap();
    assert_eq!(name, "logits");
    let err = relative_error(&got, &want);
    eprintln!("text: relative error {err:.2e}");
    assert!(err <= 1e-4, "text: {err:.3e}");

    // Feature frames straight into a model without a front end.
    let dir = fixtures_dir().join("lmu/lmu_d32_c16");
    let input = read_tensor(&dir.join("input.safetensors"), "input").values;
    let want = read_tensor(&dir.join("expected.safetensors"), "output").values;
    let ranges = cuts(input.len() / 16, 9, 4);
    let last = ranges.len() - 1;
    let mut messages = vec![start_request("plain")];
    for (i, r) in ranges.into_iter().enumerate() {
        messages.push(chunk(pb::StreamChunk {
            frames: input[r.start * 16..r.end * 16]
                .iter()
                .map(|&v| v as f32)
                .collect(),
            channels: 16,
            end: i == last,
            ..Default::default()
        }));
    }
    let (_, got) = stream(&url, messages).await.unwrap();
    let err = relative_error(&got, &want);
    eprintln!("frames: relative error {err:.2e}");
    assert!(err <= 1e-4, "frames: {err:.3e}");

    // Wrong kinds of input say what the model takes.
    for (model, c, needle) in [
        (
            "kws",
            pb::StreamChunk {
                tokens: vec![1, 2],
                ..Default::default()
            },
            "is a feature model: it takes audio samples or frames",
        ),
        (
            "kws",
            pb::StreamChunk {
                samples_f32: vec![0.0; 10],
                ..Default::default()
            },
            "audio samples need their `sample_rate`",
        ),
        (
            "plain",
            pb::StreamChunk {
                samples_f32: vec![0.0; 10],
                sample_rate: 16000,
                ..Default::default()
            },
            "has no audio front end",
        ),
        (
            "plain",
            pb::StreamChunk {
                frames: vec![0.0; 30],
                channels: 15,
                ..Default::default()
            },
            "takes feature frames of 16 values",
        ),
        (
            "kws",
            pb::StreamChunk {
                samples_f32: vec![f32::NAN; 10],
                sample_rate: 16000,
                ..Default::default()
            },
            "is NaN or infinite",
        ),
        (
            "kws",
            pb::StreamChunk {
                samples_i16: vec![40000],
                sample_rate: 16000,
                ..Default::default()
            },
            "outside the int16 range",
        ),
    ] {
        let e = stream(&url, vec![start_request(model), chunk(c)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "want {needle:?}: {e:?}");
    }
}

/// Opens a stream (`start`), sends `frames` in `chunks` (the last ends the stream unless
/// `keep`), and returns the session id, the output rows and their `skipped` flags.
async fn gated_stream(
    url: &str,
    start: pb::StreamStart,
    frames: &[f32],
    chunks: &[std::ops::Range<usize>],
    keep: bool,
) -> (String, Vec<f32>, Vec<bool>) {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(chunks.len() + 2);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(start)),
    })
    .await
    .unwrap();
    for (k, r) in chunks.iter().enumerate() {
        tx.send(chunk(pb::StreamChunk {
            frames: frames[r.start * 24..r.end * 24].to_vec(),
            channels: 24,
            end: !keep && k + 1 == chunks.len(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    drop(tx);
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut id, mut rows, mut skipped) = (String::new(), Vec::new(), Vec::new());
    while let Some(message) = inbound.next().await {
        match message.unwrap().kind.unwrap() {
            pb::stream_response::Kind::Opened(o) => id = o.session_id,
            pb::stream_response::Kind::Output(out) => {
                let n = out.outputs[0].shape[0] as usize;
                let flags = if out.skipped.is_empty() {
                    vec![false; n]
                } else {
                    out.skipped
                };
                assert_eq!(flags.len(), n);
                skipped.extend(flags);
                rows.extend(
                    out.outputs[0]
                        .data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
                );
            }
            _ => {}
        }
    }
    (id, rows, skipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_streams_state_moves_with_its_gate() {
    // A spiking LMUFormer fixture with a frame gate, and the gate fixture's input (runs of
    // repeated and quiet frames): half on server A, exported, the rest on server B from the
    // blob; the rows and skipped flags equal one uninterrupted stream's.
    let dir = scratch_dir("gated-lmu");
    let source = fixtures_dir().join("lmu/slmu_d40_c24_depth2_prefixed/checkpoint");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["tideway_frame_gate"] = serde_json::json!({ "similarity": 0.97, "quiet_below": -1.5 });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let frames: Vec<f32> = read_tensor(
        &fixtures_dir().join("prune/frame_gate.safetensors"),
        "case0.input",
    )
    .values
    .iter()
    .map(|&v| v as f32)
    .collect();
    let model = format!("gated={}", dir.display());
    let args = ["--model", model.as_str(), "--workers", "2"];
    let (a, b) = (Server::start(&args), Server::start(&args));
    // The move falls inside a run of repeated frames (90..110): a gate that did not move
    // would keep frame 95, the first it saw.
    let mut chunks = cuts(95, 11, 5);
    let half = chunks.len();
    chunks.extend(
        cuts(33, 11, 6)
            .into_iter()
            .map(|r| r.start + 95..r.end + 95),
    );
    let start = |state: Vec<u8>| pb::StreamStart {
        model: "gated".into(),
        state,
        ..Default::default()
    };
    let (_, want, want_skipped) =
        gated_stream(&a.url(), start(Vec::new()), &frames, &chunks, false).await;
    assert_eq!(want_skipped.len(), 128);
    let skipped = want_skipped.iter().filter(|&&s| s).count();
    assert!(skipped > 20, "{skipped} frames skipped");

    assert!(want_skipped[95], "frame 95 repeats frame 90");
    let keep_start = pb::StreamStart {
        keep: true,
        ..start(Vec::new())
    };
    let (id, mut rows, mut flags) =
        gated_stream(&a.url(), keep_start, &frames, &chunks[..half], true).await;
    let mut streams = pb::streams_client::StreamsClient::connect(a.url())
        .await
        .unwrap();
    let exported = streams
        .export_state(pb::ExportStateRequest {
            model: "gated".into(),
            session_id: id,
        })
        .await
        .unwrap()
        .into_inner();
    let (_, rest, rest_flags) = gated_stream(
        &b.url(),
        start(exported.state),
        &frames,
        &chunks[half..],
        false,
    )
    .await;
    rows.extend(rest);
    flags.extend(rest_flags);
    assert_eq!(flags, want_skipped);
    assert_eq!(rows, want);
}

/// `tideway bench serve --json` against `model` (a checkpoint directory served as "m") with
/// `args`: the one row it reports.
fn bench_serve_row(checkpoint: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let server = Server::start(&["--model", &format!("m={}", checkpoint.display())]);
    let out = tideway()
        .args([
            "bench",
            "serve",
            "--addr",
            &server.addr,
            "--model",
            "m",
            "--json",
        ])
        .args(["--streams", "2", "--rate", "50", "--seconds", "1"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap()
}

#[test]
fn bench_serve_feeds_an_audio_model_audio() {
    let lmu = fixtures_dir().join("lmu/lmu_d16_c128_frontend");
    let row = bench_serve_row(&lmu.join("checkpoint"), &["--audio-ms", "20"]);
    assert_eq!(
        (row["unit"].as_str(), row["per_chunk"].as_u64()),
        (Some("audio ms"), Some(20))
    );
    assert_eq!(row["errors"], 0, "{row}");
    let chunks = row["chunks_answered"].as_u64().unwrap();
    assert!(
        chunks >= 50,
        "2 streams at 50 chunks/s for 1 s: {chunks} answered"
    );
    // After k chunks of 320 samples (20 ms at 16 kHz) the front end has 1 + ⌊(320k − 400) /
    // 160⌋ = 2k − 2 frames of its 25 ms window at a 10 ms hop (Kaldi's whole frames), and the
    // outputs trail them by the patch embedding's 5 frames (the streams end without `end`,
    // which would flush those): 2k − 7 rows a stream.
    let rows = row["rows_answered"].as_u64().unwrap();
    assert_eq!(rows, 2 * chunks - 2 * 7, "{row}");
    // Seconds of audio a second: 2 streams of 20 ms, 50 times a second, are 2× real time.
    let realtime = row["input_per_s"].as_f64().unwrap();
    assert!(
        (1.5..=2.1).contains(&realtime),
        "{realtime} s of audio a second: {row}"
    );
}

#[test]
fn bench_serve_feeds_a_model_of_frames_frames_of_its_width() {
    let lmu = fixtures_dir().join("lmu/lmu_d32_c16");
    let row = bench_serve_row(&lmu.join("checkpoint"), &["--frame", "4"]);
    assert_eq!(
        (row["unit"].as_str(), row["per_chunk"].as_u64()),
        (Some("frames"), Some(4))
    );
    assert_eq!(row["errors"], 0, "{row}");
    // One output row a frame, trailing the input by the patch embedding's 5 frames.
    let chunks = row["chunks_answered"].as_u64().unwrap();
    assert!(
        chunks >= 50,
        "2 streams at 50 chunks/s for 1 s: {chunks} answered"
    );
    assert_eq!(
        row["rows_answered"].as_u64(),
        Some(4 * chunks - 2 * 5),
        "{row}"
    );
}
