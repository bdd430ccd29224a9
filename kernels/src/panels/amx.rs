//! bf16 and int8 products of many rows on AMX tiles (Intel's Advanced Matrix Extensions,
//! Sapphire Rapids on): `tdpbf16ps` multiplies a 16 × 32 tile of bf16 activations by a 32 × 16
//! tile of bf16 weights into a 16 × 16 tile of f32 sums, 8192 multiply-adds an instruction
//! where an AVX-512 FMA does 16; `tdpbssd` does the same for 16 × 64 int8 by 64 × 16 int8 into
//! i32 sums (LLM.int8's integer part; its outlier columns then take `outliers.rs`' f32 pass).
//!
//! The weights are the panels as they are: a bf16 panel step is a pair of inputs for each of
//! 64 columns (an int8 step a quad), which is the layout the tile products want of their
//! second operand (Intel SDM, "TDPBF16PS": row `t` of the tile holds input pairs `2t, 2t + 1`
//! of 16 columns), so a weight tile is 16 steps of 16 columns read 256 bytes apart. The
//! activations are rounded to bf16 (or quantized) once a call, as the other kernels do, and
//! laid out in whole tiles: 16 rows × 64 bytes, 1 KiB each, contiguous
//! ([`PanelInput::Bf16Tiles`](super::PanelInput::Bf16Tiles), `Int8Tiles`).
//!
//! A block of 32 rows × 32 columns keeps four sum tiles, two activation tiles and two weight
//! tiles, all eight tile registers, and passes over `k` once; the columns' weights (48 KiB at
//! `k` = 768) stay in cache while the row blocks pass over them. bf16 sums start from the bias
//! (a tile load with stride 0 repeats its row) and are stored straight to `out` where the
//! block's rows are all the caller's; int8's are dequantized on the way out.
//!
//! Products are the rounded values' exact products (bf16 × bf16 fits f32) summed in f32, as
//! in the other bf16 kernels, in another order; AMX treats bf16 subnormal inputs and f32
//! subnormal sums as zero (SDM), which the other kernels do not. int8 sums are exact, as in
//! the AVX-512 kernel. Measured in BENCHMARKS.md ("bf16 and int8 on AMX").
//!
//! Rust has no stable AMX intrinsics; each instruction is an `asm!` of its own naming its
//! tile registers, which the compiler never uses otherwise.

use std::arch::asm;
use std::ops::Range;

use super::outliers::{self, Outputs};
use super::{Int8Activations, PANEL, PanelWeight, row_tiles};
use crate::skinny::Out;

/// One tile instruction on memory at `p`, rows `s` bytes apart.
macro_rules! tile_op {
    ($op:literal, $p:expr, $s:expr) => {
        asm!($op, p = in(reg) $p, s = in(reg) $s, options(nostack))
    };
}

/// Steps (input pairs) of one tile: 32 inputs.
pub(super) const TILE_STEPS: usize = 16;

/// Rows of one tile.
pub(super) const TILE_ROWS: usize = 16;

/// 32-bit lanes of one activation tile: 16 rows of 16 pairs.
pub(super) const TILE_LANES: usize = TILE_ROWS * TILE_STEPS;

/// Whether a product of `rows` rows by `w` runs on tiles here: bf16 or int8 weights, AMX
/// granted ([`crate::cpu::amx`]), whole tiles of inputs (a panel's steps in 16s: `k` in 32s
/// for bf16, 64s for int8; other `k` take the AVX-512 kernels) and rows enough to fill them.
pub(super) fn takes(w: &PanelWeight, rows: usize) -> bool {
    w.format != super::PanelFormat::F32
        && rows >= MIN_ROWS
        && w.steps().is_multiple_of(TILE_STEPS)
        && crate::cpu::amx()
}

/// Fewest rows a product runs on tiles for: below, a tile of 16 rows is mostly padding and
/// the weights come from memory at the AVX-512 kernels' pace anyway. With 4 here, the weights
/// from memory (`linear_shapes bf16 cold`, 4 / 8 / 12 rows, two runs each way, 2026-12-06,
/// GB/s of weights): `in_proj` 17-21 on tiles against 19-24, `lm_head` 23 / 23 / 21-23
/// against 23-25 / 23 / 19-20, `out_proj` 18-20 / 14-16 / 16-17 against 17-23 / 21-22 /
/// 17-18. BENCHMARKS.md ("bf16 and int8 on AMX tiles") has the products of more rows.
const MIN_ROWS: usize = 16;

