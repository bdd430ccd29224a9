//! End-to-end tests of session state that survives (`serve --store`): the real binary killed
//! with SIGKILL and restarted on the same store, a snapshot torn by a writer killed in the
//! middle of a commit, and a session's state exported from one server and imported into
//! another. Each client resends its chunks from the index the resumed session reports, and
//! its outputs must equal those of an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn kws_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kws")
}

/// Three families, three kinds of state: Mamba tokens, GLA tokens, LMUFormer audio (with the
/// front end's carry-over of samples between windows).
fn model_args() -> Vec<String> {
    vec![
        "--model".into(),
        format!(
            "mamba={}",
            fixtures_dir().join("mamba/hf_k4_sharded").display()
        ),
        "--model".into(),
        format!("gla={}", fixtures_dir().join("fla/gla_basic").display()),
        "--model".into(),
        format!("kws={}", kws_dir().display()),
    ]
}

/// One stream's model and chunks.
#[derive(Clone)]
struct Plan {
    model: &'static str,
    chunks: Vec<pb::StreamRequest>,
}

fn chunk(tokens: Option<Vec<u64>>, samples: Option<Vec<f32>>, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens: tokens
                .unwrap_or_default()
                .iter()
                .map(|&t| t as i64)
                .collect(),
            samples_f32: samples.clone().unwrap_or_default(),
            sample_rate: if samples.is_some() { 16_000 } else { 0 },
            end,
            ..Default::default()
        })),
    }
}

/// Stream `i` of a mix: token streams of Mamba and GLA, audio streams of the spotter; uneven
/// chunk sizes (audio chunks end inside fbank windows, so the carry-over matters).
fn plan(i: usize, chunks: usize) -> Plan {
    let seed = 1000 + i as u64;
    let sizes = pseudo_random(chunks, 9, seed);
    let (model, vocab) = match i % 5 {
        0..=2 => ("mamba", 64),
        3 => ("gla", 50),
        _ => ("kws", 0),
    };
    let chunks = sizes
        .iter()
        .enumerate()
        .map(|(c, &s)| {
            let end = c + 1 == chunks;
            if vocab > 0 {
                let tokens = pseudo_random(s as usize + 1, vocab, seed * 31 + c as u64);
                chunk(Some(tokens), None, end)
            } else {
                let n = 137 + 211 * s as usize;
                let samples = pseudo_random(n, 1000, seed * 17 + c as u64)
                    .iter()
                    .map(|&v| (v as f32 - 500.0) / 2000.0)
                    .collect();
                chunk(None, Some(samples), end)
            }
        })
        .collect();
    Plan { model, chunks }
}

fn start(model: &str, resume: &str, state: Vec<u8>) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            resume_session_id: resume.into(),
            state,
            ..Default::default()
        })),
    }
}

/// A stream driven one chunk at a time: each chunk waits for its output.
struct Driven {
    opened: pb::StreamOpened,
    /// Output rows (flattened) of each chunk answered, in order.
    outputs: Vec<Vec<f64>>,
    rows: Vec<u64>,
    error: Option<tonic::Status>,
}

