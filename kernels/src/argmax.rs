//! The index of a slice's first largest value, vectorised: greedy decoding's choice among a
//! vocabulary of logits, once a session a step.

use crate::simd::dispatch;

dispatch! {
    /// The index of the first largest value of `values`, NaN never winning (0 when none is
    /// above −∞, or `values` is empty): a running `(index, value)` that a larger value
    /// replaces, as `torch.argmax` picks among non-NaN values.
    pub fn argmax(values: &[f32]) -> usize => argmax_body
}

/// Values compared at once: one AVX-512 register.
const LANES: usize = 16;

/// Two passes: the largest value by lanes, then the first chunk holding it. A single pass
/// keeping the index is a chain of dependent compares, ~1 ns a value: 1.4 ms of a batch-32
/// mamba-130m decode step (32 rows of 50280 logits; `perf`, 2026-12-04).
#[inline(always)]
fn argmax_body(values: &[f32]) -> usize {
    let chunks = values.chunks_exact(LANES);
    // `f32::max` returns the other operand when one is NaN, so a NaN is never the largest.
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let best = lanes.iter().fold(tail, |m, &v| m.max(v));
    if best == f32::NEG_INFINITY {
        // Nothing beats the running value's start: the first index.
        return 0;
    }
    for (c, chunk) in values.chunks(LANES).enumerate() {
        // Whether the chunk holds `best`, over all its lanes (no early exit, so it vectorises).
        if chunk.iter().fold(false, |found, &v| found | (v == best)) {
            let at = chunk.iter().position(|&v| v == best);
            return c * LANES + at.expect("the chunk holds it");
        }
    }
    unreachable!("`best` is one of the values")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: a running (index, value) replaced by strictly larger values.
    fn first_largest(values: &[f32]) -> usize {
        let mut best = (0, f32::NEG_INFINITY);
        for (i, &v) in values.iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        best.0
    }

    #[test]
    fn picks_the_first_largest_as_a_running_maximum_does() {
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN],
            vec![f32::NAN, f32::NEG_INFINITY],
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0],
            vec![2.0, 2.0],
            vec![f32::NAN, 3.0, f32::NAN, 3.0],
            vec![f32::INFINITY, f32::NAN, f32::INFINITY],
        ];
        for values in &cases {
            assert_eq!(argmax(values), first_largest(values), "{values:?}");
        }
        // Lengths around the lanes, the largest (repeated) at every place, NaNs among them.
        for len in [1usize, 15, 16, 17, 31, 33, 50280] {
            let mut values: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32).collect();
            for at in [0, len / 3, len - 1] {
                let mut v = values.clone();
                v[at] = 5000.0;
                v[len - 1 - (len - 1 - at) / 2] = 5000.0;
                if len > 2 {
                    v[1] = f32::NAN;
                }
                assert_eq!(argmax(&v), first_largest(&v), "len {len}, at {at}");
            }
            values.iter_mut().for_each(|v| *v = -*v);
            assert_eq!(
                argmax(&values),
                first_largest(&values),
                "len {len}, negated"
            );
        }
    }
}
