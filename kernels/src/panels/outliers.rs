//! LLM.int8's outlier columns on AVX-512: after the int8 pass over a panel, `out[i, j] +=
//! sw_j · Σ_{p∈C} x_ip · Q_jp` for the columns `C` kept in f32, each `Q_jp` taken out of its
//! quad of the int8 panel. One or two tiles of rows widen each weight as they go; more widen
//! the panel's outlier steps to f32 once, dequantized, and multiply them with the f32 tile
//! (widening in every tile had been a third of the pass's work, repeated for each of a
//! prefill's tiles).

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::{Dequant, Prefetch, TileArgs, tile_f32, valid_lanes};
use super::{Int8Activations, Out, PanelWeight, row_tiles};

/// The panel an outlier pass runs on: its index, lanes a step, columns written, and the
/// scales of its first column on.
pub(super) struct Panel {
    pub q: usize,
    pub width: usize,
    pub valid: usize,
    pub col_scale: *const f32,
}

/// What the outputs hold when the outlier pass starts.
#[derive(Clone, Copy)]
pub(super) enum Outputs {
    /// The int8 pass's products (with the bias): the outlier pass adds to them.
    Written,
    /// Nothing yet (the int8 pass was skipped, every column being an outlier): the pass
    /// starts them with the bias, if any. Only for `widen_once`.
    Unwritten { bias: Option<*const f32> },
}

/// The outlier pass of `x`'s rows `rows` over panel `p` of `w`, into `out` (whose first
/// column is the panel's).
///
/// # Safety
/// AVX-512F; `x` quantized for `w` with compact outlier values (`quantize_compact`); `out`
/// holds `x`'s rows × `out.n` values from its pointer back to column 0, `p` lies in `w`, and
/// no other thread writes the same cells.
pub(super) unsafe fn pass(
    x: &Int8Activations,
    w: &PanelWeight,
    p: &Panel,
    rows: Range<usize>,
    widen_once: bool,
    outputs: Outputs,
    out: Out,
) {
    assert!(widen_once || matches!(outputs, Outputs::Written));
    let values = x.outlier_values.as_ptr();
    let count = x.outliers.len();
    let panel = w.panel(p.q);
    if !widen_once {
        for tile_rows in row_tiles(rows) {
            let args = OutlierArgs {
                panel,
                width: p.width,
                outliers: &x.outliers,
                values: unsafe { values.add(tile_rows.start * count) },
                col_scale: p.col_scale,
                out: unsafe { out.ptr.add(tile_rows.start * out.n) },
                n: out.n,
                valid: p.valid,
            };
            unsafe { outlier_tile_of(p.width / 16, tile_rows.len(), &args) };
        }
        return;
    }
    for (b, chunk) in x.outliers.chunks(WIDENED_STEPS).enumerate() {
        // The first block starts unwritten outputs; the rest add to them.
        let start = match outputs {
            Outputs::Unwritten { bias } if b == 0 => Some(bias),
            _ => None,
        };
        let dst = scratch(chunk.len() * p.width / 16);
        unsafe { widen_outliers(panel, p.width, chunk, p.col_scale, p.valid, dst) };
        for tile_rows in row_tiles(rows.clone()) {
            let args = TileArgs {
                x: unsafe { values.add(tile_rows.start * count + b * WIDENED_STEPS) }.cast(),
                x_stride: count,
                panel: dst.cast_const().cast(),
                len: chunk.len(),
                bias: start.flatten(),
                out: unsafe { out.ptr.add(tile_rows.start * out.n) },
                n: out.n,
                valid: p.valid,
                accumulate: start.is_none(),
                prefetch: Prefetch::None,
                dequant: Dequant::NONE,
            };
            unsafe { tile_f32(p.width / 16, tile_rows.len(), args) };
        }
    }
}

/// Fewest tiles of rows that widen a panel's outlier steps once. Per outlier step and
/// vector, T tiles widening as they go cost T·(load, 3 ops); widening once costs (load, 3
/// ops, scale, store) + T loads: less from 3 tiles on. (At 2 tiles, int8 decode at batch 8
/// measured 20% slower widening once, `bench/cpu_decode.sh`, 2026-12-04.)
pub(super) const WIDEN_ONCE_MIN_TILES: usize = 3;

/// Outlier steps widened at a time: 128 steps of 64 lanes, 32 KiB, which the tiles then read
/// from L1 (where a panel's 1536 outlier columns widened at once, 384 KiB, sit in L2 beside
/// the weights). Int8 decode at batch 32 and prefill measured the same with 1024 steps
/// (alternated, 2026-12-04, within the Xeon's ±15% drift).
const WIDENED_STEPS: usize = 128;

/// A cache line of f32 lanes, aligned as the tiles load a panel's.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Each thread's panel of widened outlier steps, kept from call to call so that no
    /// product maps and zeroes fresh pages.
    static SCRATCH: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's scratch panel of at least `lines` cache lines, 64-byte aligned. It stays
/// valid until the thread's next call: one panel at a time.
fn scratch(lines: usize) -> *mut f32 {
    SCRATCH.with_borrow_mut(|lines_held| {
        if lines_held.len() < lines {
            lines_held.resize(lines, Line([0.0; 16]));
        }
        lines_held.as_mut_ptr().cast()
    })
}

