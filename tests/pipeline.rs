//! End-to-end tests of pipeline placement (`serve --pipeline K`): each model's layers split
//! into K stages on different workers (threads of one process, or processes of a cluster on
//! loopback), activations exchanged by timely. Every language-model fixture must answer as
//! `tideway run` does, and each process must hold only its stages' weights and state.

mod common;

use std::path::PathBuf;

use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio_stream::StreamExt;

/// Every language-model fixture with at least `min_layers` layers, as (name, dir).
fn language_fixtures(min_layers: usize) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for family in ["mamba", "fla", "ladder"] {
        for entry in std::fs::read_dir(fixtures_dir().join(family)).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.join("expected.safetensors").exists() {
                continue;
            }
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            let layers = ["num_hidden_layers", "n_layer"]
                .iter()
                .find_map(|k| config[k].as_u64())
                .unwrap() as usize;
            if layers >= min_layers {
                let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                found.push((name, dir));
            }
        }
    }
    found.sort();
    found
}

/// The vocabulary of a fixture's model, from its config.
fn vocab(dir: &std::path::Path) -> u64 {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["vocab_size"].as_u64().unwrap()
}

/// Streams `tokens` to `model` in chunks of 1..=9 tokens; every output row.
async fn stream_logits(url: &str, model: &str, tokens: &[u64]) -> Vec<f64> {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let mut requests = vec![pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            ..Default::default()
        })),
    }];
    let sizes = pseudo_random(tokens.len(), 9, 3);
    let mut i = 0;
    for size in sizes {
        if i >= tokens.len() {
            break;
        }
        let n = (size as usize + 1).min(tokens.len() - i);
        requests.push(token_chunk(&tokens[i..i + n], i + n == tokens.len()));
        i += n;
    }
    let inbound = client
        .open(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    output_rows(inbound).await.unwrap()
}

/// Runs every served fixture through a stream and through `tideway run`; all must agree.
async fn check_every_model(url: &str, fixtures: &[(String, PathBuf)], label: &str) {
    for (i, (name, dir)) in fixtures.iter().enumerate() {
        let tokens = pseudo_random(40, vocab(dir), 70 + i as u64);
        let want = run_reference(dir, &tokens);
        let got = stream_logits(url, name, &tokens).await;
        let err = relative_error(&got, &want.values);
        println!("{label}: {name}: {err:.2e}");
        assert!(err <= 1e-5, "{label}: {name}: relative error {err:.3e}");
    }
}

/// Every LMUFormer fixture, as (name, checkpoint dir); its frames are `input.safetensors`
/// beside the checkpoint.
fn feature_fixtures() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(fixtures_dir().join("lmu"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("input.safetensors").exists())
        .map(|d| {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            (name, d.join("checkpoint"))
        })
        .collect();
    found.sort();
    found
}

/// Streams a feature fixture's frames to `model` in chunks of 1..=7 frames, the last one
/// ending the stream (which flushes the lookahead); every output row.
async fn stream_frames(url: &str, model: &str, checkpoint: &std::path::Path) -> Vec<f64> {
    let input = read_tensor(
        &checkpoint.parent().unwrap().join("input.safetensors"),
        "input",
    );
    let channels = *input.shape.last().unwrap();
    let frames = input.values.len() / channels;
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let mut requests = vec![pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            ..Default::default()
        })),
    }];
    let sizes = pseudo_random(frames, 7, 5);
    let mut i = 0;
    for size in sizes {
        if i >= frames {
            break;
        }
        let n = (size as usize + 1).min(frames - i);
        requests.push(pb::StreamRequest {
            kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
                frames: input.values[i * channels..(i + n) * channels]
                    .iter()
                    .map(|&v| v as f32)
                    .collect(),
                channels: channels as u32,
                end: i + n == frames,
                ..Default::default()
            })),
        });
        i += n;
    }
    let inbound = client
        .open(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    output_rows(inbound).await.unwrap()
}

/// Every feature fixture streamed through `url` and through the single worker at `single`.
async fn check_feature_models(
    url: &str,
    single: &str,
    fixtures: &[(String, PathBuf)],
    label: &str,
) {
    for (name, checkpoint) in fixtures {
        let want = stream_frames(single, name, checkpoint).await;
        let got = stream_frames(url, name, checkpoint).await;
        assert!(!want.is_empty());
        let err = relative_error(&got, &want);
        println!("{label}: {name}: {err:.2e} vs the single worker");
        assert!(err <= 1e-5, "{label}: {name}: relative error {err:.3e}");
    }
}

