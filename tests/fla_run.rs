//! `tideway run` against flash-linear-attention's own model classes on every committed fla
//! fixture (tests/fixtures/fla/*, written by tools/gen_fla_fixtures.py), in both forms.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fla_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join("fla"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 4,
        "expected the committed fla fixtures, found {dirs:?}"
    );
    dirs
}

fn run_logits(model: &Path, tokens: &str, extra: &[&str]) -> Loaded {
    let out = scratch_dir("fla-run").join("out.safetensors");
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
        "{}: {}",
        model.display(),
        stderr(&output)
    );
    read_tensor(&out, "logits")
}

#[test]
fn run_matches_fla_on_every_fixture_in_both_modes() {
    for dir in fla_fixtures() {
        let expected = dir.join("expected.safetensors");
        let ids = read_tensor(&expected, "input_ids");
        let tokens = ids
            .values
            .iter()
            .map(|v| (*v as u64).to_string())
            .collect::<Vec<_>>()
            .join(",");
        let want = read_tensor(&expected, "logits");
        for extra in [
            &["--mode", "chunked"][..],
            &["--mode", "recurrent"][..],
            // Prefill chunks of 50 rows: the 64-row chunks of the chunkwise form start at
            // other places than fla's.
            &["--mode", "chunked", "--chunk", "50"][..],
        ] {
            let got = run_logits(&dir, &tokens, extra);
            assert_eq!(got.shape, want.shape);
            let err = relative_error(&got.values, &want.values);
            eprintln!("{} {extra:?}: relative error {err:.2e}", dir.display());
            assert!(
                err <= 1e-4,
                "{} {extra:?}: relative error {err:.3e}",
                dir.display()
            );
        }
    }
}

#[test]
fn unsupported_fla_options_are_refused_by_name() {
    let src = fixtures_dir().join("fla/gla_basic");
    for (key, value, needle) in [
        (
            "attn",
            "{\"layers\": [1], \"num_heads\": 2}",
            "option \"attn\"",
        ),
        ("use_gv", "true", "use_gv"),
        ("feature_map", "\"dpfp\"", "feature_map \"dpfp\""),
        ("hidden_act", "\"gelu\"", "hidden_act \"gelu\""),
    ] {
        let dir = scratch_dir("fla-unsupported");
        copy_dir(&src, &dir);
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config[key] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let out = dir.join("out.safetensors");
        let output = tideway()
            .args(["run", "--model"])
            .arg(&dir)
            .args(["--tokens", "1,2", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key} must be refused");
        let message = stderr(&output);
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
}
