//! The selections an adapted Zero-TPrune is measured against (SPEC-MODELS §6.3): random,
//! stride, and the top tokens by a score — DeciMamba's ‖Δ_t‖ (`MambaMixer::delta_norms`) or
//! ToR's importance (`tor_importance`). Each keeps the protected tokens and returns `keep`
//! indices (all of them when `keep` ≥ n), ascending.

/// The protected tokens (deduplicated, in range), then `fill` of the rest, ascending.
fn with_protected(
    n: usize,
    keep: usize,
    protected: &[usize],
    fill: impl FnOnce(&[usize], usize) -> Vec<usize>,
) -> Vec<usize> {
    let mut is_protected = vec![false; n];
    for &p in protected.iter().filter(|&&p| p < n) {
        is_protected[p] = true;
    }
    let mut kept: Vec<usize> = (0..n).filter(|&i| is_protected[i]).collect();
    let rest: Vec<usize> = (0..n).filter(|&i| !is_protected[i]).collect();
    let room = keep.min(n).saturating_sub(kept.len());
    kept.extend(fill(&rest, room));
    kept.sort_unstable();
    kept
}

/// The `keep` tokens with the highest `scores` (ties: lower index first).
pub fn top_scores(scores: &[f64], keep: usize, protected: &[usize]) -> Vec<usize> {
    with_protected(scores.len(), keep, protected, |rest, room| {
        let mut rest = rest.to_vec();
        rest.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        rest.truncate(room);
        rest
    })
}

/// Evenly spaced tokens: of the `m` unprotected ones, those at ⌊i·m/room⌋ for i < room.
pub fn stride(n: usize, keep: usize, protected: &[usize]) -> Vec<usize> {
    with_protected(n, keep, protected, |rest, room| {
        (0..room).map(|i| rest[i * rest.len() / room]).collect()
    })
}

/// A uniformly random choice (a partial Fisher–Yates shuffle driven by SplitMix64 from `seed`:
/// the same seed, the same tokens).
pub fn random(n: usize, keep: usize, protected: &[usize], seed: u64) -> Vec<usize> {
    with_protected(n, keep, protected, |rest, room| {
        let mut rest = rest.to_vec();
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for i in 0..room {
            let j = i + (next() % (rest.len() - i) as u64) as usize;
            rest.swap(i, j);
        }
        rest.truncate(room);
        rest
    })
}

/// ToR's token importance for SSMs (Zhan et al., EMNLP 2024): `Σ_d max(h_td, 0)` over a layer's
/// hidden states `[T, D]`.
pub fn tor_importance(hidden: &[f32], d: usize) -> Vec<f64> {
    hidden
        .chunks_exact(d)
        .map(|row| row.iter().map(|&h| (h as f64).max(0.0)).sum())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_baseline_keeps_the_protected_tokens_and_as_many_as_asked() {
        let scores = [0.5, 0.9, 0.1, 0.9, 0.3, 0.0];
        assert_eq!(top_scores(&scores, 3, &[5]), vec![1, 3, 5]);
        assert_eq!(top_scores(&scores, 10, &[]), vec![0, 1, 2, 3, 4, 5]);
        // 10 tokens, 0 protected: 9 others, 3 kept at 0, 3, 6 of them (tokens 1, 4, 7).
        assert_eq!(stride(10, 4, &[0]), vec![0, 1, 4, 7]);
        let r = random(100, 10, &[0, 99], 7);
        assert_eq!(r.len(), 10);
        assert!(r.contains(&0) && r.contains(&99));
        assert!(r.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
        assert_eq!(
            r,
            random(100, 10, &[0, 99], 7),
            "the same seed, the same tokens"
        );
        assert_ne!(r, random(100, 10, &[0, 99], 8));
        assert_eq!(
            tor_importance(&[1.0, -2.0, 3.0, -1.0, -1.0, 0.5], 3),
            vec![4.0, 0.5]
        );
    }
}
