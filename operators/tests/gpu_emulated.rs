//! The GPU models' whole code path (weights, state pool, batch layout, every kernel launch with
//! its argument list, the products' operand layout) on the host emulator of the CUDA kernels
//! (`kernels/emu/emu.cpp`), against the CPU models on the committed fixtures: the chunked form,
//! 16-row chunks, the recurrent form, and three packed sessions at different positions.
//! What this cannot show — cuBLAS and the driver themselves, device timing — is
//! `tools/gpu_check.sh`'s, on a GPU.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use common::{fixture, relative_error};

use tideway_kernels::gpu::{Gpu, GpuError, WeightDtype};
use tideway_operators::LogitRows;
use tideway_operators::gpu::{GpuModel, GpuModelError, load_gpu_model};
use tideway_operators::models::{Model, load_model};

fn fixtures(family: &str) -> Vec<PathBuf> {
    let root = fixture(family);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Every form's relative error against the CPU model.
fn compare(cpu: &Model, gpu: &mut GpuModel) -> Vec<(String, f64)> {
    let vocab = cpu.vocab_size() as u32;
    let tokens: Vec<u32> = (0..70u32).map(|i| (i * 7 + 3) % vocab).collect();
    let want = cpu
        .prefill_chunked(&tokens, &mut cpu.new_state(), 256)
        .unwrap();
    let mut out = Vec::new();
    for (form, chunk) in [("chunked", 70), ("chunks of 16", 16), ("recurrent", 1)] {
        let mut session = gpu.new_session().unwrap();
        let mut got = Vec::new();
        for part in tokens.chunks(chunk) {
            let rows = gpu
                .forward_packed(part, &[part.len()], &mut [&mut session])
                .unwrap();
            got.extend_from_slice(rows.data());
        }
        out.push((form.to_string(), relative_error(&got, want.data())));
    }
    let mut cpu_states: Vec<_> = (0..3).map(|_| cpu.new_state()).collect();
    let mut sessions: Vec<_> = (0..3).map(|_| gpu.new_session().unwrap()).collect();
    // The last batch reads windows that the one before moved on with segments shorter than
    // the conv (mamba_conv_window keeps part of the old window).
    for lens in [[20usize, 7, 1], [1, 1, 1], [3, 9, 2], [2, 9, 3]] {
        let ids = &tokens[..lens.iter().sum::<usize>()];
        let mut refs: Vec<_> = cpu_states.iter_mut().collect();
        let want = cpu.forward_packed(ids, &lens, &mut refs).unwrap();
        let mut gpu_refs: Vec<_> = sessions.iter_mut().collect();
        let got = gpu.forward_packed(ids, &lens, &mut gpu_refs).unwrap();
        out.push((
            format!("packed {lens:?}"),
            relative_error(got.data(), want.data()),
        ));
    }
    // The logits of chosen rows alone (a generating session's last row beside a session
    // that asks for every row): the GPU gathers the rows before the norm and the head.
    let lens = [6usize, 4, 1];
    let last_only = [true, false, true];
    let ids = &tokens[..lens.iter().sum::<usize>()];
    let mut cpu_states: Vec<_> = (0..3).map(|_| cpu.new_state()).collect();
    let mut refs: Vec<_> = cpu_states.iter_mut().collect();
    let want = cpu
        .forward_packed_rows(ids, &lens, &mut refs, LogitRows::LastOf(&last_only))
        .unwrap();
    drop(sessions); // their slots, for fresh sessions
    let mut sessions: Vec<_> = (0..3).map(|_| gpu.new_session().unwrap()).collect();
    let mut gpu_refs: Vec<_> = sessions.iter_mut().collect();
    let got = gpu
        .forward_packed_rows(ids, &lens, &mut gpu_refs, LogitRows::LastOf(&last_only))
        .unwrap();
    assert_eq!(got.shape(), &[6, cpu.output_width()], "1 + 4 + 1 rows");
    out.push((
        "packed [6, 4, 1], last rows of 1 and 3".to_string(),
        relative_error(got.data(), want.data()),
    ));
    out
}

#[test]
fn gpu_models_on_the_emulator_match_the_cpu_models() {
    let mut checked = 0;
    for dir in fixtures("mamba").into_iter().chain(fixtures("fla")) {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut gpu = match load_gpu_model(&dir, Gpu::emulated(), WeightDtype::F32, 4) {
            Ok(m) => m,
            Err(GpuModelError::Gpu(GpuError::Unsupported(why))) => {
                eprintln!("{name}: not on the GPU path: {why}");
                continue;
            }
            Err(e) => panic!("{name}: {e}"),
        };
        let cpu = load_model(&dir).unwrap();
        for (form, rel) in compare(&cpu, &mut gpu) {
            eprintln!("{name} {form}: {rel:.2e}");
            assert!(rel <= 1e-5, "{name} {form}: relative error {rel:.3e}");
        }
        checked += 1;
    }
    assert_eq!(
        checked, 21,
        "every Mamba and fla fixture runs on the GPU path"
    );
}

/// One long sequence takes the time-chunked recurrences (the selective scan; GLA, RetNet,
/// linear attention; the delta rule through its chunk maps S ↦ P·S + L), chunk 8 here: a 70-row prefill is 9 chunks carried across by pass B. They
/// equal the CPU models like the sequential forms.
#[test]
fn the_time_chunked_recurrences_match_the_cpu_models() {
    let families = [
        "gla",
        "retnet",
        "linear_attn",
        "delta_net",
        "gated_deltanet",
    ];
    let dirs = fixtures("mamba")
        .into_iter()
        .chain(fixtures("fla").into_iter().filter(|d| {
            let name = d.file_name().unwrap().to_string_lossy().to_string();
            families.iter().any(|f| name.starts_with(f))
        }));
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut gpu = load_gpu_model(&dir, Gpu::emulated(), WeightDtype::F32, 4).unwrap();
        gpu.set_scan_chunk(8);
        let cpu = load_model(&dir).unwrap();
        for (form, rel) in compare(&cpu, &mut gpu) {
            eprintln!("{name} chunked scan, {form}: {rel:.2e}");
            assert!(rel <= 1e-5, "{name} {form}: relative error {rel:.3e}");
        }
    }
}

