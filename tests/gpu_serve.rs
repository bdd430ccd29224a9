//! The GPU path through the real binary (a build with `--features cuda`), on the host
//! emulator of the CUDA kernels (`--device cuda-emulator`): `tideway run` gives the reference
//! logits with f32 and bf16 weights, and `tideway serve` keeps every session's state in the
//! device pool it reports, answers like `run`, refuses a session beyond the pool with
//! RESOURCE_EXHAUSTED and frees the slot of an ended session; split over GPU ranks
//! (`--tensor-parallel`), both commands give the same answers. `tideway generate` on the GPU
//! gives the CPU's greedy tokens.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

const MODEL: &str = "gla_legacy_fused_mlp";

fn model_dir() -> std::path::PathBuf {
    fixtures_dir().join("fla").join(MODEL)
}

/// A fixture's reference input as `--tokens` takes it, and its reference logits.
fn reference_input(dir: &std::path::Path) -> (String, Loaded) {
    let expected = dir.join("expected.safetensors");
    let tokens = read_tensor(&expected, "input_ids")
        .values
        .iter()
        .map(|v| (*v as u64).to_string())
        .collect::<Vec<_>>()
        .join(",");
    (tokens, read_tensor(&expected, "logits"))
}

#[test]
fn run_on_the_emulated_gpu_gives_the_reference_logits() {
    let dir = model_dir();
    let (tokens, want) = reference_input(&dir);
    for (dtype, mode, limit) in [
        ("f32", "chunked", 1e-4),
        ("f32", "recurrent", 1e-4),
        ("bf16", "chunked", 2e-2),
    ] {
        let out = scratch_dir("gpu-run").join("out.safetensors");
        let output = tideway()
            .args([
                "run",
                "--device",
                "cuda-emulator",
                "--dtype",
                dtype,
                "--mode",
                mode,
            ])
            .arg("--model")
            .arg(&dir)
            .args(["--tokens", &tokens, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        let got = read_tensor(&out, "logits");
        let rel = relative_error(&got.values, &want.values);
        eprintln!("{dtype} {mode}: {rel:.2e} vs fla");
        assert!(rel <= limit, "{dtype} {mode}: relative error {rel:.3e}");
    }
}

/// `run --device cuda-emulator --tensor-parallel N`: the model split over GPU ranks gives the
/// reference logits in both forms, ladder-wired models too; other transports are refused.
#[test]
fn greedy_generation_on_the_emulated_gpu_gives_the_cpus_tokens() {
    // The prompt in chunks of 4: the GPU gathers each chunk's last row for the head alone.
    let model = fixtures_dir().join("../../models/shakespeare-mamba");
    let tokens = |device: &str| {
        let output = tideway()
            .args(["generate", "--device", device, "--model"])
            .arg(&model)
            .args(["--text", "ROMEO:\n", "--chunk", "4", "--max-tokens", "24"])
            .args(["--temperature", "0", "--ignore-eos", "--json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{device}: {}", stderr(&output));
        let stdout = String::from_utf8(output.stdout).unwrap();
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        last["tokens"].clone()
    };
    let cpu = tokens("cpu");
    assert_eq!(cpu.as_array().unwrap().len(), 24);
    assert_eq!(tokens("cuda-emulator"), cpu);
}

#[test]
fn run_split_over_emulated_gpu_ranks_gives_the_reference_logits() {
    for (family, name, sizes) in [
        ("fla", MODEL, &["2", "4"][..]),
        ("ladder", "mamba_ladder_all", &["2"][..]),
        ("ladder", "gla_ladder_last2", &["2"][..]),
    ] {
        let dir = fixtures_dir().join(family).join(name);
        let (tokens, want) = reference_input(&dir);
        for size in sizes {
            for mode in ["chunked", "recurrent"] {
                let out = scratch_dir("gpu-tp-run").join("out.safetensors");
                let output = tideway()
                    .args(["run", "--device", "cuda-emulator", "--mode", mode])
                    .args(["--tensor-parallel", size, "--model"])
                    .arg(&dir)
                    .args(["--tokens", &tokens, "--out"])
                    .arg(&out)
                    .output()
                    .unwrap();
                assert!(output.status.success(), "{}", stderr(&output));
                let got = read_tensor(&out, "logits");
                let rel = relative_error(&got.values, &want.values);
                eprintln!("{name} on {size} GPU ranks, {mode}: {rel:.2e} vs the reference");
                assert!(
                    rel <= 1e-4,
                    "{name} tp {size} {mode}: relative error {rel:.3e}"
                );
            }
        }
    }
    // A split the heads do not divide fails every rank at load, and the group says why.
    let output = tideway()
        .args([
            "run",
            "--device",
            "cuda-emulator",
            "--tensor-parallel",
            "3",
            "--model",
        ])
        .arg(model_dir())
        .args(["--tokens", "1,2,3", "--out"])
        .arg(scratch_dir("gpu-tp-refused").join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not divide into 3 tensor-parallel shards"),
        "{}",
        stderr(&output)
    );
    let output = tideway()
        .args(["run", "--device", "cuda-emulator", "--tensor-parallel", "2"])
        .args(["--tp-transport", "processes", "--model"])
        .arg(model_dir())
        .args(["--tokens", "1,2,3", "--out"])
        .arg(scratch_dir("gpu-tp-refused").join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("on a GPU the tensor-parallel ranks are threads of this process"),
        "{}",
        stderr(&output)
    );
}

/// The spiking and plain LMUFormers through `run --device cuda-emulator` give the reference
/// outputs (spikingjelly / the LMUFormer reference modules) in both forms.
#[test]
fn lmuformers_run_on_the_emulated_gpu_give_the_reference_outputs() {
    for name in ["lmu_d32_c16", "slmu_d40_c24_depth2_prefixed"] {
        let dir = fixtures_dir().join("lmu").join(name);
        let expected = dir.join("expected.safetensors");
        for mode in ["chunked", "recurrent"] {
            let out = scratch_dir("gpu-lmu").join("out.safetensors");
            let output = tideway()
                .args([
                    "run",
                    "--device",
                    "cuda-emulator",
                    "--mode",
                    mode,
                    "--model",
                ])
                .arg(dir.join("checkpoint"))
                .arg("--input")
                .arg(dir.join("input.safetensors"))
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", stderr(&output));
            for tensor in ["output", "pooled"] {
                let (got, want) = (read_tensor(&out, tensor), read_tensor(&expected, tensor));
                let rel = relative_error(&got.values, &want.values);
                eprintln!("{name} {mode} {tensor}: {rel:.2e} vs the reference");
                assert!(rel <= 1e-4, "{name} {mode} {tensor}: {rel:.3e}");
            }
        }
    }
}

fn start(keep: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: MODEL.into(),
            keep,
            ..Default::default()
        })),
    }
}