/// Opens a stream with `first`, then sends `chunks` one at a time (pausing `pause` between
/// them) until they are all answered or the stream fails; a resumed stream sends them from
/// the index its session reports.
async fn drive(
    url: &str,
    first: pb::StreamRequest,
    chunks: &[pb::StreamRequest],
    pause: Duration,
) -> Result<Driven, tonic::Status> {
    let resumed = matches!(&first.kind, Some(pb::stream_request::Kind::Start(s)) if !s.resume_session_id.is_empty());
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let opened = match inbound.next().await {
        Some(Ok(pb::StreamResponse {
            kind: Some(pb::stream_response::Kind::Opened(o)),
        })) => o,
        Some(Err(e)) => return Err(e),
        other => panic!("expected opened, got {other:?}"),
    };
    let mut driven = Driven {
        opened,
        outputs: Vec::new(),
        rows: Vec::new(),
        error: None,
    };
    // A resumed session takes the chunks from the index it reports.
    let skip = if resumed {
        driven.opened.chunks as usize
    } else {
        0
    };
    for c in &chunks[skip.min(chunks.len())..] {
        if tx.send(c.clone()).await.is_err() {
            driven.error = Some(tonic::Status::unavailable("the request stream closed"));
            break;
        }
        match inbound.next().await {
            Some(Ok(pb::StreamResponse {
                kind: Some(pb::stream_response::Kind::Output(o)),
            })) => {
                driven.rows.push(o.outputs[0].shape[0] as u64);
                driven.outputs.push(f32s(&o.outputs[0].data));
            }
            Some(Err(e)) => {
                driven.error = Some(e);
                return Ok(driven);
            }
            other => {
                driven.error = Some(tonic::Status::unknown(format!("{other:?}")));
                return Ok(driven);
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(driven)
}

/// Every chunk's outputs from an uninterrupted run on a server without a store.
async fn references(plans: &[Plan]) -> Vec<Driven> {
    let mut args = model_args();
    args.extend(["--workers".into(), "2".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&refs);
    let url = server.url();
    let runs = plans.iter().map(|p| {
        let url = url.clone();
        let p = p.clone();
        tokio::spawn(async move {
            drive(
                &url,
                start(p.model, "", Vec::new()),
                &p.chunks,
                Duration::ZERO,
            )
            .await
            .unwrap()
        })
    });
    let mut out = Vec::new();
    for run in runs {
        let d = run.await.unwrap();
        assert!(d.error.is_none(), "{:?}", d.error);
        out.push(d);
    }
    out
}

fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: chunks answered");
    for (c, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: chunk {c} values");
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{what}: chunk {c} differs by {worst:e}");
    }
}

/// Resumes every session after a restart: each reports the chunks and position it resumed
/// from (its last snapshot), takes the chunks from there, and answers what an
/// uninterrupted run answered.
async fn resume_all(url: &str, plans: &[Plan], ids: &[String], refs: &[Driven]) -> Vec<u64> {
    let runs = plans.iter().zip(ids).map(|(p, id)| {
        let (url, p, id) = (url.to_string(), p.clone(), id.clone());
        tokio::spawn(async move {
            let d = drive(
                &url,
                start(p.model, &id, Vec::new()),
                &p.chunks,
                Duration::ZERO,
            )
            .await
            .unwrap_or_else(|e| panic!("session {id} was not restored: {e}"));
            (d.opened.chunks as usize, d.opened.clone(), d)
        })
    });
    let mut resumed_from = Vec::new();
    for ((run, r), id) in runs.zip(refs).zip(ids) {
        let (from, opened, d) = run.await.unwrap();
        assert!(d.error.is_none(), "{id}: {:?}", d.error);
        assert!(opened.resumed);
        let position: u64 = r.rows[..from].iter().sum();
        assert_eq!(
            opened.position, position,
            "{id}: position after {from} chunks"
        );
        assert_close(&d.outputs, &r.outputs[from..], id);
        resumed_from.push(from as u64);
    }
    resumed_from
}

/// Streams whose sessions outlive their stream (a kept session, until the restart).
fn keep_start(model: &str) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            keep: true,
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_streams_survive_a_kill_9_and_continue_exactly() {
    const CHUNKS: usize = 40;
    let plans: Vec<Plan> = (0..50).map(|i| plan(i, CHUNKS)).collect();
    let refs = references(&plans).await;

    let store = scratch_dir("store-kill");
    let store_arg = store.display().to_string();
    let mut args = model_args();
    args.extend(
        [
            "--workers",
            "2",
            "--store",
            &store_arg,
            "--snapshot-every-s",
            "0.2",
        ]
        .map(String::from),
    );
    let refs_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&refs_args);
    let url = server.url();
    let runs: Vec<_> = plans
        .iter()
        .map(|p| {
            let (url, p) = (url.clone(), p.clone());
            tokio::spawn(async move {
                drive(
                    &url,
                    keep_start(p.model),
                    &p.chunks[..CHUNKS - 1],
                    Duration::from_millis(40),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    // Mid-stream: every client is still sending when the server dies.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let pid = server.pid();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut ids = Vec::new();
    let mut answered = Vec::new();
    for run in runs {
        let d = run.await.unwrap();
        assert!(d.error.is_some(), "the stream outlived its server");
        ids.push(d.opened.session_id.clone());
        answered.push(d.outputs.len() as u64);
    }
    drop(server);

    let restarted = Server::start(&refs_args);
    assert!(
        restarted.stderr().contains("tideway: restored 50 sessions"),
        "{}",
        restarted.stderr()
    );
    let from = resume_all(&restarted.url(), &plans, &ids, &refs).await;
    // A session resumes where its last snapshot left it: never after what the client saw
    // answered (+1: a chunk answered as the server died), and the snapshots kept up.
    for (f, a) in from.iter().zip(&answered) {
        assert!(
            f <= &(a + 1),
            "resumed from chunk {f}, but only {a} were answered"
        );
    }
    let behind: u64 = from
        .iter()
        .zip(&answered)
        .map(|(f, a)| a.saturating_sub(*f))
        .sum();
    assert!(
        from.iter().all(|&f| f > 0),
        "every session had a snapshot: {from:?}"
    );
    eprintln!(
        "resumed 50 sessions; chunks to resend after the kill: {behind} in all (of {} answered)",
        answered.iter().sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_torn_by_a_killed_writer_leaves_the_previous_one() {
    const CHUNKS: usize = 12;
    let plans: Vec<Plan> = (0..10).map(|i| plan(i + 100, CHUNKS)).collect();
    let refs = references(&plans).await;
    let store = scratch_dir("store-torn");
    let store_arg = store.display().to_string();
    let mut args = model_args();
    args.extend(["--store", &store_arg, "--snapshot-every-s", "0.3"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // The writer aborts inside its second commit of snapshots.
    let log = scratch_dir("torn").join("stderr.log");
    let mut child = tideway()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(&args)
        .env("TIDEWAY_TEST_ABORT_MID_SNAPSHOT", "2")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("tideway listening on "))
        {
            break format!(
                "http://{}",
                line.trim_start_matches("tideway listening on ")
            );
        }
        assert!(child.try_wait().unwrap().is_none(), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Phase 1: three chunks each, then a pause for the first commit.
    let mut ids = Vec::new();
    let mut holders = Vec::new();
    for p in &plans {
        let mut client = pb::streams_client::StreamsClient::connect(url.clone())
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(CHUNKS + 1);
        tx.send(keep_start(p.model)).await.unwrap();
        let mut inbound = client
            .open(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(pb::StreamResponse {
            kind: Some(pb::stream_response::Kind::Opened(o)),
        })) = inbound.next().await
        else {
            panic!("no opened");
        };
        for c in &p.chunks[..3] {
            tx.send(c.clone()).await.unwrap();
            inbound.next().await.unwrap().unwrap();
        }
        ids.push(o.session_id);
        holders.push((tx, inbound));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Phase 2: three more chunks each; their snapshot commit is torn.
    for (p, (tx, inbound)) in plans.iter().zip(&mut holders) {
        for c in &p.chunks[3..6] {
            tx.send(c.clone()).await.unwrap();
            let _ = inbound.next().await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not abort"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("aborting inside a snapshot commit")
    );
    drop(holders);

    let restarted = Server::start(&args);
    assert!(
        restarted.stderr().contains("tideway: restored 10 sessions"),
        "{}",
        restarted.stderr()
    );
    let from = resume_all(&restarted.url(), &plans, &ids, &refs).await;
    assert_eq!(
        from,
        vec![3; 10],
        "every session is back at the first commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_exported_from_one_server_continues_on_another() {
    const CHUNKS: usize = 10;
    let plans: Vec<Plan> = [0, 3, 4].iter().map(|&i| plan(i + 200, CHUNKS)).collect();
    let refs = references(&plans).await;
    let args = model_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = (Server::start(&args), Server::start(&args));
    for (p, r) in plans.iter().zip(&refs) {
        // Four chunks on A, with the session kept after its stream.
        let d = drive(
            &a.url(),
            keep_start(p.model),
            &p.chunks[..4],
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert!(d.error.is_none());
        let mut streams = pb::streams_client::StreamsClient::connect(a.url())
            .await
            .unwrap();
        let exported = streams
            .export_state(pb::ExportStateRequest {
                model: p.model.into(),
                session_id: d.opened.session_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(exported.chunks, 4);
        assert_eq!(exported.position, r.rows[..4].iter().sum::<u64>());

        // The rest on B, from the blob.
        let d = drive(
            &b.url(),
            start(p.model, "", exported.state.clone()),
            &p.chunks[4..],
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert!(d.error.is_none(), "{:?}", d.error);
        assert_eq!(d.opened.chunks, 4);
        assert_eq!(d.opened.position, exported.position);
        assert_close(&d.outputs, &r.outputs[4..], p.model);

        // Another model's state, a corrupt one and a truncated one are refused by name.
        let other = if p.model == "mamba" { "gla" } else { "mamba" };
        let e = drive(
            &b.url(),
            start(other, "", exported.state.clone()),
            &[],
            Duration::ZERO,
        )
        .await
        .err()
        .expect("another model's state is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains(&format!("{:?}", p.model))
                && e.message().contains(&format!("{other:?}")),
            "{}",
            e.message()
        );
        let mut corrupt = exported.state.clone();
        let n = corrupt.len();
        corrupt[n - 3] ^= 0x10;
        let e = drive(&b.url(), start(p.model, "", corrupt), &[], Duration::ZERO)
            .await
            .err()
            .expect("a corrupt state is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("corrupt"), "{}", e.message());
        let truncated = exported.state[..n / 2].to_vec();
        let e = drive(&b.url(), start(p.model, "", truncated), &[], Duration::ZERO)
            .await
            .err()
            .expect("a truncated state is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // Another client cannot export a session it does not own: here, one that is not live.
    let mut streams = pb::streams_client::StreamsClient::connect(a.url())
        .await
        .unwrap();
    let e = streams
        .export_state(pb::ExportStateRequest {
            model: "mamba".into(),
            session_id: "no-such-session".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[test]
fn a_store_that_is_not_one_is_refused_and_left_alone() {
    let dir = scratch_dir("store-foreign");
    let file = dir.join("process-0.redb");
    std::fs::write(&file, b"these bytes are someone's notes, not a database").unwrap();
    let out = tideway()
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot open session store") && err.contains("process-0.redb"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"these bytes are someone's notes, not a database"
    );
}