/// bf16 storage of bf16 weights is exact, so a bf16 checkpoint measures what the bf16 path
/// adds: the activations split into two bf16 halves for each product.
#[test]
fn bf16_weights_on_the_emulator_stay_within_the_bf16_limit() {
    let dir = fixture("mamba/hf_bf16");
    let mut gpu = load_gpu_model(&dir, Gpu::emulated(), WeightDtype::Bf16, 4).unwrap();
    let cpu = load_model(&dir).unwrap();
    for (form, rel) in compare(&cpu, &mut gpu) {
        eprintln!("hf_bf16 bf16 {form}: {rel:.2e}");
        assert!(rel <= 1e-3, "bf16 {form}: relative error {rel:.3e}");
    }
}

#[test]
fn a_full_state_pool_is_refused_and_a_dropped_session_frees_its_slot() {
    let dir = fixture("fla/gla_basic");
    let mut gpu = load_gpu_model(&dir, Gpu::emulated(), WeightDtype::F32, 2).unwrap();
    assert_eq!(gpu.session_capacity(), 2);
    let a = gpu.new_session().unwrap();
    let _b = gpu.new_session().unwrap();
    let err = gpu.new_session().unwrap_err().to_string();
    assert!(
        err.contains("all 2 session slots on the GPU are in use"),
        "{err}"
    );
    drop(a);
    gpu.new_session().unwrap();
}

/// The LMUFormers (plain and spiking) on the emulated GPU against the CPU model: the whole clip
/// at once, frame-chunked streams (the frame convs' lookahead and the residual delay across
/// calls), and two streams packed in one call; outputs and clip means. Spiking fixtures keep
/// every membrane 2e-5 away from its threshold, so equal spikes are expected.
#[test]
fn lmuformers_on_the_emulator_match_the_cpu_models() {
    use tideway_operators::layers::frames::Frames;
    use tideway_operators::models::load_lmuformer;
    let mut checked = 0;
    let root = fixture("lmu");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("input.safetensors").exists())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let checkpoint = dir.join("checkpoint");
        let cpu = load_lmuformer(&checkpoint).unwrap();
        let c = cpu.in_channels();
        let input = std::fs::read(dir.join("input.safetensors")).unwrap();
        let input = safetensors::SafeTensors::deserialize(&input).unwrap();
        let frames: Vec<f32> = input
            .tensor("input")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let n = frames.len() / c;
        let model = load_lmuformer(&checkpoint).unwrap();
        let mut gpu =
            tideway_operators::gpu::GpuLmuFormer::upload(&model, Gpu::emulated(), 4).unwrap();
        for chunk in [n, 7, 1] {
            let mut cpu_state = cpu.new_state();
            let mut session = gpu.new_session().unwrap();
            let (mut want, mut got) = (Vec::new(), Vec::new());
            let parts: Vec<&[f32]> = frames.chunks(chunk * c).collect();
            for (i, part) in parts.iter().enumerate() {
                let end = i + 1 == parts.len();
                let x = Frames {
                    data: part.to_vec(),
                    width: c,
                    counts: vec![part.len() / c],
                };
                want.extend(cpu.forward(&mut [&mut cpu_state], &x, &[end]).unwrap().data);
                got.extend(gpu.forward(&mut [&mut session], &x, &[end]).unwrap().data);
            }
            let rel = relative_error(&got, &want);
            let pooled = relative_error(&session.pooled(), &cpu_state.pooled());
            eprintln!("{name} chunks of {chunk}: outputs {rel:.2e}, clip mean {pooled:.2e}");
            assert!(
                rel <= 1e-5 && pooled <= 1e-5,
                "{name} chunks of {chunk}: {rel:.3e} {pooled:.3e}"
            );
        }
        // Two streams in one call: 40 and 25 frames, then the rest of each, ending both.
        let mut cpu_states = [cpu.new_state(), cpu.new_state()];
        let mut sessions = [gpu.new_session().unwrap(), gpu.new_session().unwrap()];
        for (counts, offsets, end) in [
            ([40usize, 25], [0usize, 3], false),
            ([n - 40, n - 28], [40, 28], true),
        ] {
            let mut data = Vec::new();
            for (k, o) in counts.iter().zip(offsets) {
                data.extend_from_slice(&frames[o * c..(o + k) * c]);
            }
            let x = Frames {
                data,
                width: c,
                counts: counts.to_vec(),
            };
            let [a, b] = &mut cpu_states;
            let want = cpu.forward(&mut [a, b], &x, &[end, end]).unwrap();
            let [s, t] = &mut sessions;
            let got = gpu.forward(&mut [s, t], &x, &[end, end]).unwrap();
            assert_eq!(got.counts, want.counts, "{name}");
            let rel = relative_error(&got.data, &want.data);
            assert!(rel <= 1e-5, "{name} packed: {rel:.3e}");
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "every LMUFormer fixture");
}
