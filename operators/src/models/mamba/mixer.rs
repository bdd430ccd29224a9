//! The Mamba (v1) selective-SSM mixer (Gu & Dao 2023; `mamba_simple.py` in state-spaces/mamba,
//! `MambaMixer` in HF transformers). Equations: `shared/SPEC-MODELS.md` §1.2–1.3.
//!
//! ```text
//! [x | z] = in_proj(u)                       x, z ∈ R^E
//! x'      = silu(causal_conv1d(x))
//! [δ | B | C] = x_proj(x')                   δ ∈ R^R, B, C ∈ R^N
//! Δ       = softplus(dt_proj(δ))
//! y       = selective_scan(x', Δ, A = -exp(A_log), B, C, D) ⊙ silu(z)
//! out     = out_proj(y)
//! ```
//!
//! On a tensor-parallel rank (`d_inner` is the rank's share of the channels, see
//! [`mamba_split`]) `in_proj`, the conv, `dt_proj`, `A` and `D` hold the rank's channels;
//! `x_proj` and `out_proj` are row-parallel: `[δ | B | C]` is all-reduced inside the mixer
//! (it is small: `R + 2N` per row) and the output is a partial sum for the caller to reduce.
//!
//! One `forward` serves both forms: a prefill chunk is one long segment of rows, a decode
//! step is a batch of one-row segments (one per session). The conv uses its one-step kernel
//! for one-row segments; the scan kernel handles both.

use std::ops::Range;

use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::scan::{ScanInputs, ScanSegment, SsmParams, selective_scan};
use tideway_kernels::{StateBuffer, Weight};

use tideway_kernels::collective::CollectiveError;

use crate::checkpoint::{Checkpoint, Split};
use crate::error::LoadError;
use crate::layers::segments::CausalConv;
use crate::tensor_parallel::Group;

/// How a tensor-parallel rank holds a mixer's tensors (`name` relative to the mixer).
pub fn mamba_split(name: &str) -> Option<Split> {
    match name {
        // [x | z]: each rank takes its channels of both halves.
        "in_proj.weight" | "in_proj.bias" => Some(Split::Rows { segments: 2 }),
        "conv1d.weight" | "conv1d.bias" | "dt_proj.weight" | "dt_proj.bias" | "A_log" | "D" => {
            Some(Split::Rows { segments: 1 })
        }
        "x_proj.weight" | "out_proj.weight" => Some(Split::Columns),
        "out_proj.bias" => Some(Split::FirstRank),
        _ => None,
    }
}

/// Shapes of one mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MambaMixerConfig {
    /// Model width `D`.
    pub d_model: usize,
    /// Channels `E = expand·D`.
    pub d_inner: usize,
    /// SSM state size `N`.
    pub d_state: usize,
    /// Conv kernel width `K`.
    pub d_conv: usize,
    /// Rank `R` of the Δ projection.
    pub dt_rank: usize,
    /// Biases on `in_proj` / `out_proj`.
    pub bias: bool,
    /// Bias on the conv.
    pub conv_bias: bool,
}

/// One session's state in one layer: the conv window and the SSM state.
#[derive(Debug, Clone, PartialEq)]
pub struct MambaLayerState {
    /// The last `K` pre-conv inputs per channel, `[E, K]`, oldest first.
    pub conv: StateBuffer,
    /// `h`, stored `[N, E]` (state-index-major, the scan kernel's layout; HF's cache is the
    /// transpose, `[E, N]`).
    pub ssm: StateBuffer,
}

impl crate::state_tensors::LayerFields for MambaLayerState {
    fn fields(&self) -> Vec<(&'static str, &[f32])> {
        vec![("conv", &*self.conv), ("ssm", &*self.ssm)]
    }

    fn fields_mut(&mut self) -> Vec<(&'static str, &mut [f32])> {
        vec![("conv", &mut *self.conv), ("ssm", &mut *self.ssm)]
    }
}

/// The activations of one mixer pass, kept by the caller across a forward's layers so that
/// each layer writes into the last one's memory instead of fresh allocations (which glibc's
/// `calloc` zeroes when it reuses freed memory: ~18 MB a layer at 512 rows). Every buffer is
/// overwritten before it is read.
#[derive(Debug, Default)]
pub struct MixerScratch {
    xz: Vec<f32>,
    xc: Vec<f32>,
    dbc: Vec<f32>,
    delta: Vec<f32>,
    y: Vec<f32>,
}

