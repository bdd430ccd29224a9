//! Prompt pruning on a real `tideway serve` (SPEC-MODELS §6.3): a language model whose
//! config.json has a `tideway_prune` block runs a generation's prompt pruned, and the session
//! goes on from the pruned state. The greedy tokens must be the reference's
//! (tests/fixtures/prune/pruned_prefill.safetensors: HF's Mamba and fla's GLA run block by
//! block on the numpy oracle's survivors, then on each new token), with the prefix cache on
//! (it leaves pruning models alone); the metrics count the prompt's kept and pruned tokens,
//! ModelInfo names the setting, and placements that cannot prune are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::SafeTensors;
use tideway_proto::tideway::v1 as pb;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One case of the pruned-prefill fixture.
struct Case {
    model: PathBuf,
    setting: String,
    ids: Vec<i64>,
    kept: usize,
    greedy: Vec<i64>,
}

fn cases() -> Vec<Case> {
    let path = fixtures_dir().join("prune/pruned_prefill.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let ints = |name: &str| -> Vec<i64> {
        read_tensor(&path, name)
            .values
            .into_iter()
            .map(|x| x as i64)
            .collect()
    };
    let mut cases: Vec<Case> = metadata
        .metadata()
        .clone()
        .unwrap()
        .into_iter()
        .map(|(case, what)| {
            let (dir, setting) = what.split_once('|').unwrap();
            Case {
                model: repo().join(dir),
                setting: setting.to_string(),
                ids: ints(&format!("{case}.ids")),
                kept: ints(&format!("{case}.kept")).len(),
                greedy: ints(&format!("{case}.greedy")),
            }
        })
        .collect();
    cases.sort_by(|a, b| a.model.cmp(&b.model));
    cases
}

/// A copy of `model` whose config.json prunes prompts as `setting` says.
fn pruning_copy(model: &Path, setting: &str, label: &str) -> PathBuf {
    let copy = scratch_dir(label);
    copy_dir(model, &copy);
    let path = copy.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let block: serde_json::Map<String, serde_json::Value> = setting
        .split(',')
        .map(|item| {
            let (key, value) = item.split_once('=').unwrap();
            (key.to_string(), serde_json::Value::from(value))
        })
        .collect();
    config["tideway_prune"] = serde_json::Value::Object(block);
    std::fs::write(&path, config.to_string()).unwrap();
    copy
}

async fn greedy(url: &str, model: &str, prompt: Vec<i64>, max_tokens: u32) -> Vec<i64> {
    let mut client = pb::generation_client::GenerationClient::connect(url.to_string())
        .await
        .unwrap();
    let request = pb::GenerateRequest {
        model: model.into(),
        tokens: prompt,
        max_tokens,
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        tokens.extend(r.tokens);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_generation_prunes_its_prompt_and_goes_on_as_the_reference_does() {
    let cases = cases();
    assert_eq!(cases.len(), 3);
    let mut args = Vec::new();
    let mut names = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let name = format!("m{k}");
        let dir = pruning_copy(&case.model, &case.setting, &format!("prune-serve-{k}"));
        args.push("--model".to_string());
        args.push(format!("{name}={}", dir.display()));
        names.push(name);
    }
    args.extend(["--workers", "2", "--metrics", "127.0.0.1:0"].map(String::from));
    args.extend(["--prefix-cache-mb", "16"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let url = server.url();

    for (case, name) in cases.iter().zip(&names) {
        let want = &case.greedy;
        // Twice: the prefix cache, which is on, must not answer the second from a state.
        for round in ["first", "again"] {
            let got = greedy(&url, name, case.ids.clone(), want.len() as u32).await;
            assert_eq!(
                &got,
                want,
                "{} ({}), {round}",
                case.model.display(),
                case.setting
            );
        }
    }
    // ModelInfo names each model's setting.
    let mut models = pb::models_client::ModelsClient::connect(url.clone())
        .await
        .unwrap();
    let listed = models
        .list(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    for (case, name) in cases.iter().zip(&names) {
        let info = listed.iter().find(|m| &m.name == name).unwrap();
        assert_eq!(info.pruning, format!("prompts: {}", case.setting));
    }

    // Each prompt ran pruned twice: its kept and pruned tokens are counted.
    let page = scrape(&server.metrics_addr());
    for (case, name) in cases.iter().zip(&names) {
        let fate = |fate: &str| {
            metric(
                &page,
                &format!("tideway_prompt_tokens_total{{model=\"{name}\",fate=\"{fate}\"}}"),
            )
        };
        assert_eq!(fate("kept"), 2.0 * case.kept as f64, "{name}");
        assert_eq!(
            fate("pruned"),
            2.0 * (case.ids.len() - case.kept) as f64,
            "{name}"
        );
    }
    assert_eq!(metric(&page, "tideway_prefix_cache_misses_total"), 0.0);
}

#[test]
fn placements_and_settings_that_cannot_prune_prompts_are_refused_by_name() {
    let case = &cases()[0];
    let serve_fails = |model: &Path, extra: &[&str]| {
        let output = tideway()
            .args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(format!("m={}", model.display()))
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{extra:?} was served");
        stderr(&output)
    };
    // A pipeline splits the layers the pruner needs in one place.
    let dir = pruning_copy(&case.model, &case.setting, "prune-serve-pipeline");
    let message = serve_fails(&dir, &["--workers", "2", "--pipeline", "2"]);
    assert!(
        message.contains("tideway_prune") && message.contains("--pipeline"),
        "{message}"
    );
    // A setting the model cannot use names its key.
    let dir = pruning_copy(&case.model, "layers=40", "prune-serve-layers");
    let message = serve_fails(&dir, &[]);
    assert!(
        message.contains("tideway_prune") && message.contains("layers"),
        "{message}"
    );
}
