//! Linear layers on AVX-512 with `W` packed once, at load, in panels of 64 output columns
//! (f32 weights; bf16 where the CPU has AVX-512 BF16; LLM.int8 where it has AVX-512 VNNI),
//! and the kernel that multiplies any number of activation rows with them:
//! `out[i, j] = b[j] + Σ_p x[i, p]·W[j, p]`.
//!
//! A panel holds `W`'s rows `64q..64q + 64` transposed: for each step of inputs, the 64
//! columns' weights, one cache line per 16 columns. An f32 step is one input; a bf16 step is
//! a pair (`2t`, `2t + 1`) in each 32-bit lane, the pairs `vdpbf16ps` multiplies and sums; an
//! int8 step a quad, as `vpdpbusd` takes them: a line is 64 bytes in every format. A register
//! tile of up to 6 rows × 64 outputs (24 accumulators) loads the panel's 4 vectors of a step,
//! broadcasts the step's activations of each row (one f32, a pair of bf16, a quad of int8)
//! and does 24 multiply-adds: GotoBLAS's
//! register-blocked outer product, the shape of gemm's own `x4x6` kernel, with no horizontal
//! sums and `W` packed once instead of on every call as gemm packs it.
//!
//! - Up to 6 rows (a decode step of a few streams): one tile per panel over all of `k`, so a
//!   thread reads its panels front to back, one sequential stream at the memory's speed.
//! - More rows: every tile of rows passes over the panel while it sits in cache, in blocks
//!   (the partial sums waiting in `out` between blocks): blocks that L1 holds for 2-6 tiles
//!   (a decode step of 7-36 streams, whose weights come from memory), blocks of at most
//!   `K_BLOCK` steps in L2 for more. Each tile asks for its share of a block ahead (the
//!   next; the one after it for blocks in L1), so that memory streams it while the cores
//!   work on this one instead of waiting for the first tile's reads.
//!
//! bf16 products round the activations to bf16 too (once per call), as PyTorch's bf16
//! inference does, and sum in f32; on Intel's cores a product of several rows widens the
//! panel's bf16 to f32 and multiplies with FMAs, which issue twice as fast there as
//! `vdpbf16ps` ([`bf16_by_fma`]). int8 products quantize them as LLM.int8 does
//! ([`crate::int8::quantize`]), sum in i32 and dequantize at the end; the outlier columns
//! then pass over the panel once more in f32, while it is still in L2 (for several tiles of
//! rows, widened to f32 once and multiplied by the f32 tile; where every column of the rows
//! is an outlier, that pass alone writes the outputs).
//!
//! On a CPU with AMX, bf16 and int8 products of 16 rows or more run on its tile units instead,
//! reading the same panels (`amx.rs`).
//!
//! `examples/linear_shapes.rs` measures the kernel against the row-layout kernels of
//! [`crate::skinny`], [`crate::bf16`] and [`crate::int8`] and gemm (BENCHMARKS.md).

use std::ops::Range;
use std::sync::Arc;

use crate::huge_pages::{HugeBuffer, Zeroable};
use crate::int8::{Int8Activations, quantize_weight, weight_scale};
#[cfg(test)]
use crate::matmul::MatRef;
use crate::skinny::Out;

mod input;
mod per_cpu;
pub use input::PanelInput;
use input::{bf16_bits, bf16_pairs};
pub use per_cpu::{OneRowWalk, bf16_by_fma, one_row_walk};

/// Output columns per panel: 4 vectors of 16 lanes.
pub const PANEL: usize = 64;

/// Rows of `x` per register tile (6 × 4 accumulators of the 32 registers, beside the 4
/// weight vectors and a broadcast).
pub(crate) const MAX_TILE_ROWS: usize = 6;

/// Most steps per block when several tiles of rows share a panel: 1024 × 64 lanes, 256 KiB,
/// so that the block the tiles pass over and the next one, on its way in, hold half of a
/// 1 MiB L2 (AMD Zen 4; Intel's server cores have 1-2 MiB). A longer panel is cut in blocks
/// as even as can be (1536 as 768 + 768). Blocks of 64-512 inputs (in L1) measured slower at
/// the mamba-130m shapes, 256 rows, f32: lm_head 57-70 ms against 56 ms unblocked (k = 768),
/// out_proj 1.79-2.11 against 1.72 ms (k = 1536).
const K_BLOCK: usize = 1024;