/// The outlier pass of an int8 panel for one tile of rows: `out[i, j] += sw_j · Σ_{p∈C}
/// x_ip · Q_jp`, each `Q_jp` taken out of its quad and widened to f32.
struct OutlierArgs<'a> {
    /// The panel's first lane and its columns.
    panel: *const u32,
    width: usize,
    /// `C`, ascending.
    outliers: &'a [usize],
    /// The tile's first row of outlier values, rows `|C|` apart, each indexed by its
    /// position in `C`.
    values: *const f32,
    col_scale: *const f32,
    out: *mut f32,
    n: usize,
    valid: usize,
}

#[target_feature(enable = "avx512f")]
unsafe fn outlier_tile_of(nv: usize, rows: usize, args: &OutlierArgs) {
    unsafe {
        match nv {
            1 => outlier_tile_rows::<1>(rows, args),
            2 => outlier_tile_rows::<2>(rows, args),
            3 => outlier_tile_rows::<3>(rows, args),
            _ => outlier_tile_rows::<4>(rows, args),
        }
    }
}

#[inline(always)]
unsafe fn outlier_tile_rows<const NV: usize>(rows: usize, args: &OutlierArgs) {
    unsafe {
        match rows {
            1 => outlier_tile::<1, NV>(args),
            2 => outlier_tile::<2, NV>(args),
            3 => outlier_tile::<3, NV>(args),
            4 => outlier_tile::<4, NV>(args),
            5 => outlier_tile::<5, NV>(args),
            _ => outlier_tile::<6, NV>(args),
        }
    }
}

#[inline(always)]
unsafe fn outlier_tile<const MR: usize, const NV: usize>(a: &OutlierArgs) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut quad = [_mm512_setzero_si512(); NV];
        let mut loaded = usize::MAX;
        for (o, &p) in a.outliers.iter().enumerate() {
            // Outliers in one quad share its load.
            if p / 4 != loaded {
                loaded = p / 4;
                for (c, v) in quad.iter_mut().enumerate() {
                    *v = _mm512_load_si512(a.panel.add(loaded * a.width + 16 * c).cast());
                }
            }
            let up = byte_to_top(p);
            let mut weights = [_mm512_setzero_ps(); NV];
            for (w, q) in weights.iter_mut().zip(&quad) {
                *w = widen_byte(*q, up);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*a.values.add(i * a.outliers.len() + o));
                for (acc, w) in row.iter_mut().zip(&weights) {
                    *acc = _mm512_fmadd_ps(xb, *w, *acc);
                }
            }
        }
        for c in 0..NV {
            let Some(mask) = valid_lanes(a.valid, c) else {
                break;
            };
            let scale = _mm512_maskz_loadu_ps(mask, a.col_scale.add(16 * c));
            for (i, row) in acc.iter().enumerate() {
                let dst = a.out.add(i * a.n + 16 * c);
                let value = _mm512_fmadd_ps(row[c], scale, _mm512_maskz_loadu_ps(mask, dst));
                _mm512_mask_storeu_ps(dst, mask, value);
            }
        }
    }
}

/// The panel's outlier steps `outliers` (ascending) as an f32 panel of `width` lanes a step
/// at `dst`, each weight dequantized: `sw_j · Q_jp`, zero past the `valid` columns.
#[target_feature(enable = "avx512f")]
unsafe fn widen_outliers(
    panel: *const u32,
    width: usize,
    outliers: &[usize],
    col_scale: *const f32,
    valid: usize,
    dst: *mut f32,
) {
    unsafe {
        // The columns' scales, the same for every step (zero past the valid columns).
        let mut scales = [_mm512_setzero_ps(); 4];
        for (c, scale) in scales.iter_mut().enumerate().take(width / 16) {
            if let Some(mask) = valid_lanes(valid, c) {
                *scale = _mm512_maskz_loadu_ps(mask, col_scale.add(16 * c));
            }
        }
        for (o, &p) in outliers.iter().enumerate() {
            let up = byte_to_top(p);
            for (c, &scale) in scales.iter().enumerate().take(width / 16) {
                let quad = _mm512_load_si512(panel.add(p / 4 * width + 16 * c).cast());
                let q = widen_byte(quad, up);
                _mm512_store_ps(dst.add(o * width + 16 * c), _mm512_mul_ps(q, scale));
            }
        }
    }
}

/// The shift that takes byte `p % 4` of each 32-bit lane (input `p`'s weight in its quad) to
/// the lane's top, for [`widen_byte`].
#[inline(always)]
fn byte_to_top(p: usize) -> __m128i {
    unsafe { _mm_cvtsi32_si128(24 - 8 * (p % 4) as i32) }
}

/// The byte that `up` (from [`byte_to_top`]) picks out of each lane of `quads`, as f32: to
/// the top, then down with its sign.
#[inline(always)]
unsafe fn widen_byte(quads: __m512i, up: __m128i) -> __m512 {
    unsafe { _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(_mm512_sll_epi32(quads, up))) }
}
