//! What one client can make the server do is bounded: each test sends what a hostile or
//! careless client would, and checks the refusal names the limit, the server stays up for
//! everyone else, and the metric counts it.

mod common;

use common::*;
use tideway_proto::inference as ipb;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn start(model: &str) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            ..Default::default()
        })),
    }
}

fn audio(samples: usize, rate: u32, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            samples_f32: (0..samples)
                .map(|i| (i as f32 * 0.01).sin() * 0.1)
                .collect(),
            sample_rate: rate,
            end,
            ..Default::default()
        })),
    }
}

/// Sends the messages, half-closes; the output rows, or the status the stream ended with.
async fn stream(url: &str, messages: Vec<pb::StreamRequest>) -> Result<usize, tonic::Status> {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(messages.len() + 1);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let mut rows = 0;
    while let Some(message) = inbound.next().await {
        if let pb::stream_response::Kind::Output(out) = message?.kind.unwrap() {
            rows += out.outputs[0].shape[0] as usize;
        }
    }
    Ok(rows)
}

fn metrics_addr(server: &Server) -> String {
    server
        .stderr()
        .lines()
        .find_map(|l| {
            l.strip_prefix("tideway metrics on http://")
                .map(|a| a.trim_end_matches("/metrics").to_string())
        })
        .expect("the metrics address is printed")
}

/// The value of the metric line starting with `line_start` (0 when absent).
fn metric(addr: &str, line_start: &str) -> f64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    page.lines()
        .find(|l| l.starts_with(line_start))
        .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_rates_and_chunk_lengths_are_bounded() {
    let model = fixtures_dir().join("lmu/lmu_d16_c128_frontend/checkpoint");
    let server = Server::start(&[
        "--model",
        &format!("kws={}", model.display()),
        "--metrics",
        "127.0.0.1:0",
        "--max-chunk-samples",
        "16000",
    ]);
    let url = server.url();
    let metrics = metrics_addr(&server);
    // 80 KB at 1 Hz used to resample ×16000 (2 GB) and abort the server; a prime rate built
    // an FFT resampler of that many points per request.
    for (rate, needle) in [
        (1, "1 Hz is outside the accepted range, 8000 to 192000 Hz"),
        (191_999, "ratio 16000:191999"),
        (1_000_000, "outside the accepted range"),
    ] {
        let e = stream(&url, vec![start("kws"), audio(20_000, rate, true)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{rate} Hz: {e:?}");
        assert!(e.message().contains(needle), "{rate} Hz: {e:?}");
    }
    // A stream keeps its first rate.
    let e = stream(
        &url,
        vec![
            start("kws"),
            audio(1600, 16000, false),
            audio(800, 8000, true),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("keeps one sample rate"), "{e:?}");
    // A chunk is bounded after resampling: 8000 samples at 8 kHz are 16000 at the model's.
    let rows = stream(&url, vec![start("kws"), audio(8000, 8000, true)])
        .await
        .unwrap();
    assert!(rows > 90, "{rows}");
    let e = stream(&url, vec![start("kws"), audio(8001, 8000, true)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("16002 samples") && e.message().contains("--max-chunk-samples"),
        "{e:?}"
    );

    // The inference protocol's sample_rate is checked whole: 2^32 + 1 is not 1 Hz.
    let mut client =
        ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url.clone())
            .await
            .unwrap();
    let request = |rate: u64| {
        let samples: Vec<f32> = vec![0.0; 1600];
        let mut r = ipb::ModelInferRequest {
            model_name: "kws".into(),
            inputs: vec![ipb::model_infer_request::InferInputTensor {
                name: "audio".into(),
                datatype: "FP32".into(),
                shape: vec![samples.len() as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![samples.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        r.parameters.insert(
            "sample_rate".into(),
            ipb::InferParameter {
                parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Uint64Param(rate)),
            },
        );
        r
    };
    let e = client
        .model_infer(request((1 << 32) + 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("4294967297 Hz"), "{e:?}");
    client.model_infer(request(16000)).await.unwrap();

    // The server stayed up for everyone, and counted each refusal by its limit.
    assert!(
        stream(&url, vec![start("kws"), audio(4000, 16000, true)])
            .await
            .is_ok()
    );
    assert_eq!(
        metric(
            &metrics,
            "tideway_limit_refusals_total{limit=\"sample_rate\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tideway_limit_refusals_total{limit=\"chunk_samples\"}"
        ),
        1.0
    );
}

#[test]
fn run_refuses_a_wav_at_one_hertz() {
    let dir = scratch_dir("limits-wav");
    let wav = dir.join("one-hertz.wav");
    // A mono 16-bit PCM WAV at 1 Hz: RIFF header, fmt chunk, data chunk.
    let samples: Vec<u8> = (0..40_000u32)
        .flat_map(|i| ((i % 100) as i16).to_le_bytes())
        .collect();
    let mut bytes = Vec::new();
    bytes.extend(b"RIFF");
    bytes.extend((36 + samples.len() as u32).to_le_bytes());
    bytes.extend(b"WAVEfmt ");
    bytes.extend(16u32.to_le_bytes());
    bytes.extend(1u16.to_le_bytes()); // PCM
    bytes.extend(1u16.to_le_bytes()); // mono
    bytes.extend(1u32.to_le_bytes()); // 1 Hz
    bytes.extend(2u32.to_le_bytes()); // bytes per second
    bytes.extend(2u16.to_le_bytes()); // block align
    bytes.extend(16u16.to_le_bytes()); // bits per sample
    bytes.extend(b"data");
    bytes.extend((samples.len() as u32).to_le_bytes());
    bytes.extend(samples);
    std::fs::write(&wav, bytes).unwrap();
    let model = fixtures_dir().join("lmu/lmu_d16_c128_frontend/checkpoint");
    let output = tideway()
        .args(["run", "--model"])
        .arg(&model)
        .arg("--audio")
        .arg(&wav)
        .arg("--out")
        .arg(dir.join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("outside the accepted range"), "{text}");
}
