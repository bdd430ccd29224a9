//! End-to-end tests of `tideway serve`: the real binary on loopback ports chosen at run time,
//! driven through its gRPC APIs.
//!
//! Length: one file of end-to-end scenarios against one server binary (each test starts its
//! own `tideway serve`); the helpers they share are in `tests/common`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn model_dir() -> PathBuf {
    fixtures_dir().join("mamba/hf_k4_sharded")
}

const MODEL: &str = "hf_k4_sharded";
const VOCAB: u64 = 64;
const WIDTH: usize = 64;

fn start_msg(model: &str, resume: &str, keep: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            resume_session_id: resume.into(),
            keep,
            outputs: Vec::new(),
            state: Vec::new(),
        })),
    }
}

/// What one stream got back.
#[derive(Debug)]
struct StreamResult {
    session_id: String,
    logits: Vec<f64>,
    positions: Vec<u64>,
    summary: Option<pb::StreamSummary>,
}

/// Opens a stream, sends `chunks`, half-closes, and collects every response.
async fn run_stream(url: &str, chunks: &[Vec<u64>]) -> Result<StreamResult, tonic::Status> {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(chunks.len() + 1);
    tx.send(start_msg(MODEL, "", false)).await.unwrap();
    for c in chunks {
        tx.send(token_chunk(c, false)).await.unwrap();
    }
    drop(tx);
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let mut result = StreamResult {
        session_id: String::new(),
        logits: Vec::new(),
        positions: Vec::new(),
        summary: None,
    };
    while let Some(message) = inbound.next().await {
        match message?.kind.unwrap() {
            pb::stream_response::Kind::Opened(o) => result.session_id = o.session_id,
            pb::stream_response::Kind::Output(o) => {
                result.positions.push(o.position);
                let t = &o.outputs[0];
                assert_eq!(t.name, "logits");
                assert_eq!(t.shape[1], WIDTH as i64);
                result.logits.extend(f32s(&t.data));
            }
            pb::stream_response::Kind::Summary(s) => result.summary = Some(s),
            pb::stream_response::Kind::Generated(g) => panic!("no generation was asked: {g:?}"),
        }
    }
    Ok(result)
}

/// Splits `tokens` into chunks of 1..=max tokens.
fn random_chunks(tokens: &[u64], max: u64, seed: u64) -> Vec<Vec<u64>> {
    let sizes = pseudo_random(tokens.len(), max, seed);
    let mut chunks = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < tokens.len() {
        let n = (sizes[k] as usize + 1).min(tokens.len() - i);
        chunks.push(tokens[i..i + n].to_vec());
        i += n;
        k += 1;
    }
    chunks
}

async fn stats(url: &str) -> pb::StatsResponse {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap();
    admin.stats(pb::StatsRequest {}).await.unwrap().into_inner()
}