/// The tile registers' shapes (`ldtilecfg`'s 64 bytes, palette 1): all eight 16 rows of 64
/// bytes (sums: 16 f32; activations: 32 bf16; weights: 16 pairs).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
    };
    let mut t = 0;
    while t < 8 {
        config.bytes_per_row[t] = 64;
        config.rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    config
};

/// A call's activations in whole tiles: bf16 rounded ([`round_into_tiles`]), or LLM.int8's
/// quantized rows ([`int8_into_tiles`]) with their scales and outlier columns.
pub(super) enum TileInput<'a> {
    Bf16(&'a [u32]),
    Int8 {
        tiles: &'a [u32],
        x: &'a Int8Activations,
    },
}

/// Writes `out[i, j]` for `rows` and the columns `cols` (from a panel's first column), as
/// [`super::block`]. int8: `sx_i · sw_j · Σ_p q_ip·Q_jp + b_j` from the tiles' integer sums,
/// then LLM.int8's outlier columns in f32 (`outliers.rs`), panel by panel.
///
/// # Safety
/// [`takes`] is true for `w` and `x`'s rows; the tiles hold `x`'s rows prepared for `w`;
/// `out` and `cols` as [`super::block`]'s.
pub(super) unsafe fn block(
    input: TileInput<'_>,
    w: &PanelWeight,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    cols: Range<usize>,
    out: Out,
) {
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let k_tiles = w.steps() / TILE_STEPS;
    // Row blocks of two tiles from the tile holding `rows.start`, the last of one where
    // `rows` ends in its first half.
    let first_tile = rows.start / TILE_ROWS;
    let tile_count = rows.end.div_ceil(TILE_ROWS) - first_tile;
    // SAFETY: AMX granted ([`takes`]); the configuration is the one every tile op here assumes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    let (tiles, int8) = match input {
        TileInput::Bf16(tiles) => (tiles, None),
        TileInput::Int8 { tiles, x } => {
            let scales = w.columns.as_ref().expect("an int8 panel keeps its scales");
            (tiles, Some((x, &scales.scale[..])))
        }
    };
    for q in cols.start / PANEL..cols.end.div_ceil(PANEL) {
        let (panel, width) = (w.panel(q), w.width(q));
        for group in (0..width).step_by(32) {
            let col = q * PANEL + group;
            let pair = width - group >= 32;
            // SAFETY: `group` and, where `pair`, `group + 16` are 16 columns of panel `q`.
            let weights = unsafe { panel.add(group) };
            // The group's bias, zero past `n` (the panel's padding), for a tile load.
            let mut group_bias = [0.0f32; 32];
            if let Some(b) = bias {
                let valid = (out.n - col).min(32);
                group_bias[..valid].copy_from_slice(&b[col..col + valid]);
            }
            for t in (0..tile_count).step_by(2) {
                let tile = first_tile + t;
                let two = t + 1 < tile_count;
                let job = Job {
                    activations: &tiles[tile * k_tiles * TILE_LANES..],
                    k_tiles,
                    weights,
                    width,
                    bias: bias.map(|_| &group_bias),
                    columns: (out.n - col).min(32),
                    int8: int8.map(|(x, col_scale)| Int8Scales {
                        row_scale: &x.scale,
                        col_scale: &col_scale[col..],
                    }),
                };
                let block_rows = tile * TILE_ROWS..(tile + 1 + usize::from(two)) * TILE_ROWS;
                // SAFETY: as this function's; the job's tiles lie in `tiles` and the panel.
                unsafe {
                    match (two, pair, int8.is_some()) {
                        (true, true, false) => job.run::<2, 2, false>(&rows, block_rows, col, out),
                        (true, false, false) => job.run::<2, 1, false>(&rows, block_rows, col, out),
                        (false, true, false) => job.run::<1, 2, false>(&rows, block_rows, col, out),
                        (false, false, false) => {
                            job.run::<1, 1, false>(&rows, block_rows, col, out)
                        }
                        (true, true, true) => job.run::<2, 2, true>(&rows, block_rows, col, out),
                        (true, false, true) => job.run::<2, 1, true>(&rows, block_rows, col, out),
                        (false, true, true) => job.run::<1, 2, true>(&rows, block_rows, col, out),
                        (false, false, true) => job.run::<1, 1, true>(&rows, block_rows, col, out),
                    }
                }
            }
        }
        // LLM.int8's outlier columns, in f32 against the dequantized weights, while the
        // panel is still in L2 (as the AVX-512 int8 kernel does).
        if let Some((x, col_scale)) = int8.filter(|(x, _)| !x.outliers.is_empty()) {
            let j = q * PANEL;
            let panel = outliers::Panel {
                q,
                width,
                valid: PANEL.min(cols.end - j),
                col_scale: col_scale[j..].as_ptr(),
            };
            let widen_once = row_tiles(rows.clone()).count() >= outliers::WIDEN_ONCE_MIN_TILES;
            let out = Out {
                ptr: unsafe { out.ptr.add(j) },
                n: out.n,
            };
            // SAFETY: AVX-512F (AMX's CPUs have it); `x` was quantized compact for `w`
            // (`PanelInput::for_weight`); `out` from column `j` holds the rows the pass
            // above wrote, and the caller gave this call its cells alone.
            unsafe {
                outliers::pass(
                    x,
                    w,
                    &panel,
                    rows.clone(),
                    widen_once,
                    Outputs::Written,
                    out,
                )
            };
        }
    }
    // SAFETY: hands the tile state back, so that the OS need not save its 8 KiB at a switch.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One block of `R` row tiles × `C` column tiles.
