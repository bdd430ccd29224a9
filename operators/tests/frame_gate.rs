//! Frame pruning inside the LMUFormer (SPEC-MODELS §6.3) against the PyTorch reference:
//! `tools/gen_frame_gate_fixtures.py` ran the reference modules with the gate's skipped frames
//! given no input after the patch embedding (every LIF's input masked, u = 0). Tideway, gating
//! the same input as it streams in, must skip the same frames, give the reference's outputs on
//! the kept frames and its pooled scores over them (≤ 1e-4), repeat the last kept row on a
//! skipped frame, carry the gate across an exported and imported state, and without a gate
//! stay as before.

mod common;

use std::path::PathBuf;

use common::{f32s, i64s};
use safetensors::SafeTensors;
use tideway_operators::layers::frames::Frames;
use tideway_operators::models::ModelPart;
use tideway_operators::models::{LmuFormer, LmuFormerState, load_lmuformer, load_lmuformer_part};
use tideway_operators::prune::frames::FrameGate;
use tideway_operators::state_tensors::StateTensors;

fn keep_mask(file: &SafeTensors, name: &str) -> Vec<bool> {
    i64s(file, name).into_iter().map(|k| k != 0).collect()
}

/// Streams `input` (`[frames, width]`) through `model` in chunks of `chunk` frames; halfway,
/// the state is exported and imported into a fresh one. Returns every output row.
fn stream(
    model: &LmuFormer,
    input: &[f32],
    width: usize,
    chunk: usize,
) -> (Vec<f32>, LmuFormerState) {
    let frames = input.len() / width;
    let mut state = model.new_state();
    let mut out = Vec::new();
    let mut t = 0;
    while t < frames {
        let end = (t + chunk).min(frames);
        let chunk_frames = Frames {
            data: input[t * width..end * width].to_vec(),
            width,
            counts: vec![end - t],
        };
        let y = model
            .forward(&mut [&mut state], &chunk_frames, &[end == frames])
            .unwrap();
        out.extend(y.data);
        if t < frames / 2 && end >= frames / 2 {
            let mut tensors = StateTensors::default();
            model.export_state(&state, &mut tensors);
            state = model.import_state(&tensors).unwrap();
        }
        t = end;
    }
    (out, state)
}

