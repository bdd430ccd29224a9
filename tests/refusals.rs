//! The refusal budget (`--refusal-burst`, `--refusals-per-s`): a client whose calls keep being
//! refused for its own limits has, past its burst, its next call held unread until its budget
//! refills, then refused, while other clients are served throughout.

mod common;

use std::time::Duration;

use common::*;
use tideway_proto::inference as ipb;
use tonic::Code;

fn infer_request(n: usize) -> ipb::ModelInferRequest {
    let ids: Vec<i64> = (0..n as i64).map(|i| i % 61).collect();
    infer_ids_request("lm", &ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_again_and_again_waits_and_others_do_not() {
    let model = format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display());
    let server = Server::start(&[
        "--model",
        &model,
        "--max-request-tokens",
        "100",
        "--refusal-burst",
        "3",
        "--refusals-per-s",
        "2",
    ]);
    let connect = || async {
        ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(server.url())
            .await
            .unwrap()
    };
    // Without --auth, callers are told apart by their connections.
    let (mut hostile, mut polite) = (connect().await, connect().await);
    for _ in 0..3 {
        let e = hostile.model_infer(infer_request(1000)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("--max-request-tokens"), "{e:?}");
    }
    // The burst is spent: the next call is held until the budget refills (half a second at
    // 2 a second), then refused unread, while everyone else is served.
    let held = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let e = hostile.model_infer(infer_request(1000)).await.unwrap_err();
        (hostile, e, started.elapsed())
    });
    let answer = polite.model_infer(infer_request(10)).await.unwrap();
    assert_eq!(answer.into_inner().outputs[0].shape, [10, 61]);
    let (mut hostile, e, took) = held.await.unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--refusal-burst") && e.message().contains("held"),
        "{e:?}"
    );
    assert!(took >= Duration::from_millis(400), "held only {took:?}");
    // Refilled: the caller is heard again.
    hostile.model_infer(infer_request(10)).await.unwrap();
}