/// One stream: its logits, or the status it ended with.
async fn stream(url: &str, messages: Vec<pb::StreamRequest>) -> Result<Vec<f64>, tonic::Status> {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let inbound = client
        .open(tokio_stream::iter(messages))
        .await?
        .into_inner();
    output_rows(inbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_on_the_emulated_gpu_reports_its_pool_and_answers_like_run() {
    serve_and_check(&[]).await;
}

/// The same over two GPU ranks (threads, host-staged reductions on one device): the group's
/// pool is its ranks' pool, and the answers are the single worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_split_over_emulated_gpu_ranks_answers_like_run() {
    serve_and_check(&["--tensor-parallel", "2"]).await;
}

async fn serve_and_check(extra: &[&str]) {
    let dir = model_dir();
    let mut args = vec![
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cuda-emulator",
        "--gpu-sessions",
        "2",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let url = server.url();
    let info = first_model(&url).await;
    assert_eq!(info.device, "cuda-emulator");
    assert_eq!(info.session_capacity, 2);

    let tokens = pseudo_random(24, 45, 5);
    let want = run_reference(&dir, &tokens);
    let got = stream(
        &url,
        vec![
            start(false),
            token_chunk(&tokens[..10], false),
            token_chunk(&tokens[10..], true),
        ],
    )
    .await
    .unwrap();
    assert!(relative_error(&got, &want.values) <= 1e-5);

    // Two kept sessions fill the pool; a third is refused; ending one frees its slot.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut client = pb::streams_client::StreamsClient::connect(url.clone())
            .await
            .unwrap();
        let mut inbound = client
            .open(tokio_stream::iter(vec![
                start(true),
                token_chunk(&tokens[..3], false),
            ]))
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = inbound.next().await {
            if let pb::stream_response::Kind::Opened(o) = m.unwrap().kind.unwrap() {
                kept.push(o.session_id);
            }
        }
    }
    assert_eq!(kept.len(), 2);
    let refused = stream(&url, vec![start(false), token_chunk(&tokens[..3], true)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("all 2 session slots on the GPU are in use"),
        "{refused:?}"
    );
    // End the first kept session, then a new one fits.
    let resume = pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: MODEL.into(),
            resume_session_id: kept[0].clone(),
            ..Default::default()
        })),
    };
    stream(&url, vec![resume, token_chunk(&tokens[3..4], true)])
        .await
        .unwrap();
    let got = stream(
        &url,
        vec![
            start(false),
            token_chunk(&tokens[..10], false),
            token_chunk(&tokens[10..], true),
        ],
    )
    .await
    .unwrap();
    assert!(relative_error(&got, &want.values) <= 1e-5);
}

/// A spiking LMUFormer served on the emulated GPU: frames streamed in uneven chunks give the
/// reference outputs, and the pool reports itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_model_served_on_the_emulated_gpu_gives_the_reference_outputs() {
    let dir = fixtures_dir().join("lmu/slmu_d32_c16");
    let checkpoint = dir.join("checkpoint");
    let server = Server::start(&[
        "--model",
        &format!("spiking={}", checkpoint.display()),
        "--device",
        "cuda-emulator",
        "--gpu-sessions",
        "3",
    ]);
    let url = server.url();
    let info = first_model(&url).await;
    assert_eq!(
        (info.device.as_str(), info.session_capacity),
        ("cuda-emulator", 3)
    );
    let input = read_tensor(&dir.join("input.safetensors"), "input").values;
    let want = read_tensor(&dir.join("expected.safetensors"), "output").values;
    let c = 16;
    let rows = input.len() / c;
    let mut messages = vec![pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: "spiking".into(),
            ..Default::default()
        })),
    }];
    let mut at = 0;
    for (i, n) in [1usize, 9, 3, 40].iter().cycle().enumerate() {
        let n = (*n).min(rows - at);
        messages.push(pb::StreamRequest {
            kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
                frames: input[at * c..(at + n) * c]
                    .iter()
                    .map(|&v| v as f32)
                    .collect(),
                channels: c as u32,
                end: at + n == rows,
                ..Default::default()
            })),
        });
        at += n;
        if at == rows || i > 1000 {
            break;
        }
    }
    let got = stream(&url, messages).await.unwrap();
    let err = relative_error(&got, &want);
    eprintln!("spiking LMUFormer on the emulated GPU: {err:.2e}");
    assert!(err <= 1e-4, "{err:.3e}");
}
