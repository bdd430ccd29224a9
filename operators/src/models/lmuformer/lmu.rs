//! The Legendre Memory Unit cell of the LMUFormer (Liu et al., ICLR 2024;
//! `src/blocks/lmu_cell.py` of the reference), `shared/SPEC-MODELS.md` §4.1, and its spiking
//! form (`SpikingLMUFFTCell`, §4.3):
//!
//! ```text
//! u_t = f_u(W_u x_t + b_u)                 (scalar; ReLU, or BN → LIF when spiking)
//! m_t = Ā m_{t−1} + B̄ u_t                  (the memory, `memory_size` wide, m_{−1} = 0)
//! h_t = f_h(W_h [g(m_t); x_t] + b_h)       (ReLU, or BN → LIF; g = BN → LIF when spiking)
//! ```
//!
//! Ā, B̄ discretise the Legendre delay system of window θ by zero-order hold with dt = 1,
//! computed in f64 and rounded to f32 as the reference does with scipy, unless the checkpoint
//! carries its `A` / `B` buffers. The memory has two forms that agree for any length:
//! - recurrent, one frame per session: `M ← M Āᵀ + u B̄ᵀ` over all sessions at once (a GEMM);
//! - parallel, for a run of frames: per chunk of `seq_len` frames, the zero-state response is
//!   a Toeplitz product with the impulse response `H_j = Āʲ B̄` (the reference convolves with
//!   `H` by FFT, for exactly 128 frames), plus the carried state's response `Ā^{t+1} m`,
//!   built by doubling (`R[b..2b) = R[0..b)·(Āᵇ)ᵀ`) from the powers `Ā^{2^k}`.

use tideway_kernels::Weight;
use tideway_kernels::expm::{expm, matmul_square_f64};
use tideway_kernels::matmul::{Linear, MatRef, Strided, matmul_small};

use crate::error::LoadError;
use crate::layers::batch_norm::BatchNorm;
use crate::layers::frames::Frames;
use crate::spiking::{Lif, LifLayer, LifRegistry, Membranes};
use crate::state_dict::StateDict;

/// The continuous Legendre delay system of SPEC §4.1 (`A` `[d, d]`, `B` `[d]`), in f64.
fn legendre_system(d: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
    let mut a = vec![0.0f64; d * d];
    let mut b = vec![0.0f64; d];
    for i in 0..d {
        let r = (2 * i + 1) as f64 / theta;
        for j in 0..d {
            let sign = if i < j {
                -1.0
            } else if (i - j + 1) % 2 == 0 {
                1.0
            } else {
                -1.0
            };
            a[i * d + j] = r * sign;
        }
        b[i] = if i % 2 == 0 { r } else { -r };
    }
    (a, b)
}

/// Zero-order hold with dt = 1: `expm([[A, B], [0, 0]]) = [[Ā, B̄], [0, 1]]`.
pub fn zoh_discretize(d: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = legendre_system(d, theta);
    let n = d + 1;
    let mut block = vec![0.0f64; n * n];
    for i in 0..d {
        block[i * n..i * n + d].copy_from_slice(&a[i * d..(i + 1) * d]);
        block[i * n + d] = b[i];
    }
    let e = expm(&block, n);
    let a_bar = (0..d)
        .flat_map(|i| e[i * n..i * n + d].iter().map(|&v| v as f32))
        .collect();
    let b_bar = (0..d).map(|i| e[i * n + d] as f32).collect();
    (a_bar, b_bar)
}

/// The LMU's linear memory: Ā, B̄ and what the parallel form precomputes from them.
#[derive(Debug, Clone)]
pub struct LmuMemory {
    size: usize,
    /// `m ↦ m Āᵀ` as a linear layer (torch layout weight = Ā).
    transition: Linear,
    b: Vec<f32>,
    /// `H_j = Āʲ B̄` as rows, `[chunk, d]`.
    impulse: Vec<f32>,
    /// `(Ā^{2^k})ᵀ`, dense `[d, d]`, for 2^k < chunk.
    powers_t: Vec<Vec<f32>>,
    chunk: usize,
}