#[test]
fn gated_streams_skip_the_references_frames_and_match_it_on_the_rest() {
    let bytes = std::fs::read(common::fixture("prune/frame_gate.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata.metadata().clone().unwrap();
    assert_eq!(cases.len(), 2);
    for (case, what) in cases {
        let parts: Vec<&str> = what.split('|').collect();
        let dir: PathBuf = common::fixture(parts[0]).join("checkpoint");
        let gate =
            FrameGate::new(parts[1].parse().unwrap(), Some(parts[2].parse().unwrap())).unwrap();
        let mut model = load_lmuformer(&dir).unwrap();
        model.set_frame_gate(Some(gate)).unwrap();
        let width = model.in_channels();
        let classes = model.num_classes();
        let input = f32s(&file, &format!("{case}.input"));
        let keep = keep_mask(&file, &format!("{case}.keep"));
        let want = f32s(&file, &format!("{case}.output"));
        let want_pooled = f32s(&file, &format!("{case}.pooled"));
        for chunk in [1, 7, 128] {
            let (got, state) = stream(&model, &input, width, chunk);
            assert_eq!(got.len(), want.len(), "{case}: every frame has its row");
            let kept = keep.iter().filter(|&&k| k).count() as u64;
            assert_eq!(
                state.gate_counts(),
                Some((keep.len() as u64, kept)),
                "{case}"
            );
            let (mut got_kept, mut want_kept) = (Vec::new(), Vec::new());
            let mut last: Option<&[f32]> = None;
            for (t, &k) in keep.iter().enumerate() {
                let row = &got[t * classes..(t + 1) * classes];
                if k {
                    got_kept.extend_from_slice(row);
                    want_kept.extend_from_slice(&want[t * classes..(t + 1) * classes]);
                    last = Some(row);
                } else {
                    let zeros = vec![0.0; classes];
                    assert_eq!(
                        row,
                        last.unwrap_or(&zeros),
                        "{case}: frame {t} repeats the last kept row"
                    );
                }
            }
            let error = common::relative_error(&got_kept, &want_kept);
            let pooled_error = common::relative_error(&state.pooled(), &want_pooled);
            eprintln!(
                "{case} ({}), chunks of {chunk}: kept {kept} of {} frames, outputs {error:e}, pooled {pooled_error:e}",
                parts[0],
                keep.len()
            );
            assert!(
                error <= 1e-4,
                "{case}, chunks of {chunk}: outputs differ by {error:e}"
            );
            assert!(
                pooled_error <= 1e-4,
                "{case}: pooled differs by {pooled_error:e}"
            );
        }
        // Without the gate, the stream is as before: no gate state, every frame pooled (so
        // other pooled scores than the gated reference's), and its own pooled mean.
        model.set_frame_gate(None).unwrap();
        let (plain, state) = stream(&model, &input, width, 128);
        assert_eq!(state.gate_counts(), None);
        let mean: Vec<f32> = (0..classes)
            .map(|c| {
                (plain
                    .iter()
                    .skip(c)
                    .step_by(classes)
                    .map(|&v| v as f64)
                    .sum::<f64>()
                    / keep.len() as f64) as f32
            })
            .collect();
        assert!(common::relative_error(&state.pooled(), &mean) <= 1e-6);
        assert!(
            common::relative_error(&state.pooled(), &want_pooled) > 1e-3,
            "{case}: the gate changed nothing"
        );
    }
}

#[test]
fn only_a_whole_model_gates_its_frames() {
    let dir = common::fixture("lmu/slmu_d40_c24_depth2_prefixed/checkpoint");
    let mut part = load_lmuformer_part(&dir, ModelPart::stage(0, 2, 2).unwrap()).unwrap();
    let gate = FrameGate::new(0.9, None).unwrap();
    let e = part.set_frame_gate(Some(gate)).unwrap_err();
    assert!(e.contains("whole model"), "{e}");
}

#[test]
fn decisions_made_elsewhere_give_the_same_stream() {
    // The serving graph's prune stage decides with the gate the model hands over; the model
    // applies the decisions: the same rows as a model deciding itself, and its state leaves
    // the gate's own state to the decider.
    let bytes = std::fs::read(common::fixture("prune/frame_gate.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let dir = common::fixture("lmu/slmu_d40_c24_depth2_prefixed/checkpoint");
    let gate = FrameGate::new(0.97, Some(-1.5)).unwrap();
    let mut own = load_lmuformer(&dir).unwrap();
    own.set_frame_gate(Some(gate.clone())).unwrap();
    let mut told = load_lmuformer(&dir).unwrap();
    told.set_frame_gate(Some(gate)).unwrap();
    let handed = told.decide_frames_elsewhere().unwrap();
    assert!(told.gates_frames() && told.frame_gate().is_none());
    let input = f32s(&file, "case0.input");
    let width = own.in_channels();
    let (want, _) = stream(&own, &input, width, 9);
    let mut decider = tideway_operators::prune::frames::FrameGateState::default();
    let mut state = told.new_state();
    let mut got = Vec::new();
    for (k, chunk) in input.chunks(9 * width).enumerate() {
        let keep = handed.mask(&mut decider, chunk, width);
        let frames = Frames {
            data: chunk.to_vec(),
            width,
            counts: vec![chunk.len() / width],
        };
        let end = (k + 1) * 9 * width >= input.len();
        let out = told
            .forward_decided(&mut [&mut state], &frames, &[end], &[keep])
            .unwrap();
        got.extend(out.data);
        let mut tensors = StateTensors::default();
        told.export_state(&state, &mut tensors);
        assert!(
            !tensors.contains("prune.frames.counts") && tensors.contains("prune.frames.pending")
        );
        state = told.import_state(&tensors).unwrap();
    }
    assert_eq!(got, want);
    assert_eq!(state.gate_counts(), None);
}