fn model_args(fixtures: &[(String, PathBuf)]) -> Vec<String> {
    fixtures
        .iter()
        .flat_map(|(name, dir)| ["--model".to_string(), format!("{name}={}", dir.display())])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stages_on_two_workers_answer_like_run() {
    let fixtures = language_fixtures(1);
    assert!(fixtures.len() >= 20, "{fixtures:?}");
    let features = feature_fixtures();
    assert!(features.len() >= 7, "{features:?}");
    let mut args = model_args(&fixtures);
    args.extend(model_args(&features));
    let single_args = args.clone();
    // Records between the stages serialised as between processes.
    args.extend(["--workers", "2", "--pipeline", "2", "--process-binary"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    check_every_model(&server.url(), &fixtures, "pipeline 2, 2 workers").await;
    let single = Server::start(&single_args.iter().map(String::as_str).collect::<Vec<_>>());
    check_feature_models(
        &server.url(),
        &single.url(),
        &features,
        "pipeline 2, 2 workers",
    )
    .await;
    // Concurrent streams of one model share each stage's batches.
    let (name, dir) = &fixtures[0];
    let url = server.url();
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let (url, name, dir) = (url.clone(), name.clone(), dir.clone());
        tasks.push(tokio::spawn(async move {
            let tokens = pseudo_random(25, vocab(&dir), 900 + s);
            (stream_logits(&url, &name, &tokens).await, tokens)
        }));
    }
    for task in tasks {
        let (got, tokens) = task.await.unwrap();
        let want = run_reference(dir, &tokens);
        assert!(relative_error(&got, &want.values) <= 1e-5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_refuses_what_it_cannot_split() {
    let dir = fixtures_dir().join("mamba/hf_k4_sharded");
    let output = tideway()
        .args(["serve", "--listen", "127.0.0.1:0", "--model"])
        .arg(&dir)
        .args(["--workers", "3", "--pipeline", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("--pipeline 2 needs a number of workers"),
        "{text}"
    );
}

/// `processes` `tideway serve` processes on loopback forming one cluster, one worker each,
/// the layers in `stages` pipeline stages.
fn start_pipeline_cluster(
    processes: usize,
    stages: usize,
    fixtures: &[(String, PathBuf)],
) -> Vec<Server> {
    let ports: Vec<u16> = (0..processes).map(|_| free_port()).collect();
    let hosts = scratch_dir("pipeline-cluster").join("hosts.txt");
    let lines: String = ports.iter().map(|p| format!("127.0.0.1:{p}\n")).collect();
    std::fs::write(&hosts, lines).unwrap();
    let mut base = model_args(fixtures);
    base.extend([
        "--workers".to_string(),
        "1".to_string(),
        "--pipeline".to_string(),
        stages.to_string(),
        "--hosts".to_string(),
        hosts.display().to_string(),
        "--metrics".to_string(),
        "127.0.0.1:0".to_string(),
    ]);
    // All start at once: each waits for its peers before it listens for gRPC.
    let handles: Vec<_> = (0..processes)
        .map(|p| {
            let mut args = base.clone();
            args.extend(["--process".to_string(), p.to_string()]);
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Server::start(&args)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

async fn model_info(url: &str, model: &str) -> pb::ModelInfo {
    let mut models = pb::models_client::ModelsClient::connect(url.to_string())
        .await
        .unwrap();
    let list = models
        .list(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    list.models.into_iter().find(|m| m.name == model).unwrap()
}

async fn weight_bytes(url: &str, model: &str) -> u64 {
    model_info(url, model).await.weight_bytes
}

/// Starts a session of `model` and keeps its stream open (while the sender lives).
async fn open_session(
    url: &str,
    model: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::StreamRequest>,
    tonic::Streaming<pb::StreamResponse>,
) {
    let (tx, mut inbound) = open_stream(url, vec![start_request(model)]).await;
    // Opened comes back once the start has passed every stage: each holds its state then.
    let first = inbound.next().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(pb::stream_response::Kind::Opened(_))
    ));
    (tx, inbound)
}

/// `tideway_stage_state_bytes` of `model` on the process whose stderr is `server`'s, summed
/// over its stages.
fn held_state_bytes(server: &Server, model: &str) -> u64 {
    let page = scrape(&server.metrics_addr());
    let prefix = format!("tideway_stage_state_bytes{{model=\"{model}\",");
    metric_values(&page, &prefix).iter().sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_processes_hold_only_their_stages_and_answer_like_run() {
    // The three-layer fixtures (a Mamba, fla's fused-MLP GLA and both ladder-wired ones) and
    // one of two layers: four stages leave the last stages without layers (the head's alone).
    let mut fixtures = language_fixtures(3);
    assert!(fixtures.len() >= 4, "{fixtures:?}");
    fixtures.push((
        "hf_odd_tied".to_string(),
        fixtures_dir().join("mamba/hf_odd_tied"),
    ));
    let features = feature_fixtures();
    let mut served = fixtures.clone();
    served.extend(features.iter().cloned());
    let single_args = model_args(&served);
    let single = Server::start(&single_args.iter().map(String::as_str).collect::<Vec<_>>());
    for (processes, stages) in [(2, 2), (4, 4)] {
        let cluster = start_pipeline_cluster(processes, stages, &served);
        for (p, server) in cluster.iter().enumerate() {
            check_every_model(
                &server.url(),
                &fixtures[..1],
                &format!("pipeline {stages} over {processes} processes, via process {p}"),
            )
            .await;
        }
        let label = format!("pipeline {stages} over {processes} processes");
        check_every_model(&cluster[0].url(), &fixtures, &label).await;
        check_feature_models(&cluster[1].url(), &single.url(), &features, &label).await;
        // Each process holds its stages' layers (and the embedding or head at the ends),
        // never the whole model.
        for (name, _) in &fixtures {
            let whole = weight_bytes(&single.url(), name).await;
            let mut held = Vec::new();
            for server in &cluster {
                held.push(weight_bytes(&server.url(), name).await);
            }
            println!("{name}: whole {whole} bytes, per process {held:?}");
            assert!(
                held.iter().all(|&b| b < whole),
                "{name}: {held:?} of {whole}"
            );
            // Layers are held once; the ends (embedding, head) by the first and last process.
            assert!(
                held.iter().sum::<u64>() >= whole,
                "{name}: {held:?} of {whole}"
            );
        }
        // So do feature models: each process its blocks (the first the patch embedding, the
        // last the head), none twice.
        for (name, _) in &features {
            let whole = weight_bytes(&single.url(), name).await;
            let mut held = Vec::new();
            for server in &cluster {
                held.push(weight_bytes(&server.url(), name).await);
            }
            println!("{name}: whole {whole} bytes, per process {held:?}");
            assert!(held.iter().all(|&b| b < whole), "{name}: {held:?}");
            assert_eq!(held.iter().sum::<u64>(), whole, "{name}: {held:?}");
        }
        // Session state: with three sessions open of a language model and of a feature model,
        // each process holds its stages' share of every session's state, and together they
        // hold each session's whole state once.
        for name in [&fixtures[0].0, &features[0].0] {
            let per_session = model_info(&single.url(), name)
                .await
                .state_bytes_per_session;
            let mut open = Vec::new();
            for _ in 0..3 {
                open.push(open_session(&cluster[0].url(), name).await);
            }
            let held: Vec<u64> = cluster.iter().map(|s| held_state_bytes(s, name)).collect();
            println!("{label}: {name}: 3 sessions of {per_session} bytes, per process {held:?}");
            assert_eq!(
                held.iter().sum::<u64>(),
                3 * per_session,
                "{name}: {held:?}"
            );
            assert!(
                held.iter().all(|&b| b < 3 * per_session),
                "{name}: {held:?}"
            );
            drop(open);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_serves_the_inference_protocol_and_jobs() {
    use tideway_proto::inference as kserve;
    let fixtures = language_fixtures(2);
    let (name, dir) = &fixtures[0];
    let server = Server::start(&[
        "--model",
        &format!("{name}={}", dir.display()),
        "--workers",
        "2",
        "--pipeline",
        "2",
    ]);
    let tokens = pseudo_random(30, vocab(dir), 4242);
    let want = run_reference(dir, &tokens);

    let mut client =
        kserve::grpc_inference_service_client::GrpcInferenceServiceClient::connect(server.url())
            .await
            .unwrap();
    let ids: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as i64).to_le_bytes())
        .collect();
    let response = client
        .model_infer(kserve::ModelInferRequest {
            model_name: name.clone(),
            inputs: vec![kserve::model_infer_request::InferInputTensor {
                name: "input_ids".into(),
                datatype: "INT64".into(),
                shape: vec![tokens.len() as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![ids],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = f32s(&response.raw_output_contents[0]);
    assert!(relative_error(&got, &want.values) <= 1e-5);

    let mut jobs = pb::jobs_client::JobsClient::connect(server.url())
        .await
        .unwrap();
    let job = jobs
        .submit(pb::JobRequest {
            model: name.clone(),
            tokens: tokens.iter().map(|&t| t as i64).collect(),
            chunk: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = jobs
        .watch(pb::JobRef {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut logits = None;
    while let Some(event) = events.next().await {
        if let Some(pb::job_event::Kind::Result(result)) = event.unwrap().kind {
            logits = result.logits;
        }
    }
    let got = f32s(&logits.expect("the job's result").data);
    assert!(relative_error(&got, &want.values) <= 1e-5);
}
