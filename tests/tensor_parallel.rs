//! `tideway run --tensor-parallel N --tp-transport processes`: the model split over N
//! `tideway tp-rank` processes joined by the TCP ring on loopback gives the reference logits
//! (the fixtures' expected outputs, from HF transformers / fla / the ladder-rewired reference)
//! and the single-worker logits, in both forms; for every family and for ladder-wired models.

mod common;

use std::path::Path;

use common::*;

/// (fixture, tensor-parallel sizes its heads / channels divide into)
const MODELS: [(&str, &[usize]); 8] = [
    ("mamba/hf_k4_sharded", &[2, 4]),
    ("fla/gla_legacy_fused_mlp", &[2, 4]),
    ("fla/retnet_basic", &[2]),
    ("fla/delta_net_relu_sum_gate_negeig", &[4]),
    ("fla/gated_deltanet_basic", &[2]),
    ("fla/linear_attn_hedgehog_normalized", &[2]),
    ("ladder/gla_ladder_last2", &[2, 4]),
    ("ladder/mamba_ladder_all", &[2]),
];

fn run(model: &Path, tokens: &str, extra: &[&str]) -> Loaded {
    let out = scratch_dir("tp-run").join("out.safetensors");
    let output = tideway()
        .args(["run", "--model"])
        .arg(model)
        .args(["--tokens", tokens, "--out"])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {extra:?}: {}",
        model.display(),
        stderr(&output)
    );
    read_tensor(&out, "logits")
}

#[test]
fn processes_on_loopback_give_the_reference_and_single_worker_logits() {
    for (name, sizes) in MODELS {
        let dir = fixtures_dir().join(name);
        let expected = dir.join("expected.safetensors");
        let tokens = read_tensor(&expected, "input_ids")
            .values
            .iter()
            .map(|v| (*v as u64).to_string())
            .collect::<Vec<_>>()
            .join(",");
        let reference = read_tensor(&expected, "logits");
        for mode in ["chunked", "recurrent"] {
            let single = run(&dir, &tokens, &["--mode", mode]);
            for &size in sizes {
                let tp = size.to_string();
                let got = run(
                    &dir,
                    &tokens,
                    &[
                        "--mode",
                        mode,
                        "--tensor-parallel",
                        &tp,
                        "--tp-transport",
                        "processes",
                    ],
                );
                assert_eq!(got.shape, single.shape);
                let vs_single = relative_error(&got.values, &single.values);
                let vs_reference = relative_error(&got.values, &reference.values);
                eprintln!(
                    "{name} {mode} tp {size} (processes): {vs_single:.2e} vs single worker, {vs_reference:.2e} vs reference"
                );
                assert!(
                    vs_single <= 1e-5,
                    "{name} {mode} tp {size}: {vs_single:.3e}"
                );
                assert!(
                    vs_reference <= 1e-4,
                    "{name} {mode} tp {size}: {vs_reference:.3e}"
                );
            }
        }
    }
}