/// Tiles of rows up to which the tiles that share a panel pass over it in blocks held in
/// L1 ([`few_tiles_block`]) rather than in L2: a decode step of 7-36 streams.
const FEW_TILES: usize = 6;

/// Most steps per block for 2..=[`FEW_TILES`] tiles: two thirds of L1's data cache
/// ([`crate::cpu::l1_data_bytes`]) of a full panel's 256-byte steps, in whole 16s (128
/// steps, 32 KiB, on a 48 KiB L1). Such a step reads its weights from memory, the tiles'
/// fetches of the next block (`avx512::Fetch`) in flight while they compute; re-read from
/// L2, each tile's 4 lines a step took fill buffers that those fetches wait for (a likely
/// cause, not verified: the VM exposes no hardware counters). A step's products (a variant
/// of `examples/step_products.rs`'s loop, the two block sizes alternated step by step in one
/// process, Intel Xeon, 48 KiB L1, 2026-12-04; BENCHMARKS.md), f32, ms: 32 rows 35.2 → 32.7
/// and 34.8 → 32.4, 24 rows 26.5 → 24.8, 36 rows 36.6 → 35.0, 16 rows 25.8 → 25.0, 8 rows
/// 19.7 → 18.9; bf16 and int8 at 8 rows 12.8 → 12.3 and 9.2 → 9.0, at 32 rows the same.
/// 48 and 64 rows came out the same, 128 rows slower (113.6 → 119.3), so more tiles keep
/// [`K_BLOCK`]. Blocks of 112-160 steps did about as well as 128 at 32 rows, 96 between them
/// and 1024; 64, 192 and 256 worse than 1024. (Not measured on a 32 KiB L1, where the rule
/// gives 80 steps.)
fn few_tiles_block() -> usize {
    let steps = 2 * crate::cpu::l1_data_bytes() / 3 / (PANEL * 4);
    (steps / 16 * 16).max(16)
}

/// Blocks ahead that the tiles of [`few_tiles_block`]'s blocks ask for, into L2: the block
/// after the next, asked for while the tiles pass over this one (the next was asked for a block
/// earlier). Blocks of 128 steps pass in ~3 µs at 32 rows: a likely reason, not verified (no
/// hardware counters on the VM), is that one block's time is too short for the fetches the
/// core's fill buffers allow at memory's latency. A step's products (a temporary switch in one
/// process, alternated step by step, Intel Xeon, 2026-12-04 late; medians, ms): f32 32 rows
/// 31.92 → 31.12, 31.63 → 31.06, 31.25 → 30.67, 30.87 → 29.95; 36 rows 34.95 → 34.04, 34.78
/// → 34.16; 24 rows 24.94 → 24.67, 24.78 → 24.59; 8-16 rows the same; int8 32 rows 14.92
/// → 14.66, 14.94 → 14.60; bf16 32 rows 32.33 → 31.90, 32.14 → 32.07. Asking for both blocks
/// did worse (32 rows 36.26), one and a half or three blocks ahead the same as two. The
/// L2-sized blocks of more tiles keep asking for the next: the block after it was slower there
/// (64 rows 59.0 → 60.4 and 60.1, 512 rows 425 → 430). In `tideway bench` the step's other work
/// dilutes it: batch 32 f32 768.3 → 775.5 tok/s (medians of 5 alternated runs), int8 the same
/// (BENCHMARKS.md). With each tile's share asked for evenly over its steps (2026-12-05), the
/// next block alone was still slower at 32 rows (in_proj 271.7 / 266.7 → 263.8 / 266.6,
/// out_proj 278.3 / 280.7 → 270.7 / 272.9, lm_head 302.6 / 300.7 → 291.0 / 292.2 GFLOP/s),
/// and blocks of 96, 176 or 256 steps slower than 128.
const FEW_TILES_FETCH_BLOCKS: usize = 2;

