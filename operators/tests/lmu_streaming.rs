//! LMUFormer streams: a clip fed in chunks of random sizes (1..17 frames) gives the per-frame
//! outputs of the whole clip; sessions batched together at different positions equal each
//! alone; the per-session state has a constant, reported size; the model split into pipeline
//! parts (patch embedding with the first blocks, later blocks, the head with the last) streams
//! the same outputs, each part holding only its own weights and state.

use std::path::PathBuf;

use tideway_operators::layers::frames::Frames;
use tideway_operators::models::{
    LmuFormer, LmuFormerState, ModelPart, load_lmuformer, load_lmuformer_part,
};

const FIXTURES: [&str; 4] = [
    "lmu_d32_c16",
    "lmu_d48_c20_depth2_prefixed",
    "slmu_d32_c16",
    "slmu_d40_c24_depth2_prefixed",
];

fn checkpoint(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lmu")
        .join(name)
        .join("checkpoint")
}

fn load(name: &str) -> LmuFormer {
    let dir = checkpoint(name);
    load_lmuformer(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Deterministic features in [-1.5, 1.5).
fn features(frames: usize, channels: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..frames * channels)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect()
}

/// Chunk sizes in 1..=17 covering `total`, from a seed.
fn chunking(total: usize, seed: u64) -> Vec<usize> {
    let mut sizes = Vec::new();
    let (mut left, mut x) = (total, seed);
    while left > 0 {
        x = x.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
        let n = (1 + (x >> 33) as usize % 17).min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

fn one_session(frames: &[f32], width: usize, count: usize) -> Frames {
    Frames {
        data: frames.to_vec(),
        width,
        counts: vec![count],
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (diff / norm).sqrt();
    assert!(rel <= 1e-5, "{what}: relative error {rel:.3e}");
}

#[test]
fn random_chunkings_give_the_whole_clip_and_state_stays_constant() {
    for name in FIXTURES {
        let model = load(name);
        let c = model.in_channels();
        // Longer than the 128-frame chunks of the parallel form.
        let total = 300;
        let clip = features(total, c, 7);
        let mut whole_state = model.new_state();
        whole_state.record_spikes();
        let (whole, pooled) = model.run_clip(&mut whole_state, &clip).unwrap();
        assert_eq!(whole.len(), total * model.num_classes());
        for seed in 1..=3 {
            let mut state = model.new_state();
            state.record_spikes();
            let size = state.size_bytes();
            assert_eq!(size, model.state_bytes());
            let mut streamed = Vec::new();
            let mut at = 0;
            let sizes = chunking(total, seed);
            for (i, &n) in sizes.iter().enumerate() {
                let end = i + 1 == sizes.len();
                let input = one_session(&clip[at * c..(at + n) * c], c, n);
                streamed.extend(
                    model
                        .forward(&mut [&mut state], &input, &[end])
                        .unwrap()
                        .data,
                );
                at += n;
                // Outputs trail the input by the patch embedding's lookahead until the end.
                let emitted = streamed.len() / model.num_classes();
                if !end {
                    assert_eq!(emitted, at.saturating_sub(model.lookahead()), "{name}");
                }
                assert_eq!(state.size_bytes(), size, "{name}: state grew");
            }
            assert_close(&streamed, &whole, &format!("{name} chunking {seed}"));
            assert_close(&state.pooled(), &pooled, &format!("{name} pooled {seed}"));
            assert_eq!(state.spikes(), whole_state.spikes(), "{name}: spike trains");
        }
    }
}

#[test]
fn state_size_is_what_the_stream_keeps() {
    // lmu_d32_c16: windows of 2 frames for the 5 convolutions (16 input channels, then 32),
    // the held residual frame (32), the LMU memory (32), no membranes, the clip sum (5 f64).
    let model = load("lmu_d32_c16");
    assert_eq!(
        model.state_bytes(),
        4 * (2 * 16 + 4 * 2 * 32 + 32 + 32) + 8 * 5
    );
    // slmu_d32_c16 adds 2·32 memory and the membranes of its 11 neurons:
    // 4 patch-embedding LIFs (32 each), prev_lif 32, f_u 1, f_m 64, f_h 32, fc1 32, fc2 128,
    // head 32.
    let model = load("slmu_d32_c16");
    let membranes = 4 * 32 + 32 + 1 + 64 + 32 + 32 + 128 + 32;
    assert_eq!(
        model.state_bytes(),
        4 * (2 * 16 + 4 * 2 * 32 + 32 + 64 + membranes) + 8 * 5
    );
}

#[test]
fn batched_sessions_at_different_positions_equal_each_alone() {
    for name in FIXTURES {
        let model = load(name);
        let c = model.in_channels();
        let lengths = [40usize, 1, 23, 64];
        let clips: Vec<Vec<f32>> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| features(n, c, 100 + i as u64))
            .collect();
        let alone: Vec<Vec<f32>> = clips
            .iter()
            .map(|clip| model.run_clip(&mut model.new_state(), clip).unwrap().0)
            .collect();
        // Each round, session i sends (round + i) % 5 frames (possibly none) until its clip
        // is done, ending in the round its last frames go.
        let mut states: Vec<LmuFormerState> = lengths.iter().map(|_| model.new_state()).collect();
        let mut sent = vec![0usize; lengths.len()];
        let mut done = vec![false; lengths.len()];
        let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); lengths.len()];
        for round in 0.. {
            if done.iter().all(|&d| d) {
                break;
            }
            let (mut data, mut counts, mut ends, mut who) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..lengths.len() {
                if done[i] {
                    continue;
                }
                let n = ((round + i) % 5).min(lengths[i] - sent[i]);
                data.extend_from_slice(&clips[i][sent[i] * c..(sent[i] + n) * c]);
                sent[i] += n;
                counts.push(n);
                ends.push(sent[i] == lengths[i]);
                done[i] = sent[i] == lengths[i];
                who.push(i);
            }
            let input = Frames {
                data,
                width: c,
                counts,
            };
            let mut refs: Vec<&mut LmuFormerState> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| who.contains(i))
                .map(|(_, s)| s)
                .collect();
            let out = model.forward(&mut refs, &input, &ends).unwrap();
            let k = model.num_classes();
            for (rows, &i) in out.ranges().into_iter().zip(&who) {
                outputs[i].extend_from_slice(&out.data[rows.start * k..rows.end * k]);
            }
        }
        for i in 0..lengths.len() {
            assert_close(&outputs[i], &alone[i], &format!("{name} session {i}"));
        }
    }
}

