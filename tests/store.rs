//! End-to-end tests of session state that survives (`serve --store`): the real binary killed
//! with SIGKILL and restarted on the same store, a snapshot torn by a writer killed in the
//! middle of a commit, and a session's state exported from one server and imported into
//! another. Each client resends its chunks from the index the resumed session reports, and
//! its outputs must equal those of an uninterrupted run.

mod common;

use std::time::Duration;

use common::sessions::*;
use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

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
    // No periodic snapshots here: each commit is asked for by a drain (which writes every
    // changed session before it answers), so the test knows what each commit holds.
    args.extend(["--store", &store_arg, "--snapshot-every-s", "3600"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // The writer aborts inside the commit of the first snapshot past chunk 3.
    let log = scratch_dir("torn").join("stderr.log");
    let mut child = tideway()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(&args)
        .env("TIDEWAY_TEST_ABORT_MID_SNAPSHOT", "4")
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
    let mut admin = pb::admin_client::AdminClient::connect(url.clone())
        .await
        .unwrap();
    // The first drain commits every session at chunk 3.
    admin.drain(pb::DrainRequest {}).await.unwrap();
    admin.undrain(pb::UndrainRequest {}).await.unwrap();
    // Phase 2: three more chunks each; their snapshot commit is torn.
    for (p, (tx, inbound)) in plans.iter().zip(&mut holders) {
        for c in &p.chunks[3..6] {
            tx.send(c.clone()).await.unwrap();
            inbound.next().await.unwrap().unwrap();
        }
    }
    let torn = admin.drain(pb::DrainRequest {}).await;
    assert!(torn.is_err(), "the drain's commit was to be torn: {torn:?}");
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

/// An inference-protocol request of `tokens` in sequence 7.
fn sequence_request(tokens: &[u64], start: bool) -> tideway_proto::inference::ModelInferRequest {
    use tideway_proto::inference as ipb;
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let mut r = infer_ids_request("mamba", &ids);
    let param = |choice| ipb::InferParameter {
        parameter_choice: Some(choice),
    };
    r.parameters.insert(
        "sequence_id".into(),
        param(ipb::infer_parameter::ParameterChoice::Int64Param(7)),
    );
    r.parameters.insert(
        "sequence_start".into(),
        param(ipb::infer_parameter::ParameterChoice::BoolParam(start)),
    );
    r
}

fn int_param(response: &tideway_proto::inference::ModelInferResponse, name: &str) -> i64 {
    match response.parameters[name].parameter_choice {
        Some(tideway_proto::inference::infer_parameter::ParameterChoice::Int64Param(v)) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inference_sequence_resumed_after_a_kill_is_told_its_chunk() {
    use tideway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    let chunks: Vec<Vec<u64>> = (0..6)
        .map(|c| pseudo_random(2 + c, 64, 70 + c as u64))
        .collect();
    let args = model_args();
    let plain: Vec<&str> = args.iter().map(String::as_str).collect();
    let reference = Server::start(&plain);
    let mut client = GrpcInferenceServiceClient::connect(reference.url())
        .await
        .unwrap();
    let mut want = Vec::new();
    for (c, tokens) in chunks.iter().enumerate() {
        let r = client
            .model_infer(sequence_request(tokens, c == 0))
            .await
            .unwrap()
            .into_inner();
        want.push(f32s(&r.raw_output_contents[0]));
    }
    drop(reference);

    let store = scratch_dir("store-sequence");
    let mut args = model_args();
    args.extend(
        [
            "--store",
            &store.display().to_string(),
            "--snapshot-every-s",
            "3600",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let mut client = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    for (c, tokens) in chunks[..3].iter().enumerate() {
        client
            .model_infer(sequence_request(tokens, c == 0))
            .await
            .unwrap();
    }
    // Snapshot at chunk 3, then one more chunk that no snapshot holds, then SIGKILL.
    let mut admin = pb::admin_client::AdminClient::connect(server.url())
        .await
        .unwrap();
    admin.drain(pb::DrainRequest {}).await.unwrap();
    admin.undrain(pb::UndrainRequest {}).await.unwrap();
    client
        .model_infer(sequence_request(&chunks[3], false))
        .await
        .unwrap();
    std::process::Command::new("kill")
        .args(["-9", &server.pid().to_string()])
        .status()
        .unwrap();
    drop(server);

    let server = Server::start(&args);
    let mut client = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    // An empty request asks where the sequence is, and does not move it.
    let probe = client
        .model_infer(sequence_request(&[], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(int_param(&probe, "sequence_chunks"), 3);
    let tokens: usize = chunks[..3].iter().map(Vec::len).sum();
    assert_eq!(int_param(&probe, "sequence_position"), tokens as i64);
    for (c, tokens) in chunks.iter().enumerate().skip(3) {
        let r = client
            .model_infer(sequence_request(tokens, false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(int_param(&r, "sequence_chunks"), c as i64 + 1);
        assert_close(&[f32s(&r.raw_output_contents[0])], &want[c..=c], "sequence");
    }
}