/// How far ahead a one-stream tile asks for its panel, into L1: 32 steps, 8 KiB. In
/// `tideway bench` (mamba-130m, f32, 2026-12-03) batch 8 went 199 → 228 tok/s with it;
/// 16-64 steps ahead did about as well, 128 worse. Tiles that share a panel (more than 6
/// rows) ask for their own steps as far ahead, as well as for their share of the next
/// block into L2: a step's products (`examples/step_products.rs`, alternated step by step
/// in one process, f32, 2026-12-04 and the night before) at 32 rows 45.4 → 43.1 ms and
/// 44.6 → 42.1-42.4 (16 or 24 steps ahead did the same), 64 rows 82.9 → 81.1, bf16 at 32
/// rows 24.6 → 23.5; int8 at 32, bf16 at 8 and f32 at 512 rows unchanged within the noise.
const PREFETCH_STEPS: usize = 32;

/// How far ahead each segment of a one- or two-row tile asks for its panel, to L2: 128
/// steps, 32 KiB (one-row tiles on Intel's cores ask for nothing: [`one_row_walk`]). The
/// segments are sequential streams, but the hardware prefetcher stops at every 4 KiB page
/// and restarts behind the reads. A mamba-130m step's products at batch 1 (the loop of
/// `examples/step_products.rs` with the variants behind a switch, alternated step by step
/// in one process, AMD Zen 4, 2026-12-03 night), medians: f32 18.4-21.3 ms with four
/// segments and no fetching (as before) → 16.9-17.8 with two segments 128 steps ahead
/// (17.8-19.9 at 48); bf16 9.7-10.0 → 8.8; int8 5.26 → 4.91; two rows 19.8 → 18.7 (f32),
/// 10.6 → 9.9 (bf16). Six segments, one segment fetching ahead, or fetching to L1 did
/// worse. A tile of 3-6 rows streaming its panel alone asks for it as far ahead too
/// (besides [`PREFETCH_STEPS`] into L1), alternated with and without (2026-12-04): 4 rows
/// bf16 9.05 → 8.59 and 9.16 → 8.92 ms, f32 18.90 → 17.94 and 17.32 → 17.23; 6 rows bf16
/// 8.48 → 8.34, f32 17.09 → 16.89; 3 rows f32 and 4 rows int8 the same within the noise.
const STREAM_AHEAD_STEPS: usize = 128;

/// What a panel's 32-bit lanes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelFormat {
    /// One f32 weight per column and input.
    F32,
    /// Two bf16 weights per column: inputs `2t` (low half) and `2t + 1` (high half).
    Bf16,
    /// Four LLM.int8 weights per column, inputs `4t..4t + 4` from the low byte up (the
    /// quads `vpdpbusd` multiplies and sums), with each column's scale ([`crate::int8`]).
    Int8,
}

impl PanelFormat {
    /// Inputs per lane (per step).
    fn inputs_per_lane(self) -> usize {
        match self {
            PanelFormat::F32 => 1,
            PanelFormat::Bf16 => 2,
            PanelFormat::Int8 => 4,
        }
    }
}

/// One cache line of 16 lanes, so that every panel vector is an aligned load.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([u32; 16]);

// SAFETY: sixteen `u32`s, no padding: zero bytes are the line of zeros.
unsafe impl Zeroable for Line {
    const ZERO: Self = Line([0; 16]);
}

/// `W` (`[n, k]`, PyTorch's layout) packed in panels of [`PANEL`] output columns; the last
/// panel is as narrow as its columns allow in whole vectors of 16, padded with zeros (a
/// mamba-130m `x_proj` of 80 outputs keeps 64 + 16 columns, not 128), and a `k` that does
/// not fill a bf16 pair or an int8 quad with zero inputs.
#[derive(Clone, Debug)]
pub struct PanelWeight {
    lines: Arc<HugeBuffer<Line>>,
    n: usize,
    k: usize,
    format: PanelFormat,
    /// int8 only.
    columns: Option<Int8Columns>,
}

