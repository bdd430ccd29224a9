//! `tideway generate` against the reference implementations' own `generate`: greedy tokens
//! for 200 new tokens on the trained models (models/shakespeare-*) and random fixtures equal
//! those of HF transformers (Mamba) and flash-linear-attention (GLA), committed under
//! tests/fixtures/generation/ by tools/gen_generation_fixtures.py. The generator recorded each
//! step's gap between the two largest logits: a comparison may end early only at a step whose
//! gap is below 1e-4 of the logits' scale (a tie within float error), and says so. Also:
//! seeded sampling repeats, a model's text streams, and bad parameters are refused by name.

mod common;

use std::path::PathBuf;

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cases() -> Vec<(String, serde_json::Value)> {
    let dir = fixtures_dir().join("generation");
    let mut cases: Vec<(String, serde_json::Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `tideway generate … --json`: its last stdout line as JSON.
fn generate(args: &[&str]) -> serde_json::Value {
    let output = tideway().arg("generate").args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn greedy_generation_equals_the_reference_generate_for_200_tokens() {
    let cases = cases();
    let names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "shakespeare_mamba",
        "shakespeare_gla",
        "mamba_bias_untied_k2",
        "gla_basic",
    ] {
        assert!(names.contains(&want), "fixture {want} missing: {names:?}");
    }
    for (name, case) in &cases {
        check_greedy(name, case, &[]);
    }
}

#[test]
fn greedy_generation_over_two_ranks_in_short_chunks_equals_the_reference_generate() {
    // The prompt in chunks of 4 (the head runs over each chunk's last row only) on a
    // tensor-parallel group of two, whose rank 0 runs the head.
    for (name, case) in cases().iter().filter(|(n, _)| n.starts_with("shakespeare")) {
        check_greedy(name, case, &["--tensor-parallel", "2", "--chunk", "4"]);
    }
}

/// `tideway generate --temperature 0` (with `extra` arguments) against a fixture's tokens: equal,
/// or equal up to a step whose top-2 gap the generator recorded as a tie within float error.
fn check_greedy(name: &str, case: &serde_json::Value, extra: &[&str]) {
    let model = repo().join(case["model"].as_str().unwrap());
    let prompt: Vec<String> = ids(&case["prompt_ids"])
        .iter()
        .map(|i| i.to_string())
        .collect();
    let prompt = prompt.join(",");
    let want = ids(&case["tokens"]);
    let max_tokens = want.len().to_string();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &prompt,
        "--max-tokens",
        &max_tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let got = ids(&generate(&args)["tokens"]);
    assert_eq!(got.len(), want.len(), "{name} {extra:?}");
    if let Some(at) = got.iter().zip(&want).position(|(g, w)| g != w) {
        let gap = case["top2_gap"][at].as_f64().unwrap();
        let scale = case["logit_scale"][at].as_f64().unwrap();
        assert!(
            gap < 1e-4 * scale,
            "{name} {extra:?}: token {at} is {} where the reference made {} (its top-2 gap {gap:.3e} is not a tie at scale {scale:.3e})",
            got[at],
            want[at]
        );
        eprintln!(
            "{name} {extra:?}: equal for {at} tokens, then a tie within float error (gap {gap:.2e} at scale {scale:.2e}): compared no further"
        );
    } else {
        eprintln!("{name} {extra:?}: {} tokens equal", want.len());
    }
}

#[test]
fn the_trained_model_writes_its_text_and_the_same_seed_writes_the_same_text() {
    let model = repo().join("models/shakespeare-mamba");
    let args = |seed: &'static str| {
        [
            "--model",
            model.to_str().unwrap(),
            "--text",
            "KING HENRY:\n",
            "--max-tokens",
            "40",
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]
        .map(String::from)
    };
    let run = |seed| {
        let a = args(seed);
        generate(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (a, b, c) = (run("5"), run("5"), run("6"));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["text"], b["text"]);
    assert_ne!(a["tokens"], c["tokens"]);
    assert_eq!(a["finish_reason"], "length");
    assert_eq!(a["tokens"].as_array().unwrap().len(), 40);
    assert!(!a["text"].as_str().unwrap().is_empty());
}

#[test]
fn bad_parameters_are_refused_by_name() {
    let model = repo().join("models/shakespeare-mamba");
    let m = model.to_str().unwrap();
    let no_tokenizer = fixtures_dir().join("mamba/hf_odd_tied");
    for (args, says) in [
        (
            vec!["--model", m, "--text", "a", "--temperature", "-1"],
            "temperature -1",
        ),
        (vec!["--model", m, "--text", "a", "--top-p", "0"], "top_p 0"),
        (
            vec!["--model", m, "--text", "a", "--top-p", "1.5"],
            "top_p 1.5",
        ),
        (
            vec!["--model", m, "--text", "a", "--max-tokens", "0"],
            "max_tokens must be at least 1",
        ),
        (vec!["--model", m, "--tokens", "1,99999"], "99999"),
        (
            vec!["--model", m, "--text", "a", "--stop-token", "4096"],
            "--stop-token 4096",
        ),
        (
            vec!["--model", no_tokenizer.to_str().unwrap(), "--text", "a"],
            "no tokenizer.json",
        ),
        (
            vec![
                "--model",
                no_tokenizer.to_str().unwrap(),
                "--tokens",
                "1",
                "--stop",
                "x",
            ],
            "stop strings need text",
        ),
    ] {
        let output = tideway().arg("generate").args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let err = stderr(&output);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn the_trained_models_give_the_reference_logits() {
    for name in ["shakespeare_mamba", "shakespeare_gla"] {
        let case = &cases().into_iter().find(|(n, _)| n == name).unwrap().1;
        let model = repo().join(case["model"].as_str().unwrap());
        let expected = fixtures_dir().join(format!("generation/{name}.logits.safetensors"));
        let ids = read_tensor(&expected, "input_ids");
        let tokens: Vec<String> = ids.values.iter().map(|v| (*v as u64).to_string()).collect();
        let want = read_tensor(&expected, "logits");
        let out = scratch_dir("trained").join("out.safetensors");
        let output = tideway()
            .args([
                "run",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                &tokens.join(","),
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let got = read_tensor(&out, "logits");
        assert_eq!(got.shape, want.shape);
        let err = relative_error(&got.values, &want.values);
        eprintln!(
            "{name}: relative error {err:.2e} over {} tokens",
            tokens.len()
        );
        assert!(err <= 1e-4, "{name}: relative error {err:.3e}");
    }
}
