//! Zero-TPrune's pruning layer (Wang, Dedhia, Jha, CVPR 2024; ../shared/SPEC-MODELS.md §6) as a
//! plain function: per-head token-mixing graphs and the tokens' keys in, the kept tokens and
//! their importance out. I′ (one Weighted-PageRank iteration) ranks the tokens; the S stage drops
//! the less important half's near-duplicates (cosine of keys); the I stage runs WPR with the
//! variance-based head filter (VHF) and "emphasize informative region" (EIR) on the survivors
//! and keeps the top ones. `causal` applies Tideway's adaptation to causal layers (§6.3).
//!
//! Where §6 leaves a choice open, this function makes the one stated on its item below, and
//! `tools/gen_zero_tprune.py` (the numpy oracle the tests compare against) makes the same.
//!
//! ```
//! use tideway_operators::prune::zero_tprune::{zero_tprune, ZeroTPrune};
//! // One head over 3 tokens: token 2 gets most of the votes.
//! let graph = [0.2, 0.2, 0.6, 0.1, 0.1, 0.8, 0.0, 0.3, 0.7f32];
//! let keys = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0f32];
//! let config = ZeroTPrune { keep: 2, protected: vec![0], ..ZeroTPrune::default() };
//! let pruned = zero_tprune(&graph, 1, &keys, 2, &config).unwrap();
//! assert_eq!(pruned.kept, vec![0, 2]);
//! ```

use super::cosine;

/// How one pruning layer prunes.
#[derive(Clone, Debug, PartialEq)]
pub struct ZeroTPrune {
    /// The graphs are causal (row i attends to j ≤ i): §6.3's adaptation. Otherwise every row
    /// must be a distribution over all tokens.
    pub causal: bool,
    /// WPR iterations of the I stage ([`default_iterations`] gives the paper's by layer).
    pub iterations: usize,
    /// Tokens kept in all (protected ones included); more than there are keeps them all.
    pub keep: usize,
    /// Tokens the S stage drops as near-duplicates (at most the less important half).
    pub drop_similar: usize,
    /// Tokens never pruned (the first token, the most recent ones, a CLS token).
    pub protected: Vec<usize>,
    /// VHF's range of `Var_i(n · s_i)` (n tokens; the scale makes a uniform score 1; the
    /// paper's [0.01, 0.7] does not say its scale).
    pub vhf: (f64, f64),
}

impl Default for ZeroTPrune {
    fn default() -> Self {
        ZeroTPrune {
            causal: false,
            iterations: 5,
            keep: usize::MAX,
            drop_similar: 0,
            protected: Vec::new(),
            vhf: (0.01, 0.7),
        }
    }
}

/// What a pruning layer decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Pruned {
    /// Kept token indices, ascending.
    pub kept: Vec<usize>,
    /// The I stage's importance of each kept token.
    pub scores: Vec<f64>,
    /// Tokens the S stage dropped as near-duplicates, ascending.
    pub dropped: Vec<usize>,
    /// I′: every token's one-iteration importance (the S stage's ranking).
    pub i_prime: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PruneError {
    #[error(
        "graphs of {heads} heads hold {len} values; {heads} heads over {n} tokens take {heads}·{n}·{n}"
    )]
    GraphShape { heads: usize, n: usize, len: usize },
    #[error("keys hold {len} values; {n} tokens of {d} values take {}", n * d)]
    KeyShape { n: usize, d: usize, len: usize },
    #[error("protected token {index} is out of range: there are {n} tokens")]
    Protected { index: usize, n: usize },
    #[error("a graph value is not finite (head {head}, row {row}, column {column})")]
    NotFinite {
        head: usize,
        row: usize,
        column: usize,
    },
    #[error("no heads: the pruner needs at least one head's graph")]
    NoHeads,
    #[error("this model family has no DeciMamba score (‖Δ‖ is Mamba's); use another policy")]
    NoScore,
}

/// The paper's iteration counts (§6.1: 30–50 in the first three layers, 5–10 in the middle,
/// 1 in the last three): 30, 5 and 1.
pub fn default_iterations(layer: usize, layers: usize) -> usize {
    if layer < 3 {
        30
    } else if layer + 3 >= layers {
        1
    } else {
        5
    }
}

