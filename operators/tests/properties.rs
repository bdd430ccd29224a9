//! Properties that hold for every input, checked by proptest on random ones (shrunk to a
//! smallest failing case when one fails), on the committed fixture checkpoints:
//! - the chunked (prefill) form gives the recurrent form's logits, whatever the chunk size;
//! - a packed batch of random sessions — random lengths, starting at random positions — gives
//!   each session what it gets alone;
//! - the front ends' carry-over: text and audio cut at random points give what the whole
//!   input gives.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::relative_error;
use proptest::prelude::*;
use tideway_operators::LogitRows;
use tideway_operators::models::{Model, SessionState, load_model};
use tideway_operators::tokenizers::audio::{AudioFrontend, AudioFrontendConfig};
use tideway_operators::tokenizers::text::{TextStream, TextTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// One fixture of each mixer kind: Mamba (selective scan), GLA (gated linear attention),
/// Gated DeltaNet (delta rule), linear attention with a normalised feature map.
fn models() -> &'static [Model] {
    static MODELS: OnceLock<Vec<Model>> = OnceLock::new();
    MODELS.get_or_init(|| {
        [
            "mamba/hf_odd_tied",
            "fla/gla_basic",
            "fla/gated_deltanet_basic",
            "fla/linear_attn_elu_normalized",
        ]
        .iter()
        .map(|name| load_model(&fixtures().join(name)).unwrap())
        .collect()
    })
}

/// Logits of `tokens` one token at a time.
fn recurrent(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = model.new_state();
    let mut logits = Vec::new();
    for &t in tokens {
        logits.extend_from_slice(model.step(&[t], &mut [&mut state]).unwrap().data());
    }
    logits
}