#[test]
fn pipeline_parts_stream_the_whole_models_outputs() {
    for name in FIXTURES {
        let model = load(name);
        let depths = model.config().depths;
        let c = model.in_channels();
        let total = 150;
        let clip = features(total, c, 11);
        let mut whole_state = model.new_state();
        let (whole, pooled) = model.run_clip(&mut whole_state, &clip).unwrap();
        // Up to one stage more than there are blocks: the last stage then holds only the head.
        for stages in 2..=depths + 1 {
            let parts: Vec<LmuFormer> = (0..stages)
                .map(|k| {
                    let part = ModelPart::stage(k, stages, depths).unwrap();
                    load_lmuformer_part(&checkpoint(name), part).unwrap()
                })
                .collect();
            let what = format!("{name} in {stages} stages");
            assert_eq!(
                parts.iter().map(LmuFormer::weight_bytes).sum::<usize>(),
                model.weight_bytes(),
                "{what}: weights"
            );
            assert_eq!(
                parts.iter().map(LmuFormer::state_bytes).sum::<usize>(),
                model.state_bytes(),
                "{what}: state"
            );
            assert!(
                parts[1..]
                    .iter()
                    .all(|p| p.input_width() == model.config().dim)
            );
            let mut states: Vec<LmuFormerState> = parts.iter().map(LmuFormer::new_state).collect();
            let mut streamed = Vec::new();
            let mut at = 0;
            let sizes = chunking(total, 5);
            for (i, &n) in sizes.iter().enumerate() {
                let end = [i + 1 == sizes.len()];
                let mut x = one_session(&clip[at * c..(at + n) * c], c, n);
                for (part, state) in parts.iter().zip(&mut states) {
                    x = part.forward(&mut [state], &x, &end).unwrap();
                }
                streamed.extend(x.data);
                at += n;
            }
            assert_close(&streamed, &whole, &what);
            let last = states.last().unwrap();
            assert_close(&last.pooled(), &pooled, &format!("{what}: pooled"));
            // Every part counts the frames that left it: the same for all.
            assert!(states.iter().all(|s| s.frames_out() == total), "{what}");
        }
        // A later part refuses feature frames (it takes the stream of `dim` channels).
        let later = load_lmuformer_part(&checkpoint(name), ModelPart::stage(1, 2, depths).unwrap())
            .unwrap();
        if c != model.config().dim {
            let mut state = later.new_state();
            let input = one_session(&clip[..c], c, 1);
            assert!(later.forward(&mut [&mut state], &input, &[false]).is_err());
        }
    }
}
