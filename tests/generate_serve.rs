//! `tideway.v1.Generation/Generate` on a real `tideway serve`: greedy tokens equal the
//! reference's (tests/fixtures/generation, as tests/generate.rs checks for the CLI), streamed
//! one response per token with the finish last; a seeded sampling request makes the same
//! tokens alone and among 16 others (continuous batching does not change a request's
//! draws); a cancelled call frees its session at once; a stream continues from its state;
//! a two-stage pipeline generates the same tokens; bad requests are refused by name.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tideway_proto::tideway::v1 as pb;
use tonic::Code;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn case(name: &str) -> serde_json::Value {
    let path = fixtures_dir().join(format!("generation/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

struct Generated {
    tokens: Vec<i64>,
    text: String,
    responses: usize,
    finished: pb::GenerateFinished,
}

async fn generate(url: &str, request: pb::GenerateRequest) -> Result<Generated, tonic::Status> {
    let mut client = pb::generation_client::GenerationClient::connect(url.to_string())
        .await
        .unwrap();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut tokens, mut text, mut responses) = (Vec::new(), String::new(), 0);
    while let Some(r) = stream.message().await? {
        responses += 1;
        tokens.extend(r.tokens);
        text.push_str(&r.text);
        if let Some(finished) = r.finished {
            assert!(
                stream.message().await?.is_none(),
                "a response after the finish"
            );
            return Ok(Generated {
                tokens,
                text,
                responses,
                finished,
            });
        }
    }
    panic!("the stream ended without a finish")
}

fn request(model: &str, tokens: Vec<i64>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        tokens,
        max_tokens,
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

async fn live_sessions(url: &str) -> u64 {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap();
    let stats = admin.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    stats.live_sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_the_reference_tokens_and_batching_leaves_seeded_draws_alone() {
    let mamba = case("mamba_bias_untied_k2");
    let gla = case("gla_basic");
    let server = Server::start(&[
        "--model",
        &format!(
            "mamba={}",
            repo().join(mamba["model"].as_str().unwrap()).display()
        ),
        "--model",
        &format!(
            "gla={}",
            repo().join(gla["model"].as_str().unwrap()).display()
        ),
        "--workers",
        "2",
    ]);
    let url = server.url();

    // Greedy: the reference's 200 tokens, one response each, then the finish.
    for (model, case) in [("mamba", &mamba), ("gla", &gla)] {
        let want = ids(&case["tokens"]);
        let got = generate(
            &url,
            request(model, ids(&case["prompt_ids"]), want.len() as u32),
        )
        .await
        .unwrap();
        assert_eq!(got.tokens, want, "{model}");
        assert_eq!(got.responses, want.len() + 1, "{model}");
        assert_eq!(got.finished.finish_reason, "length");
        assert_eq!(got.finished.completion_tokens as usize, want.len());
        assert_eq!(
            got.finished.prompt_tokens as usize,
            ids(&case["prompt_ids"]).len()
        );
    }

    // Seeded sampling: the same tokens alone and among 16 other generations.
    let sampled = |seed: u64, prompt: Vec<i64>| pb::GenerateRequest {
        temperature: Some(1.0),
        top_p: Some(0.9),
        seed: Some(seed),
        ..request("mamba", prompt, 64)
    };
    let prompt = ids(&mamba["prompt_ids"]);
    let alone = generate(&url, sampled(1234, prompt.clone())).await.unwrap();
    assert_eq!(alone.finished.seed, 1234);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let (url, other) = (
            url.clone(),
            sampled(i, vec![(i % 40) as i64 + 1; 5 + i as usize]),
        );
        tasks.push(tokio::spawn(
            async move { generate(&url, other).await.unwrap() },
        ));
    }
    let among = generate(&url, sampled(1234, prompt)).await.unwrap();
    let others: Vec<Generated> = futures_join(tasks).await;
    assert_eq!(among.tokens, alone.tokens);
    assert!(others.iter().any(|o| o.tokens != alone.tokens));
    assert_ne!(
        generate(&url, sampled(1235, ids(&mamba["prompt_ids"])))
            .await
            .unwrap()
            .tokens,
        alone.tokens
    );

    // Cancelling: the session is freed as soon as the call is dropped.
    wait_for_sessions(&url, 0).await;
    let mut client = pb::generation_client::GenerationClient::connect(url.clone())
        .await
        .unwrap();
    let mut stream = client
        .generate(request("mamba", vec![1, 2, 3], 4000))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    wait_for_sessions(&url, 1).await;
    drop(stream);
    wait_for_sessions(&url, 0).await;
}

/// Waits (at most 5 s) until the server's control plane counts `n` live sessions.
async fn wait_for_sessions(url: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let live = live_sessions(url).await;
        if live == n {
            return;
        }
        assert!(Instant::now() < deadline, "{live} live sessions, not {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<Generated>>) -> Vec<Generated> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_generation_stops_at_a_stop_string_and_bad_requests_are_refused_by_name() {
    let bpe = fixtures_dir().join("text/mamba_bpe");
    let no_text = fixtures_dir().join("mamba/hf_odd_tied");
    let server = Server::start(&[
        "--model",
        &format!("bpe={}", bpe.display()),
        "--model",
        &format!("ids={}", no_text.display()),
        "--max-new-tokens",
        "300",
    ]);
    let url = server.url();

    // The greedy text, then the same with a stop string taken from its middle.
    let text_request = |stop: Vec<String>| pb::GenerateRequest {
        model: "bpe".into(),
        text: "Hello world".into(),
        max_tokens: 60,
        temperature: Some(0.0),
        stop,
        ignore_eos: true,
        ..Default::default()
    };
    let whole = generate(&url, text_request(vec![])).await.unwrap();
    let chars: Vec<char> = whole.text.chars().collect();
    assert!(chars.len() > 12, "{:?}", whole.text);
    let cut = chars.len() / 2;
    let stop: String = chars[cut..cut + 3].iter().collect();
    let before: String = chars[..cut].iter().collect();
    let want = &before[..before.find(&stop).unwrap_or(before.len())];
    let stopped = generate(&url, text_request(vec![stop.clone()]))
        .await
        .unwrap();
    assert_eq!(stopped.text, want, "stop {stop:?} in {:?}", whole.text);
    assert_eq!(stopped.finished.finish_reason, "stop");

    for (request, code, says) in [
        (
            pb::GenerateRequest {
                model: "nope".into(),
                tokens: vec![1],
                ..Default::default()
            },
            Code::NotFound,
            "unknown model",
        ),
        (
            pb::GenerateRequest {
                model: "bpe".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "prompt is empty",
        ),
        (
            pb::GenerateRequest {
                model: "bpe".into(),
                tokens: vec![1],
                temperature: Some(-1.0),
                ..Default::default()
            },
            Code::InvalidArgument,
            "temperature -1",
        ),
        (
            pb::GenerateRequest {
                model: "bpe".into(),
                tokens: vec![1],
                top_p: Some(0.0),
                ..Default::default()
            },
            Code::InvalidArgument,
            "top_p 0",
        ),
        (
            pb::GenerateRequest {
                model: "bpe".into(),
                tokens: vec![1],
                max_tokens: 301,
                ..Default::default()
            },
            Code::ResourceExhausted,
            "--max-new-tokens",
        ),
        (
            pb::GenerateRequest {
                model: "bpe".into(),
                tokens: vec![100_000],
                ..Default::default()
            },
            Code::InvalidArgument,
            "vocabulary",
        ),
        (
            pb::GenerateRequest {
                model: "ids".into(),
                text: "a".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "no tokenizer.json",
        ),
        (
            pb::GenerateRequest {
                model: "ids".into(),
                tokens: vec![1],
                stop: vec!["x".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "stop strings need text",
        ),
    ] {
        let e = generate(&url, request.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{request:?} was accepted"));
        assert_eq!(e.code(), code, "{request:?}: {e:?}");
        assert!(e.message().contains(says), "{request:?}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_continues_from_its_state_then_takes_chunks_again() {
    let mamba = case("mamba_bias_untied_k2");
    let server = Server::start(&[
        "--model",
        &format!(
            "mamba={}",
            repo().join(mamba["model"].as_str().unwrap()).display()
        ),
    ]);
    let prompt: Vec<u64> = ids(&mamba["prompt_ids"])
        .iter()
        .map(|&t| t as u64)
        .collect();
    let want: Vec<i64> = ids(&mamba["tokens"])[..20].to_vec();
    let mut client = pb::streams_client::StreamsClient::connect(server.url())
        .await
        .unwrap();
    let mut ask = token_chunk(&prompt, false);
    if let Some(pb::stream_request::Kind::Chunk(chunk)) = &mut ask.kind {
        chunk.generate = Some(Box::new(request("", vec![], want.len() as u32)));
    }
    let messages = vec![start_request("mamba"), ask, token_chunk(&[5], true)];
    let mut inbound = client
        .open(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    use pb::stream_response::Kind;
    let (mut outputs, mut generated, mut finished, mut summary) =
        (Vec::new(), Vec::new(), None, None);
    while let Some(r) = inbound.message().await.unwrap() {
        match r.kind.unwrap() {
            Kind::Opened(_) => {}
            Kind::Output(o) => {
                assert!(
                    generated.is_empty() || finished.is_some(),
                    "an output inside the generation"
                );
                outputs.push(o.position)
            }
            Kind::Generated(g) => {
                generated.extend(g.tokens);
                if g.finished.is_some() {
                    finished = g.finished;
                }
            }
            Kind::Summary(s) => summary = Some(s),
        }
    }
    assert_eq!(
        generated, want,
        "greedy from the stream's state = the reference's continuation"
    );
    assert_eq!(finished.unwrap().finish_reason, "length");
    let n = prompt.len() as u64;
    // The next chunk starts after the prompt and every generated token.
    assert_eq!(outputs, vec![0, n + want.len() as u64]);
    assert_eq!(summary.unwrap().position, n + want.len() as u64 + 1);
}

/// Serves the `mamba_bias_untied_k2` fixture with `placement` arguments and checks that its
/// greedy generation gives the reference tokens.
async fn reference_tokens_when_served_with(placement: &[&str]) {
    let mamba = case("mamba_bias_untied_k2");
    let model = format!(
        "mamba={}",
        repo().join(mamba["model"].as_str().unwrap()).display()
    );
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(placement);
    let server = Server::start(&args);
    let want = ids(&mamba["tokens"]);
    let got = generate(
        &server.url(),
        request("mamba", ids(&mamba["prompt_ids"]), want.len() as u32),
    )
    .await
    .unwrap();
    assert_eq!(got.tokens, want, "{placement:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_through_a_two_stage_pipeline_gives_the_reference_tokens() {
    // The layers in two stages on two workers: the last-row-only answer crosses the
    // pipeline's exchange and the head like every other step.
    reference_tokens_when_served_with(&["--workers", "2", "--pipeline", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_over_a_tensor_parallel_group_gives_the_reference_tokens() {
    // A model over a group runs whole in one stage: its prompt's step asks the group's rank 0
    // for the last row of logits alone.
    reference_tokens_when_served_with(&["--tensor-parallel", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prompt_prefix_gives_the_reference_tokens_and_saves_its_prefill() {
    let mamba = case("mamba_bias_untied_k2");
    let gla = case("gla_basic");
    let server = Server::start(&[
        "--model",
        &format!(
            "mamba={}",
            repo().join(mamba["model"].as_str().unwrap()).display()
        ),
        "--model",
        &format!(
            "gla={}",
            repo().join(gla["model"].as_str().unwrap()).display()
        ),
        "--prefix-cache-mb",
        "16",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let url = server.url();
    let mut saved = 0;
    for (model, case) in [("mamba", &mamba), ("gla", &gla)] {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["tokens"]);
        // A miss (the prompt's state is captured), then a hit on the same prompt.
        for round in ["miss", "hit"] {
            let got = generate(&url, request(model, prompt.clone(), 60))
                .await
                .unwrap();
            assert_eq!(got.tokens, want[..60], "{model}, {round}");
        }
        // A prompt that continues the cached one (a conversation's next turn): the rest of the
        // same greedy sequence.
        let longer = [prompt.clone(), want[..20].to_vec()].concat();
        let got = generate(&url, request(model, longer, 40)).await.unwrap();
        assert_eq!(got.tokens, want[20..60], "{model}, continued");
        // Another prompt of the same length does not match.
        let other: Vec<i64> = prompt.iter().map(|t| (t + 1) % 40).collect();
        generate(&url, request(model, other, 4)).await.unwrap();
        saved += 2 * (prompt.len() - 1);
    }
    let page = scrape(&server.metrics_addr());
    assert_eq!(metric(&page, "tideway_prefix_cache_hits_total"), 4.0);
    assert_eq!(metric(&page, "tideway_prefix_cache_misses_total"), 4.0);
    assert_eq!(
        metric(&page, "tideway_prefix_cache_tokens_saved_total"),
        saved as f64
    );
    assert!(metric(&page, "tideway_prefix_cache_bytes") > 0.0);
    // Every generation's session was freed (the control plane counts a tick behind the last
    // token, so wait for it).
    wait_for_sessions(&url, 0).await;
}