struct Job<'a> {
    /// The first row tile's first `k` tile; the second row tile follows `k_tiles` later.
    activations: &'a [u32],
    k_tiles: usize,
    /// The block's first column at step 0 of its panel.
    weights: *const u32,
    /// The panel's columns (lanes from one step to the next).
    width: usize,
    /// The group's bias, zero-padded to 32.
    bias: Option<&'a [f32; 32]>,
    /// The group's columns that are `W`'s (the rest are the panel's padding).
    columns: usize,
    /// int8: the scales the integer sums are dequantized by.
    int8: Option<Int8Scales<'a>>,
}

/// `sx_i` of every row of the call and `sw_j` from the group's first column.
struct Int8Scales<'a> {
    row_scale: &'a [f32],
    col_scale: &'a [f32],
}

impl Job<'_> {
    /// Sums the block's tiles over `k` (bf16 pairs into f32 by `tdpbf16ps`; `INT8`: int8
    /// quads into i32 by `tdpbssd`) and writes the rows of `block_rows` (the block's) that lie
    /// in `rows` to `out` from column `col`.
    ///
    /// # Safety
    /// As [`block`]'s, the tiles configured by `CONFIG`.
    #[inline(always)]
    unsafe fn run<const R: usize, const C: usize, const INT8: bool>(
        &self,
        rows: &Range<usize>,
        block_rows: Range<usize>,
        col: usize,
        out: Out,
    ) {
        assert!(self.activations.len() >= R * self.k_tiles * TILE_LANES);
        let a = self.activations.as_ptr();
        let a_next = (R - 1) * self.k_tiles * TILE_LANES;
        let w_stride = self.width * 4;
        unsafe {
            // bf16 sums start at the bias, a tile load of one row repeated (stride 0); int8's
            // integer sums at 0, the bias added when they are dequantized.
            match self.bias.filter(|_| !INT8) {
                Some(b) => {
                    let b = b.as_ptr();
                    tile_op!("tileloadd tmm0, [{p} + {s}*1]", b, 0usize);
                    if C == 2 {
                        tile_op!("tileloadd tmm1, [{p} + {s}*1]", b.add(16), 0usize);
                    }
                    if R == 2 {
                        tile_op!("tileloadd tmm2, [{p} + {s}*1]", b, 0usize);
                        if C == 2 {
                            tile_op!("tileloadd tmm3, [{p} + {s}*1]", b.add(16), 0usize);
                        }
                    }
                }
                None => asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                ),
            }
            for kt in 0..self.k_tiles {
                let a0 = a.add(kt * TILE_LANES);
                let w0 = self.weights.add(kt * TILE_STEPS * self.width);
                tile_op!("tileloadd tmm4, [{p} + {s}*1]", a0, 64usize);
                tile_op!("tileloadd tmm6, [{p} + {s}*1]", w0, w_stride);
                dot::<INT8>(Dot::Tmm0);
                if C == 2 {
                    tile_op!("tileloadd tmm7, [{p} + {s}*1]", w0.add(16), w_stride);
                    dot::<INT8>(Dot::Tmm1);
                }
                if R == 2 {
                    tile_op!("tileloadd tmm5, [{p} + {s}*1]", a0.add(a_next), 64usize);
                    dot::<INT8>(Dot::Tmm2);
                    if C == 2 {
                        dot::<INT8>(Dot::Tmm3);
                    }
                }
            }
            // Straight to `out` where all of the block's rows are the caller's; through a
            // buffer otherwise, keeping those that are.
            let whole = !INT8
                && rows.start <= block_rows.start
                && block_rows.end <= rows.end
                && self.columns >= 16 * C;
            let mut buffer = [0.0f32; 2 * TILE_ROWS * 32];
            let (dst, stride) = if whole {
                (out.ptr.add(block_rows.start * out.n + col), out.n)
            } else {
                (buffer.as_mut_ptr(), 32)
            };
            let bytes = stride * 4;
            tile_op!("tilestored [{p} + {s}*1], tmm0", dst, bytes);
            if C == 2 {
                tile_op!("tilestored [{p} + {s}*1], tmm1", dst.add(16), bytes);
            }
            if R == 2 {
                let dst = dst.add(TILE_ROWS * stride);
                tile_op!("tilestored [{p} + {s}*1], tmm2", dst, bytes);
                if C == 2 {
                    tile_op!("tilestored [{p} + {s}*1], tmm3", dst.add(16), bytes);
                }
            }
            if !whole {
                let keep = rows.start.max(block_rows.start)..rows.end.min(block_rows.end);
                let width = self.columns.min(16 * C);
                for i in keep {
                    let from = &buffer[(i - block_rows.start) * 32..][..width];
                    let to = std::slice::from_raw_parts_mut(out.ptr.add(i * out.n + col), width);
                    match &self.int8 {
                        Some(s) if INT8 => {
                            dequantize_row(from, s.row_scale[i], s.col_scale, self.bias, to)
                        }
                        _ => to.copy_from_slice(from),
                    }
                }
            }
        }
    }
}

