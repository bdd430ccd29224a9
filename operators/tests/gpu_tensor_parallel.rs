//! Tensor parallelism of the GPU models on the host emulator: every family split over 2 and 4
//! GPU ranks (threads, each with its own emulated GPU, reductions host-staged over the
//! in-process group) gives the CPU single worker's logits, in the chunked form (a 70-token
//! prefill in 8-row time chunks) and the recurrent form; ladder-wired models, and the ladder
//! reference fixtures, likewise. NCCL's device path needs a GPU: `tools/gpu_check.sh`.
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use common::{fixture, laddered, reference_logits, relative_error};

use tideway_kernels::collective::{Collective, ThreadGroup};
use tideway_kernels::gpu::collective::HostStaged;
use tideway_kernels::gpu::{Gpu, WeightDtype};
use tideway_operators::LogitRows;
use tideway_operators::gpu::tensor_parallel::DeviceGroup;
use tideway_operators::gpu::{GpuModel, load_gpu_model, load_gpu_model_rank};
use tideway_operators::models::load_model;

/// (fixture, tensor-parallel sizes its heads / channels divide into)
const MODELS: [(&str, &[usize]); 7] = [
    ("mamba/hf_bias_untied_k2", &[2, 4]),
    ("mamba/hf_k4_sharded", &[2]),
    ("fla/gla_legacy_fused_mlp", &[2, 4]),
    ("fla/retnet_basic", &[2, 4]),
    ("fla/delta_net_relu_sum_gate_negeig", &[2]),
    ("fla/gated_deltanet_basic", &[2]),
    ("fla/linear_attn_hedgehog_normalized", &[2]),
];

const PREFILL: usize = 70;
const STEPS: usize = 3;

fn tokens(vocab: usize) -> Vec<u32> {
    (0..PREFILL + STEPS)
        .map(|i| ((i * 7 + 3) % vocab) as u32)
        .collect()
}

/// The CPU single worker's logits: the prefill, then each decode step.
fn cpu_single(dir: &Path) -> Vec<Vec<f32>> {
    let model = load_model(dir).unwrap();
    let ids = tokens(model.vocab_size());
    let mut state = model.new_state();
    let (prefill, steps) = ids.split_at(PREFILL);
    let mut out = vec![
        model
            .forward_packed(prefill, &[PREFILL], &mut [&mut state])
            .unwrap()
            .into_vec(),
    ];
    for t in steps {
        out.push(model.step(&[*t], &mut [&mut state]).unwrap().into_vec());
    }
    out
}

/// The same passes on one GPU rank of a group; the prefill in 8-row time chunks.
fn gpu_rank(model: &mut GpuModel, group: &mut DeviceGroup<'_>) -> Vec<Vec<f32>> {
    model.set_scan_chunk(8);
    let ids = tokens(model.vocab_size());
    let mut session = model.new_session().unwrap();
    let (prefill, steps) = ids.split_at(PREFILL);
    let mut out = Vec::new();
    for part in [prefill].into_iter().chain(steps.chunks(1)) {
        let logits = model
            .forward_in_group(
                part,
                &[part.len()],
                &mut [&mut session],
                group,
                LogitRows::All,
            )
            .unwrap()
            .unwrap();
        out.push(logits.into_vec());
    }
    out
}