/// Polls Admin.Stats until `check` holds (the control plane is eventually consistent: it
/// updates when epochs close on every worker).
async fn wait_for_stats(
    url: &str,
    what: &str,
    check: impl Fn(&pb::StatsResponse) -> bool,
) -> pb::StatsResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(url).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: stats stayed {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_random_chunks_gets_the_logits_of_run() {
    let tokens = pseudo_random(300, VOCAB, 11);
    let want = run_reference(&model_dir(), &tokens);
    // One worker; two workers exchanging records serialised as a cluster does; a token budget
    // that closes epochs early; one reserved state, which the second stream gets back zeroed
    // from the first. Each server takes the stream twice, one after the other.
    for args in [
        vec![],
        vec!["--workers", "2", "--process-binary"],
        vec!["--epoch-tokens", "5", "--tick-ms", "50"],
        vec!["--reserve-sessions", "1"],
    ] {
        let model = model_dir();
        let mut all = vec!["--model", model.to_str().unwrap()];
        all.extend(args.iter().copied());
        let server = Server::start(&all);
        if args.contains(&"--reserve-sessions") {
            let log = std::fs::read_to_string(&server.stderr_log).unwrap();
            assert!(log.contains("reserved session states"), "{log}");
        }
        for round in 0..2 {
            let chunks = random_chunks(&tokens, 17, 5 + round);
            let got = run_stream(&server.url(), &chunks).await.unwrap();
            let err = relative_error(&got.logits, &want.values);
            assert!(err <= 1e-5, "{args:?} #{round}: relative error {err:.3e}");
            let mut expect_pos = 0;
            for (c, p) in chunks.iter().zip(&got.positions) {
                assert_eq!(*p, expect_pos, "position of each chunk's first row");
                expect_pos += c.len() as u64;
            }
            let summary = got.summary.expect("a summary ends the stream");
            assert_eq!((summary.tokens, summary.position), (300, 300));
            assert!(!summary.state_kept);
            // The session was freed when the stream ended.
            wait_for_stats(&server.url(), "session freed", |s| s.live_sessions == 0).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_streams_each_get_what_they_get_alone() {
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--workers", "2"]);
    let url = server.url();
    let inputs: Vec<Vec<u64>> = (0..64)
        .map(|i| pseudo_random(20 + i % 13, VOCAB, 100 + i as u64))
        .collect();
    let mut alone = Vec::new();
    for (i, tokens) in inputs.iter().take(8).enumerate() {
        alone.push(
            run_stream(&url, &random_chunks(tokens, 5, i as u64))
                .await
                .unwrap()
                .logits,
        );
    }
    let mut tasks = Vec::new();
    for (i, tokens) in inputs.iter().enumerate() {
        let url = url.clone();
        let chunks = random_chunks(tokens, 4, 1000 + i as u64);
        tasks.push(tokio::spawn(async move {
            run_stream(&url, &chunks).await.unwrap()
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.logits.len(), inputs[i].len() * WIDTH, "stream {i}");
        if i < alone.len() {
            let err = relative_error(&r.logits, &alone[i]);
            assert!(err <= 1e-5, "stream {i}: {err:.3e}");
        }
    }
    // The first streams alone versus `tideway run`: the interleaved ones equal them above.
    let want = run_reference(&model_dir(), &inputs[3]);
    assert!(relative_error(&alone[3], &want.values) <= 1e-5);
    let ids: std::collections::HashSet<_> = results.iter().map(|r| r.session_id.clone()).collect();
    assert_eq!(ids.len(), 64, "every stream is its own session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_and_reflection_lists_the_services() {
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "inference.GRPCInferenceService", "tideway.v1.Streams"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "inference.GRPCInferenceService",
        "tideway.v1.Streams",
        "tideway.v1.Models",
        "tideway.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_their_codes_and_say_what_is_allowed() {
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let url = server.url();
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();
    let open = |messages: Vec<pb::StreamRequest>| {
        let mut client = client.clone();
        async move {
            let mut inbound = client
                .open(tokio_stream::iter(messages))
                .await?
                .into_inner();
            while let Some(m) = inbound.next().await {
                m?;
            }
            Ok::<(), tonic::Status>(())
        }
    };
    let e = open(vec![start_msg("nope", "", false)]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("unknown model \"nope\"") && e.message().contains(MODEL),
        "{e:?}"
    );

    let e = open(vec![token_chunk(&[1, 2], false)]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("must be `start`"), "{e:?}");

    let e = open(vec![start_msg(MODEL, "no-such-session", false)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no-such-session"), "{e:?}");

    let e = open(vec![
        start_msg(MODEL, "", false),
        token_chunk(&[1, VOCAB], false),
    ])
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("token id 64 at position 1") && e.message().contains("0..=63"),
        "{e:?}"
    );

    let mut bad_output = start_msg(MODEL, "", false);
    if let Some(pb::stream_request::Kind::Start(s)) = bad_output.kind.as_mut() {
        s.outputs = vec!["hidden".into()];
    }
    let e = open(vec![bad_output]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("unknown output \"hidden\"") && e.message().contains("\"logits\""),
        "{e:?}"
    );

    let audio = pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            samples_f32: vec![0.0; 160],
            sample_rate: 16000,
            ..Default::default()
        })),
    };
    let e = open(vec![start_msg(MODEL, "", false), audio])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("takes token ids"), "{e:?}");

    // Draining: new streams are refused with UNAVAILABLE.
    let mut admin = pb::admin_client::AdminClient::connect(url.clone())
        .await
        .unwrap();
    admin.drain(pb::DrainRequest {}).await.unwrap();
    let e = open(vec![start_msg(MODEL, "", false)]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(stats(&url).await.draining);
    let _ = &mut client;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_runs_a_chunk_without_waiting_for_the_tick() {
    // A tick of 5 s: a chunk that waited for it would take seconds. Each chunk is sent once the
    // one before it was answered, so each finds the graph idle (as a lone generation's next
    // token does) and must run at once.
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--tick-ms", "5000"]);
    let (tx, mut inbound) = open_stream(&server.url(), vec![start_msg(MODEL, "", false)]).await;
    let mut answered = Vec::new();
    for (i, token) in [3u64, 14, 15, 9].into_iter().enumerate() {
        let sent = std::time::Instant::now();
        tx.send(token_chunk(&[token], false)).await.unwrap();
        loop {
            match inbound
                .next()
                .await
                .expect("the stream ended")
                .unwrap()
                .kind
            {
                Some(pb::stream_response::Kind::Output(o)) => {
                    assert_eq!(o.position, i as u64);
                    break;
                }
                Some(pb::stream_response::Kind::Opened(_)) => {}
                other => panic!("chunk {i}: {other:?}"),
            }
        }
        answered.push(sent.elapsed());
    }
    // The first chunk may also wait for the session to open; the later ones only for the model.
    assert!(
        answered[1..]
            .iter()
            .all(|t| *t < Duration::from_millis(2500)),
        "chunks answered after {answered:?} with a 5 s tick"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted() {
    let model = model_dir();
    // One slot per worker and a slow tick: a burst overflows it.
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--queue-capacity",
        "1",
        "--tick-ms",
        "200",
    ]);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = server.url();
        tasks.push(tokio::spawn(async move {
            run_stream(&url, &[vec![i % VOCAB]]).await
        }));
    }
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => assert_eq!(r.logits.len(), WIDTH),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("queue is full"), "{e:?}");
                exhausted += 1;
            }
        }
    }
    assert!(
        exhausted > 0,
        "16 streams at once into a queue of 1 must overflow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_sessions_resume_and_disconnects_free_sessions() {
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let url = server.url();
    let tokens = pseudo_random(30, VOCAB, 77);
    let want = run_reference(&model_dir(), &tokens);
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();

    // Part one with keep, then resume by id for part two: the logits continue.
    let first = vec![
        start_msg(MODEL, "", true),
        token_chunk(&tokens[..12], false),
    ];
    let mut inbound = client
        .open(tokio_stream::iter(first))
        .await
        .unwrap()
        .into_inner();
    let mut session = String::new();
    let mut logits = Vec::new();
    while let Some(m) = inbound.next().await {
        match m.unwrap().kind.unwrap() {
            pb::stream_response::Kind::Opened(o) => session = o.session_id,
            pb::stream_response::Kind::Output(o) => logits.extend(f32s(&o.outputs[0].data)),
            pb::stream_response::Kind::Summary(s) => assert!(s.state_kept),
            pb::stream_response::Kind::Generated(g) => panic!("no generation was asked: {g:?}"),
        }
    }
    wait_for_stats(&url, "kept session", |s| s.live_sessions == 1).await;
    let second = vec![
        start_msg(MODEL, &session, false),
        token_chunk(&tokens[12..], true),
    ];
    let mut inbound = client
        .open(tokio_stream::iter(second))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = inbound.next().await {
        match m.unwrap().kind.unwrap() {
            pb::stream_response::Kind::Opened(o) => {
                assert!(o.resumed);
                assert_eq!(o.position, 12);
            }
            pb::stream_response::Kind::Output(o) => logits.extend(f32s(&o.outputs[0].data)),
            pb::stream_response::Kind::Summary(s) => assert_eq!(s.position, 30),
            pb::stream_response::Kind::Generated(g) => panic!("no generation was asked: {g:?}"),
        }
    }
    assert!(relative_error(&logits, &want.values) <= 1e-5);
    wait_for_stats(&url, "ended session", |s| s.live_sessions == 0).await;

    // A client that goes away mid-stream: its session is freed.
    let (tx, rx) = mpsc::channel(4);
    tx.send(start_msg(MODEL, "", false)).await.unwrap();
    tx.send(token_chunk(&tokens[..5], false)).await.unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    inbound.next().await.unwrap().unwrap(); // opened
    inbound.next().await.unwrap().unwrap(); // output
    wait_for_stats(&url, "live stream", |s| s.live_sessions == 1).await;
    drop(inbound);
    drop(client);
    drop(tx);
    wait_for_stats(&url, "disconnect freed the session", |s| {
        s.live_sessions == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_say_so() {
    let model = model_dir();
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--idle-timeout-s",
        "0.3",
    ]);
    let url = server.url();
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();
    let mut inbound = client
        .open(tokio_stream::iter(vec![
            start_msg(MODEL, "", true),
            token_chunk(&[1, 2, 3], false),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut session = String::new();
    while let Some(m) = inbound.next().await {
        if let pb::stream_response::Kind::Opened(o) = m.unwrap().kind.unwrap() {
            session = o.session_id;
        }
    }
    let s = wait_for_stats(&url, "expiry", |s| s.expired_sessions == 1).await;
    assert_eq!(s.live_sessions, 0);
    let e = client
        .open(tokio_stream::iter(vec![start_msg(MODEL, &session, false)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("expired") && e.message().contains("idle for more than 0.3 s"),
        "{e:?}"
    );
}

/// Two `tideway serve` processes on loopback forming one timely cluster, each with `workers`
/// worker threads.
fn start_cluster(workers: &str) -> (Server, Server) {
    // Two free loopback ports for timely's own transport.
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let hosts = scratch_dir("cluster").join("hosts.txt");
    std::fs::write(
        &hosts,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1]),
    )
    .unwrap();
    let (h, m) = (
        hosts.to_str().unwrap().to_string(),
        model_dir().to_str().unwrap().to_string(),
    );
    // Both start at once: process 0 dials process 1 and each waits for the other before it
    // listens for gRPC.
    let args = |process: &'static str| {
        let (h, m, w) = (h.clone(), m.clone(), workers.to_string());
        move || {
            Server::start(&[
                "--model",
                &m,
                "--workers",
                &w,
                "--hosts",
                &h,
                "--process",
                process,
            ])
        }
    };
    let p1 = std::thread::spawn(args("1"));
    let p0 = args("0")();
    (p0, p1.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_form_one_cluster() {
    let (p0, p1) = start_cluster("2");

    let inputs: Vec<Vec<u64>> = (0..24)
        .map(|i| pseudo_random(10 + i, VOCAB, 500 + i as u64))
        .collect();
    // Keep every session alive while looking at the stats: streams with keep.
    let mut ids = Vec::new();
    for (i, tokens) in inputs.iter().enumerate() {
        let url = if i % 2 == 0 { p0.url() } else { p1.url() };
        let mut client = pb::streams_client::StreamsClient::connect(url)
            .await
            .unwrap();
        let mut inbound = client
            .open(tokio_stream::iter(vec![
                start_msg(MODEL, "", true),
                token_chunk(tokens, false),
            ]))
            .await
            .unwrap()
            .into_inner();
        let mut logits = Vec::new();
        while let Some(m) = inbound.next().await {
            match m.unwrap().kind.unwrap() {
                pb::stream_response::Kind::Opened(o) => ids.push(o.session_id),
                pb::stream_response::Kind::Output(o) => logits.extend(f32s(&o.outputs[0].data)),
                _ => {}
            }
        }
        if i < 2 {
            let want = run_reference(&model_dir(), tokens);
            assert!(
                relative_error(&logits, &want.values) <= 1e-5,
                "stream {i} through process {}",
                i % 2
            );
        } else {
            assert_eq!(logits.len(), tokens.len() * WIDTH);
        }
    }
    for url in [p0.url(), p1.url()] {
        let s = wait_for_stats(&url, "cluster view", |s| s.live_sessions == 24).await;
        assert_eq!((s.processes, s.workers), (2, 4));
        let per_process: Vec<u64> = (0..2)
            .map(|p| {
                s.per_worker
                    .iter()
                    .filter(|w| w.process == p)
                    .map(|w| w.live_sessions)
                    .sum()
            })
            .collect();
        assert!(
            per_process.iter().all(|&n| n > 0),
            "sessions land on both processes: {per_process:?}"
        );
    }
}

async fn watch_job(
    url: &str,
    job_id: &str,
    cancel_after: Option<usize>,
) -> (Vec<pb::JobStatus>, Option<pb::JobResult>) {
    let mut jobs = pb::jobs_client::JobsClient::connect(url.to_string())
        .await
        .unwrap();
    let mut events = jobs
        .watch(pb::JobRef {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut progress = Vec::new();
    let mut result = None;
    while let Some(event) = events.next().await {
        match event.unwrap().kind.unwrap() {
            pb::job_event::Kind::Progress(p) => {
                progress.push(p);
                if Some(progress.len()) == cancel_after {
                    let s = jobs
                        .cancel(pb::JobRef {
                            job_id: job_id.into(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(s.job_id, job_id);
                }
            }
            pb::job_event::Kind::Result(r) => result = Some(r),
        }
    }
    (progress, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_report_progress_end_with_the_result_of_run_and_cancel() {
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let url = server.url();
    let tokens = pseudo_random(300, VOCAB, 9);
    let want = run_reference(&model_dir(), &tokens);
    let mut jobs = pb::jobs_client::JobsClient::connect(url.clone())
        .await
        .unwrap();

    // Inline submit.
    let handle = jobs
        .submit(pb::JobRequest {
            model: MODEL.into(),
            tokens: tokens.iter().map(|&t| t as i64).collect(),
            chunk: 64,
            outputs: pb::JobOutputs::All as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(handle.total_tokens, 300);
    let (progress, result) = watch_job(&url, &handle.job_id, None).await;
    let done: Vec<u64> = progress.iter().map(|p| p.done_tokens).collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {done:?}"
    );
    let last = progress.last().unwrap();
    assert_eq!(
        (last.state, last.done_tokens),
        (pb::JobState::Succeeded as i32, 300)
    );
    let result = result.expect("a finished job ends with its result");
    assert_eq!(
        result.logits.as_ref().unwrap().shape,
        vec![300, WIDTH as i64]
    );
    let err = relative_error(&f32s(&result.logits.unwrap().data), &want.values);
    assert!(err <= 1e-5, "job result vs run: {err:.3e}");

    // Streamed upload, last row only.
    let uploads = vec![
        pb::JobUpload {
            kind: Some(pb::job_upload::Kind::Header(pb::JobRequest {
                model: MODEL.into(),
                tokens: tokens[..100].iter().map(|&t| t as i64).collect(),
                chunk: 0,
                outputs: pb::JobOutputs::Last as i32,
            })),
        },
        pb::JobUpload {
            kind: Some(pb::job_upload::Kind::Tokens(pb::JobTokens {
                tokens: tokens[100..].iter().map(|&t| t as i64).collect(),
            })),
        },
    ];
    let handle = jobs
        .submit_stream(tokio_stream::iter(uploads))
        .await
        .unwrap()
        .into_inner();
    let (_, result) = watch_job(&url, &handle.job_id, None).await;
    let result = result.unwrap();
    assert_eq!(result.first_position, 299);
    let last_row = &want.values[299 * WIDTH..];
    assert!(relative_error(&f32s(&result.logits.unwrap().data), last_row) <= 1e-5);

    // A long job, cancelled after a few progress events.
    let long = pseudo_random(40_000, VOCAB, 10);
    let handle = jobs
        .submit(pb::JobRequest {
            model: MODEL.into(),
            tokens: long.iter().map(|&t| t as i64).collect(),
            chunk: 8,
            outputs: pb::JobOutputs::Last as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let (progress, result) = watch_job(&url, &handle.job_id, Some(3)).await;
    assert!(result.is_none());
    let last = progress.last().unwrap();
    assert_eq!(last.state, pb::JobState::Cancelled as i32, "{last:?}");
    assert!(last.done_tokens < 40_000);
    let status = jobs
        .get(pb::JobRef {
            job_id: handle.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, pb::JobState::Cancelled as i32);
    wait_for_stats(&url, "cancelled job freed its state", |s| {
        s.live_sessions == 0
    })
    .await;

    let e = jobs
        .get(pb::JobRef {
            job_id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = jobs
        .submit(pb::JobRequest {
            model: MODEL.into(),
            tokens: vec![],
            chunk: 0,
            outputs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_refused() {
    let model = model_dir();
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--max-request-bytes",
        "4096",
    ]);
    // 6000 tokens are about 12 KB on the wire; their answer would fit --max-message-bytes.
    let tokens: Vec<u64> = pseudo_random(6000, VOCAB, 4);
    let e = run_stream(&server.url(), &[tokens]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("4096") && e.message().contains("--max-request-bytes"),
        "{e:?}"
    );
    // A unary call too: tonic refuses it before any handler (OUT_OF_RANGE); the server answers
    // it as every limit, RESOURCE_EXHAUSTED naming the flag.
    let mut infer = tideway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    let ids: Vec<i64> = (0..1000).collect();
    let e = infer
        .model_infer(infer_ids_request("m", &ids))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("4096") && e.message().contains("--max-request-bytes"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_sessions_and_a_disconnect_freeing_one() {
    let model = model_dir();
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics_addr = server.metrics_addr();
    let url = server.url();
    // A connection whose socket the test can shut down under the client: a client that
    // vanishes (crash, network loss) without ending its stream.
    let tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    let cut = tcp.try_clone().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let tcp = std::sync::Mutex::new(Some(tokio::net::TcpStream::from_std(tcp).unwrap()));
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let stream = tcp.lock().unwrap().take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection only"))
            }
        }))
        .await
        .unwrap();
    let mut client = pb::streams_client::StreamsClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(start_msg(MODEL, "", false)).await.unwrap();
    tx.send(token_chunk(&[1, 2, 3, 4], false)).await.unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    inbound.next().await.unwrap().unwrap();
    inbound.next().await.unwrap().unwrap();
    wait_for_stats(&url, "live", |s| s.live_sessions == 1).await;
    let page = scrape(&metrics_addr);
    assert_eq!(
        metric(
            &page,
            &format!("tideway_live_sessions{{model=\"{MODEL}\"}}")
        ),
        1.0
    );
    assert_eq!(metric(&page, "tideway_state_bytes"), 15360.0);
    assert!(metric(&page, "tideway_tokens_total") >= 4.0);
    assert!(metric(&page, "tideway_step_latency_seconds_count") >= 1.0);
    assert!(page.contains("# TYPE tideway_step_latency_seconds histogram"));

    cut.shutdown(std::net::Shutdown::Both).unwrap();
    wait_for_stats(&url, "freed", |s| s.live_sessions == 0).await;
    let page = scrape(&metrics_addr);
    assert_eq!(
        metric(
            &page,
            &format!("tideway_live_sessions{{model=\"{MODEL}\"}}")
        ),
        0.0
    );
    assert_eq!(metric(&page, "tideway_disconnects_total"), 1.0);
    drop((tx, inbound));

    // Errors are counted by status code.
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();
    let _ = client
        .open(tokio_stream::iter(vec![token_chunk(&[1], false)]))
        .await;
    let mut inference = tideway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url.clone()).await.unwrap();
    let _ = inference
        .model_infer(tideway_proto::inference::ModelInferRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let page = scrape(&metrics_addr);
    assert_eq!(
        metric(
            &page,
            "tideway_errors_total{service=\"inference.GRPCInferenceService\",method=\"ModelInfer\",code=\"NotFound\"}"
        ),
        1.0
    );
    // Native APIs are counted too, and a stream the server refused is not a disconnect.
    let refused = run_stream(&url, &[vec![VOCAB + 5]]).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let page = scrape(&metrics_addr);
    assert_eq!(
        metric(
            &page,
            "tideway_errors_total{service=\"tideway.v1.Streams\",method=\"Open\",code=\"InvalidArgument\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "tideway_errors_total{service=\"tideway.v1.Streams\",method=\"Open\",code=\"FailedPrecondition\"}"
        ),
        1.0
    );
    assert_eq!(metric(&page, "tideway_disconnects_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_ends_streams_with_unavailable_not_a_hang() {
    let (p0, p1) = start_cluster("1");

    let (tx, mut inbound) = open_stream(&p0.url(), vec![start_msg(MODEL, "", false)]).await;
    inbound.next().await.unwrap().unwrap();
    drop(p1); // kills process 1
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        // Keep sending until the stream fails.
        for i in 0..2000u64 {
            if tx.send(token_chunk(&[i % VOCAB], false)).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(500), inbound.next()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(status))) => return Some(status),
                Ok(None) => return None,
                Err(_) => {}
            }
        }
        None
    })
    .await
    .expect("the stream must fail, not hang, when a peer is lost");
    let status = outcome.expect("an error status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("lost a peer") && status.message().contains("retry"),
        "{status:?}"
    );
    drop(p0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_protocol_errors_say_what_is_allowed() {
    use std::collections::HashMap;
    use tideway_proto::inference as ipb;
    let model = model_dir();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let mut client =
        ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(server.url())
            .await
            .unwrap();
    let request = |shape: Vec<i64>, datatype: &str, raw: Vec<u8>, outputs: Vec<&str>| {
        ipb::ModelInferRequest {
            model_name: MODEL.into(),
            inputs: vec![ipb::model_infer_request::InferInputTensor {
                name: "input_ids".into(),
                datatype: datatype.into(),
                shape,
                parameters: HashMap::new(),
                contents: None,
            }],
            outputs: outputs
                .into_iter()
                .map(|n| ipb::model_infer_request::InferRequestedOutputTensor {
                    name: n.into(),
                    parameters: HashMap::new(),
                })
                .collect(),
            raw_input_contents: vec![raw],
            ..Default::default()
        }
    };
    let ids = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let cases = [
        (
            request(vec![2, 3], "INT64", ids(&[1; 6]), vec![]),
            "allowed: [T] or [1, T]",
        ),
        (request(vec![3], "INT64", ids(&[1, 2]), vec![]), "needs 24"),
        (
            request(vec![2], "FP32", vec![0; 8], vec![]),
            "allowed: \"INT64\", \"INT32\"",
        ),
        (
            request(vec![2], "INT64", ids(&[1, 2]), vec!["probs"]),
            "one output, \"logits\"",
        ),
        (
            request(vec![2], "INT64", ids(&[1, -5]), vec![]),
            "token id -5 at position 1",
        ),
    ];
    for (req, needle) in cases {
        let e = client.model_infer(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "{needle:?} not in {e:?}");
    }
    // Typed contents (not raw) are accepted too; the answer is raw.
    let mut typed = request(vec![1, 3], "INT64", vec![], vec!["logits"]);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(ipb::InferTensorContents {
        int64_contents: vec![1, 2, 3],
        ..Default::default()
    });
    typed.id = "typed-1".into();
    let reply = client.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(reply.id, "typed-1");
    assert_eq!(reply.outputs[0].shape, vec![3, WIDTH as i64]);
    let want = run_reference(&model_dir(), &[1, 2, 3]);
    assert!(relative_error(&f32s(&reply.raw_output_contents[0]), &want.values) <= 1e-5);
    // A start on a live sequence replaces it.
    let mut seq = |tokens: &[i64], start: bool| {
        let mut r = request(vec![tokens.len() as i64], "INT64", ids(tokens), vec![]);
        r.parameters.insert(
            "sequence_id".into(),
            ipb::InferParameter {
                parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Int64Param(9)),
            },
        );
        r.parameters.insert(
            "sequence_start".into(),
            ipb::InferParameter {
                parameter_choice: Some(ipb::infer_parameter::ParameterChoice::BoolParam(start)),
            },
        );
        r
    };
    client.model_infer(seq(&[5, 6], true)).await.unwrap();
    let again = client
        .model_infer(seq(&[1, 2, 3], true))
        .await
        .unwrap()
        .into_inner();
    assert!(relative_error(&f32s(&again.raw_output_contents[0]), &want.values) <= 1e-5);
    let _ = &mut seq;
}