/// What an int8 panel keeps per output column, padded with zeros to a whole vector.
#[derive(Clone, Debug)]
struct Int8Columns {
    /// `sw_j`.
    scale: Arc<[f32]>,
    /// `Σ_p Q_jp` (the kernel adds 128 to the activations, `vpdpbusd` taking them unsigned,
    /// and takes `128 · Σ_p Q_jp` off).
    sums: Arc<[i32]>,
}

/// Whether the panel kernel for `format` runs here: AVX-512F ([`crate::cpu::simd_level`]),
/// and for bf16 AVX-512 BF16, for int8 AVX-512 VNNI.
pub fn available(format: PanelFormat) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        crate::cpu::avx512()
            && match format {
                PanelFormat::F32 => true,
                PanelFormat::Bf16 => has!("avx512bw") && has!("avx512bf16"),
                PanelFormat::Int8 => has!("avx512bw") && has!("avx512vnni"),
            }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = format;
        false
    }
}

impl PanelWeight {
    /// Packs `w` (`[n, k]` row-major) in f32.
    pub fn from_torch(w: &[f32], n: usize, k: usize) -> Self {
        check_len(w, n, k);
        Self::pack(n, k, PanelFormat::F32, |j, p| w[j * k + p].to_bits())
    }

    /// Packs `w` (`[n, k]` row-major) rounded to bf16 (nearest, ties to even).
    pub fn from_torch_bf16(w: &[f32], n: usize, k: usize) -> Self {
        check_len(w, n, k);
        Self::pack(n, k, PanelFormat::Bf16, |j, p| bf16_bits(w[j * k + p]))
    }

    /// Packs `w` (`[n, k]` row-major) quantized as LLM.int8 quantizes weights (per output
    /// row, absmax: [`crate::int8`]), straight into the panels (no copy in rows on the way:
    /// a load's peak memory).
    pub fn from_torch_int8(w: &[f32], n: usize, k: usize) -> Self {
        check_len(w, n, k);
        let columns = n.next_multiple_of(16);
        let mut scale: Vec<f32> = (0..n)
            .map(|j| weight_scale(&w[j * k..(j + 1) * k]))
            .collect();
        scale.resize(columns, 0.0);
        // `Σ_p Q_jp` of each column, for the kernel's 128-offset, summed as the weights are
        // quantized into the panels (once each).
        let mut sums = vec![0i32; columns];
        let mut packed = Self::pack(n, k, PanelFormat::Int8, |j, p| {
            let q = quantize_weight(w[j * k + p], scale[j]);
            sums[j] += i32::from(q);
            u32::from(q as u8)
        });
        packed.columns = Some(Int8Columns {
            scale: scale.into(),
            sums: sums.into(),
        });
        packed
    }

    /// Packs `value(j, p)`, the bits of `W[j, p]` in the low bits of a lane: the lanes are
    /// written in the order they lie, panel by panel and step by step (writing each weight
    /// where [`position`](Self::position) puts it, row by row of `W`, scattered the writes
    /// and made a load seconds long). `value` is called once for each `j < n`, `p < k`.
    fn pack(
        n: usize,
        k: usize,
        format: PanelFormat,
        mut value: impl FnMut(usize, usize) -> u32,
    ) -> Self {
        let mut packed = PanelWeight {
            lines: Arc::new(HugeBuffer::zeroed(0)),
            n,
            k,
            format,
            columns: None,
        };
        let (per, steps) = (format.inputs_per_lane(), packed.steps());
        let bits = 32 / per;
        let mut lines = HugeBuffer::<Line>::packed(n.next_multiple_of(16) * steps / 16);
        let mut at = 0;
        for q in 0..n.div_ceil(PANEL) {
            let width = packed.width(q);
            for t in 0..steps {
                for j in q * PANEL..q * PANEL + width {
                    // Columns past `n` (the last panel's padding) and inputs past `k` stay 0.
                    if j < n {
                        let inputs = t * per..(t * per + per).min(k);
                        for (part, p) in inputs.enumerate() {
                            lines[at / 16].0[at % 16] |= value(j, p) << (bits * part);
                        }
                    }
                    at += 1;
                }
            }
        }
        debug_assert_eq!(at, lines.len() * 16);
        packed.lines = Arc::new(lines);
        packed
    }