impl LmuMemory {
    /// From Ā, B̄ (f32, as the model computes with them) and the impulse response if the
    /// checkpoint has it (`H` `[d, chunk]`).
    pub fn new(a: Vec<f32>, b: Vec<f32>, impulse_cols: Option<&[f32]>, chunk: usize) -> Self {
        let d = b.len();
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let impulse = match impulse_cols {
            Some(h) => (0..chunk)
                .flat_map(|j| (0..d).map(move |i| h[i * chunk + j]))
                .collect(),
            None => {
                let mut rows = Vec::with_capacity(chunk * d);
                let mut v: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                for _ in 0..chunk {
                    rows.extend(v.iter().map(|&x| x as f32));
                    v = (0..d)
                        .map(|i| (0..d).map(|j| a64[i * d + j] * v[j]).sum())
                        .collect();
                }
                rows
            }
        };
        let mut powers_t = Vec::new();
        let mut power = a64.clone();
        let mut step = 1;
        while step < chunk {
            powers_t.push(
                (0..d)
                    .flat_map(|i| (0..d).map(|j| power[j * d + i] as f32).collect::<Vec<_>>())
                    .collect(),
            );
            power = matmul_square_f64(&power, &power, d);
            step *= 2;
        }
        let transition =
            Linear::from_torch(&Weight::from_vec(a, &[d, d]).expect("shape"), None).expect("shape");
        LmuMemory {
            size: d,
            transition,
            b,
            impulse,
            powers_t,
            chunk,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// `(Ā, B̄)`: Ā `[d, d]` row-major (`m_t = Ā m_{t−1} + B̄ u_t`), B̄ `[d]`.
    pub fn matrices(&self) -> (Vec<f32>, Vec<f32>) {
        (self.transition.to_torch().0, self.b.clone())
    }

    pub fn size_bytes(&self) -> usize {
        self.transition.size_bytes()
            + 4 * (self.b.len()
                + self.impulse.len()
                + self.powers_t.iter().map(Vec::len).sum::<usize>())
    }

    /// One frame for each of several sessions: `memories` (`[S, d]` rows) ← `M Āᵀ + u B̄ᵀ`.
    pub fn step(&self, memories: &mut [f32], u: &[f32]) {
        let (s, d) = (u.len(), self.size);
        let mut next = vec![0.0f32; s * d];
        self.transition
            .forward(MatRef::dense(memories, s, d), &mut next);
        for (row, &ui) in next.chunks_exact_mut(d).zip(u) {
            for (m, &b) in row.iter_mut().zip(&self.b) {
                *m += ui * b;
            }
        }
        memories.copy_from_slice(&next);
    }

    /// A run of frames of one session: writes `m_t` for every frame into `out` (`[n, d]`)
    /// and leaves the last in `memory`.
    pub fn parallel(&self, memory: &mut [f32], u: &[f32], out: &mut [f32]) {
        let d = self.size;
        for (c0, u_chunk) in (0..u.len()).step_by(self.chunk).zip(u.chunks(self.chunk)) {
            let n = u_chunk.len();
            let dst = &mut out[c0 * d..(c0 + n) * d];
            // Zero-state response: Z = Toeplitz(u) · H.
            let mut toeplitz = vec![0.0f32; n * n];
            for t in 0..n {
                for j in 0..=t {
                    toeplitz[t * n + j] = u_chunk[t - j];
                }
            }
            let impulse = Strided::dense(&self.impulse[..n * d], n, d);
            matmul_small(dst, d, false, 1.0, Strided::dense(&toeplitz, n, n), impulse);
            // The carried state's response R_t = Ā^{t+1} m, by doubling.
            if memory.iter().any(|&v| v != 0.0) {
                let mut carry = vec![0.0f32; n * d];
                self.transition
                    .forward(MatRef::dense(memory, 1, d), &mut carry[..d]);
                let mut filled = 1;
                for power in &self.powers_t {
                    if filled >= n {
                        break;
                    }
                    let len = filled.min(n - filled);
                    let (done, rest) = carry.split_at_mut(filled * d);
                    matmul_small(
                        &mut rest[..len * d],
                        d,
                        false,
                        1.0,
                        Strided::dense(&done[..len * d], len, d),
                        Strided::dense(power, d, d),
                    );
                    filled += len;
                }
                for (o, c) in dst.iter_mut().zip(&carry) {
                    *o += c;
                }
            }
            memory.copy_from_slice(&dst[(n - 1) * d..]);
        }
    }
}

/// The spiking cell's BatchNorm → LIF gates (absent in the non-spiking cell, which uses ReLU).
#[derive(Debug, Clone)]
pub(crate) struct SpikingGates {
    pub(crate) bn_u: BatchNorm,
    pub(crate) lif_u: LifLayer,
    pub(crate) bn_m: BatchNorm,
    pub(crate) lif_m: LifLayer,
    pub(crate) bn_h: BatchNorm,
    pub(crate) lif_h: LifLayer,
}

/// `LMUFFTCell` / `SpikingLMUFFTCell`.
#[derive(Debug, Clone)]
pub struct LmuCell {
    pub(crate) w_u: Linear,
    pub(crate) w_h: Linear,
    pub(crate) memory: LmuMemory,
    pub(crate) gates: Option<SpikingGates>,
    pub(crate) input: usize,
}

/// The shape of one cell.
#[derive(Debug, Clone, Copy)]
pub struct LmuCellShape {
    pub input: usize,
    pub hidden: usize,
    pub memory: usize,
    pub theta: f64,
    pub seq_len: usize,
}

impl LmuCell {
    /// `{prefix}.W_u`, `.W_h`, optional `.A`, `.B`, `.H`, and for a spiking cell (`lif` set)
    /// `.bn_u`, `.bn_m`, `.bn_h`. Neuron names are `{prefix}.f_u` etc., as in the reference.
    pub fn load(
        dict: &StateDict,
        prefix: &str,
        shape: LmuCellShape,
        lif: Option<(Lif, &mut LifRegistry)>,
    ) -> Result<Self, LoadError> {
        let LmuCellShape {
            input,
            hidden,
            memory: d,
            theta,
            seq_len,
        } = shape;
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear, LoadError> {
            let w = dict.load(&format!("{prefix}.{name}.weight"), &[out, inp])?;
            let b = dict.load(&format!("{prefix}.{name}.bias"), &[out])?;
            Ok(Linear::from_torch(&w, Some(b)).expect("shapes checked"))
        };
        let w_u = linear("W_u", 1, input)?;
        let w_h = linear("W_h", hidden, d + input)?;
        let a = dict.load_optional(&format!("{prefix}.A"), &[d, d])?;
        let b = dict.load_optional(&format!("{prefix}.B"), &[d, 1])?;
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a.as_slice().to_vec(), b.as_slice().to_vec()),
            _ => zoh_discretize(d, theta),
        };
        let h = dict.load_optional(&format!("{prefix}.H"), &[d, seq_len])?;
        let memory = LmuMemory::new(a, b, h.as_ref().map(Weight::as_slice), seq_len);
        let gates = match lif {
            None => None,
            Some((lif, registry)) => Some(SpikingGates {
                bn_u: BatchNorm::load(dict, &format!("{prefix}.bn_u"), 1)?,
                lif_u: registry.add(format!("{prefix}.f_u"), lif, 1),
                bn_m: BatchNorm::load(dict, &format!("{prefix}.bn_m"), d)?,
                lif_m: registry.add(format!("{prefix}.f_m"), lif, d),
                bn_h: BatchNorm::load(dict, &format!("{prefix}.bn_h"), hidden)?,
                lif_h: registry.add(format!("{prefix}.f_h"), lif, hidden),
            }),
        };
        Ok(LmuCell {
            w_u,
            w_h,
            memory,
            gates,
            input,
        })
    }

