//! Operating `tideway serve`: graceful shutdown — on SIGTERM (or SIGINT) the server drains
//! (new streams are refused, health says NOT_SERVING, open streams may finish within
//! `--shutdown-grace-s`), then ends the streams still open with UNAVAILABLE and exits — and
//! logs a collector can read (no colour codes off a terminal, or JSON lines).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Code;

fn chunk(tokens: Vec<i64>, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens,
            end,
            ..Default::default()
        })),
    }
}

fn serve(grace: &str) -> Server {
    Server::start(&[
        "--model",
        &format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display()),
        "--shutdown-grace-s",
        grace,
    ])
}

/// An open stream: its sender and its answers, after the first chunk's output.
async fn open_lm_stream(
    url: &str,
) -> (
    mpsc::Sender<pb::StreamRequest>,
    tonic::Streaming<pb::StreamResponse>,
) {
    let first = vec![start_request("lm"), chunk(vec![1, 2, 3], false)];
    let (tx, mut inbound) = open_stream(url, first).await;
    loop {
        let message = inbound.next().await.unwrap().unwrap();
        if let Some(pb::stream_response::Kind::Output(_)) = message.kind {
            return (tx, inbound);
        }
    }
}

fn terminate(server: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_for(server: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains(needle) {
        assert!(Instant::now() < deadline, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_open_stream_ends_with_unavailable_after_the_grace() {
    let mut server = serve("1");
    let url = server.url();
    let (_tx, mut inbound) = open_lm_stream(&url).await;
    let signalled = Instant::now();
    terminate(&server);
    wait_for(
        &server,
        "SIGTERM: draining for up to 1.0 s (1 open streams)",
    );
    // Draining: new streams are refused, health says NOT_SERVING.
    let mut client = pb::streams_client::StreamsClient::connect(url.clone())
        .await
        .unwrap();
    let refused = client
        .open(tokio_stream::iter(vec![start_request("lm")]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    // The idle stream is ended after the grace, not held forever.
    let ended = loop {
        match inbound.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    assert!(signalled.elapsed() >= Duration::from_millis(900));
    let exit = server.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        server.stderr()
    );
    assert!(
        server
            .stderr()
            .contains("closing 1 open streams with UNAVAILABLE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_finishes_within_the_grace_gets_its_answers() {
    let mut server = serve("30");
    let (tx, mut inbound) = open_lm_stream(&server.url()).await;
    terminate(&server);
    wait_for(&server, "SIGTERM: draining");
    tx.send(chunk(vec![4, 5], true)).await.unwrap();
    let mut rows = 0;
    let mut summary = false;
    while let Some(message) = inbound.next().await {
        match message.unwrap().kind.unwrap() {
            pb::stream_response::Kind::Output(o) => rows += o.outputs[0].shape[0],
            pb::stream_response::Kind::Summary(_) => summary = true,
            pb::stream_response::Kind::Opened(_) | pb::stream_response::Kind::Generated(_) => {}
        }
    }
    assert_eq!(rows, 2);
    assert!(summary);
    // Nothing is left open: the server exits long before its 30 s of grace.
    let exit = server.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        server.stderr()
    );
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal_and_can_be_json() {
    let model = format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display());
    let text = Server::start(&["--model", &model]);
    wait_for(&text, "loaded");
    assert!(!text.stderr().contains('\u{1b}'), "{}", text.stderr());
    let json = Server::start(&["--model", &model, "--log-format", "json"]);
    wait_for(&json, "loaded");
    let line = json
        .stderr()
        .lines()
        .find(|l| l.contains("loaded"))
        .unwrap()
        .to_string();
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["level"], "INFO", "{line}");
    assert_eq!(record["fields"]["model"], "lm", "{line}");
    assert_eq!(record["fields"]["family"], "mamba", "{line}");
}
