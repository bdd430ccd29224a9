//! Causal depthwise conv1d, the short convolution in front of Mamba's SSM.
//!
//! PyTorch `Conv1d(C, C, K, groups=C, padding=K-1)` keeping the first `T` outputs:
//! `out[t, c] = b[c] + Σ_{j<K} w[c, j] · x[t - (K-1) + j, c]` — tap `K-1` multiplies the current
//! step (state-spaces/mamba `mamba_simple.py`, HF `MambaMixer.slow_forward`).
//!
//! Streaming keeps a rolling `window` of the last `K` inputs per channel, laid out `[C, K]`
//! oldest first, as HF's `conv_states` cache is. A fresh window is all zeros, which is the
//! reference's left zero padding.

use crate::matmul::MatRef;
use crate::simd::dispatch;

dispatch! {
    /// Runs the conv over `x` (`T × C`) continuing from `window`, writes `out` (`[T, C]`) and
    /// leaves in `window` the last `K` inputs (zeros, then older window values, when `T < K`).
    pub fn causal_conv1d_seq(
        x: MatRef<'_>,
        weight: &[f32],
        k: usize,
        bias: Option<&[f32]>,
        window: &mut [f32],
        out: &mut [f32],
    ) => conv_seq_body
}

dispatch! {
    /// One step: shifts `x` (`[C]`) into `window` and writes the conv output for it into `out`.
    pub fn causal_conv1d_step(
        x: &[f32],
        weight: &[f32],
        k: usize,
        bias: Option<&[f32]>,
        window: &mut [f32],
        out: &mut [f32],
    ) => conv_step_body
}

#[inline(always)]
fn conv_seq_body(
    x: MatRef<'_>,
    weight: &[f32],
    k: usize,
    bias: Option<&[f32]>,
    window: &mut [f32],
    out: &mut [f32],
) {
    let (t_len, c_len) = (x.rows, x.cols);
    assert_eq!(weight.len(), c_len * k);
    assert_eq!(window.len(), c_len * k);
    assert!(out.len() >= t_len * c_len);
    // Input at time p (p may be negative: then it comes from the window, whose newest entry,
    // index K-1, is time -1).
    let input = |p: isize, c: usize, window: &[f32]| -> f32 {
        if p >= 0 {
            x.data[p as usize * x.row_stride + c]
        } else {
            window[c * k + (k as isize + p) as usize]
        }
    };
    for t in 0..t_len {
        let dst = &mut out[t * c_len..(t + 1) * c_len];
        match bias {
            Some(b) => dst.copy_from_slice(b),
            None => dst.fill(0.0),
        }
        for j in 0..k {
            let p = t as isize + j as isize - (k as isize - 1);
            if p >= 0 {
                let src = &x.data[p as usize * x.row_stride..][..c_len];
                for c in 0..c_len {
                    dst[c] = weight[c * k + j].mul_add(src[c], dst[c]);
                }
            } else {
                for c in 0..c_len {
                    dst[c] = weight[c * k + j].mul_add(input(p, c, window), dst[c]);
                }
            }
        }
    }
    // The new window holds inputs at times T-K .. T-1.
    let mut next = vec![0.0f32; k];
    for c in 0..c_len {
        for (j, slot) in next.iter_mut().enumerate() {
            *slot = input(t_len as isize - k as isize + j as isize, c, window);
        }
        window[c * k..(c + 1) * k].copy_from_slice(&next);
    }
}

#[inline(always)]
fn conv_step_body(
    x: &[f32],
    weight: &[f32],
    k: usize,
    bias: Option<&[f32]>,
    window: &mut [f32],
    out: &mut [f32],
) {
    let c_len = x.len();
    assert_eq!(weight.len(), c_len * k);
    assert_eq!(window.len(), c_len * k);
    for c in 0..c_len {
        let win = &mut window[c * k..(c + 1) * k];
        win.copy_within(1.., 0);
        win[k - 1] = x[c];
        let w = &weight[c * k..(c + 1) * k];
        let mut acc = bias.map_or(0.0, |b| b[c]);
        for j in 0..k {
            acc = w[j].mul_add(win[j], acc);
        }
        out[c] = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's definition, directly: zero-padded input, no window.
    fn reference(
        x: &[f32],
        t_len: usize,
        c_len: usize,
        w: &[f32],
        k: usize,
        b: &[f32],
    ) -> Vec<f32> {
        let mut out = vec![0.0; t_len * c_len];
        for t in 0..t_len {
            for c in 0..c_len {
                let mut acc = b[c] as f64;
                for j in 0..k {
                    let p = t as isize + j as isize - (k as isize - 1);
                    if p >= 0 {
                        acc += w[c * k + j] as f64 * x[p as usize * c_len + c] as f64;
                    }
                }
                out[t * c_len + c] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn sequence_split_and_step_agree_with_reference() {
        for k in 2..=4 {
            let (t_len, c_len) = (9, 5);
            let x: Vec<f32> = (0..t_len * c_len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
                .collect();
            let w: Vec<f32> = (0..c_len * k)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2)
                .collect();
            let b: Vec<f32> = (0..c_len).map(|i| i as f32 * 0.1 - 0.2).collect();
            let want = reference(&x, t_len, c_len, &w, k, &b);

            let mut win = vec![0.0; c_len * k];
            let mut out = vec![0.0; t_len * c_len];
            causal_conv1d_seq(
                MatRef::dense(&x, t_len, c_len),
                &w,
                k,
                Some(&b),
                &mut win,
                &mut out,
            );
            for (a, e) in out.iter().zip(&want) {
                assert!((a - e).abs() < 1e-5);
            }
            let whole_window = win.clone();

            // Split in two uneven pieces (the first shorter than K), then step by step.
            for split in [1, k - 1, 4] {
                let mut win = vec![0.0; c_len * k];
                let mut out = vec![0.0; t_len * c_len];
                causal_conv1d_seq(
                    MatRef::dense(&x, split, c_len),
                    &w,
                    k,
                    Some(&b),
                    &mut win,
                    &mut out,
                );
                let rest = MatRef::dense(&x[split * c_len..], t_len - split, c_len);
                causal_conv1d_seq(rest, &w, k, Some(&b), &mut win, &mut out[split * c_len..]);
                for (a, e) in out.iter().zip(&want) {
                    assert!((a - e).abs() < 1e-5, "k={k} split={split}");
                }
                assert_eq!(win, whole_window);
            }
            let mut win = vec![0.0; c_len * k];
            for t in 0..t_len {
                let mut o = vec![0.0; c_len];
                causal_conv1d_step(
                    &x[t * c_len..(t + 1) * c_len],
                    &w,
                    k,
                    Some(&b),
                    &mut win,
                    &mut o,
                );
                for c in 0..c_len {
                    assert!((o[c] - want[t * c_len + c]).abs() < 1e-5);
                }
            }
            assert_eq!(win, whole_window);
        }
    }
}
