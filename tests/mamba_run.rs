//! `tideway run` against HF transformers' logits on every committed Mamba fixture
//! (tests/fixtures/mamba/*, written by tools/gen_mamba_fixtures.py), in both forms, and its
//! errors on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn mamba_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join("mamba"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "expected the committed Mamba fixtures, found {dirs:?}"
    );
    dirs
}

fn fixture_tokens(dir: &Path) -> String {
    let ids = read_tensor(&dir.join("expected.safetensors"), "input_ids");
    ids.values
        .iter()
        .map(|v| (*v as u64).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `tideway run --model MODEL --tokens TOKENS --out OUT EXTRA…`, to be run.
fn run_tokens(model: &Path, tokens: &str, out: &Path, extra: &[&str]) -> Command {
    let mut command = tideway();
    command
        .args(["run", "--model"])
        .arg(model)
        .args(["--tokens", tokens, "--out"])
        .arg(out)
        .args(extra);
    command
}

/// Runs `tideway run` and returns the logits it wrote.
fn run_logits(model: &Path, tokens: &str, extra: &[&str]) -> Loaded {
    let out = scratch_dir("run").join("out.safetensors");
    let output = run_tokens(model, tokens, &out, extra).output().unwrap();
    assert!(
        output.status.success(),
        "tideway run {extra:?} on {} failed: {}",
        model.display(),
        stderr(&output)
    );
    read_tensor(&out, "logits")
}

#[test]
fn run_matches_hf_transformers_on_every_fixture_in_both_modes() {
    for dir in mamba_fixtures() {
        let expected_path = dir.join("expected.safetensors");
        let tokens = fixture_tokens(&dir);
        let want = read_tensor(&expected_path, "logits");
        let bf16 = dir.file_name().unwrap().to_string_lossy().contains("bf16");
        for extra in [
            &["--mode", "chunked"][..],
            &["--mode", "recurrent"][..],
            &["--mode", "chunked", "--chunk", "3"][..],
        ] {
            let got = run_logits(&dir, &tokens, extra);
            assert_eq!(got.shape, want.shape, "{}: logits shape", dir.display());
            let err = relative_error(&got.values, &want.values);
            let limit = if bf16 { 1e-2 } else { 1e-4 };
            eprintln!("{} {extra:?}: relative error {err:.2e}", dir.display());
            assert!(
                err <= limit,
                "{} {extra:?}: relative error {err:.3e} > {limit:e}",
                dir.display()
            );
            if bf16 {
                // The same bf16 weights computed in f32 by HF: the strict bound applies.
                let exact = read_tensor(&expected_path, "logits_f32_compute");
                let err = relative_error(&got.values, &exact.values);
                assert!(
                    err <= 1e-4,
                    "{} {extra:?}: vs f32 compute {err:.3e}",
                    dir.display()
                );
            }
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("mamba").join(name)
}

/// Runs `tideway run` expecting failure; returns stderr.
fn run_fails(model: &Path, tokens: &str) -> String {
    let out = scratch_dir("fail").join("out.safetensors");
    let output = run_tokens(model, tokens, &out, &[]).output().unwrap();
    assert!(!output.status.success(), "expected failure, got success");
    assert!(!out.exists(), "no output may be written on failure");
    stderr(&output)
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "message lacks {part:?}:\n{message}");
    }
}

#[test]
fn missing_config_is_reported() {
    let dir = scratch_dir("noconfig");
    copy_dir(&fixture("hf_odd_tied"), &dir);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &["no config.json", &dir.display().to_string()],
    );
}

#[test]
fn malformed_config_is_reported() {
    let dir = scratch_dir("badjson");
    copy_dir(&fixture("hf_odd_tied"), &dir);
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"mamba\", \"hidden_size\": 37,",
    )
    .unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &["malformed config.json", "config.json"],
    );

    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba", "hidden_size": "wide", "num_hidden_layers": 2, "vocab_size": 61}"#).unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &["\"hidden_size\"", "positive integer", "\"wide\""],
    );

    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "mamba", "num_hidden_layers": 2, "vocab_size": 61}"#,
    )
    .unwrap();
    assert_mentions(&run_fails(&dir, "1,2"), &["missing key \"hidden_size\""]);
}

