//! The token pruner's graph providers against the reference implementations (SPEC-MODELS
//! §6.3: a provider is exact when its matrices times the values reproduce the layer's token
//! mixing). Mamba: the hidden-attention matrices of a mixer, applied to the conv's output, plus
//! the skip, gated by silu(z), equal what HF transformers' mixer hands its `out_proj`
//! (`tools/gen_prune_graph_fixtures.py`) on the mixer input HF recorded; DeciMamba's score
//! (a baseline) equals the norm of HF's Δ.

mod common;

use common::f32s;
use safetensors::SafeTensors;
use tideway_operators::checkpoint::Checkpoint;
use tideway_operators::models::mamba::mixer::{MambaMixer, MambaMixerConfig};
use tideway_operators::prune::zero_tprune::{ZeroTPrune, zero_tprune};

/// Layer `layer`'s mixer of the HF Mamba checkpoint in `dir`.
fn mixer(dir: &std::path::Path, layer: usize) -> MambaMixer {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| config[k].as_u64().unwrap() as usize;
    let mixer = MambaMixerConfig {
        d_model: get("hidden_size"),
        d_inner: get("intermediate_size"),
        d_state: get("state_size"),
        d_conv: get("conv_kernel"),
        dt_rank: get("time_step_rank"),
        bias: config["use_bias"].as_bool().unwrap(),
        conv_bias: config["use_conv_bias"].as_bool().unwrap_or(true),
    };
    let checkpoint = Checkpoint::open(dir).unwrap();
    MambaMixer::load(
        &checkpoint,
        &format!("backbone.layers.{layer}.mixer."),
        mixer,
    )
    .unwrap()
}

#[test]
fn mamba_hidden_attention_reproduces_the_reference_mixer() {
    let bytes = std::fs::read(common::fixture("prune/mamba_hidden_attention.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata.metadata().clone().unwrap();
    assert_eq!(cases.len(), 2);
    for (case, what) in cases {
        let (fixture, layer) = what.split_once(':').unwrap();
        let mixer = mixer(&common::fixture(fixture), layer.parse().unwrap());
        let attention = mixer.hidden_attention(&f32s(&file, &format!("{case}.mixer_in")));
        let want = f32s(&file, &format!("{case}.out_proj_in"));
        let got = attention.mix();
        let error = common::relative_error(&got, &want);
        // DeciMamba's score, ‖Δ_t‖ over channels, as HF's mixer computes Δ.
        let scores: Vec<f32> = mixer
            .delta_norms(&f32s(&file, &format!("{case}.mixer_in")))
            .iter()
            .map(|&s| s as f32)
            .collect();
        let want_scores: Vec<f32> = file
            .tensor(&format!("{case}.decimamba_score"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect();
        let score_error = common::relative_error(&scores, &want_scores);
        assert!(
            score_error <= 1e-5,
            "{case}: DeciMamba scores differ by {score_error:e}"
        );
        eprintln!("{case} ({what}): relative error {error:e}");
        assert!(error <= 1e-5, "{case} ({what}): relative error {error:e}");
        // Causal: nothing above the diagonal.
        let t = attention.tokens;
        assert!(
            (0..attention.channels)
                .all(|c| (0..t)
                    .all(|i| (i + 1..t).all(|j| attention.alpha[(c * t + i) * t + j] == 0.0))),
            "{case}: α above the diagonal"
        );
        // Its head graphs feed the pruner's causal form.
        let heads = 4;
        let graphs = attention.head_graphs(heads);
        let keys = vec![1.0f32; t];
        let config = ZeroTPrune {
            causal: true,
            iterations: 2,
            keep: t / 2,
            protected: vec![0, t - 1],
            ..ZeroTPrune::default()
        };
        let pruned = zero_tprune(&graphs, heads, &keys, 1, &config).unwrap();
        assert_eq!(pruned.kept.len(), t / 2, "{case}");
        assert!(pruned.kept.contains(&0) && pruned.kept.contains(&(t - 1)));
    }
}

#[test]
fn fla_head_matrices_reproduce_the_reference_heads() {
    // fla's GLA, RetNet, DeltaNet, Gated DeltaNet and linear-attention layers
    // (tools/gen_prune_graph_fixtures.py):
    // the per-head matrices of the layer's attention input, times the values, give the heads'
    // output that fla hands its output norm.
    use tideway_operators::models::{FlaLm, load_model};
    let bytes = std::fs::read(common::fixture("prune/fla_head_attention.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata.metadata().clone().unwrap();
    assert_eq!(cases.len(), 14);
    for (case, what) in cases {
        let (fixture, layer) = what.split_once(':').unwrap();
        let model = load_model(&common::fixture(fixture)).unwrap();
        let fla = model.as_family::<FlaLm>().unwrap();
        let attention = fla
            .head_attention(
                layer.parse().unwrap(),
                &f32s(&file, &format!("{case}.attn_in")),
            )
            .unwrap();
        let got = attention.mix();
        let want = f32s(&file, &format!("{case}.heads_out"));
        let error = common::relative_error(&got, &want);
        eprintln!("{case} ({what}): relative error {error:e}");
        assert!(error <= 1e-5, "{case} ({what}): relative error {error:e}");
        let t = attention.tokens;
        assert!(
            (0..attention.heads).all(|h| (0..t)
                .all(|i| (i + 1..t).all(|j| attention.matrices[(h * t + i) * t + j] == 0.0))),
            "{case}: A above the diagonal"
        );
    }
}
