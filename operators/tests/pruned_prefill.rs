//! Pruned prefills against the reference (SPEC-MODELS §6.3): `tools/gen_pruned_prefill.py`
//! ran HF transformers' Mamba and flash-linear-attention's GLA block by block with the numpy
//! Zero-TPrune oracle choosing each pruning layer's survivors from the reference's own
//! projections (Mamba's Δ, B and C; GLA's q, k and key gate); Tideway must keep the same
//! positions and give the same logits on them (≤ 1e-4), and a session going on from the pruned
//! state must generate the reference's greedy tokens with its logits. Pruning that keeps every
//! token equals the plain forward bit for bit, and settings a model cannot use are refused by
//! name.

mod common;

use std::path::PathBuf;

use common::{f32s, i64s};
use safetensors::SafeTensors;
use tideway_operators::models::load_model;
use tideway_operators::prune::prefill::PrefillPrune;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn a_pruned_prefill_keeps_the_oracles_tokens_and_gives_the_references_logits() {
    let bytes = std::fs::read(common::fixture("prune/pruned_prefill.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata.metadata().clone().unwrap();
    assert_eq!(cases.len(), 3);
    for (case, what) in cases {
        let (dir, spec) = what.split_once('|').unwrap();
        let model = load_model(&root().join(dir)).unwrap();
        let prune: PrefillPrune = spec.parse().unwrap();
        let positions = |name: &str| -> Vec<usize> {
            i64s(&file, &format!("{case}.{name}"))
                .into_iter()
                .map(|i| i as usize)
                .collect()
        };
        let ids: Vec<u32> = positions("ids").into_iter().map(|i| i as u32).collect();
        let pruned = model.prefill_pruned(&ids, &prune).unwrap();
        assert_eq!(
            pruned.kept,
            positions("kept"),
            "{case} ({dir}): kept positions"
        );
        assert_eq!(pruned.survivors, positions("survivors"));
        let want = f32s(&file, &format!("{case}.logits"));
        let error = common::relative_error(pruned.logits.data(), &want);
        eprintln!(
            "{case} ({dir}, {spec}): {} of {} tokens kept, logits relative error {error:e}",
            pruned.kept.len(),
            ids.len()
        );
        assert!(error <= 1e-4, "{case}: logits relative error {error:e}");
    }
}

/// A session going on from a pruned prefill (what `tideway serve` does with a pruned prompt):
/// the reference reran the prompt and each new token block by block, with the prompt's
/// survivors at each pruning layer and every new token; its greedy tokens and logits must
/// come from Tideway's pruned state stepped one token at a time.
#[test]
fn a_session_goes_on_from_its_pruned_state_as_the_reference_does() {
    let bytes = std::fs::read(common::fixture("prune/pruned_prefill.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    for (case, what) in metadata.metadata().clone().unwrap() {
        let (dir, spec) = what.split_once('|').unwrap();
        let model = load_model(&root().join(dir)).unwrap();
        let prune: PrefillPrune = spec.parse().unwrap();
        let ids: Vec<u32> = i64s(&file, &format!("{case}.ids"))
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let greedy: Vec<u32> = i64s(&file, &format!("{case}.greedy"))
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let want = f32s(&file, &format!("{case}.continued_logits"));
        let width = want.len() / (greedy.len() - 1);
        let mut pruned = model.prefill_pruned_hidden(&ids, &prune).unwrap();
        assert_eq!(pruned.state.position(), ids.len(), "{case}: position");
        let last = pruned.residual.len() - model.hidden_size();
        let first = model
            .head(tideway_operators::tensor_parallel::Residual {
                values: pruned.residual[last..].to_vec(),
                pending: None,
            })
            .unwrap();
        assert_eq!(argmax(first.data()), greedy[0], "{case}: first token");
        let mut got = Vec::new();
        for (step, &token) in greedy[..greedy.len() - 1].iter().enumerate() {
            let logits = model
                .forward_packed(&[token], &[1], &mut [&mut pruned.state])
                .unwrap();
            assert_eq!(
                argmax(logits.data()),
                greedy[step + 1],
                "{case}: token {step}"
            );
            got.extend_from_slice(logits.data());
        }
        assert_eq!(got.len(), want.len());
        assert_eq!(pruned.state.position(), ids.len() + greedy.len() - 1);
        let error = common::relative_error(&got, &want);
        eprintln!("{case} ({dir}): continued logits relative error {error:e} (width {width})");
        assert!(
            error <= 1e-4,
            "{case}: continued logits relative error {error:e}"
        );
    }
}

/// A session cannot go on from a pruned RetNet prompt (its rotary positions after a pruning
/// layer count the survivors): refused by name, while a GLA's and a Mamba's can.
#[test]
fn only_models_whose_positions_survive_pruning_start_sessions_from_a_pruned_prompt() {
    let setting: PrefillPrune = "layers=0,heads=1".parse().unwrap();
    let retnet = load_model(&common::fixture("fla/retnet_basic")).unwrap();
    retnet.prefill_pruned_hidden(&[1, 2, 3], &setting).unwrap();
    let e = retnet
        .check_session_pruning(&setting)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers") && e.contains("rotary"), "{e}");
    for dir in ["models/shakespeare-mamba", "models/shakespeare-gla"] {
        let model = load_model(&root().join(dir)).unwrap();
        model.check_session_pruning(&setting).unwrap();
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn keeping_every_token_is_the_plain_forward() {
    let model = load_model(&root().join("models/shakespeare-mamba")).unwrap();
    let ids: Vec<u32> = (0..150).map(|i| (i * 37 % 500) as u32).collect();
    let prune: PrefillPrune = "layers=1+4,keep=1".parse().unwrap();
    let pruned = model.prefill_pruned(&ids, &prune).unwrap();
    assert_eq!(pruned.kept, (0..150).collect::<Vec<_>>());
    let mut state = model.new_state();
    let plain = model
        .forward_packed(&ids, &[150], &mut [&mut state])
        .unwrap();
    assert_eq!(pruned.logits.data(), plain.data());
}

#[test]
fn settings_the_model_cannot_use_are_refused_by_name() {
    let model = load_model(&root().join("models/shakespeare-mamba")).unwrap();
    let ids = [1u32, 2, 3, 4];
    for (spec, names) in [
        ("layers=7", "layers"),
        ("layers=2,heads=5", "heads"),
        ("layers=2,policy=decimamba,keep=0.5,window=4", ""),
    ] {
        let prune: PrefillPrune = spec.parse().unwrap();
        match model.prefill_pruned(&ids, &prune) {
            Err(e) => assert!(
                !names.is_empty() && e.to_string().contains(names),
                "{spec}: {e}"
            ),
            Ok(_) => assert!(names.is_empty(), "{spec} was not refused"),
        }
    }
    // GLA's heads are the model's 4: the setting's heads group them.
    let gla = load_model(&root().join("models/shakespeare-gla")).unwrap();
    let three: PrefillPrune = "layers=1,heads=3".parse().unwrap();
    let e = gla.prefill_pruned(&ids, &three).unwrap_err().to_string();
    assert!(e.contains("heads"), "{e}");
    // Ladder-wired layers and a pipeline stage's part cannot prune.
    for dir in ["ladder/gla_ladder_last2", "ladder/mamba_ladder_all"] {
        let ladder = load_model(&common::fixture(dir)).unwrap();
        let e = ladder
            .prefill_pruned(&ids, &"layers=0,heads=1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ladder-wired"), "{dir}: {e}");
    }
    let part = tideway_operators::models::load_model_part(
        &root().join("models/shakespeare-mamba"),
        tideway_operators::models::ModelPart::stage(0, 2, 8).unwrap(),
    )
    .unwrap();
    let e = part
        .prefill_pruned(&ids, &"layers=1".parse().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole model"), "{e}");
    // DeltaNet prunes (its 2 heads grouped by 2), on its own fixture's input.
    let delta_net = load_model(&common::fixture("fla/delta_net_basic")).unwrap();
    let ids: Vec<u32> = (0..100).map(|i| (i * 7 % 50) as u32).collect();
    let setting = "layers=0,heads=2,keep=0.5,window=32,recent=4"
        .parse()
        .unwrap();
    let pruned = delta_net.prefill_pruned(&ids, &setting).unwrap();
    assert_eq!(pruned.kept.len(), 16 + 16 + 16 + 4);
    assert!(pruned.kept.contains(&0) && pruned.kept.ends_with(&[96, 97, 98, 99]));
}