/// Most rows of a run of `dt_proj` and the scan: `δ` (6 KB a row at mamba-130m's width)
/// is then written into the buffer the run before left in L2, where a prefill's 3 MB one
/// took its lines back from L3 or memory first (the product writes 96 FLOPs an output):
/// `dt_proj` and the scan of a 512-token prefill, temporary timers, alternated (Intel Xeon,
/// 2026-12-05): 59.5 / 60.4 → 53.9 / 53.4 ms, runs of 64 and 256 rows about the same as 128;
/// the conv and `x_proj` in runs as well came out no faster (the conv's runs each rebuild
/// their windows).
const SCAN_RUN_ROWS: usize = 128;

/// The runs of rows that `forward` takes `dt_proj` and the scan in: one session's rows (a
/// prefill chunk) longer than [`SCAN_RUN_ROWS`] in runs of that many; a batch of sessions
/// (a decode step) whole. Each row's `δ` is the same in any run (`k` of 48: one block).
fn scan_runs(m: usize, segments: &[Range<usize>]) -> Vec<Range<usize>> {
    let whole = 0..m;
    if segments != std::slice::from_ref(&whole) || m <= SCAN_RUN_ROWS {
        return vec![whole];
    }
    (0..m)
        .step_by(SCAN_RUN_ROWS)
        .map(|r| r..(r + SCAN_RUN_ROWS).min(m))
        .collect()
}

/// `buffer` made `len` long (zeros where it grows) and returned whole.
fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.resize(len, 0.0);
    buffer
}

/// The parameters of one mixer.
pub struct MambaMixer {
    pub config: MambaMixerConfig,
    pub(super) in_proj: Linear,
    pub(super) conv_weight: Weight,
    pub(super) conv_bias: Option<Weight>,
    pub(super) x_proj: Linear,
    pub(super) dt_proj: Linear,
    /// `A = -exp(A_log)`, computed once at load and stored transposed, `[N, E]`.
    pub(super) a_t: Weight,
    pub(super) d: Weight,
    pub(super) out_proj: Linear,
}