/// One row of a block's integer sums (their bits in `sums`) dequantized into `to` as the
/// AVX-512 int8 tile does, `S · (sx · sw_j)` and then the bias, 16 columns at a time (in
/// scalar code this pass took as long as the block's products).
///
/// # Safety
/// AVX-512F; `sw` and `bias` hold at least `to.len()` ≤ 32 values, `sums` as many.
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_row(
    sums: &[f32],
    sx: f32,
    sw: &[f32],
    bias: Option<&[f32; 32]>,
    to: &mut [f32],
) {
    use std::arch::x86_64::*;
    for c in (0..to.len()).step_by(16) {
        let mask = match to.len() - c {
            16.. => 0xffff,
            lanes => ((1u32 << lanes) - 1) as u16,
        };
        unsafe {
            let sum = _mm512_maskz_loadu_epi32(mask, sums.as_ptr().add(c).cast());
            let scale = _mm512_mul_ps(
                _mm512_set1_ps(sx),
                _mm512_maskz_loadu_ps(mask, sw.as_ptr().add(c)),
            );
            let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale);
            if let Some(b) = bias {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c)));
            }
            _mm512_mask_storeu_ps(to.as_mut_ptr().add(c), mask, v);
        }
    }
}

/// Which sum tile a [`dot`] adds into: tmm0 (rows 0-15, columns 0-15), tmm1 (columns 16-31),
/// tmm2 and tmm3 (rows 16-31), from the activation tiles tmm4 (rows 0-15) and tmm5 and the
/// weight tiles tmm6 (columns 0-15) and tmm7.
#[derive(Clone, Copy)]
enum Dot {
    Tmm0,
    Tmm1,
    Tmm2,
    Tmm3,
}