fn tokens(model: &Model, raw: &[u32]) -> Vec<u32> {
    raw.iter().map(|t| t % model.vocab_size() as u32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn chunked_equals_recurrent(
        which in 0usize..4,
        raw in prop::collection::vec(any::<u32>(), 1..40),
        chunk in 1usize..17,
    ) {
        let model = &models()[which];
        let tokens = tokens(model, &raw);
        let mut state = model.new_state();
        let chunked = model.prefill_chunked(&tokens, &mut state, chunk).unwrap();
        let err = relative_error(chunked.data(), &recurrent(model, &tokens));
        prop_assert!(err <= 1e-4, "{}: chunk {chunk}: {err:.3e}", model.family());
        prop_assert_eq!(state.position(), tokens.len());
    }

    #[test]
    fn packed_sessions_equal_each_alone(
        which in 0usize..4,
        // Per session: tokens already consumed, then the tokens of the packed step.
        sessions in prop::collection::vec(
            (prop::collection::vec(any::<u32>(), 0..12), prop::collection::vec(any::<u32>(), 1..9)),
            1..6,
        ),
    ) {
        let model = &models()[which];
        let mut states: Vec<SessionState> = Vec::new();
        let mut alone: Vec<Vec<f32>> = Vec::new();
        let (mut packed, mut lens) = (Vec::new(), Vec::new());
        for (before, now) in &sessions {
            let (before, now) = (tokens(model, before), tokens(model, now));
            let mut state = model.new_state();
            if !before.is_empty() {
                model.forward_packed(&before, &[before.len()], &mut [&mut state]).unwrap();
            }
            let whole: Vec<u32> = before.iter().chain(&now).copied().collect();
            let logits = recurrent(model, &whole);
            let width = model.output_width();
            alone.push(logits[before.len() * width..].to_vec());
            states.push(state);
            packed.extend_from_slice(&now);
            lens.push(now.len());
        }
        let mut refs: Vec<&mut SessionState> = states.iter_mut().collect();
        let out = model.forward_packed(&packed, &lens, &mut refs).unwrap();
        let width = model.output_width();
        let mut at = 0;
        for (i, (&len, want)) in lens.iter().zip(&alone).enumerate() {
            let got = &out.data()[at * width..(at + len) * width];
            let err = relative_error(got, want);
            prop_assert!(err <= 1e-4, "{}: session {i}: {err:.3e}", model.family());
            at += len;
        }
    }

    #[test]
    fn last_row_logits_are_those_rows_of_every_rows_logits(
        which in 0usize..4,
        lens in prop::collection::vec(1usize..9, 1..5),
        last_only in prop::collection::vec(any::<bool>(), 4),
        raw in prop::collection::vec(any::<u32>(), 40),
    ) {
        let model = &models()[which];
        let total: usize = lens.iter().sum();
        let ids = tokens(model, &raw[..total]);
        let last_only = &last_only[..lens.len()];
        let run = |rows: LogitRows<'_>| {
            let mut states: Vec<SessionState> = lens.iter().map(|_| model.new_state()).collect();
            let mut refs: Vec<&mut SessionState> = states.iter_mut().collect();
            model.forward_packed_rows(&ids, &lens, &mut refs, rows).unwrap()
        };
        let every = run(LogitRows::All);
        let some = run(LogitRows::LastOf(last_only));
        // The rows the flags name, picked here from every row's logits.
        let width = model.output_width();
        let mut want = Vec::new();
        let mut start = 0;
        for (&len, &last) in lens.iter().zip(last_only) {
            let first = if last { start + len - 1 } else { start };
            want.extend_from_slice(&every.data()[first * width..(start + len) * width]);
            start += len;
        }
        prop_assert_eq!(some.data().len(), want.len());
        let err = relative_error(some.data(), &want);
        prop_assert!(err <= 1e-5, "{}: {err:.3e}", model.family());
    }

    #[test]
    fn text_cut_anywhere_gives_the_whole_texts_ids(
        text in "[a-z é€🙂,.!?\n]{0,80}",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let tokenizer =
            TextTokenizer::from_file(&fixtures().join("text/bpe.tokenizer.json")).unwrap();
        let bytes = text.as_bytes();
        let whole = tokenizer.push(&mut TextStream::default(), bytes, true).unwrap();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut stream = TextStream::default();
        let (mut ids, mut from) = (Vec::new(), 0);
        for point in points {
            ids.extend(tokenizer.push(&mut stream, &bytes[from..point], false).unwrap());
            from = point;
        }
        ids.extend(tokenizer.push(&mut stream, &bytes[from..], true).unwrap());
        prop_assert_eq!(ids, whole);
    }

    #[test]
    fn audio_cut_anywhere_gives_the_whole_clips_features(
        rate in prop::sample::select(vec![8000u32, 16000, 22050, 44100]),
        // From 45 ms at 44.1 kHz: at least one 25 ms frame at every rate.
        samples in 2000usize..6000,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let front = audio_frontend();
        let clip: Vec<f32> = (0..samples).map(|i| ((i as f32) * 0.037).sin() * 0.3).collect();
        let whole = front.push(&mut front.new_stream(), &clip, rate, true).unwrap();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(samples + 1)).collect();
        points.sort_unstable();
        let mut stream = front.new_stream();
        let (mut got, mut from) = (Vec::new(), 0);
        for point in points {
            got.extend(front.push(&mut stream, &clip[from..point], rate, false).unwrap());
            from = point;
        }
        got.extend(front.push(&mut stream, &clip[from..], rate, true).unwrap());
        prop_assert!(!whole.is_empty());
        prop_assert_eq!(got.len(), whole.len());
        let err = relative_error(&got, &whole);
        prop_assert!(err <= 1e-5, "{rate} Hz: {err:.3e}");
    }
}

fn audio_frontend() -> AudioFrontend {
    let config = tideway_operators::models::config::ConfigJson::read(
        &fixtures().join("lmu/lmu_d16_c128_frontend/checkpoint"),
    )
    .unwrap();
    AudioFrontend::new(AudioFrontendConfig::from_config(&config).unwrap().unwrap()).unwrap()
}