impl MambaMixer {
    /// Loads `{prefix}in_proj.weight` … `{prefix}out_proj.weight`.
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        config: MambaMixerConfig,
    ) -> Result<Self, LoadError> {
        let MambaMixerConfig {
            d_model,
            d_inner: e,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            bias,
            conv_bias,
        } = config;
        let name = |s: &str| format!("{prefix}{s}");
        let maybe =
            |s: &str, present: bool, shape: &[usize]| -> Result<Option<Weight>, LoadError> {
                if present {
                    checkpoint.load(&name(s), shape).map(Some)
                } else {
                    Ok(None)
                }
            };
        let linear = |w: &str, b: Option<&str>, out: usize, inp: usize| {
            checkpoint.load_linear(&name(w), b.map(name).as_deref(), out, inp)
        };
        let conv = checkpoint.load(&name("conv1d.weight"), &[e, 1, k])?;
        let a_log = checkpoint.load(&name("A_log"), &[e, n])?;
        let a_log = a_log.as_slice();
        let mut a_t = vec![0.0f32; e * n];
        for c in 0..e {
            for s in 0..n {
                a_t[s * e + c] = -a_log[c * n + s].exp();
            }
        }
        Ok(MambaMixer {
            config,
            in_proj: linear(
                "in_proj.weight",
                bias.then_some("in_proj.bias"),
                2 * e,
                d_model,
            )?,
            conv_weight: conv,
            conv_bias: maybe("conv1d.bias", conv_bias, &[e])?,
            x_proj: linear("x_proj.weight", None, r + 2 * n, e)?,
            dt_proj: linear("dt_proj.weight", Some("dt_proj.bias"), e, r)?,
            a_t: Weight::from_vec(a_t, &[n, e]).expect("A has A_log's size"),
            d: checkpoint.load(&name("D"), &[e])?,
            out_proj: linear(
                "out_proj.weight",
                bias.then_some("out_proj.bias"),
                d_model,
                e,
            )?,
        })
    }

    /// A fresh state: zeros, as the reference starts every sequence.
    pub fn new_state(&self) -> MambaLayerState {
        let c = &self.config;
        MambaLayerState {
            conv: StateBuffer::zeroed(c.d_inner * c.d_conv),
            ssm: StateBuffer::zeroed(c.d_inner * c.d_state),
        }
    }

    /// Bytes of one session's state in this layer.
    pub fn state_bytes(&self) -> usize {
        let c = &self.config;
        4 * c.d_inner * (c.d_conv + c.d_state)
    }

    pub fn weight_bytes(&self) -> usize {
        let linears = [&self.in_proj, &self.x_proj, &self.dt_proj, &self.out_proj];
        let others = [
            Some(&self.conv_weight),
            self.conv_bias.as_ref(),
            Some(&self.a_t),
            Some(&self.d),
        ];
        linears.iter().map(|l| l.size_bytes()).sum::<usize>()
            + others
                .into_iter()
                .flatten()
                .map(Weight::size_bytes)
                .sum::<usize>()
    }

    /// Runs the mixer over the packed rows `u` (`[M, D]`): session `i` owns rows
    /// `segments[i]` (consecutive, in order) and continues from `states[i]`, which is updated.
    /// Writes `out` (`[M, D]`; on a tensor-parallel rank, the rank's partial sum). `scratch`
    /// holds the pass's activations (any content; one per forward, reused by its layers).
    pub fn forward(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        states: &mut [&mut MambaLayerState],
        group: &mut Group<'_>,
        scratch: &mut MixerScratch,
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let MambaMixerConfig {
            d_model,
            d_inner: e,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            ..
        } = self.config;
        assert_eq!(segments.len(), states.len());
        let m = u.len() / d_model;
        assert_eq!(u.len(), m * d_model);

        // 1. [x | z] = in_proj(u): one GEMM over every session's rows.
        let MixerScratch {
            xz,
            xc,
            dbc,
            delta,
            y,
        } = scratch;
        let xz = sized(xz, m * 2 * e);
        self.in_proj.forward(MatRef::dense(u, m, d_model), xz);

        // 2. x' = silu(conv(x)), continuing each session's window (sessions in parallel).
        let xc = sized(xc, m * e);
        let conv = CausalConv {
            weight: self.conv_weight.as_slice(),
            kernel: k,
            bias: self.conv_bias.as_ref().map(Weight::as_slice),
            silu: true,
        };
        let windows = states.iter_mut().map(|s| &mut *s.conv).collect();
        conv.run(MatRef::columns(xz, m, 2 * e, 0, e), segments, windows, xc);

        // 3. [δ | B | C] = x_proj(x'); dt_proj(δ) + dt_bias (in step 4), whose softplus (Δ)
        // the scan takes.
        let w = r + 2 * n;
        self.x_proj
            .forward(MatRef::dense(xc, m, e), sized(dbc, m * w));
        *dbc = group.all_reduce_sum(std::mem::take(dbc))?;

        // 4. The selective scan, gated by silu(z), per session; with `dt_proj` in runs of
        // rows where one session's rows are many (a prefill chunk).
        let y = sized(y, m * e);
        for rows in scan_runs(m, segments) {
            let (r0, mr) = (rows.start, rows.len());
            let dbc_rows = &dbc[r0 * w..];
            let delta = sized(delta, mr * e);
            self.dt_proj
                .forward(MatRef::columns(dbc_rows, mr, w, 0, r), delta);
            let mut scan_segments: Vec<ScanSegment<'_>> = segments
                .iter()
                .zip(states.iter_mut())
                .map(|(segment, state)| ScanSegment {
                    // The run's part of the segment, from the run's first row.
                    rows: segment.start.max(r0) - r0..segment.end.min(rows.end) - r0,
                    state: &mut state.ssm,
                })
                .collect();
            selective_scan(
                SsmParams {
                    a_t: self.a_t.as_slice(),
                    d: self.d.as_slice(),
                    channels: e,
                    state_size: n,
                },
                ScanInputs {
                    x: &xc[r0 * e..],
                    delta,
                    b: MatRef::columns(dbc_rows, mr, w, r, n),
                    c: MatRef::columns(dbc_rows, mr, w, r + n, n),
                    z: MatRef::columns(&xz[r0 * 2 * e..], mr, 2 * e, e, e),
                },
                &mut scan_segments,
                &mut y[r0 * e..][..mr * e],
            );
        }

        // 5. out = out_proj(y).
        self.out_proj.forward(MatRef::dense(y, m, e), out);
        Ok(())
    }
}