#[test]
fn a_split_that_does_not_divide_the_heads_is_refused_before_starting_ranks() {
    let output = tideway()
        .args(["run", "--model"])
        .arg(fixtures_dir().join("fla/gated_deltanet_basic"))
        .args(["--tokens", "1,2,3", "--out"])
        .arg(scratch_dir("tp-bad").join("out.safetensors"))
        .args(["--tensor-parallel", "4", "--tp-transport", "processes"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("num_heads = 2 does not divide into 4 tensor-parallel shards"),
        "{err}"
    );
}

mod serving {
    use super::*;
    use std::time::Duration;
    use tideway_proto::tideway::v1 as pb;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    const MODEL: &str = "gla_legacy_fused_mlp";

    fn start() -> pb::StreamRequest {
        pb::StreamRequest {
            kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
                model: MODEL.into(),
                ..Default::default()
            })),
        }
    }

    /// One stream with `chunks`: every logit row, or the status it ended with.
    async fn stream(url: &str, chunks: &[Vec<u64>]) -> Result<Vec<f64>, tonic::Status> {
        let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(chunks.len() + 1);
        tx.send(start()).await.unwrap();
        for (i, c) in chunks.iter().enumerate() {
            tx.send(token_chunk(c, i + 1 == chunks.len()))
                .await
                .unwrap();
        }
        drop(tx);
        let inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
        output_rows(inbound).await
    }

    /// The `tideway tp-rank` processes the server started.
    fn rank_processes(parent: u32) -> Vec<u32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // Fields after the command name: state, ppid, …
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("tp-rank") {
                pids.push(pid);
            }
        }
        pids
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_served_group_answers_like_run_and_a_lost_rank_ends_requests_with_unavailable() {
        let dir = fixtures_dir().join("fla").join(MODEL);
        let server = Server::start(&[
            "--model",
            dir.to_str().unwrap(),
            "--tensor-parallel",
            "4",
            "--tp-transport",
            "processes",
        ]);
        let tokens = pseudo_random(40, 45, 9);
        let want = run_reference(&dir, &tokens);
        let chunks: Vec<Vec<u64>> = [1usize, 7, 1, 1, 20, 10]
            .iter()
            .scan(0, |at, &n| {
                *at += n;
                Some(tokens[*at - n..*at].to_vec())
            })
            .collect();
        // Two streams one after the other, then two at once: the ranks keep every session's
        // slices apart and forget ended ones.
        for _ in 0..2 {
            let got = stream(&server.url(), &chunks).await.unwrap();
            let rel = relative_error(&got, &want.values);
            assert!(rel <= 1e-5, "relative error {rel:.3e}");
        }
        let url = server.url();
        let (a, b) = tokio::join!(stream(&url, &chunks), stream(&url, &chunks));
        for got in [a.unwrap(), b.unwrap()] {
            assert!(relative_error(&got, &want.values) <= 1e-5);
        }

        let ranks = rank_processes(server.pid());
        assert_eq!(ranks.len(), 3, "ranks 1..4 run as processes");
        let killed = std::process::Command::new("kill")
            .args(["-9", &ranks[1].to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        for attempt in 0..2 {
            let outcome =
                tokio::time::timeout(Duration::from_secs(30), stream(&server.url(), &chunks))
                    .await
                    .expect("a lost rank must end requests, not hang them");
            let status = outcome.expect_err("the group has lost a rank");
            eprintln!(
                "attempt {attempt}: {:?}: {}",
                status.code(),
                status.message()
            );
            assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "attempt {attempt}: {status:?}"
            );
            assert!(
                status.message().contains("tensor-parallel group")
                    && status.message().contains("restart the server"),
                "{status:?}"
            );
        }
        drop(server);
    }
}

/// A group whose rank 1 is started by hand (as on another host): `--tp-transport external`.
#[test]
fn ranks_started_by_hand_join_the_leader_at_its_control_address() {
    let dir = fixtures_dir().join("fla/gla_legacy_fused_mlp");
    let port = free_port();
    let control = format!("127.0.0.1:{port}");
    let expected = dir.join("expected.safetensors");
    let ids = read_tensor(&expected, "input_ids").values;
    let tokens = ids
        .iter()
        .map(|v| (*v as u64).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = scratch_dir("tp-external").join("out.safetensors");
    // The rank first: it waits for its leader.
    let mut rank = tideway()
        .args([
            "tp-rank", "--leader", &control, "--rank", "1", "--size", "2", "--model",
        ])
        .arg(&dir)
        .spawn()
        .unwrap();
    let leader = tideway()
        .args(["run", "--model"])
        .arg(&dir)
        .args(["--tokens", &tokens, "--out"])
        .arg(&out)
        .args([
            "--tensor-parallel",
            "2",
            "--tp-transport",
            "external",
            "--tp-control",
            &control,
        ])
        .output()
        .unwrap();
    assert!(leader.status.success(), "{}", stderr(&leader));
    assert!(
        stderr(&leader).contains("waiting for ranks 1..2"),
        "{}",
        stderr(&leader)
    );
    // The leader's end shuts the rank down.
    assert!(rank.wait().unwrap().success());
    let got = read_tensor(&out, "logits");
    let want = read_tensor(&expected, "logits");
    let rel = relative_error(&got.values, &want.values);
    assert!(rel <= 1e-4, "relative error {rel:.3e}");
}
