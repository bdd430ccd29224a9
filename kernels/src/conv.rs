//! Causal depthwise conv1d, the short convolution in front of Mamba's SSM.
//!
//! PyTorch `Conv1d(C, C, K, groups=C, padding=K-1)` keeping the first `T` outputs:
//! `out[t, c] = b[c] + Σ_{j<K} w[c, j] · x[t - (K-1) + j, c]` — tap `K-1` multiplies the current
//! step (state-spaces/mamba `mamba_simple.py`, HF `MambaMixer.slow_forward`).
//!
//! Streaming keeps a rolling `window` of the last `K` inputs per channel, laid out `[C, K]`
//! oldest first, as HF's `conv_states` cache is. A fresh window is all zeros, which is the
//! reference's left zero padding.

use crate::activation::silu;
use crate::matmul::MatRef;
use crate::simd::dispatch;

/// Channels summed together in registers: four AVX-512 vectors, four chains of multiply-adds
/// in flight (one vector's chain over the taps waits on each add).
const LANES: usize = 64;

dispatch! {
    /// Runs the conv over `x` (`T × C`) continuing from `window`, writes `out` (`[T, C]`),
    /// through [`silu`] where `silu` is set, and leaves in `window` the last `K` inputs (zeros,
    /// then older window values, when `T < K`).
    pub fn causal_conv1d_seq(
        x: MatRef<'_>,
        weight: &[f32],
        k: usize,
        bias: Option<&[f32]>,
        silu: bool,
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
    with_silu: bool,
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
    // The weights tap-major (`[K, C]`), so that the loop over channels reads them
    // contiguously: in the `[C, K]` layout each tap's weights lie K floats apart, and that
    // strided read kept the loop from vectorising (65 of a 512-token mamba-130m prefill's
    // ~930 ms went to this conv). Once per call: C·K floats against T·C·K multiply-adds.
    let mut taps = vec![0.0f32; k * c_len];
    for (c, w) in weight.chunks_exact(k).enumerate() {
        for (j, &wj) in w.iter().enumerate() {
            taps[j * c_len + c] = wj;
        }
    }
    // Rows whose K inputs are all rows of `x`: 64 channels at a time, each output summed over
    // the taps in a register and stored once (tap by tap over the whole row, each tap was a
    // load and a store of every output). The same multiply-adds in the same order.
    let whole = c_len / LANES * LANES;
    for t in 0..t_len {
        let dst = &mut out[t * c_len..(t + 1) * c_len];
        if t + 1 >= k && whole > 0 {
            let first = (t + 1 - k) * x.row_stride;
            for c0 in (0..whole).step_by(LANES) {
                let mut sums: [f32; LANES] = match bias {
                    Some(b) => b[c0..c0 + LANES].try_into().expect("64"),
                    None => [0.0; LANES],
                };
                for j in 0..k {
                    let tap: &[f32; LANES] =
                        taps[j * c_len + c0..][..LANES].try_into().expect("64");
                    let src: &[f32; LANES] = x.data[first + j * x.row_stride + c0..][..LANES]
                        .try_into()
                        .expect("64");
                    for ((sum, &w), &v) in sums.iter_mut().zip(tap).zip(src) {
                        *sum = w.mul_add(v, *sum);
                    }
                }
                if with_silu {
                    sums = sums.map(silu);
                }
                dst[c0..c0 + LANES].copy_from_slice(&sums);
            }
            for c in whole..c_len {
                let mut sum = bias.map_or(0.0, |b| b[c]);
                for j in 0..k {
                    sum = taps[j * c_len + c].mul_add(x.data[first + j * x.row_stride + c], sum);
                }
                dst[c] = if with_silu { silu(sum) } else { sum };
            }
            continue;
        }
        match bias {
            Some(b) => dst.copy_from_slice(b),
            None => dst.fill(0.0),
        }
        for (j, tap) in taps.chunks_exact(c_len).enumerate() {
            let p = t as isize + j as isize - (k as isize - 1);
            if p >= 0 {
                let src = &x.data[p as usize * x.row_stride..][..c_len];
                for ((d, &w), &s) in dst.iter_mut().zip(tap).zip(src) {
                    *d = w.mul_add(s, *d);
                }
            } else {
                for (c, (d, &w)) in dst.iter_mut().zip(tap).enumerate() {
                    *d = w.mul_add(input(p, c, window), *d);
                }
            }
        }
        if with_silu {
            dst.iter_mut().for_each(|d| *d = silu(*d));
        }
    }
    // The new window holds the inputs at times T-K .. T-1.
    let next = window_before(x, window, k, t_len);
    window.copy_from_slice(&next);
}

/// The `[C, K]` window (oldest first) of the `K` inputs before row `t` of `x` (`T × C`)
/// continuing `window`: tap `j` holds the input at time `t - K + j`, `x`'s row or, before
/// row 0, `window`'s entry (its newest, index K - 1, is time -1). Filled tap by tap, a row of
/// `x` or a column of `window` each (one branch a tap, not one an input: a prefill's runs of
/// rows each start from such a window).
pub fn window_before(x: MatRef<'_>, window: &[f32], k: usize, t: usize) -> Vec<f32> {
    let c_len = x.cols;
    assert_eq!(window.len(), c_len * k);
    let mut slots = vec![0.0f32; c_len * k];
    for j in 0..k {
        match (t + j).checked_sub(k) {
            Some(p) => {
                let row = &x.data[p * x.row_stride..][..c_len];
                for (slot, &v) in slots.iter_mut().skip(j).step_by(k).zip(row) {
                    *slot = v;
                }
            }
            None => {
                let back = t + j;
                let columns = slots.iter_mut().skip(j).step_by(k);
                for (slot, old) in columns.zip(window.chunks_exact(k)) {
                    *slot = old[back];
                }
            }
        }
    }
    slots
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
    assert!(out.len() >= c_len);
    if let Some(b) = bias {
        assert_eq!(b.len(), c_len);
    }
    // A kernel size known at compile time (Mamba's and fla's 4, and the neighbours) unrolls
    // the taps; LLVM still does not vectorise over the interleaved channels (perf: scalar
    // code, 3.9% of a batch-32 mamba-130m step), so 4 taps on AVX-512 go 16 channels at a time.
    match k {
        2 => conv_step_fixed::<2>(x, weight, bias, window, out),
        3 => conv_step_fixed::<3>(x, weight, bias, window, out),
        4 => {
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::avx512() {
                // SAFETY: the CPU has AVX-512F; the lengths are asserted above.
                let done = unsafe { step4_avx512(x, weight, bias, window, out) };
                let bias = bias.map(|b| &b[done..]);
                let (w, win) = (&weight[4 * done..], &mut window[4 * done..]);
                return conv_step_fixed::<4>(&x[done..], w, bias, win, &mut out[done..]);
            }
            conv_step_fixed::<4>(x, weight, bias, window, out)
        }
        _ => {
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
    }
}

/// [`conv_step_body`] for a kernel of `K` taps: the same operations in the same order.
#[inline(always)]
fn conv_step_fixed<const K: usize>(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    window: &mut [f32],
    out: &mut [f32],
) {
    let windows = window.chunks_exact_mut(K);
    let weights = weight.chunks_exact(K);
    for (c, ((win, w), (&xc, o))) in windows.zip(weights).zip(x.iter().zip(out)).enumerate() {
        let mut acc = bias.map_or(0.0, |b| b[c]);
        for j in 0..K {
            let v = if j + 1 < K { win[j + 1] } else { xc };
            win[j] = v;
            acc = w[j].mul_add(v, acc);
        }
        *o = acc;
    }
}

/// [`conv_step_fixed`]`::<4>` over the first `16·⌊C/16⌋` channels, 16 at a time; returns how
/// many it did. Four registers hold 16 channels' windows as stored (`[C, 4]`): each shifts
/// by one lane within its channels with the new inputs coming in, is stored back, and is
/// transposed to one register a tap (as are the weights), so that the taps' multiply-adds
/// run in the scalar loop's order (the same bits).
///
/// # Safety
/// The CPU has AVX-512F; `weight` and `window` hold `4·x.len()` values, `out` and `bias` at
/// least `x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn step4_avx512(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    window: &mut [f32],
    out: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    /// Lane indices into the 32 lanes of two registers.
    fn lanes(f: impl Fn(i32) -> i32) -> __m512i {
        let v: [i32; 16] = std::array::from_fn(|l| f(l as i32));
        // SAFETY: 16 i32 lanes are 64 bytes, as an __m512i.
        unsafe { std::mem::transmute(v) }
    }
    // Register i holds channels 4i..4i+4 of the block; lane 4g + j is channel 4i + g's tap j.
    // Its window after the shift: lane 4g + j ← lane 4g + j + 1 (j < 3), lane 4g + 3 ← the
    // new input of channel 4i + g, lane 4i + g of the inputs' register (the second source).
    let shift: [__m512i; 4] = std::array::from_fn(|i| {
        lanes(|l| {
            if l % 4 < 3 {
                l + 1
            } else {
                16 + 4 * i as i32 + l / 4
            }
        })
    });
    // Transpose, first step: taps {0, 1} (and {2, 3}) of 8 channels from two registers, lane
    // 2q + s holding channel q's tap s (2 + s).
    let pairs_lo = lanes(|l| (l / 8) * 16 + 4 * ((l / 2) % 4) + l % 2);
    let pairs_hi = lanes(|l| (l / 8) * 16 + 4 * ((l / 2) % 4) + l % 2 + 2);
    // Second step: one tap of 16 channels from two such registers.
    let even = lanes(|l| 2 * l);
    let odd = lanes(|l| 2 * l + 1);
    let taps = |r: [__m512; 4]| -> [__m512; 4] {
        let a = _mm512_permutex2var_ps(r[0], pairs_lo, r[1]);
        let b = _mm512_permutex2var_ps(r[0], pairs_hi, r[1]);
        let c = _mm512_permutex2var_ps(r[2], pairs_lo, r[3]);
        let d = _mm512_permutex2var_ps(r[2], pairs_hi, r[3]);
        [
            _mm512_permutex2var_ps(a, even, c),
            _mm512_permutex2var_ps(a, odd, c),
            _mm512_permutex2var_ps(b, even, d),
            _mm512_permutex2var_ps(b, odd, d),
        ]
    };
    let blocks = x.len() / 16;
    for block in 0..blocks {
        let c0 = 16 * block;
        // SAFETY: channels c0..c0 + 16 are in bounds of every slice (see the contract).
        unsafe {
            let inputs = _mm512_loadu_ps(x.as_ptr().add(c0));
            let win = window.as_mut_ptr().add(4 * c0);
            let shifted: [__m512; 4] = std::array::from_fn(|i| {
                let old = _mm512_loadu_ps(win.add(16 * i));
                _mm512_permutex2var_ps(old, shift[i], inputs)
            });
            for (i, &v) in shifted.iter().enumerate() {
                _mm512_storeu_ps(win.add(16 * i), v);
            }
            let w = weight.as_ptr().add(4 * c0);
            let w = taps(std::array::from_fn(|i| _mm512_loadu_ps(w.add(16 * i))));
            let v = taps(shifted);
            let mut acc = match bias {
                Some(b) => _mm512_loadu_ps(b.as_ptr().add(c0)),
                None => _mm512_setzero_ps(),
            };
            for j in 0..4 {
                acc = _mm512_fmadd_ps(w[j], v[j], acc);
            }
            _mm512_storeu_ps(out.as_mut_ptr().add(c0), acc);
        }
    }
    16 * blocks
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
        // 2-4: the step's fixed-size paths; 5: its general one. 133 channels: two blocks of 64
        // summed in registers and five one at a time.
        for (k, c_len) in (2..=5).flat_map(|k| [(k, 5), (k, 133)]) {
            let t_len = 9;
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
                false,
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
                    false,
                    &mut win,
                    &mut out,
                );
                let rest = MatRef::dense(&x[split * c_len..], t_len - split, c_len);
                causal_conv1d_seq(
                    rest,
                    &w,
                    k,
                    Some(&b),
                    false,
                    &mut win,
                    &mut out[split * c_len..],
                );
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

    /// The fixed-size step paths (with 4 taps on AVX-512, 16 channels at a time: two blocks
    /// of the 37 channels, then the scalar tail) do the general loop's operations in its
    /// order: the same bits.
    #[test]
    fn fixed_size_steps_give_the_general_bits() {
        for k in 2..=4 {
            let c_len = 37;
            let w: Vec<f32> = (0..c_len * k)
                .map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.07)
                .collect();
            let b: Vec<f32> = (0..c_len).map(|i| i as f32 * 0.03 - 0.5).collect();
            let (mut fixed_win, mut general_win) = (vec![0.0; c_len * k], vec![0.0; c_len * k]);
            for t in 0..7 {
                let x: Vec<f32> = (0..c_len)
                    .map(|c| ((c * 7 + t * 11) % 17) as f32 * 0.13 - 1.0)
                    .collect();
                let mut fixed = vec![0.0; c_len];
                causal_conv1d_step(&x, &w, k, Some(&b), &mut fixed_win, &mut fixed);
                // The general loop, as `conv_step_body` runs it for other sizes.
                let mut general = vec![0.0; c_len];
                for c in 0..c_len {
                    let win = &mut general_win[c * k..(c + 1) * k];
                    win.copy_within(1.., 0);
                    win[k - 1] = x[c];
                    let mut acc = b[c];
                    for j in 0..k {
                        acc = w[c * k + j].mul_add(win[j], acc);
                    }
                    general[c] = acc;
                }
                assert_eq!(fixed, general, "k={k} t={t}");
                assert_eq!(fixed_win, general_win, "k={k} t={t}");
            }
        }
    }
}