    pub fn format(&self) -> PanelFormat {
        self.format
    }

    /// Steps of a panel: `k` inputs in lanes of one, two or four.
    pub fn steps(&self) -> usize {
        self.k.div_ceil(self.format.inputs_per_lane())
    }

    /// Columns of panel `q`: [`PANEL`], or fewer for the last.
    fn width(&self, q: usize) -> usize {
        (self.n - q * PANEL).min(PANEL).next_multiple_of(16)
    }

    /// Where `W[j, p]` is kept: the lane (after the full panels before `j`'s, at `p`'s step of
    /// its panel) and which of a lane's parts (a bf16 half, an int8 byte).
    fn position(&self, j: usize, p: usize) -> (usize, usize) {
        let (q, c) = (j / PANEL, j % PANEL);
        let per = self.format.inputs_per_lane();
        (
            q * PANEL * self.steps() + p / per * self.width(q) + c,
            p % per,
        )
    }

    /// Copies row `j` of PyTorch's `W` (`[k]` values, bf16 widened, int8 dequantized:
    /// `Q_jp · sw_j`) into `dst`: column `j`'s lane of each step, the panel's width apart (a
    /// cache line a step, which a tied embedding's lookup waits on, not the arithmetic).
    pub fn row_f32(&self, j: usize, dst: &mut [f32]) {
        assert!(j < self.n && dst.len() == self.k);
        let (first, _) = self.position(j, 0);
        let width = self.width(j / PANEL);
        let lane = |step: usize| {
            let at = first + step * width;
            self.lines[at / 16].0[at % 16]
        };
        let per = self.format.inputs_per_lane();
        match (self.format, &self.columns) {
            (PanelFormat::Bf16, _) => {
                for (step, pair) in dst.chunks_mut(per).enumerate() {
                    let lane = lane(step);
                    for (part, d) in pair.iter_mut().enumerate() {
                        *d = half::bf16::from_bits((lane >> (16 * part)) as u16).to_f32();
                    }
                }
            }
            (PanelFormat::Int8, Some(c)) => {
                for (step, quad) in dst.chunks_mut(per).enumerate() {
                    let lane = lane(step);
                    for (part, d) in quad.iter_mut().enumerate() {
                        *d = f32::from((lane >> (8 * part)) as u8 as i8) * c.scale[j];
                    }
                }
            }
            _ => {
                for (step, d) in dst.iter_mut().enumerate() {
                    *d = f32::from_bits(lane(step));
                }
            }
        }
    }

    /// Bytes kept (the last panel's padding included; int8: with its scales and sums).
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of_val(&**self.lines)
            + self.columns.as_ref().map_or(0, |c| {
                std::mem::size_of_val(&*c.scale) + std::mem::size_of_val(&*c.sums)
            })
    }

    /// The first lane of panel `q`.
    fn panel(&self, q: usize) -> *const u32 {
        self.lines[q * PANEL * self.steps() / 16..].as_ptr().cast()
    }
}

fn check_len(w: &[f32], n: usize, k: usize) {
    assert_eq!(
        w.len(),
        n * k,
        "weight holds {} values, not {n} × {k}",
        w.len()
    );
}

/// Writes `out[i, j]` for the rows `rows` of `x` and the output columns `cols`, which start
/// at a panel's first column; `bias` `[n]` if any.
///
/// # Safety
/// [`available`] must be true for `w`'s format; `x` must come from
/// [`PanelInput::for_weight`] with `w` (with `x.cols` = `w`'s inputs for f32); `out.ptr` must
/// hold `x`'s rows × `out.n` values with `out.n == w`'s outputs, `cols` must lie in
/// `0..out.n`, and no other thread may write the same cells at the same time.
pub unsafe fn block(
    x: &PanelInput<'_>,
    w: &PanelWeight,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    cols: Range<usize>,
    out: Out,
) {
    // SAFETY: the caller's contract; all of the steps.
    unsafe { block_steps(x, w, bias, rows, (cols, 0..w.steps()), out, one_row_walk()) }
}

