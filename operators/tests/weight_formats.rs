//! bf16 and int8 weights (`--dtype` on the CPU) against f32 on the trained language models
//! (`models/shakespeare-mamba`, `models/shakespeare-gla`), teacher-forced over held-out text
//! (`tests/fixtures/text/heldout_excerpt.txt`: the start of the plays `tools/train_lm` holds
//! out): the top-1 prediction must agree with f32's at ≥ 99% of positions for bf16 and ≥ 97%
//! for int8, and the perplexity of the text must move by ≤ 1% and ≤ 3% (issue 20).

mod common;

use std::path::PathBuf;

use tideway_kernels::matmul::LinearFormat;
use tideway_operators::models::{Model, load_model_as};
use tideway_operators::tokenizers::text::TextTokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Logits of every position of `ids`, one prefill.
fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut state = model.new_state();
    model
        .forward_packed(ids, &[ids.len()], &mut [&mut state])
        .unwrap()
        .into_vec()
}

/// The argmax of each row, and the perplexity of `ids[1..]` under the rows before them.
fn predictions(logits: &[f32], ids: &[u32], vocab: usize) -> (Vec<usize>, f64) {
    let mut top = Vec::new();
    let mut nll = 0.0;
    for (t, row) in logits.chunks_exact(vocab).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        top.push(row.iter().position(|&x| x == max).unwrap());
        if let Some(&next) = ids.get(t + 1) {
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            nll += sum.ln() - (row[next as usize] - max) as f64;
        }
    }
    (top, (nll / (ids.len() - 1) as f64).exp())
}

#[test]
fn bf16_and_int8_weights_agree_with_f32_on_the_trained_models() {
    let text = std::fs::read_to_string(common::fixture("text/heldout_excerpt.txt")).unwrap();
    for dir in ["models/shakespeare-mamba", "models/shakespeare-gla"] {
        let dir = root().join(dir);
        let tokenizer = TextTokenizer::find(&dir).unwrap().unwrap();
        let mut ids = tokenizer.encode(&text).unwrap();
        ids.truncate(1024);
        let reference = load_model_as(&dir, LinearFormat::F32).unwrap();
        let vocab = reference.vocab_size();
        let (want, ppl) = predictions(&logits(&reference, &ids), &ids, vocab);
        for (format, min_agreement, max_ppl_change) in [
            (LinearFormat::Bf16, 0.99, 0.01),
            (LinearFormat::Int8, 0.97, 0.03),
        ] {
            let model = load_model_as(&dir, format).unwrap();
            assert!(model.weight_bytes() < reference.weight_bytes());
            let (got, ppl_q) = predictions(&logits(&model, &ids), &ids, vocab);
            let agreement =
                got.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
            let change = ppl_q / ppl - 1.0;
            eprintln!(
                "{} {format:?}: {} tokens, top-1 agreement {:.2}%, perplexity {ppl:.3} -> {ppl_q:.3} ({:+.2}%), weights {} -> {} bytes",
                dir.display(),
                ids.len(),
                100.0 * agreement,
                100.0 * change,
                reference.weight_bytes(),
                model.weight_bytes()
            );
            assert!(
                agreement >= min_agreement,
                "{format:?}: agreement {agreement}"
            );
            assert!(
                change.abs() <= max_ppl_change,
                "{format:?}: perplexity {change:+}"
            );
        }
    }
}
