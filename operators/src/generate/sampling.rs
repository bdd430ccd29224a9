//! Choosing the next token from a row of logits: penalties, temperature, top-k, top-p, min-p,
//! and a draw from the request's own seeded generator.
//!
//! The steps and their order are those of HF transformers' logits processors (repetition
//! penalty as CTRL, Keskar et al. 2019: a seen token's positive logit divided by the penalty,
//! a negative one multiplied; then temperature, top-k, top-p, min-p) with the presence
//! penalty of the OpenAI API (subtracted once from every token already generated). A
//! request's random numbers come from its own ChaCha8 stream, one number per step, so its
//! tokens depend on its seed and its logits only, never on what else shares the batch.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tideway_kernels::argmax::argmax;

/// How a request samples. `temperature` 0 is greedy (the first largest logit).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k likeliest tokens (0: all).
    pub top_k: usize,
    /// Keep the fewest likeliest tokens whose probabilities sum to at least `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the likeliest one, in [0, 1].
    pub min_p: f32,
    /// ≥ 1 penalises tokens of the prompt and the output (1: off).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated (0: off).
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampling parameter out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature {0} is not allowed: give a finite value ≥ 0 (0 is greedy)")]
    Temperature(f32),
    #[error("top_p {0} is not allowed: give a value in (0, 1] (1 keeps every token)")]
    TopP(f32),
    #[error("min_p {0} is not allowed: give a value in [0, 1] (0 keeps every token)")]
    MinP(f32),
    #[error("repetition_penalty {0} is not allowed: give a finite value > 0 (1 is off)")]
    RepetitionPenalty(f32),
    #[error("presence_penalty {0} is not allowed: give a finite value in [-2, 2] (0 is off)")]
    PresencePenalty(f32),
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        if !(self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty)) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// One request's sampler: its parameters, its random stream and the tokens it has seen.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens of the prompt and the output (repetition penalty), sorted, deduplicated.
    seen: Vec<u32>,
    /// Tokens of the output only (presence penalty), sorted, deduplicated.
    generated: Vec<u32>,
    /// Scratch: (token, logit) candidates, reused every step.
    candidates: Vec<(u32, f32)>,
    /// Scratch: the step's logits with the penalties applied, reused every step.
    penalised: Vec<f32>,
}

impl Sampler {
    /// A sampler for validated `params` whose prompt was `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let mut seen = prompt.to_vec();
        seen.sort_unstable();
        seen.dedup();
        Sampler {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
            seen,
            generated: Vec::new(),
            candidates: Vec::new(),
            penalised: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for `logits` (one row over the vocabulary), remembered as seen.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = self.choose(logits);
        for list in [&mut self.seen, &mut self.generated] {
            if let Err(at) = list.binary_search(&token) {
                list.insert(at, token);
            }
        }
        token
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // The penalties change only the tokens seen so far: a copy of the logits adjusted
        // at those (the repetition penalty first, then the presence penalty); without
        // penalties the logits are chosen from as they are, with no copy.
        let logits = if p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 {
            logits
        } else {
            let penalised = &mut self.penalised;
            penalised.clear();
            penalised.extend_from_slice(logits);
            if p.repetition_penalty != 1.0 {
                for &token in &self.seen {
                    if let Some(l) = penalised.get_mut(token as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
            if p.presence_penalty != 0.0 {
                for &token in &self.generated {
                    if let Some(l) = penalised.get_mut(token as usize) {
                        *l -= p.presence_penalty;
                    }
                }
            }
            &self.penalised[..]
        };
        if p.is_greedy() {
            return argmax(logits) as u32;
        }
        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / p.temperature))
                .filter(|(_, l)| !l.is_nan()),
        );
        // Likeliest first; equal logits by token id, so the order is fixed.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        let Some(&(_, max)) = candidates.first() else {
            return 0;
        };
        if max == f32::NEG_INFINITY {
            return candidates[0].0;
        }
        // Probabilities (unnormalised, in f64) of the survivors of top-k.
        let weights: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut keep = candidates.len();
        if p.top_p < 1.0 {
            // The fewest tokens reaching top_p, as HF's TopPLogitsWarper keeps them.
            let mut cumulative = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cumulative += w / total;
                if cumulative >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // weights[0] is the likeliest token's, 1 before normalising.
            keep = keep.min(
                weights
                    .iter()
                    .take_while(|&&w| w >= p.min_p as f64)
                    .count()
                    .max(1),
            );
        }
        let kept = &weights[..keep];
        let sum: f64 = kept.iter().sum();
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * sum;
        let mut cumulative = 0.0;
        for (i, w) in kept.iter().enumerate() {
            cumulative += w;
            if u < cumulative {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }
}
