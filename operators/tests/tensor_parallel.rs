//! Tensor parallelism: every family's model split over 2 and 4 ranks (threads sharing memory,
//! and ranks joined by the TCP ring on loopback) gives the single-worker logits, in the
//! chunked form (a 70-token prefill, two chunks of the linear-attention kernels) and the
//! recurrent form (decode steps after it), with standard and ladder wiring. Each rank reads
//! only its slices: its split weights are 1/tp of the whole.

mod common;

use std::path::Path;

use common::{fixture, laddered, reference_logits, relative_error};

use tideway_kernels::collective::{Collective, TcpRank, ThreadGroup};
use tideway_operators::LogitRows;
use tideway_operators::checkpoint::{Checkpoint, TensorShard};
use tideway_operators::layers::mlp::{GatedMlp, default_intermediate};
use tideway_operators::models::fla::fla_lm_split;
use tideway_operators::models::{Model, load_model, load_model_rank};
use tideway_operators::tensor_parallel::Group;

/// (fixture, tensor-parallel sizes its heads / channels divide into)
const MODELS: [(&str, &[usize]); 9] = [
    ("mamba/hf_bias_untied_k2", &[2, 4]),
    ("mamba/hf_k4_sharded", &[2, 4]),
    ("mamba/hf_bf16", &[2, 4]),
    ("fla/gla_legacy_fused_mlp", &[2, 4]),
    ("fla/gla_kv_heads_relu_clamp", &[2]),
    ("fla/retnet_basic", &[2, 4]),
    ("fla/delta_net_relu_sum_gate_negeig", &[2, 4]),
    ("fla/gated_deltanet_basic", &[2]),
    ("fla/linear_attn_hedgehog_normalized", &[2, 4]),
];

const PREFILL: usize = 70;
const STEPS: usize = 3;

fn tokens(vocab: usize) -> Vec<u32> {
    (0..PREFILL + STEPS)
        .map(|i| ((i * 7 + 3) % vocab) as u32)
        .collect()
}

/// Logits of the prefill then of each decode step, as rank `group.rank()` of the group.
fn run_rank(model: &Model, group: &mut Group<'_>) -> Vec<Vec<f32>> {
    let ids = tokens(model.vocab_size());
    let mut state = model.new_state();
    let mut out = Vec::new();
    let (prefill, steps) = ids.split_at(PREFILL);
    let logits = model
        .forward_in_group(
            prefill,
            &[PREFILL],
            &mut [&mut state],
            group,
            LogitRows::All,
        )
        .unwrap()
        .unwrap();
    out.push(logits.into_vec());
    for t in steps {
        let logits = model
            .forward_in_group(&[*t], &[1], &mut [&mut state], group, LogitRows::All)
            .unwrap()
            .unwrap();
        out.push(logits.into_vec());
    }
    out
}

fn single(dir: &Path) -> Vec<Vec<f32>> {
    let model = load_model(dir).unwrap();
    let mut solo = tideway_kernels::collective::Solo;
    run_rank(&model, &mut Group::new(&mut solo))
}