/// One tile product into `sum`: bf16 pairs summed into f32 (`tdpbf16ps`), or `INT8`'s signed
/// quads into i32 (`tdpbssd`).
///
/// # Safety
/// AMX granted, the tiles configured by `CONFIG` and loaded.
#[inline(always)]
unsafe fn dot<const INT8: bool>(sum: Dot) {
    unsafe {
        match (INT8, sum) {
            (false, Dot::Tmm0) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
            (false, Dot::Tmm1) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
            (false, Dot::Tmm2) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
            (false, Dot::Tmm3) => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
            (true, Dot::Tmm0) => asm!("tdpbssd tmm0, tmm4, tmm6", options(nostack, nomem)),
            (true, Dot::Tmm1) => asm!("tdpbssd tmm1, tmm4, tmm7", options(nostack, nomem)),
            (true, Dot::Tmm2) => asm!("tdpbssd tmm2, tmm5, tmm6", options(nostack, nomem)),
            (true, Dot::Tmm3) => asm!("tdpbssd tmm3, tmm5, tmm7", options(nostack, nomem)),
        }
    }
}

/// `rows` rows of `steps` lanes (a multiple of [`TILE_STEPS`]) in whole tiles: `row(i, lanes)`
/// writes row `i`'s lanes, which are then copied into its tiles. Tile `(r, t)`, rows
/// `16r..16r + 16` and steps `16t..16t + 16`, is [`TILE_LANES`] lanes at
/// `(r · steps / 16 + t) · TILE_LANES`, row by row; rows past `rows` are zeros. A tile of
/// rows on each of the pool's threads: rounded on the caller's thread alone, a prefill's
/// `out_proj` (512 × 1536) took a third as long again as its product.
fn into_tiles(rows: usize, steps: usize, row: impl Fn(usize, &mut [u32]) + Sync) -> Vec<u32> {
    use rayon::prelude::*;
    debug_assert!(steps.is_multiple_of(TILE_STEPS));
    let k_tiles = steps / TILE_STEPS;
    let mut tiles = vec![0u32; rows.div_ceil(TILE_ROWS) * k_tiles * TILE_LANES];
    tiles
        .par_chunks_mut(k_tiles * TILE_LANES)
        .enumerate()
        .for_each(|(r, block)| {
            let mut lanes = vec![0u32; steps];
            for i in r * TILE_ROWS..rows.min((r + 1) * TILE_ROWS) {
                row(i, &mut lanes);
                for (t, piece) in lanes.chunks_exact(TILE_STEPS).enumerate() {
                    let at = t * TILE_LANES + (i % TILE_ROWS) * TILE_STEPS;
                    block[at..at + TILE_STEPS].copy_from_slice(piece);
                }
            }
        });
    tiles
}

/// `x` rounded to bf16 (as [`super::bf16_pairs`]) into whole tiles ([`into_tiles`]) for a
/// weight of `steps` pairs. Each row in one call of the vector rounding: a call for each
/// tile's 32 inputs made the rounding 12% of a bf16 prefill (`perf`).
pub(super) fn round_into_tiles(x: crate::matmul::MatRef<'_>, steps: usize) -> Vec<u32> {
    debug_assert!(x.cols <= 2 * steps);
    // Every row fills the same lanes: those past `x.cols` stay 0 from one row to the next.
    into_tiles(x.rows, steps, |i, pairs| {
        super::bf16_pairs(&x.data[i * x.row_stride..][..x.cols], pairs)
    })
}

/// LLM.int8's quantized rows of `x` (`[rows, k_pad]`, zeros on the outlier columns) into whole
/// tiles of 16 rows × 64 inputs ([`into_tiles`]; a lane holds a quad, the first input in its
/// low byte).
pub(super) fn int8_into_tiles(x: &Int8Activations) -> Vec<u32> {
    into_tiles(x.scale.len(), x.k_pad / 4, |i, lanes| {
        let row = &x.q[i * x.k_pad..][..x.k_pad];
        for (lane, quad) in lanes.iter_mut().zip(row.as_chunks::<4>().0) {
            *lane = u32::from_le_bytes(quad.map(|q| q as u8));
        }
    })
}
