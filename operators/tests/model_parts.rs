//! A model split into pipeline parts (embedding, contiguous layer ranges, head), each loaded on
//! its own, gives the reference logits: the residual stream handed from part to part (with a
//! ladder output still pending) continues exactly where the whole model would.

mod common;

use std::path::PathBuf;

use common::{fixture, laddered, reference_logits, relative_error};
use tideway_operators::models::{Model, ModelPart, SessionState, load_model, load_model_part};

fn language_fixtures() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for family in ["mamba", "fla", "ladder"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(fixture(family))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("expected.safetensors").exists())
            .collect();
        found.sort();
        dirs.extend(found);
    }
    dirs
}

/// Runs `tokens` through `parts` in order: the first embeds, each runs its layers, the last
/// runs the head. Two sessions at once (the sequence split in two different-length halves),
/// then each continues alone, so that both packing and state carry are exercised.
fn run_parts(parts: &[Model], tokens: &[u32]) -> Vec<f32> {
    let mut states: Vec<Vec<SessionState>> = parts.iter().map(|p| vec![p.new_state()]).collect();
    let mut logits = Vec::new();
    for chunk in [&tokens[..tokens.len() / 3], &tokens[tokens.len() / 3..]] {
        for rows in [&chunk[..1], &chunk[1..]] {
            if rows.is_empty() {
                continue;
            }
            let mut residual = parts[0].embed(rows).unwrap();
            for (part, part_states) in parts.iter().zip(&mut states) {
                let mut refs: Vec<&mut SessionState> = part_states.iter_mut().collect();
                residual = part
                    .forward_layers(residual, &[rows.len()], &mut refs)
                    .unwrap();
            }
            logits.extend_from_slice(parts.last().unwrap().head(residual).unwrap().data());
        }
    }
    logits
}

#[test]
fn every_split_of_every_fixture_gives_the_reference_logits() {
    let scratch = std::env::temp_dir().join(format!("tideway-parts-{}", std::process::id()));
    let mut dirs = language_fixtures();
    // A ladder-wired copy whose pending output crosses a stage boundary.
    dirs.push(laddered(
        &fixture("mamba/hf_bias_untied_k2"),
        serde_json::json!(2),
        &scratch,
    ));
    for dir in dirs {
        let whole = load_model(&dir).unwrap();
        let (tokens, want) = reference_logits(&dir);
        let layers = whole.num_layers();
        // The whole model, fed the same pieces.
        let whole_logits = run_parts(std::slice::from_ref(&whole), &tokens);
        for stages in 1..=4 {
            let parts: Vec<Model> = (0..stages)
                .map(|k| {
                    load_model_part(&dir, ModelPart::stage(k, stages, layers).unwrap()).unwrap()
                })
                .collect();
            let got = run_parts(&parts, &tokens);
            let vs_whole = relative_error(&got, &whole_logits);
            let vs_reference = relative_error(&got, &want);
            println!(
                "{} in {stages} parts: {vs_whole:.2e} vs the whole model, {vs_reference:.2e} vs the reference",
                dir.display()
            );
            assert!(vs_whole <= 1e-6, "{}: {vs_whole}", dir.display());
            // (The bf16 fixture's reference computed in bf16; the whole model's own test
            // holds it to its tolerance.)
            let bf16 = dir.to_string_lossy().contains("bf16");
            if !dir.starts_with(&scratch) && !bf16 {
                assert!(vs_reference <= 1e-4, "{}: {vs_reference}", dir.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_part_holds_only_its_weights_and_state() {
    let dir = fixture("fla/gla_basic");
    let whole = load_model(&dir).unwrap();
    let layers = whole.num_layers();
    assert!(layers >= 2);
    let parts: Vec<Model> = (0..2)
        .map(|k| load_model_part(&dir, ModelPart::stage(k, 2, layers).unwrap()).unwrap())
        .collect();
    // Layers are held once; the (tied) embedding is held by both ends, which need it.
    let sum: usize = parts.iter().map(Model::weight_bytes).sum();
    assert!(
        parts
            .iter()
            .all(|p| p.weight_bytes() < whole.weight_bytes())
    );
    assert!(sum >= whole.weight_bytes());
    let state_sum: usize = parts.iter().map(Model::state_bytes).sum();
    assert_eq!(state_sum, whole.state_bytes());
    // A middle part asked for an end it does not hold says so.
    let middle = load_model_part(
        &dir,
        ModelPart {
            layers: 1..2,
            embed: false,
            head: false,
        },
    )
    .unwrap();
    let err = middle.embed(&[1]).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not hold the model's embedding"),
        "{err}"
    );
    let residual = parts[0].embed(&[1]).unwrap();
    let err = middle.head(residual).unwrap_err();
    assert!(
        err.to_string().contains("does not hold the model's head"),
        "{err}"
    );
    // A part outside the model is refused by name.
    let err = load_model_part(
        &dir,
        ModelPart {
            layers: layers..layers + 1,
            embed: false,
            head: false,
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("not a part of a model"), "{err}");
}

#[test]
fn stages_cover_the_layers_in_order() {
    for layers in 1..9 {
        for stages in 1..=layers {
            let parts: Vec<ModelPart> = (0..stages)
                .map(|k| ModelPart::stage(k, stages, layers).unwrap())
                .collect();
            assert_eq!(parts[0].layers.start, 0);
            assert_eq!(parts.last().unwrap().layers.end, layers);
            for w in parts.windows(2) {
                assert_eq!(w[0].layers.end, w[1].layers.start);
                assert!(w[0].layers.len() >= w[1].layers.len());
                assert!(!w[1].layers.is_empty());
            }
            assert!(parts[0].embed && parts.last().unwrap().head);
        }
        // More stages than layers: the last ones hold none.
        let last = ModelPart::stage(layers, layers + 1, layers).unwrap();
        assert!(last.layers.is_empty() && last.head);
        assert!(ModelPart::stage(2, 2, layers).is_none());
    }
}