/// Every rank's outputs, each rank on its own thread with its own shard.
fn group_run(dir: &Path, members: Vec<Box<dyn Collective>>) -> Vec<Vec<Vec<f32>>> {
    let size = members.len();
    let whole = load_model(dir).unwrap().weight_bytes();
    std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .into_iter()
            .map(|mut member| {
                scope.spawn(move || {
                    let model = load_model_rank(dir, member.rank(), size).unwrap();
                    assert!(model.weight_bytes() < whole, "a rank holds a slice");
                    run_rank(&model, &mut Group::new(member.as_mut()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn threads(size: usize) -> Vec<Box<dyn Collective>> {
    ThreadGroup::new(size)
        .members()
        .into_iter()
        .map(|m| Box::new(m) as Box<dyn Collective>)
        .collect()
}

/// A TCP ring on loopback, one rank per member.
fn tcp(size: usize) -> Vec<Box<dyn Collective>> {
    let listeners: Vec<std::net::TcpListener> = (0..size)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<std::net::SocketAddr> =
        listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || TcpRank::connect(rank, l, &peers).unwrap())
        })
        .collect();
    handles
        .into_iter()
        .map(|h| Box::new(h.join().unwrap()) as Box<dyn Collective>)
        .collect()
}

fn check_against_single(dir: &Path, sizes: &[usize], what: &str) {
    let want = single(dir);
    for &size in sizes {
        for (transport, members) in [("threads", threads(size)), ("tcp", tcp(size))] {
            for (rank, got) in group_run(dir, members).iter().enumerate() {
                for (pass, (g, w)) in got.iter().zip(&want).enumerate() {
                    let rel = relative_error(g, w);
                    assert!(
                        rel <= 1e-5,
                        "{what} tp {size} over {transport}, rank {rank}, pass {pass}: relative error {rel:.3e}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_family_split_over_ranks_equals_the_single_worker() {
    for (name, sizes) in MODELS {
        check_against_single(&fixture(name), sizes, name);
    }
}

#[test]
fn ladder_wired_models_split_over_ranks_equal_their_single_worker_forward() {
    let scratch = std::env::temp_dir().join(format!("tideway-ladder-tp-{}", std::process::id()));
    for (name, ladder) in [
        ("mamba/hf_bias_untied_k2", serde_json::json!(2)),
        ("fla/gla_legacy_fused_mlp", serde_json::json!(3)),
        ("fla/delta_net_relu_sum_gate_negeig", serde_json::json!([1])),
    ] {
        let dir = laddered(&fixture(name), ladder.clone(), &scratch);
        // The wiring changes the function: the ladder model is not the standard one.
        let (plain, ladder_out) = (single(&fixture(name)), single(&dir));
        assert!(relative_error(&ladder_out[0], &plain[0]) > 1e-3, "{name}");
        check_against_single(&dir, &[2, 4], &format!("{name} ladder {ladder}"));
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The ladder fixtures (tools/gen_ladder_fixtures.py): the reference models' modules with the
/// residual adds rewired as SPEC-MODELS.md §5.1 states. Tideway's ladder wiring reproduces
/// their logits in the chunked form (the whole sequence at once), the recurrent form (one
/// token at a time) and split over 2 and 4 ranks.
#[test]
fn ladder_fixtures_match_the_reference_ladder_forward_in_both_forms() {
    for name in ["ladder/gla_ladder_last2", "ladder/mamba_ladder_all"] {
        let dir = fixture(name);
        let (ids, want) = reference_logits(&dir);
        let model = load_model(&dir).unwrap();
        assert!(model.ladder_layers().iter().any(|&l| l), "{name}");
        let mut state = model.new_state();
        let chunked = model
            .forward_packed(&ids, &[ids.len()], &mut [&mut state])
            .unwrap();
        let mut state = model.new_state();
        let mut recurrent = Vec::new();
        for t in &ids {
            recurrent.extend_from_slice(model.step(&[*t], &mut [&mut state]).unwrap().data());
        }
        for (form, got) in [("chunked", chunked.data()), ("recurrent", &recurrent[..])] {
            let rel = relative_error(got, &want);
            assert!(rel <= 1e-4, "{name} {form}: relative error {rel:.3e}");
            eprintln!(
                "{name} {form}: relative error {rel:.2e} against the reference ladder forward"
            );
        }
        check_against_single(&dir, &[2, 4], name);
    }
}

#[test]
fn a_rank_holds_its_slice_of_the_mlp() {
    // gla_legacy_fused_mlp stores the pre-2025 fused gate_proj [2I, D].
    for name in ["fla/gla_basic", "fla/gla_legacy_fused_mlp"] {
        let (hidden, intermediate) = (32, default_intermediate(32, 2));
        let prefix = "model.layers.1.mlp.";
        let mut checkpoint = Checkpoint::open(&fixture(name)).unwrap();
        let whole = GatedMlp::load(&checkpoint, prefix, hidden, intermediate).unwrap();
        for tp in [2, 4] {
            for rank in 0..tp {
                checkpoint.set_shard(Some(TensorShard {
                    rank,
                    size: tp,
                    split: fla_lm_split,
                }));
                let shard = GatedMlp::load(&checkpoint, prefix, hidden, intermediate / tp).unwrap();
                assert_eq!(shard.size_bytes() * tp, whole.size_bytes(), "{name}");
            }
        }
        checkpoint.set_shard(None);
    }
}

#[test]
fn sizes_that_do_not_divide_the_heads_are_refused_by_name() {
    let err = load_model_rank(&fixture("fla/gated_deltanet_basic"), 0, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("num_heads = 2 does not divide into 4"),
        "{err}"
    );
    let err = load_model_rank(&fixture("mamba/hf_odd_tied"), 1, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("d_inner) = 74 does not divide into 4"),
        "{err}"
    );
}