#[test]
fn unknown_model_type_is_reported() {
    let dir = scratch_dir("unknowntype");
    copy_dir(&fixture("hf_odd_tied"), &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"mamba\"", "\"llama\""),
    )
    .unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &["unknown model_type \"llama\"", "supported: \"mamba\""],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_dir("missingtensor");
    copy_dir(&fixture("hf_odd_tied"), &dir);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "backbone.layers.1.mixer.x_proj.weight")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    drop(file);
    std::fs::write(&path, out).unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &["\"backbone.layers.1.mixer.x_proj.weight\"", "missing"],
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let dir = scratch_dir("shape");
    copy_dir(&fixture("hf_odd_tied"), &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    // The checkpoint's state size is 5; claim 6.
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"state_size\": 5", "\"state_size\": 6"),
    )
    .unwrap();
    assert_mentions(
        &run_fails(&dir, "1,2"),
        &[
            "\"backbone.layers.0.mixer.A_log\"",
            "shape [74, 5]",
            "expected [74, 6]",
        ],
    );
}

#[test]
fn token_out_of_range_is_reported() {
    // hf_odd_tied has 61 ids.
    assert_mentions(
        &run_fails(&fixture("hf_odd_tied"), "1,2,61"),
        &["token id 61 at position 2", "61 ids", "0..=60"],
    );
    // The original layout pads 53 ids to 56 rows; ids 53..55 are padding, not input.
    assert_mentions(
        &run_fails(&fixture("ssm_original"), "53"),
        &["token id 53", "53 ids"],
    );
    assert_mentions(
        &run_fails(&fixture("hf_odd_tied"), "1,x"),
        &["\"x\"", "not a token id"],
    );
    assert_mentions(&run_fails(&fixture("hf_odd_tied"), ""), &["empty input"]);
}

#[test]
fn missing_model_dir_is_reported() {
    let dir = scratch_dir("gone").join("nothing-here");
    assert_mentions(&run_fails(&dir, "1"), &["nothing-here is not a directory"]);
}

#[test]
fn unsupported_state_spaces_variants_are_refused_by_name() {
    let dir = scratch_dir("mamba2");
    copy_dir(&fixture("ssm_original"), &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"d_state\": 7", "\"d_state\": 7, \"layer\": \"Mamba2\""),
    )
    .unwrap();
    assert_mentions(
        &run_fails(&dir, "1"),
        &["ssm_cfg.layer \"Mamba2\" is not supported"],
    );
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"rms_norm\": true", "\"rms_norm\": false"),
    )
    .unwrap();
    assert_mentions(&run_fails(&dir, "1"), &["rms_norm false", "not supported"]);
}

