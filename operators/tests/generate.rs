//! The per-step work of generation against outcomes known in advance: every sampling option
//! on logits whose answer is fixed by hand (top-k 1, a tiny top-p and min-p 1 are greedy; the
//! penalties flip a chosen token; draws follow the softmax), seeded draws that repeat, stop
//! strings cut anywhere, and streamed text from a byte-level tokenizer that never releases
//! half a character.

use std::path::PathBuf;

use tideway_operators::generate::{
    FinishReason, GenerateError, Generation, GenerationParams, Sampler, SamplingError,
    SamplingParams, StopScan, StopStrings, argmax,
};
use tideway_operators::tokenizers::text::TextTokenizer;

fn tokenizer() -> TextTokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/text/mamba_bpe");
    TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
}

/// Pseudo-random logits (a fixed LCG: the test owns its inputs).
fn logits(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn sampling(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p.validate().unwrap();
    p
}

#[test]
fn greedy_takes_the_first_largest_logit() {
    let mut s = Sampler::new(SamplingParams::greedy(), &[]);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0]), 1);
    assert_eq!(s.sample(&[f32::NAN, 0.5, 0.2]), 1);
    assert_eq!(argmax(&[2.0f32, 2.0]), 0);
}

#[test]
fn top_k_1_a_tiny_top_p_and_min_p_1_are_greedy() {
    for seed in 0..200u64 {
        let row = logits(seed, 97);
        let best = argmax(&row) as u32;
        for params in [
            sampling(|p| (p.top_k, p.seed) = (1, seed)),
            sampling(|p| (p.top_p, p.seed) = (1e-7, seed)),
            sampling(|p| (p.min_p, p.seed) = (1.0, seed)),
        ] {
            assert_eq!(
                Sampler::new(params.clone(), &[]).sample(&row),
                best,
                "{params:?}"
            );
        }
    }
}

