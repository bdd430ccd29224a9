//! fla models: a stream continued by steps after a chunked prefill equals the whole sequence,
//! and batched steps across sessions at different positions equal each session alone.

use std::path::PathBuf;

use tideway_operators::models::{Model, SessionState, load_model};

fn load(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/fla")
        .join(name);
    load_model(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (diff / norm).sqrt();
    assert!(rel <= 1e-5, "{what}: relative error {rel:.3e}");
}

fn ids(count: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..count as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % vocab as u32)
        .collect()
}

const FIXTURES: [&str; 4] = [
    "gla_basic",
    "gla_conv_no_gate",
    "gla_kv_heads_relu_clamp",
    "gla_legacy_fused_mlp",
];

#[test]
fn steps_after_a_chunked_prefill_continue_the_sequence() {
    for name in FIXTURES {
        let model = load(name);
        let tokens = ids(140, model.vocab_size(), 3);
        let whole = model
            .prefill_chunked(&tokens, &mut model.new_state(), 256)
            .unwrap();
        let mut state = model.new_state();
        let head = model
            .prefill_chunked(&tokens[..100], &mut state, 64)
            .unwrap();
        assert_close(
            head.data(),
            &whole.data()[..100 * model.output_width()],
            name,
        );
        for (t, &tok) in tokens.iter().enumerate().skip(100) {
            let row = model.step(&[tok], &mut [&mut state]).unwrap();
            assert_close(row.row(0), whole.row(t), &format!("{name} step {t}"));
        }
        assert_eq!(state.position(), 140);
    }
}

#[test]
fn batched_steps_at_different_positions_match_each_session_alone() {
    for name in FIXTURES {
        let model = load(name);
        let vocab = model.vocab_size();
        let mut batched: Vec<SessionState> = Vec::new();
        for (i, len) in [0usize, 3, 70, 9].into_iter().enumerate() {
            let mut s = model.new_state();
            if len > 0 {
                model
                    .prefill_chunked(&ids(len, vocab, i as u32), &mut s, 64)
                    .unwrap();
            }
            batched.push(s);
        }
        let mut alone = batched.clone();
        for step in 0..4 {
            let tokens = ids(batched.len(), vocab, 50 + step);
            let mut refs: Vec<&mut SessionState> = batched.iter_mut().collect();
            let together = model.step(&tokens, &mut refs).unwrap();
            for (i, s) in alone.iter_mut().enumerate() {
                let single = model.step(&tokens[i..i + 1], &mut [s]).unwrap();
                assert_close(
                    together.row(i),
                    single.row(0),
                    &format!("{name} step {step} session {i}"),
                );
            }
        }
    }
}