/// One head's graph over the tokens `keep` (indices into an `n`-token graph), as a dense
/// `[m, m]` f64 matrix ready for WPR: rows renormalised to sum 1 (a row summing to 0 stays 0);
/// causal: `rownorm(|A| ⊙ lower-triangular mask)`.
fn prepare(graph: &[f32], n: usize, keep: &[usize], causal: bool) -> Vec<f64> {
    let m = keep.len();
    let mut a = vec![0.0f64; m * m];
    for (r, &i) in keep.iter().enumerate() {
        let row = &mut a[r * m..(r + 1) * m];
        for (c, &j) in keep.iter().enumerate() {
            let v = graph[i * n + j] as f64;
            row[c] = match causal {
                true if c > r => 0.0,
                true => v.abs(),
                false => v,
            };
        }
        let sum: f64 = row.iter().sum();
        if sum > 0.0 {
            row.iter_mut().for_each(|v| *v /= sum);
        } else {
            row.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    a
}

/// Weighted PageRank over a prepared `[n, n]` graph: from the uniform score, `iterations`
/// times `s_j ← Σ_i A_ij s_i` (each token votes for those it attends to, by its own score),
/// causal: divided by the token's possible voters, `· n / (n − j)`; renormalised to sum 1
/// after each iteration (no per-iteration 1/N factor, which underflows).
pub fn wpr(a: &[f64], n: usize, iterations: usize, causal: bool) -> Vec<f64> {
    let mut s = vec![1.0 / n as f64; n];
    let mut next = vec![0.0; n];
    for _ in 0..iterations {
        next.iter_mut().for_each(|v| *v = 0.0);
        for (i, &si) in s.iter().enumerate() {
            for (j, v) in next.iter_mut().enumerate() {
                *v += a[i * n + j] * si;
            }
        }
        if causal {
            for (j, v) in next.iter_mut().enumerate() {
                *v *= n as f64 / (n - j) as f64;
            }
        }
        let total: f64 = next.iter().sum();
        if total > 0.0 {
            next.iter_mut().for_each(|v| *v /= total);
        }
        std::mem::swap(&mut s, &mut next);
    }
    s
}

/// VHF: whether each head's `Var_i(n · s_i)` (population variance) lies in `range`.
fn vhf(per_head: &[Vec<f64>], range: (f64, f64)) -> Vec<bool> {
    per_head
        .iter()
        .map(|s| {
            let n = s.len() as f64;
            let mean = s.iter().map(|v| n * v).sum::<f64>() / n;
            let var = s.iter().map(|v| (n * v - mean).powi(2)).sum::<f64>() / n;
            (range.0..=range.1).contains(&var)
        })
        .collect()
}

/// EIR: `s_i = sqrt(Σ_h η_h (s_i^h)² / Σ_h η_h)`; no head kept by VHF counts every head.
fn eir(per_head: &[Vec<f64>], eta: &[bool]) -> Vec<f64> {
    let all = !eta.iter().any(|&e| e);
    let counted: Vec<&Vec<f64>> = per_head
        .iter()
        .zip(eta)
        .filter(|(_, e)| all || **e)
        .map(|(s, _)| s)
        .collect();
    let n = per_head[0].len();
    (0..n)
        .map(|i| {
            let sum: f64 = counted.iter().map(|s| s[i] * s[i]).sum();
            (sum / counted.len() as f64).sqrt()
        })
        .collect()
}

/// Prunes `n` tokens: `graphs` holds `heads` `[n, n]` graphs (row i: query i's weights over the
/// keys), `keys` `[n, d]` (heads concatenated).
///
/// 1. I′: one WPR iteration per head, heads combined by EIR with every head counted.
/// 2. S ("Sequential-U"): the unprotected tokens sorted by I′ ascending (ties: lower index
///    first); group A is the first ⌊M/2⌋ of them, group B every other token. Each a in A scores
///    `max_b cos(k_a, k_b)`; the `drop_similar` highest are dropped (ties: lower index first).
/// 3. I: each head's graph restricted to the survivors (renormalised), `iterations` WPR
///    iterations, VHF, EIR; kept: the protected survivors, then the highest scores (ties: lower
///    index first), `keep` in all.
pub fn zero_tprune(
    graphs: &[f32],
    heads: usize,
    keys: &[f32],
    d: usize,
    config: &ZeroTPrune,
) -> Result<Pruned, PruneError> {
    if heads == 0 {
        return Err(PruneError::NoHeads);
    }
    let n = ((graphs.len() / heads) as f64).sqrt().round() as usize;
    if heads * n * n != graphs.len() {
        return Err(PruneError::GraphShape {
            heads,
            n,
            len: graphs.len(),
        });
    }
    if keys.len() != n * d {
        return Err(PruneError::KeyShape {
            n,
            d,
            len: keys.len(),
        });
    }
    if let Some(&index) = config.protected.iter().find(|&&p| p >= n) {
        return Err(PruneError::Protected { index, n });
    }
    if let Some(at) = graphs.iter().position(|v| !v.is_finite()) {
        return Err(PruneError::NotFinite {
            head: at / (n * n),
            row: at % (n * n) / n,
            column: at % n,
        });
    }
    let mut protected = vec![false; n];
    for &p in &config.protected {
        protected[p] = true;
    }
    let graph = |h: usize| &graphs[h * n * n..(h + 1) * n * n];
    let all: Vec<usize> = (0..n).collect();

    // I′.
    let per_head: Vec<Vec<f64>> = (0..heads)
        .map(|h| {
            wpr(
                &prepare(graph(h), n, &all, config.causal),
                n,
                1,
                config.causal,
            )
        })
        .collect();
    let i_prime = eir(&per_head, &vec![true; heads]);

    // S.
    let mut others: Vec<usize> = (0..n).filter(|&i| !protected[i]).collect();
    others.sort_by(|&a, &b| i_prime[a].total_cmp(&i_prime[b]).then(a.cmp(&b)));
    let group_a = &others[..others.len() / 2];
    let mut in_a = vec![false; n];
    group_a.iter().for_each(|&a| in_a[a] = true);
    let key = |i: usize| &keys[i * d..(i + 1) * d];
    let mut similar: Vec<(f64, usize)> = group_a
        .iter()
        .map(|&a| {
            let m = (0..n)
                .filter(|&b| !in_a[b])
                .map(|b| cosine(key(a), key(b)))
                .fold(f64::NEG_INFINITY, f64::max);
            (m, a)
        })
        .collect();
    similar.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut dropped: Vec<usize> = similar
        .iter()
        .take(config.drop_similar)
        .map(|&(_, a)| a)
        .collect();
    dropped.sort_unstable();

    // I.
    let mut gone = vec![false; n];
    dropped.iter().for_each(|&i| gone[i] = true);
    let survivors: Vec<usize> = (0..n).filter(|&i| !gone[i]).collect();
    let m = survivors.len();
    let per_head: Vec<Vec<f64>> = (0..heads)
        .map(|h| {
            let a = prepare(graph(h), n, &survivors, config.causal);
            wpr(&a, m, config.iterations, config.causal)
        })
        .collect();
    let eta = vhf(&per_head, config.vhf);
    let scores = eir(&per_head, &eta);

    let mut kept: Vec<usize> = (0..m).filter(|&r| protected[survivors[r]]).collect();
    let mut rest: Vec<usize> = (0..m).filter(|&r| !protected[survivors[r]]).collect();
    rest.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let room = config.keep.saturating_sub(kept.len());
    kept.extend(rest.into_iter().take(room));
    kept.sort_unstable();
    Ok(Pruned {
        kept: kept.iter().map(|&r| survivors[r]).collect(),
        scores: kept.iter().map(|&r| scores[r]).collect(),
        dropped,
        i_prime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wpr_keeps_the_mass_and_votes_along_the_rows() {
        // Every token attends to token 1 only: after one iteration all mass is there.
        let a = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0];
        let s = wpr(&a, 3, 1, false);
        assert_eq!(s, vec![0.0, 1.0, 0.0]);
        // Causal: the first token has every token as a voter, the last only itself.
        let uniform_causal = prepare(&[1.0; 9], 3, &[0, 1, 2], true);
        let s = wpr(&uniform_causal, 3, 1, true);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(s[0] > s[1] && s[1] > s[2], "{s:?}");
    }

    #[test]
    fn bad_shapes_and_protected_tokens_are_refused_by_name() {
        let c = ZeroTPrune::default();
        assert!(matches!(
            zero_tprune(&[0.5; 8], 1, &[0.0; 2], 1, &c),
            Err(PruneError::GraphShape { .. })
        ));
        assert!(matches!(
            zero_tprune(&[0.25; 4], 1, &[0.0; 3], 1, &c),
            Err(PruneError::KeyShape { .. })
        ));
        let c = ZeroTPrune {
            protected: vec![5],
            ..ZeroTPrune::default()
        };
        let e = zero_tprune(&[0.25; 4], 1, &[0.0; 2], 1, &c).unwrap_err();
        assert_eq!(
            e.to_string(),
            "protected token 5 is out of range: there are 2 tokens"
        );
        let mut g = [0.25f32; 4];
        g[3] = f32::NAN;
        assert!(matches!(
            zero_tprune(&g, 1, &[0.0; 2], 1, &ZeroTPrune::default()),
            Err(PruneError::NotFinite {
                row: 1,
                column: 1,
                ..
            })
        ));
    }

    #[test]
    fn the_paper_iteration_counts_by_layer() {
        let counts: Vec<usize> = (0..12).map(|l| default_iterations(l, 12)).collect();
        assert_eq!(counts, vec![30, 30, 30, 5, 5, 5, 5, 5, 5, 1, 1, 1]);
    }
}