/// Draws of `params` over logits ln(probs): how often each token came.
fn frequencies(probs: &[f64], params: SamplingParams, draws: usize) -> Vec<f64> {
    let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let mut sampler = Sampler::new(params, &[]);
    let mut counts = vec![0usize; probs.len()];
    for _ in 0..draws {
        // A fresh sampler would remember nothing; this one's penalties are off.
        counts[sampler.sample(&row) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

#[test]
fn draws_follow_the_softmax_of_what_top_k_top_p_and_min_p_keep() {
    let probs = [0.5, 0.3, 0.2];
    let n = 40_000;
    // ±0.015 is over 6 standard deviations of a frequency near 0.5 after 40,000 draws.
    let close = |got: Vec<f64>, want: [f64; 3]| {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 0.015, "got {got:?}, want {want:?}");
        }
    };
    close(
        frequencies(&probs, sampling(|p| p.seed = 7), n),
        [0.5, 0.3, 0.2],
    );
    // Temperature 2: probabilities ∝ sqrt(p).
    let s: f64 = probs.iter().map(|p: &f64| p.sqrt()).sum();
    close(
        frequencies(&probs, sampling(|p| (p.temperature, p.seed) = (2.0, 8)), n),
        [0.5f64.sqrt() / s, 0.3f64.sqrt() / s, 0.2f64.sqrt() / s],
    );
    // top-k 2, top-p 0.7 (0.5 < 0.7 ≤ 0.8) and min-p 0.5 (0.2 < 0.25) keep tokens 0 and 1.
    for params in [
        sampling(|p| (p.top_k, p.seed) = (2, 9)),
        sampling(|p| (p.top_p, p.seed) = (0.7, 10)),
        sampling(|p| (p.min_p, p.seed) = (0.5, 11)),
    ] {
        close(frequencies(&probs, params, n), [0.625, 0.375, 0.0]);
    }
}

#[test]
fn the_same_seed_draws_the_same_tokens_and_another_seed_does_not() {
    let rows: Vec<Vec<f32>> = (0..64)
        .map(|i| logits(i, 50).iter().map(|l| l * 0.3).collect())
        .collect();
    let draw = |seed: u64| {
        let mut s = Sampler::new(sampling(|p| (p.seed, p.top_p) = (seed, 0.95)), &[]);
        rows.iter().map(|r| s.sample(r)).collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
    let greedy_with =
        |penalty: f32| sampling(|p| (p.temperature, p.repetition_penalty) = (0.0, penalty));
    // Token 0 was in the prompt: 2.0 / 1.2 = 1.67 < 1.9.
    assert_eq!(Sampler::new(greedy_with(1.2), &[0]).sample(&[2.0, 1.9]), 1);
    assert_eq!(Sampler::new(greedy_with(1.0), &[0]).sample(&[2.0, 1.9]), 0);
    // -1.0 * 1.2 = -1.2 < -1.1.
    assert_eq!(
        Sampler::new(greedy_with(1.2), &[0]).sample(&[-1.0, -1.1]),
        1
    );
    // Token 1 is not seen: unchanged.
    assert_eq!(Sampler::new(greedy_with(1.2), &[1]).sample(&[2.0, 1.9]), 0);
}

#[test]
fn the_presence_penalty_lowers_tokens_already_generated_not_the_prompt() {
    let params = sampling(|p| (p.temperature, p.presence_penalty) = (0.0, 0.6));
    let mut s = Sampler::new(params, &[0]);
    assert_eq!(
        s.sample(&[1.0, 0.5]),
        0,
        "the prompt's token 0 is not penalised"
    );
    assert_eq!(s.sample(&[1.0, 0.5]), 1, "generated once: 1.0 - 0.6 < 0.5");
}

#[test]
fn out_of_range_parameters_are_refused_by_name() {
    let bad = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p.validate().unwrap_err()
    };
    assert_eq!(
        bad(|p| p.temperature = -0.1),
        SamplingError::Temperature(-0.1)
    );
    assert!(matches!(
        bad(|p| p.temperature = f32::NAN),
        SamplingError::Temperature(_)
    ));
    assert_eq!(bad(|p| p.top_p = 0.0), SamplingError::TopP(0.0));
    assert_eq!(bad(|p| p.top_p = 1.5), SamplingError::TopP(1.5));
    assert_eq!(bad(|p| p.min_p = -0.5), SamplingError::MinP(-0.5));
    assert_eq!(
        bad(|p| p.repetition_penalty = 0.0),
        SamplingError::RepetitionPenalty(0.0)
    );
    assert_eq!(
        bad(|p| p.presence_penalty = 3.0),
        SamplingError::PresencePenalty(3.0)
    );
    assert!(bad(|p| p.temperature = -1.0).to_string().contains("≥ 0"));
    let no_tokens = GenerationParams {
        max_new_tokens: 0,
        ..GenerationParams::greedy()
    };
    assert_eq!(
        Generation::new(no_tokens, &[], &[], None).unwrap_err(),
        GenerateError::NoTokens
    );
    let stops = GenerationParams {
        stop_strings: vec!["x".into()],
        ..GenerationParams::greedy()
    };
    assert_eq!(
        Generation::new(stops, &[], &[], None).unwrap_err(),
        GenerateError::StopStringsWithoutTokenizer
    );
}

#[test]
fn a_stop_string_split_across_pieces_stops_at_its_first_character() {
    let mut stops = StopStrings::new(vec!["o w".into(), "zz".into()]);
    assert_eq!(stops.push("Hel"), StopScan::Release("Hel".into()));
    // "lo" could begin "o w": held.
    assert_eq!(stops.push("lo"), StopScan::Release("l".into()));
    // Released in all: "Hell", the text before "o w".
    assert_eq!(
        stops.push(" wo"),
        StopScan::Stopped {
            text: String::new(),
            stop: 0
        }
    );
    let mut stops = StopStrings::new(vec!["END".into()]);
    assert_eq!(stops.push("xxE"), StopScan::Release("xx".into()));
    assert_eq!(
        stops.push("Nd"),
        StopScan::Release("ENd".into()),
        "not a stop: released whole"
    );
    assert_eq!(stops.finish(), "");
    // A multi-byte stop string cut inside nothing but characters.
    let mut stops = StopStrings::new(vec!["—and".into()]);
    assert_eq!(stops.push("a —"), StopScan::Release("a ".into()));
    assert_eq!(stops.push("an"), StopScan::Release(String::new()));
    assert_eq!(
        stops.push("d so"),
        StopScan::Stopped {
            text: String::new(),
            stop: 0
        }
    );
}

#[test]
fn streamed_text_is_whole_characters_and_equals_the_decoded_tokens() {
    let tokenizer = tokenizer();
    let text = "naïve café — “quoted” 日本語 done";
    let ids = tokenizer.encode(text).unwrap();
    assert!(
        ids.len() > text.chars().count() / 2,
        "byte-level pieces expected"
    );
    let mut detok = tideway_operators::generate::Detokenizer::default();
    let mut out = String::new();
    for &id in &ids {
        let piece = detok.push(&tokenizer, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "half a character released: {piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&detok.finish(&tokenizer).unwrap());
    assert_eq!(out, tokenizer.decode(&ids).unwrap());
    assert_eq!(out, text);
}

/// Drives a generation over fixed rows of logits that spell `ids` greedily.
fn run(
    params: GenerationParams,
    ids: &[u32],
    vocab: usize,
    eos: &[u32],
) -> (Vec<u32>, String, Option<FinishReason>) {
    let tokenizer = tokenizer();
    let mut generation = Generation::new(params, &[], eos, Some(&tokenizer)).unwrap();
    let mut text = String::new();
    for &id in ids {
        let mut row = vec![0.0f32; vocab];
        row[id as usize] = 10.0;
        let step = generation.step(&row, Some(&tokenizer)).unwrap();
        text.push_str(&step.text);
        if step.finished.is_some() {
            break;
        }
    }
    (generation.tokens().to_vec(), text, generation.finished())
}

#[test]
fn a_generation_stops_at_a_stop_string_a_stop_token_the_end_token_or_its_length() {
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size();
    let ids = tokenizer
        .encode("To be, or not to be: that is the question")
        .unwrap();
    let greedy = GenerationParams {
        max_new_tokens: 1000,
        ..GenerationParams::greedy()
    };

    let (tokens, text, finished) = run(
        GenerationParams {
            stop_strings: vec!["not t".into()],
            ..greedy.clone()
        },
        &ids,
        vocab,
        &[],
    );
    assert_eq!(text, "To be, or ");
    assert_eq!(finished, Some(FinishReason::StopString(0)));
    assert!(tokens.len() < ids.len());

    let stop_id = ids[3];
    let (tokens, _, finished) = run(
        GenerationParams {
            stop_token_ids: vec![stop_id],
            ..greedy.clone()
        },
        &ids,
        vocab,
        &[],
    );
    assert_eq!(tokens, ids[..4].to_vec());
    assert_eq!(finished, Some(FinishReason::StopToken(stop_id)));

    let (tokens, _, finished) = run(greedy.clone(), &ids, vocab, &[ids[2]]);
    assert_eq!(
        (tokens.len(), finished),
        (3, Some(FinishReason::StopToken(ids[2])))
    );
    let ignoring = GenerationParams {
        ignore_eos: true,
        max_new_tokens: 5,
        ..greedy
    };
    let (tokens, text, finished) = run(ignoring, &ids, vocab, &[ids[2]]);
    assert_eq!(
        (tokens, finished),
        (ids[..5].to_vec(), Some(FinishReason::Length))
    );
    assert_eq!(text, tokenizer.decode(&ids[..5]).unwrap());
}
