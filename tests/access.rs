//! Access control of `tideway serve --auth FILE`: a call needs a known bearer token; sessions
//! and jobs belong to the identity that made them (another gets NOT_FOUND, as if they did
//! not exist); their ids are unguessable; Admin calls need the admin role; a drained server
//! says NOT_SERVING to health checks until an admin undrains it.

mod common;

use common::*;
use tideway_proto::inference as ipb;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const ROOT: &str = "root-token-0123456789a";

fn start_server() -> Server {
    start_server_with(&[])
}

fn start_server_with(extra: &[&str]) -> Server {
    let dir = scratch_dir("access");
    let tokens = dir.join("tokens.txt");
    std::fs::write(
        &tokens,
        format!(
            "# token identity role\n{ALICE} alice client\n{BOB} bob client\n{ROOT} root admin\n"
        ),
    )
    .unwrap();
    let model = format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display());
    let mut args = vec!["--model", &model, "--auth", tokens.to_str().unwrap()];
    args.extend(extra);
    Server::start(&args)
}

/// A request carrying `token` (none: no header).
fn with<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn chunk(tokens: Vec<i64>, end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens,
            end,
            ..Default::default()
        })),
    }
}

/// Opens a stream as `token` (resuming `resume` if given, keeping the session after the
/// call); its session id, or the status.
async fn open(
    channel: &Channel,
    token: &str,
    resume: &str,
    messages: Vec<pb::StreamRequest>,
) -> Result<String, tonic::Status> {
    let mut client = pb::streams_client::StreamsClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(messages.len() + 1);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: "lm".into(),
            resume_session_id: resume.into(),
            keep: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    for m in messages {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut inbound = client
        .open(with(ReceiverStream::new(rx), Some(token)))
        .await?
        .into_inner();
    let mut id = String::new();
    while let Some(message) = inbound.next().await {
        if let pb::stream_response::Kind::Opened(o) = message?.kind.unwrap() {
            id = o.session_id;
        }
    }
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_own_their_sessions_and_jobs_and_admin_needs_the_role() {
    let server = start_server();
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();

    // No token, or an unknown one: UNAUTHENTICATED, on every service.
    let mut models = pb::models_client::ModelsClient::new(channel.clone());
    for token in [None, Some("not-a-known-token-at-all")] {
        let e = models
            .list(with(pb::ListModelsRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    models
        .list(with(pb::ListModelsRequest {}, Some(ALICE)))
        .await
        .unwrap();

    // Alice's session: unguessable id; Bob cannot resume (hijack) it, Alice can.
    let id = open(&channel, ALICE, "", vec![chunk(vec![1, 2, 3], false)])
        .await
        .unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    let e = open(&channel, BOB, &id, vec![chunk(vec![4], false)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        open(&channel, ALICE, &id, vec![chunk(vec![4], true)])
            .await
            .unwrap(),
        id
    );

    // The inference protocol's sequences too: Bob's sequence 7 is not Alice's.
    let mut infer =
        ipb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel.clone());
    let request = |start: bool| {
        let mut r = ipb::ModelInferRequest {
            model_name: "lm".into(),
            inputs: vec![ipb::model_infer_request::InferInputTensor {
                name: "input_ids".into(),
                datatype: "INT64".into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_input_contents: vec![[5i64, 6].iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        for (key, choice) in [
            (
                "sequence_id",
                ipb::infer_parameter::ParameterChoice::Int64Param(7),
            ),
            (
                "sequence_start",
                ipb::infer_parameter::ParameterChoice::BoolParam(start),
            ),
        ] {
            r.parameters.insert(
                key.into(),
                ipb::InferParameter {
                    parameter_choice: Some(choice),
                },
            );
        }
        r
    };
    infer
        .model_infer(with(request(true), Some(ALICE)))
        .await
        .unwrap();
    let e = infer
        .model_infer(with(request(false), Some(BOB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("is not live"), "{e:?}");
    infer
        .model_infer(with(request(false), Some(ALICE)))
        .await
        .unwrap();

    // Jobs: unguessable ids, seen only by their owner.
    let mut jobs = pb::jobs_client::JobsClient::new(channel.clone());
    let handle = jobs
        .submit(with(
            pb::JobRequest {
                model: "lm".into(),
                tokens: vec![1, 2, 3, 4],
                ..Default::default()
            },
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        handle.job_id.starts_with("job-") && handle.job_id.len() == 36,
        "{handle:?}"
    );
    let job = || pb::JobRef {
        job_id: handle.job_id.clone(),
    };
    assert_eq!(
        jobs.get(with(job(), Some(BOB))).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        jobs.cancel(with(job(), Some(BOB)))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        jobs.watch(with(job(), Some(BOB))).await.unwrap_err().code(),
        Code::NotFound
    );
    jobs.get(with(job(), Some(ALICE))).await.unwrap();

    // Admin needs the admin role; a drained server is NOT_SERVING until undrained.
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let e = admin
        .drain(with(pb::DrainRequest {}, Some(ALICE)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs the admin role"), "{e:?}");
    let e = admin
        .stats(with(pb::StatsRequest {}, Some(BOB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(
        health.check(status("")).await.unwrap().into_inner().status,
        serving
    );
    admin
        .drain(with(pb::DrainRequest {}, Some(ROOT)))
        .await
        .unwrap();
    for service in ["", "tideway.v1.Streams", "inference.GRPCInferenceService"] {
        let s = health.check(status(service)).await.unwrap().into_inner();
        assert_eq!(
            s.status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
            "{service}"
        );
    }
    let e = open(&channel, ALICE, "", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    admin
        .undrain(with(pb::UndrainRequest {}, Some(ROOT)))
        .await
        .unwrap();
    assert_eq!(
        health.check(status("")).await.unwrap().into_inner().status,
        serving
    );
    open(&channel, ALICE, "", vec![chunk(vec![1], true)])
        .await
        .unwrap();
}

#[test]
fn a_bad_token_file_stops_the_server_before_it_starts() {
    let dir = scratch_dir("access-bad");
    for (text, needle) in [
        ("short alice client\n", "at least 16 characters"),
        (
            "alice-token-0123456789 alice owner\n",
            "role \"owner\"; allowed: client, admin",
        ),
        (
            "alice-token-0123456789 alice\n",
            "expected `TOKEN IDENTITY ROLE`",
        ),
        ("# nothing\n", "no tokens"),
    ] {
        let file = dir.join("tokens.txt");
        std::fs::write(&file, text).unwrap();
        let output = tideway()
            .args(["serve", "--listen", "127.0.0.1:0", "--auth"])
            .arg(&file)
            .arg("--model")
            .arg(fixtures_dir().join("mamba/hf_odd_tied"))
            .output()
            .unwrap();
        assert!(!output.status.success());
        let text = stderr(&output);
        assert!(text.contains(needle), "want {needle:?}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_session() {
    let server = start_server_with(&["--max-sessions-per-client", "2", "--workers", "1"]);
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Alice keeps two sessions (kept after their calls); a third is refused, Bob's is not.
    for _ in 0..2 {
        open(&channel, ALICE, "", vec![]).await.unwrap();
    }
    let e = open(&channel, ALICE, "", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains(
            "identity \"alice\" holds its limit of 2 live sessions (--max-sessions-per-client)"
        ),
        "{e:?}"
    );
    open(&channel, BOB, "", vec![]).await.unwrap();
}
