//! The packed batch gives every session what it gets alone: sessions at different positions
//! stepped together, and sessions of different lengths packed into one forward. Also: the
//! chunked and recurrent forms leave the same state. Runs on the committed fixture checkpoints.

use std::path::PathBuf;

use tideway_operators::models::mamba::DEFAULT_PREFILL_CHUNK;
use tideway_operators::models::{MambaState, Model, SessionState, load_model};

fn load(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/mamba")
        .join(name);
    load_model(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A session's state as Mamba's own.
fn mamba(state: &SessionState) -> &MambaState {
    state.downcast_ref().expect("a Mamba session")
}

fn ids(count: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..count as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % vocab as u32)
        .collect()
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

#[test]
fn batched_steps_at_different_positions_match_each_session_alone() {
    for name in ["hf_k4_sharded", "hf_odd_tied", "hf_bias_untied_k2"] {
        let lm = load(name);
        let vocab = lm.vocab_size();
        // Five sessions with prompts of different lengths (one empty: position 0).
        let prompts: Vec<Vec<u32>> = [0usize, 1, 3, 7, 12]
            .iter()
            .enumerate()
            .map(|(i, &len)| ids(len, vocab, i as u32 + 1))
            .collect();
        let mut batched: Vec<SessionState> = Vec::new();
        for p in &prompts {
            let mut s = lm.new_state();
            if !p.is_empty() {
                lm.prefill_chunked(p, &mut s, DEFAULT_PREFILL_CHUNK)
                    .unwrap();
            }
            batched.push(s);
        }
        let mut alone = batched.clone();
        for step in 0..6 {
            let tokens = ids(batched.len(), vocab, 100 + step);
            let mut refs: Vec<&mut SessionState> = batched.iter_mut().collect();
            let together = lm.step(&tokens, &mut refs).unwrap();
            for (i, state) in alone.iter_mut().enumerate() {
                let single = lm.step(&tokens[i..i + 1], &mut [state]).unwrap();
                assert_close(
                    together.row(i),
                    single.row(0),
                    &format!("{name} step {step} session {i}"),
                );
            }
        }
        for (b, a) in batched.iter().zip(&alone) {
            assert_eq!(b.position(), a.position());
            let (b, a) = (mamba(b), mamba(a));
            for (lb, la) in b.layers.iter().zip(&a.layers) {
                assert_close(&lb.ssm, &la.ssm, &format!("{name} final ssm state"));
                assert_close(&lb.conv, &la.conv, &format!("{name} final conv window"));
            }
        }
    }
}

#[test]
fn packed_segments_of_different_lengths_match_each_alone() {
    let lm = load("hf_k4_sharded");
    let vocab = lm.vocab_size();
    let lens = [5usize, 1, 17, 2];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| ids(l, vocab, 7 + i as u32))
        .collect();
    let packed: Vec<u32> = seqs.concat();
    let mut states: Vec<SessionState> = (0..lens.len()).map(|_| lm.new_state()).collect();
    let mut refs: Vec<&mut SessionState> = states.iter_mut().collect();
    let out = lm.forward_packed(&packed, &lens, &mut refs).unwrap();
    let width = lm.output_width();
    let mut row = 0;
    for (i, seq) in seqs.iter().enumerate() {
        let mut s = lm.new_state();
        let alone = lm
            .prefill_chunked(seq, &mut s, DEFAULT_PREFILL_CHUNK)
            .unwrap();
        let got = &out.data()[row * width..(row + seq.len()) * width];
        assert_close(got, alone.data(), &format!("segment {i}"));
        assert_eq!(states[i].position(), seq.len());
        row += seq.len();
    }
}

#[test]
fn chunked_and_recurrent_forms_leave_the_same_state() {
    let lm = load("hf_odd_tied");
    let tokens = ids(29, lm.vocab_size(), 3);
    let mut chunked = lm.new_state();
    let logits_chunked = lm.prefill_chunked(&tokens, &mut chunked, 4).unwrap();
    let mut recurrent = lm.new_state();
    for (t, &tok) in tokens.iter().enumerate() {
        let row = lm.step(&[tok], &mut [&mut recurrent]).unwrap();
        assert_close(row.row(0), logits_chunked.row(t), &format!("token {t}"));
    }
    assert_eq!(chunked.position(), 29);
    for (a, b) in mamba(&chunked).layers.iter().zip(&mamba(&recurrent).layers) {
        assert_close(&a.ssm, &b.ssm, "ssm state");
        assert_close(&a.conv, &b.conv, "conv window");
    }
    // The state is constant in size: what a session costs the server.
    assert_eq!(lm.state_bytes(), 2 * 4 * 74 * (3 + 5));
}

/// A prefill chunk of 300 rows, whose `dt_proj` and scan run in runs of 128, 128 and 44
/// rows (`SCAN_RUN_ROWS`), leaves the state and gives the logits of one token at a time.
#[test]
fn a_long_chunk_in_runs_of_rows_matches_the_recurrent_form() {
    let lm = load("hf_odd_tied");
    let tokens = ids(300, lm.vocab_size(), 5);
    let mut chunked = lm.new_state();
    let logits = lm.prefill_chunked(&tokens, &mut chunked, 512).unwrap();
    let mut recurrent = lm.new_state();
    for (t, &tok) in tokens.iter().enumerate() {
        let row = lm.step(&[tok], &mut [&mut recurrent]).unwrap();
        assert_close(row.row(0), logits.row(t), &format!("token {t}"));
    }
    for (a, b) in mamba(&chunked).layers.iter().zip(&mamba(&recurrent).layers) {
        assert_close(&a.ssm, &b.ssm, "ssm state");
        assert_close(&a.conv, &b.conv, "conv window");
    }
}

#[test]
fn step_rejects_mismatched_batches_and_bad_ids() {
    let lm = load("hf_odd_tied");
    let mut a = lm.new_state();
    let mut b = lm.new_state();
    let err = lm.step(&[1], &mut [&mut a, &mut b]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "2 sessions but 1 tokens: a step takes one token per session"
    );
    let err = lm.step(&[1, 61], &mut [&mut a, &mut b]).unwrap_err();
    assert!(
        err.to_string().contains("token id 61 at position 1"),
        "{err}"
    );
    // A refused step leaves the states untouched.
    assert_eq!(mamba(&a), mamba(&lm.new_state()));
}
