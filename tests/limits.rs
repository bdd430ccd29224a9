//! What one client can make the server do is bounded: each test sends what a hostile or
//! careless client would, and checks the refusal names the limit, the server stays up for
//! everyone else, and the metric counts it.
//!
//! Length: ~620 lines, one end-to-end test per kind of limit, each with its own server and
//! the same few helpers; split by kind when it grows further.

mod common;

use common::*;
use tideway_proto::inference as ipb;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

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

/// The value of the metric line starting with `line_start` on `addr`'s page (0 when absent).
fn metric_at(addr: &str, line_start: &str) -> f64 {
    metric_values(&scrape(addr), line_start)
        .first()
        .copied()
        .unwrap_or(0.0)
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
    let metrics = server.metrics_addr();
    // 80 KB at 1 Hz used to resample ×16000 (2 GB) and abort the server; a prime rate built
    // an FFT resampler of that many points per request.
    for (rate, needle) in [
        (1, "1 Hz is outside the accepted range, 8000 to 192000 Hz"),
        (191_999, "ratio 16000:191999"),
        (1_000_000, "outside the accepted range"),
    ] {
        let e = stream(&url, vec![start_request("kws"), audio(20_000, rate, true)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{rate} Hz: {e:?}");
        assert!(e.message().contains(needle), "{rate} Hz: {e:?}");
    }
    // A stream keeps its first rate.
    let e = stream(
        &url,
        vec![
            start_request("kws"),
            audio(1600, 16000, false),
            audio(800, 8000, true),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("keeps one sample rate"), "{e:?}");
    // A chunk is bounded after resampling: 8000 samples at 8 kHz are 16000 at the model's.
    let rows = stream(&url, vec![start_request("kws"), audio(8000, 8000, true)])
        .await
        .unwrap();
    assert!(rows > 90, "{rows}");
    let e = stream(&url, vec![start_request("kws"), audio(8001, 8000, true)])
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
        stream(&url, vec![start_request("kws"), audio(4000, 16000, true)])
            .await
            .is_ok()
    );
    assert_eq!(
        metric_at(
            &metrics,
            "tideway_limit_refusals_total{limit=\"sample_rate\"}"
        ),
        5.0
    );
    assert_eq!(
        metric_at(
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

fn tokens_chunk(tokens: Vec<i64>, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens,
            end,
            ..Default::default()
        })),
    }
}

fn language_model() -> String {
    format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_jobs_are_bounded_in_tokens() {
    let server = Server::start(&[
        "--model",
        &language_model(),
        "--metrics",
        "127.0.0.1:0",
        "--max-request-tokens",
        "100",
        "--max-job-tokens",
        "100000",
        "--max-job-chunk",
        "64",
        // Fixed steps of --max-job-chunk (time-sized steps: the unit test in jobs.rs).
        "--job-step-ms",
        "0",
    ]);
    let url = server.url();
    let metrics = server.metrics_addr();
    // One stream chunk, one inference request: 100 tokens pass, 101 are refused.
    let ids = |n: usize| -> Vec<i64> { (0..n as i64).map(|i| i % 61).collect() };
    assert_eq!(
        stream(
            &url,
            vec![start_request("lm"), tokens_chunk(ids(100), true)]
        )
        .await
        .unwrap(),
        100
    );
    let e = stream(
        &url,
        vec![start_request("lm"), tokens_chunk(ids(101), true)],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("101 tokens in one request; at most 100 are accepted (--max-request-tokens)"),
        "{e:?}"
    );
    let mut infer =
        ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url.clone())
            .await
            .unwrap();
    let request = |n: usize| infer_ids_request("lm", &ids(n));
    infer.model_infer(request(100)).await.unwrap();
    let e = infer.model_infer(request(101)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // A job over the limit is refused, whole or uploaded in pieces (as soon as it is over).
    let mut jobs = pb::jobs_client::JobsClient::connect(url.clone())
        .await
        .unwrap();
    let job = |tokens: Vec<i64>, chunk: u32| pb::JobRequest {
        model: "lm".into(),
        tokens,
        chunk,
        ..Default::default()
    };
    let e = jobs.submit(job(ids(100_001), 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("(--max-job-tokens)"), "{e:?}");
    let uploads = vec![
        pb::JobUpload {
            kind: Some(pb::job_upload::Kind::Header(job(ids(60_000), 0))),
        },
        pb::JobUpload {
            kind: Some(pb::job_upload::Kind::Tokens(pb::JobTokens {
                tokens: ids(60_000),
            })),
        },
    ];
    let e = jobs
        .submit_stream(tokio_stream::iter(uploads))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // A job asking for steps of a million tokens runs in steps of --max-job-chunk: its
    // progress moves 64 tokens at a time, and Cancel stops it within a step.
    let handle = jobs
        .submit(job(ids(20_000), 1_000_000))
        .await
        .unwrap()
        .into_inner();
    let mut events = jobs
        .watch(pb::JobRef {
            job_id: handle.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let event = events.next().await.unwrap().unwrap();
        if let Some(pb::job_event::Kind::Progress(p)) = event.kind {
            seen.push(p.done_tokens);
        }
    }
    assert!(
        seen.iter().all(|d| d % 64 == 0) && seen.last() > Some(&0),
        "{seen:?}"
    );
    let cancelled = jobs
        .cancel(pb::JobRef {
            job_id: handle.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = cancelled;
    while last.state == pb::JobState::Running as i32 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        last = jobs
            .get(pb::JobRef {
                job_id: handle.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(last.state, pb::JobState::Cancelled as i32, "{last:?}");
    assert!(last.done_tokens < 20_000, "{last:?}");

    assert_eq!(
        metric_at(
            &metrics,
            "tideway_limit_refusals_total{limit=\"request_tokens\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_at(
            &metrics,
            "tideway_limit_refusals_total{limit=\"job_tokens\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_flood_meets_the_session_limit() {
    let server = Server::start(&[
        "--model",
        &language_model(),
        "--metrics",
        "127.0.0.1:0",
        "--max-sessions",
        "5",
    ]);
    let url = server.url();
    let metrics = server.metrics_addr();
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();
    let mut open = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(start_request("lm")).await.unwrap();
        let mut inbound = client
            .open(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        inbound.next().await.unwrap().unwrap();
        open.push((tx, inbound));
    }
    let e = stream(
        &url,
        vec![start_request("lm"), tokens_chunk(vec![1, 2], true)],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("the server holds its limit of 5 live sessions (--max-sessions)"),
        "{e:?}"
    );
    // Ending one makes room.
    let (tx, mut inbound) = open.pop().unwrap();
    tx.send(tokens_chunk(vec![1], true)).await.unwrap();
    while inbound.next().await.is_some() {}
    assert!(
        stream(
            &url,
            vec![start_request("lm"), tokens_chunk(vec![1, 2], true)]
        )
        .await
        .is_ok()
    );
    assert_eq!(
        metric_at(&metrics, "tideway_limit_refusals_total{limit=\"sessions\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_kept_by_bytes_and_age() {
    let server = Server::start(&[
        "--model",
        &language_model(),
        "--job-result-ttl-s",
        "2",
        "--max-job-results-bytes",
        "40000",
    ]);
    let mut jobs = pb::jobs_client::JobsClient::connect(server.url())
        .await
        .unwrap();
    // 100 tokens of logits: 100 × 61 × 4 = 24400 bytes, and the job's record.
    let mut run = async |tokens: usize| -> String {
        let handle = jobs
            .submit(pb::JobRequest {
                model: "lm".into(),
                tokens: (0..tokens as i64).map(|i| i % 61).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            let status = jobs
                .get(pb::JobRef {
                    job_id: handle.job_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if status.state == pb::JobState::Succeeded as i32 {
                return handle.job_id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let first = run(100).await;
    let second = run(100).await;
    let mut jobs = pb::jobs_client::JobsClient::connect(server.url())
        .await
        .unwrap();
    let get = |id: &str| pb::JobRef {
        job_id: id.to_string(),
    };
    // Two results are more than 40000 bytes: the older one went.
    let e = jobs.get(get(&first)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("--max-job-results-bytes"), "{e:?}");
    jobs.get(get(&second)).await.unwrap();
    // And none outlives --job-result-ttl-s.
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let e = jobs.get(get(&second)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_without_whitespace_is_held_only_up_to_the_limit() {
    let server = Server::start(&[
        "--model",
        &format!("bpe={}", fixtures_dir().join("text/mamba_bpe").display()),
        "--metrics",
        "127.0.0.1:0",
        "--max-held-text-bytes",
        "1000",
    ]);
    let metrics = server.metrics_addr();
    let text = |t: String, end: bool| pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            text: t,
            end,
            ..Default::default()
        })),
    };
    // 600 + 600 bytes with no word boundary: the second chunk would hold 1200.
    let e = stream(
        &server.url(),
        vec![
            start_request("bpe"),
            text("a".repeat(600), false),
            text("b".repeat(600), false),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("1200 bytes of text with no word boundary")
            && e.message().contains("--max-held-text-bytes"),
        "{e:?}"
    );
    // Words keep the held text short, however long the stream.
    let words: Vec<pb::StreamRequest> = (0..20)
        .map(|i| text("word ".repeat(100), i == 19))
        .collect();
    let mut messages = vec![start_request("bpe")];
    messages.extend(words);
    assert!(stream(&server.url(), messages).await.unwrap() > 1000);
    assert_eq!(
        metric_at(
            &metrics,
            "tideway_limit_refusals_total{limit=\"held_text\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_messages_are_bounded_in_bytes() {
    let server = Server::start(&[
        "--model",
        &language_model(),
        "--metrics",
        "127.0.0.1:0",
        "--max-message-bytes",
        "30000",
        "--max-request-bytes",
        "30000",
    ]);
    let url = server.url();
    let metrics = server.metrics_addr();
    let ids = |n: usize| -> Vec<i64> { (0..n as i64).map(|i| i % 61).collect() };
    // 100 tokens answer 100 × 61 × 4 = 24400 bytes: sent. 120 would be 29280 and the
    // message's envelope: refused before the model runs them.
    assert_eq!(
        stream(
            &url,
            vec![start_request("lm"), tokens_chunk(ids(100), true)]
        )
        .await
        .unwrap(),
        100
    );
    let e = stream(
        &url,
        vec![start_request("lm"), tokens_chunk(ids(120), true)],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("the answer would be 29280 bytes ([120, 61] FP32)")
            && e.message().contains("--max-message-bytes"),
        "{e:?}"
    );
    // A job's whole answer too; its last position's outputs alone are fine.
    let mut jobs = pb::jobs_client::JobsClient::connect(url.clone())
        .await
        .unwrap();
    let job = |outputs: pb::JobOutputs| pb::JobRequest {
        model: "lm".into(),
        tokens: ids(200),
        outputs: outputs as i32,
        ..Default::default()
    };
    let e = jobs.submit(job(pb::JobOutputs::All)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("last position's outputs only"),
        "{e:?}"
    );
    jobs.submit(job(pb::JobOutputs::Last)).await.unwrap();

    // A gzip bomb: 2 MB of zero tokens in about 2 KB on the wire. Decompression stops at the
    // limit; the server stays up.
    let mut bombing = pb::jobs_client::JobsClient::connect(url.clone())
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let e = bombing
        .submit(pb::JobRequest {
            model: "lm".into(),
            tokens: vec![0; 2_000_000],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("30000 bytes"), "{e:?}");
    assert_eq!(
        stream(&url, vec![start_request("lm"), tokens_chunk(ids(10), true)])
            .await
            .unwrap(),
        10
    );
    assert_eq!(
        metric_at(
            &metrics,
            "tideway_limit_refusals_total{limit=\"message_bytes\"}"
        ),
        2.0
    );
}