    pub fn memory_size(&self) -> usize {
        self.memory.size()
    }

    pub fn size_bytes(&self) -> usize {
        self.w_u.size_bytes() + self.w_h.size_bytes() + self.memory.size_bytes()
    }

    /// Every session's new frames `x` (`[rows, input]`) → `h` (`[rows, hidden]`). Sessions
    /// with one frame take the recurrent form together; longer runs the parallel form.
    pub fn forward(
        &self,
        x: &Frames,
        memories: &mut [&mut Vec<f32>],
        membranes: &mut [&mut Membranes],
    ) -> Frames {
        assert_eq!(x.width, self.input);
        let d = self.memory.size();
        let mut u = x.linear(&self.w_u);
        match &self.gates {
            Some(g) => {
                g.bn_u.apply(&mut u.data);
                g.lif_u.fire(membranes, &mut u);
            }
            None => u.data.iter_mut().for_each(|v| *v = v.max(0.0)),
        }
        // m for every row, then [m ; x] for W_h.
        let rows = x.rows();
        let mut m = vec![0.0f32; rows * d];
        let ranges = x.ranges();
        let singles: Vec<usize> = (0..ranges.len())
            .filter(|&i| ranges[i].len() == 1)
            .collect();
        if !singles.is_empty() {
            let mut batch: Vec<f32> = singles
                .iter()
                .flat_map(|&i| memories[i].iter().copied())
                .collect();
            let inputs: Vec<f32> = singles.iter().map(|&i| u.data[ranges[i].start]).collect();
            self.memory.step(&mut batch, &inputs);
            for (k, &i) in singles.iter().enumerate() {
                let row = &batch[k * d..(k + 1) * d];
                memories[i].copy_from_slice(row);
                m[ranges[i].start * d..(ranges[i].start + 1) * d].copy_from_slice(row);
            }
        }
        for (i, rows) in ranges.iter().enumerate() {
            if rows.len() > 1 {
                self.memory.parallel(
                    memories[i],
                    &u.data[rows.clone()],
                    &mut m[rows.start * d..rows.end * d],
                );
            }
        }
        let mut m = Frames {
            data: m,
            width: d,
            counts: x.counts.clone(),
        };
        if let Some(g) = &self.gates {
            g.bn_m.apply(&mut m.data);
            g.lif_m.fire(membranes, &mut m);
        }
        let mut joined = Vec::with_capacity(rows * (d + self.input));
        for t in 0..rows {
            joined.extend_from_slice(&m.data[t * d..(t + 1) * d]);
            joined.extend_from_slice(&x.data[t * self.input..(t + 1) * self.input]);
        }
        let joined = m.map_data(joined, d + self.input);
        let mut h = joined.linear(&self.w_h);
        match &self.gates {
            Some(g) => {
                g.bn_h.apply(&mut h.data);
                g.lif_h.fire(membranes, &mut h);
            }
            None => h.data.iter_mut().for_each(|v| *v = v.max(0.0)),
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_form_equals_the_recurrence_for_any_length_and_carry() {
        let d = 12;
        let (a, b) = zoh_discretize(d, 16.0);
        // Chunk 8: lengths below, at and across several chunks, with and without a carry.
        let memory = LmuMemory::new(a, b, None, 8);
        for (len, carried) in [
            (1usize, false),
            (5, true),
            (8, false),
            (29, true),
            (64, true),
        ] {
            let u: Vec<f32> = (0..len)
                .map(|t| ((t * 7 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let start: Vec<f32> = (0..d)
                .map(|i| {
                    if carried {
                        (i as f32 - 6.0) / 10.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut recurrent = start.clone();
            let mut want = Vec::new();
            for &ut in &u {
                memory.step(&mut recurrent, &[ut]);
                want.extend_from_slice(&recurrent);
            }
            let mut parallel = start.clone();
            let mut got = vec![0.0; len * d];
            memory.parallel(&mut parallel, &u, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "len {len}: {g} vs {w}"
                );
            }
            assert_eq!(parallel, got[(len - 1) * d..]);
        }
    }

    #[test]
    fn zoh_matches_scipy_cont2discrete() {
        // scipy.signal.cont2discrete(method="zoh") of the d = 3, θ = 4 Legendre system
        // (values computed with scipy 1.17.1 in float64).
        let (a, b) = zoh_discretize(3, 4.0);
        let want_a: [f64; 9] = [
            0.7633232, -0.2053031, -0.0647040, 0.6159093, 0.2121180, -0.2784715, -0.3235200,
            0.4641191, 0.1670694,
        ];
        let want_b: [f64; 3] = [0.2366768, -0.6159093, 0.3235200];
        for (g, w) in a.iter().zip(want_a) {
            assert!((*g as f64 - w).abs() < 2e-7, "{a:?}");
        }
        for (g, w) in b.iter().zip(want_b) {
            assert!((*g as f64 - w).abs() < 2e-7, "{b:?}");
        }
    }
}
