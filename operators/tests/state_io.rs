//! A session's state exported as named tensors and imported again continues bit for bit:
//! into the whole model, and into every pipeline split of it (each part takes the layers it
//! holds), for every language family's fixtures and for LMUFormer streams. A state of another
//! model is refused, naming the tensor at fault.

mod common;

use std::path::PathBuf;

use common::{fixture, reference_logits};
use tideway_operators::layers::frames::Frames;
use tideway_operators::models::{
    LmuFormer, Model, ModelPart, SessionState, load_lmuformer, load_lmuformer_part, load_model,
    load_model_part,
};
use tideway_operators::state_tensors::{StateError, StateTensors};

fn language_fixtures() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for family in ["mamba", "fla"] {
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

/// Runs `tokens` through `parts` (in order) from `states`; the logits.
fn run(parts: &[Model], states: &mut [SessionState], tokens: &[u32]) -> Vec<f32> {
    let mut residual = parts[0].embed(tokens).unwrap();
    for (part, state) in parts.iter().zip(states.iter_mut()) {
        residual = part
            .forward_layers(residual, &[tokens.len()], &mut [state])
            .unwrap();
    }
    parts
        .last()
        .unwrap()
        .head(residual)
        .unwrap()
        .data()
        .to_vec()
}

#[test]
fn an_exported_language_state_continues_bit_for_bit_in_any_split() {
    for dir in language_fixtures() {
        let whole = load_model(&dir).unwrap();
        let (tokens, _) = reference_logits(&dir);
        let (first, rest) = tokens.split_at(tokens.len() / 2);
        let mut state = whole.new_state();
        run(
            std::slice::from_ref(&whole),
            std::slice::from_mut(&mut state),
            first,
        );
        let mut exported = StateTensors::default();
        whole.export_state(&state, &mut exported);
        let want = run(std::slice::from_ref(&whole), &mut [state.clone()], rest);

        let layers = whole.num_layers();
        for stages in 1..=layers.min(3) {
            let parts: Vec<Model> = (0..stages)
                .map(|k| {
                    load_model_part(&dir, ModelPart::stage(k, stages, layers).unwrap()).unwrap()
                })
                .collect();
            let mut states: Vec<SessionState> = parts
                .iter()
                .map(|p| p.import_state(&exported).unwrap())
                .collect();
            assert!(states.iter().all(|s| s.position() == first.len()));
            let got = run(&parts, &mut states, rest);
            assert_eq!(got, want, "{} in {stages} parts", dir.display());
        }
    }
}

#[test]
fn another_models_state_is_refused_by_tensor() {
    let mamba = load_model(&fixture("mamba/hf_k4_sharded")).unwrap();
    let gla = load_model(&fixture("fla/gla_basic")).unwrap();
    let mut exported = StateTensors::default();
    mamba.export_state(&mamba.new_state(), &mut exported);
    let e = gla.import_state(&exported).unwrap_err();
    assert!(matches!(e, StateError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("layers.0."), "{e}");
    // The same family with other widths: a size mismatch, named.
    let other = load_model(&fixture("mamba/hf_bias_untied_k2")).unwrap();
    let e = other.import_state(&exported).unwrap_err();
    assert!(matches!(e, StateError::Shape { .. }), "{e}");
}

fn lmu(name: &str) -> PathBuf {
    fixture("lmu").join(name).join("checkpoint")
}

fn frames(count: usize, width: usize, seed: u64) -> Frames {
    let mut x = seed;
    let data = (0..count * width)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect();
    Frames {
        data,
        width,
        counts: vec![count],
    }
}

#[test]
fn an_exported_lmuformer_stream_continues_bit_for_bit_in_any_split() {
    for name in ["lmu_d32_c16", "slmu_d40_c24_depth2_prefixed"] {
        let whole = load_lmuformer(&lmu(name)).unwrap();
        let c = whole.in_channels();
        let depths = whole.config().depths;
        let mut state = whole.new_state();
        whole
            .forward(&mut [&mut state], &frames(37, c, 1), &[false])
            .unwrap();
        let mut exported = StateTensors::default();
        whole.export_state(&state, &mut exported);
        let rest = frames(29, c, 2);
        let want = whole
            .forward(&mut [&mut state.clone()], &rest, &[true])
            .unwrap();
        for stages in 1..=depths + 1 {
            let parts: Vec<LmuFormer> = (0..stages)
                .map(|k| {
                    load_lmuformer_part(&lmu(name), ModelPart::stage(k, stages, depths).unwrap())
                        .unwrap()
                })
                .collect();
            let mut x = rest.clone();
            for part in &parts {
                let mut s = part.import_state(&exported).unwrap();
                x = part.forward(&mut [&mut s], &x, &[true]).unwrap();
            }
            assert_eq!(x.data, want.data, "{name} in {stages} parts");
        }
    }
}

/// Blobs written from the format's description by an independent writer
/// (`tools/gen_state_blob_seeds.py`, also the `state_blob` fuzz target's seeds).
fn seed(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/state_blob")
            .join(name),
    )
    .unwrap()
}

#[test]
fn blobs_written_from_the_format_description_are_read_and_checked() {
    use tideway_operators::state_blob::{BlobError, decode};
    let model = load_model(&fixture("mamba/hf_k4_sharded")).unwrap();
    let snapshot = decode(&seed("mamba_k4.safetensors")).unwrap();
    assert_eq!((snapshot.chunks, snapshot.position), (3, 7));
    assert_eq!(snapshot.model, "hf_k4_sharded");
    let state = model.import_state(&snapshot.tensors).unwrap();
    assert_eq!(state.position(), 7);
    let mut again = StateTensors::default();
    model.export_state(&state, &mut again);
    for (name, value) in &again.0 {
        assert_eq!(Some(value), snapshot.tensors.0.get(name), "{name}");
    }
    assert!(matches!(
        decode(&seed("mamba_k4_bad_crc.safetensors")),
        Err(BlobError::Checksum { .. })
    ));
    let short = decode(&seed("mamba_k4_short_tensor.safetensors")).unwrap();
    let e = model.import_state(&short.tensors).unwrap_err();
    assert!(e.to_string().contains("layers.0.ssm"), "{e}");
}
