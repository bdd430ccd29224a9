//! RetNet's retention (Sun et al. 2023; `fla/layers/multiscale_retention.py`),
//! `shared/SPEC-MODELS.md` §3.4: the GLA mixer ([`super::gla`], `DecayKind::Retention`) with a
//! fixed per-head decay instead of the data-dependent key gate, and rotary q/k. This module
//! holds the two pieces that are RetNet's own.

/// The per-head log decay, `ln(1 − 2^{−5−h})` for heads `h = first_head ..` (a
/// tensor-parallel rank holds heads from `first_head`), repeated over the `dk` key channels of
/// each head (`[num_heads·dk]`; computed in f64 as fla's `torch.log(1 - 2**(...))` on a
/// Python float, then rounded).
pub fn retention_log_decay(first_head: usize, num_heads: usize, dk: usize) -> Vec<f32> {
    let mut gk = vec![0.0f32; num_heads * dk];
    for (h, row) in gk.chunks_mut(dk).enumerate() {
        let gamma = 1.0 - 2f64.powi(-5 - (first_head + h) as i32);
        row.fill(gamma.ln() as f32);
    }
    gk
}

/// Rotary position embedding, NeoX style (rotate-half, not interleaved), base 10000, on every
/// `dk`-wide head of every `width`-wide row; row `t` sits at position `start + t`
/// (`fla/modules/rotary`, `RotaryEmbedding(dim = head_k_dim)`; angles in f32 as fla's cache).
pub fn rotary(values: &mut [f32], width: usize, dk: usize, start: usize) {
    let half = dk / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dk as f32))
        .collect();
    for (t, row) in values.chunks_mut(width).enumerate() {
        let pos = (start + t) as f32;
        for head in row.chunks_mut(dk) {
            for i in 0..half {
                let (sin, cos) = (pos * inv_freq[i]).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}