#[test]
fn bench_json_reports_every_measurement() {
    let output = tideway()
        .args([
            "--threads",
            "2",
            "bench",
            "--json",
            "--seconds",
            "0.05",
            "--prefill-tokens",
            "64",
            "--model",
        ])
        .arg(fixture("hf_k4_sharded"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON object");
    let decode = report["decode"].as_array().unwrap();
    let batches: Vec<u64> = decode
        .iter()
        .map(|d| d["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [1, 8, 32]);
    for d in decode {
        assert!(d["tokens_per_s"].as_f64().unwrap() > 0.0 && d["steps"].as_u64().unwrap() >= 5);
    }
    assert_eq!(report["prefill"][0]["tokens"], 64);
    assert!(report["prefill"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(report["threads"], 2);
    // Two layers of [E=96] × (K=4 + N=16) f32 values.
    assert_eq!(report["state_bytes_per_session"], 2 * 96 * 20 * 4);
}

#[test]
fn run_text_tokenizes_with_the_checkpoint_tokenizer() {
    // A Mamba over a byte-level BPE vocabulary with its tokenizer.json (tests/fixtures/text,
    // tools/gen_text_fixtures.py): `--text` must give HF's logits for the ids the Python
    // tokenizer makes of the text.
    let dir = fixtures_dir().join("text");
    let text = std::fs::read_to_string(dir.join("mamba_bpe.text.txt")).unwrap();
    let expected = dir.join("mamba_bpe.expected.safetensors");
    let out = scratch_dir("run-text").join("out.safetensors");
    let output = tideway()
        .args(["run", "--model"])
        .arg(dir.join("mamba_bpe"))
        .args(["--text", &text, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let (got, want) = (
        read_tensor(&out, "logits"),
        read_tensor(&expected, "logits"),
    );
    assert_eq!(got.shape, want.shape);
    let err = relative_error(&got.values, &want.values);
    eprintln!("--text: relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err:.3e}");
    // A checkpoint without a tokenizer.json.
    let output = tideway()
        .args(["run", "--model"])
        .arg(fixtures_dir().join("mamba/hf_odd_tied"))
        .args(["--text", "hello", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        stderr(&output).contains("has no tokenizer.json: give token ids with --tokens"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_prune_keeps_the_oracles_tokens_from_the_flag_or_the_config_block() {
    // Case 0 of tests/fixtures/prune/pruned_prefill.safetensors (tools/gen_pruned_prefill.py):
    // HF's Mamba pruned by the numpy Zero-TPrune oracle after layer 0.
    let fixture = fixtures_dir().join("prune/pruned_prefill.safetensors");
    let ids = read_tensor(&fixture, "case0.ids");
    let tokens: Vec<String> = ids.values.iter().map(|v| (*v as u64).to_string()).collect();
    let tokens = tokens.join(",");
    let want_kept = read_tensor(&fixture, "case0.kept").values;
    let want_logits = read_tensor(&fixture, "case0.logits");
    let spec = "layers=0,keep=0.5,window=24,recent=5,heads=4,similar=0.1";
    let model = fixture_dir_copy("hf_k4_sharded");
    let check = |extra: &[&str], what: &str| {
        let out = scratch_dir("run-prune").join("out.safetensors");
        let output = run_tokens(&model, &tokens, &out, extra).output().unwrap();
        assert!(output.status.success(), "{what}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("kept 35 of 70 tokens (50.0%)"),
            "{what}: {}",
            stderr(&output)
        );
        assert_eq!(read_tensor(&out, "kept").values, want_kept, "{what}");
        let got = read_tensor(&out, "logits");
        assert_eq!(got.shape, want_logits.shape, "{what}");
        let err = relative_error(&got.values, &want_logits.values);
        assert!(err <= 1e-4, "{what}: relative error {err:e}");
    };
    check(&["--prune", spec], "--prune");
    // The same setting as config.json's tideway_prune block.
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["tideway_prune"] = serde_json::json!({
        "layers": [0], "keep": 0.5, "window": 24, "recent": 5, "heads": 4, "similar": 0.1
    });
    std::fs::write(&config_path, config.to_string()).unwrap();
    check(&[], "config block");
    // `--prune off` ignores the block: every position's logits.
    assert_eq!(
        run_logits(&model, &tokens, &["--prune", "off"]).shape,
        vec![70, 64]
    );
    // Bad settings are refused by name, from the flag and from the block.
    let out = scratch_dir("run-prune-bad").join("out.safetensors");
    for (extra, names) in [
        (vec!["--prune", "keep=1.5"], "keep"),
        (vec!["--prune", "layers=1"], "layers"),
        (vec!["--prune", "heads=5,layers=0"], "heads"),
    ] {
        let output = run_tokens(&model, &tokens, &out, &extra).output().unwrap();
        assert!(!output.status.success(), "{extra:?} was not refused");
        assert!(
            stderr(&output).contains(names),
            "{extra:?}: {}",
            stderr(&output)
        );
    }
    config["tideway_prune"] = serde_json::json!({ "window": 1 });
    std::fs::write(&config_path, config.to_string()).unwrap();
    let message = run_fails(&model, &tokens);
    assert_mentions(&message, &["tideway_prune.window", "config.json"]);
}

/// A copy of a Mamba fixture directory that a test may change.
fn fixture_dir_copy(name: &str) -> PathBuf {
    let copy = scratch_dir(name);
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    copy
}

/// `--dtype bf16|int8` on the CPU: the trained Mamba's logits stay near f32's (the
/// agreement thresholds are `operators/tests/weight_formats.rs`'s; here the command line's
/// plumbing), the same predictions at nearly every position; with --tensor-parallel the
/// formats are refused by name.
#[test]
fn run_dtype_keeps_the_linear_layers_in_bf16_or_int8() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shakespeare-mamba");
    let tokens: String = (0..200)
        .map(|i| ((i * 37 + 11) % 500).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let reference = run_logits(&model, &tokens, &[]);
    let vocab = reference.shape[1];
    let argmax = |row: &[f64]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    for dtype in ["bf16", "int8"] {
        let got = run_logits(&model, &tokens, &["--dtype", dtype]);
        assert_eq!(got.shape, reference.shape);
        assert_ne!(
            got.values, reference.values,
            "{dtype}: bit-identical to f32"
        );
        let same = got
            .values
            .chunks_exact(vocab)
            .zip(reference.values.chunks_exact(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        assert!(same >= 190, "{dtype}: {same} of 200 predictions agree");
    }
    let out = scratch_dir("run-dtype").join("out.safetensors");
    let output = tideway()
        .args(["run", "--model"])
        .arg(&model)
        .args([
            "--tokens",
            "1,2,3",
            "--dtype",
            "int8",
            "--tensor-parallel",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_mentions(&stderr(&output), &["--dtype int8", "--tensor-parallel"]);
}

/// `TIDEWAY_SIMD` caps the kernels' instruction set (kernels/src/cpu.rs): a run capped at
/// AVX2 or at plain Rust gives HF's logits too; a cap without AVX2 refuses int8 weights by
/// name; a value it does not take is an error at start, before anything loads.
#[test]
fn simd_cap_runs_the_narrower_paths_and_refuses_bad_values() {
    let dir = fixture("hf_odd_tied");
    let tokens = fixture_tokens(&dir);
    let want = read_tensor(&dir.join("expected.safetensors"), "logits");
    for cap in ["avx2", "portable"] {
        let out = scratch_dir("simd").join("out.safetensors");
        let run = |extra: &[&str]| {
            run_tokens(&dir, &tokens, &out, extra)
                .env("TIDEWAY_SIMD", cap)
                .output()
                .unwrap()
        };
        let output = run(&[]);
        assert!(output.status.success(), "{cap}: {}", stderr(&output));
        let got = read_tensor(&out, "logits");
        let err = relative_error(&got.values, &want.values);
        eprintln!("TIDEWAY_SIMD={cap}: relative error {err:.2e}");
        assert!(err <= 1e-4, "TIDEWAY_SIMD={cap}: relative error {err:.3e}");
        if cap == "portable" {
            let output = run(&["--dtype", "int8"]);
            assert!(!output.status.success());
            assert_mentions(
                &stderr(&output),
                &["Int8 weights on the CPU need AVX2", "portable"],
            );
        }
    }
    let output = tideway()
        .env("TIDEWAY_SIMD", "sse2")
        .arg("devices")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_mentions(
        &stderr(&output),
        &["TIDEWAY_SIMD=\"sse2\": expected amx, avx512, avxvnni, avx2 or portable"],
    );
}