/// Every rank's outputs, each rank a thread with its own emulated GPU and shard.
fn gpu_group_run(dir: &Path, size: usize) -> Vec<Vec<Vec<f32>>> {
    let whole = load_gpu_model(dir, Gpu::emulated(), WeightDtype::F32, 2)
        .unwrap()
        .weight_bytes();
    std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadGroup::new(size)
            .members()
            .into_iter()
            .enumerate()
            .map(|(rank, member)| {
                scope.spawn(move || {
                    let mut model =
                        load_gpu_model_rank(dir, Gpu::emulated(), WeightDtype::F32, 2, rank, size)
                            .unwrap();
                    assert!(
                        size == 1 || model.weight_bytes() < whole,
                        "a rank holds a slice"
                    );
                    let mut staged = HostStaged(Box::new(member) as Box<dyn Collective>);
                    gpu_rank(&mut model, &mut DeviceGroup::new(&mut staged))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check_group_against(want: &[Vec<f32>], dir: &Path, sizes: &[usize], what: &str) {
    for &size in sizes {
        let ranks = gpu_group_run(dir, size);
        let mut worst = 0.0f64;
        for (rank, got) in ranks.iter().enumerate() {
            for (pass, (g, w)) in got.iter().zip(want).enumerate() {
                let rel = relative_error(g, w);
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-5,
                    "{what} on {size} GPU ranks, rank {rank}, pass {pass}: relative error {rel:.3e}"
                );
            }
        }
        eprintln!("{what}: {size} GPU ranks, worst relative error {worst:.2e}");
    }
}

#[test]
fn gpu_models_split_over_ranks_equal_the_cpu_single_worker() {
    for (name, sizes) in MODELS {
        let dir = fixture(name);
        check_group_against(&cpu_single(&dir), &dir, sizes, name);
    }
}

/// Ladder-wired GPU models (alone and split) give the CPU ladder model's logits; the wiring
/// is a different function from the standard one.
#[test]
fn ladder_wired_gpu_models_equal_the_cpu_ladder_models() {
    let scratch = std::env::temp_dir().join(format!("tideway-gpu-ladder-{}", std::process::id()));
    for (name, ladder) in [
        ("mamba/hf_bias_untied_k2", serde_json::json!(2)),
        ("fla/gla_legacy_fused_mlp", serde_json::json!([0, 2])),
        ("fla/delta_net_relu_sum_gate_negeig", serde_json::json!(1)),
    ] {
        let dir = laddered(&fixture(name), ladder.clone(), &scratch);
        let want = cpu_single(&dir);
        assert!(
            relative_error(&want[0], &cpu_single(&fixture(name))[0]) > 1e-3,
            "{name}: the ladder wiring changes the function"
        );
        check_group_against(&want, &dir, &[1, 2], &format!("{name} ladder {ladder}"));
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The reference ladder fixtures (tools/gen_ladder_fixtures.py) on the GPU path: one rank and
/// two, every row of the 8-row-chunked prefill against the reference logits.
#[test]
fn ladder_fixtures_match_the_reference_on_gpu_ranks() {
    for name in ["ladder/gla_ladder_last2", "ladder/mamba_ladder_all"] {
        let dir = fixture(name);
        let (ids, want) = reference_logits(&dir);
        for size in [1, 2] {
            let ids = &ids;
            let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
                let handles: Vec<_> = ThreadGroup::new(size)
                    .members()
                    .into_iter()
                    .enumerate()
                    .map(|(rank, member)| {
                        let dir = &dir;
                        scope.spawn(move || {
                            let mut model = load_gpu_model_rank(
                                dir,
                                Gpu::emulated(),
                                WeightDtype::F32,
                                1,
                                rank,
                                size,
                            )
                            .unwrap();
                            assert!(model.ladder_layers().iter().any(|&l| l));
                            model.set_scan_chunk(8);
                            let mut staged = HostStaged(Box::new(member) as Box<dyn Collective>);
                            let mut session = model.new_session().unwrap();
                            model
                                .forward_in_group(
                                    ids,
                                    &[ids.len()],
                                    &mut [&mut session],
                                    &mut DeviceGroup::new(&mut staged),
                                    LogitRows::All,
                                )
                                .unwrap()
                                .unwrap()
                                .into_vec()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, got) in outputs.iter().enumerate() {
                let rel = relative_error(got, &want);
                assert!(
                    rel <= 1e-4,
                    "{name} on {size} GPU ranks, rank {rank}: {rel:.3e}"
                );
                eprintln!(
                    "{name}: {size} GPU ranks, rank {rank}: relative error {rel:.2e} against the reference"
                );
            }
        }
    }
}