/// [`block`] over the panels' steps `steps` alone (inputs `steps`, or their pairs for bf16),
/// a one-row share's tiles walking their panels by `walk` (this CPU's is [`one_row_walk`];
/// the tests run every one): `out` gets that part of each sum, with `bias` if given. The
/// parts of a row too narrow for its columns to keep the threads busy (`Linear`'s one-row
/// products) run on several threads this way, each into its own outputs, and are added
/// after. Not for int8 weights, whose sums take LLM.int8's offset off once over all the
/// inputs.
///
/// # Safety
/// As [`block`]'s, with `steps` in `0..w.steps()`.
pub unsafe fn block_steps(
    x: &PanelInput<'_>,
    w: &PanelWeight,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    (cols, steps): (Range<usize>, Range<usize>),
    out: Out,
    walk: OneRowWalk,
) {
    assert!(
        w.format != PanelFormat::Int8 || steps == (0..w.steps()),
        "an int8 product runs over all its inputs"
    );
    assert!(cols.start.is_multiple_of(PANEL) && cols.end <= w.n && out.n == w.n);
    assert!(steps.start <= steps.end && steps.end <= w.steps());
    assert!(
        rows.end <= x.rows(),
        "rows {rows:?} of a {}-row input",
        x.rows()
    );
    match (x, w.format) {
        (PanelInput::F32(x), PanelFormat::F32) => assert_eq!(x.cols, w.k),
        (PanelInput::Bf16 { pairs, rows }, PanelFormat::Bf16) => {
            assert_eq!(pairs.len(), rows * w.steps())
        }
        (PanelInput::Bf16Wide { values, rows }, PanelFormat::Bf16) => {
            assert_eq!(values.len(), rows * 2 * w.steps())
        }
        (PanelInput::Bf16Tiles { tiles, rows }, PanelFormat::Bf16) => {
            assert!(w.steps().is_multiple_of(16) && steps == (0..w.steps()));
            assert_eq!(tiles.len(), rows.div_ceil(16) * 16 * w.steps());
        }
        (PanelInput::Int8(x), PanelFormat::Int8) => assert_eq!(x.k_pad, 4 * w.steps()),
        (PanelInput::Int8Tiles { x, tiles }, PanelFormat::Int8) => {
            assert!(w.steps().is_multiple_of(16) && x.k_pad == 4 * w.steps());
            assert_eq!(tiles.len(), x.scale.len().div_ceil(16) * 16 * w.steps());
        }
        _ => panic!(
            "activations prepared for another format than {:?}",
            w.format
        ),
    }
    #[cfg(target_arch = "x86_64")]
    unsafe {
        // Tiles exist only where `amx::takes` said so.
        match x {
            PanelInput::Bf16Tiles { tiles, .. } => {
                let tiles = amx::TileInput::Bf16(tiles);
                return amx::block(tiles, w, bias, rows, cols, out);
            }
            PanelInput::Int8Tiles { x, tiles } => {
                let tiles = amx::TileInput::Int8 { tiles, x };
                return amx::block(tiles, w, bias, rows, cols, out);
            }
            _ => {}
        }
        avx512::block(x, rows, w, bias, (cols, steps), out, walk)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w, bias, rows, cols, steps, out, walk);
        unreachable!("the panel kernel needs x86-64 (see `available`)");
    }
}

/// Splits `rows` into tiles of at most [`MAX_TILE_ROWS`] rows, as even as can be (8 rows run
/// as 4 + 4, not 6 + 2: a thin tile does as many loads for fewer multiply-adds).
fn row_tiles(rows: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let tiles = rows.len().div_ceil(MAX_TILE_ROWS).max(1);
    let (base, extra) = (rows.len() / tiles, rows.len() % tiles);
    (0..tiles).scan(rows.start, move |start, t| {
        let len = base + usize::from(t < extra);
        let range = *start..*start + len;
        *start += len;
        Some(range)
    })
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod fetch;
#[cfg(target_arch = "x86_64")]
mod half_vectors;
#[cfg(target_arch = "x86_64")]
mod outliers;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
