//! The activations of a panel product as its kernels read them (`PanelInput`): f32 as the
//! caller holds them, rounded to bf16 (in pairs, widened, or in AMX tiles), or quantized as
//! LLM.int8 quantizes them; and the rounding to bf16 that the weights share.

use super::{PanelFormat, PanelWeight, bf16_by_fma};
use crate::int8::Int8Activations;
use crate::matmul::MatRef;

#[cfg(target_arch = "x86_64")]
use super::amx;

/// The activations of one call as a panel kernel reads them: rows of 32-bit lanes, one per
/// step of the weight (an f32, a pair of bf16 or a quad of int8), or two for
/// [`PanelInput::Bf16Wide`].
pub enum PanelInput<'a> {
    /// f32 activations as the caller holds them.
    F32(MatRef<'a>),
    /// Rounded to bf16 (nearest, ties to even) in pairs, `[rows, steps]`, an odd `k` padded
    /// with a zero.
    Bf16 { pairs: Vec<u32>, rows: usize },
    /// Rounded to bf16 as for [`PanelInput::Bf16`] but each kept in an f32 (the same values),
    /// `[rows, 2 × steps]`: for the tiles that widen a bf16 panel to f32 and multiply with
    /// FMAs ([`bf16_by_fma`]).
    Bf16Wide { values: Vec<f32>, rows: usize },
    /// Rounded to bf16 as for [`PanelInput::Bf16`], in whole AMX tiles of 16 rows × 32 inputs
    /// (`amx.rs`), for a product of many rows on a CPU with AMX-BF16.
    Bf16Tiles { tiles: Vec<u32>, rows: usize },
    /// Quantized as LLM.int8 quantizes activations ([`crate::int8::quantize`]), rows padded to
    /// whole quads.
    Int8(Int8Activations),
    /// Quantized as for [`PanelInput::Int8`], the quantized rows also in whole AMX tiles of
    /// 16 rows × 64 inputs (`amx.rs`), for a product of many rows on a CPU with AMX.
    Int8Tiles { x: Int8Activations, tiles: Vec<u32> },
}

impl<'a> PanelInput<'a> {
    /// `x` as `w`'s kernel reads it: as it is for f32, rounded and paired for bf16,
    /// quantized for int8.
    pub fn for_weight(x: MatRef<'a>, w: &PanelWeight) -> Self {
        match w.format {
            PanelFormat::F32 => PanelInput::F32(x),
            PanelFormat::Bf16 if amx_takes(w, x.rows) => Self::bf16_tiles(x, w.steps()),
            PanelFormat::Bf16 if x.rows >= WIDE_MIN_ROWS && bf16_by_fma() => {
                Self::bf16_wide(x, w.steps())
            }
            PanelFormat::Bf16 => Self::bf16_pairs(x, w.steps()),
            PanelFormat::Int8 => {
                let quantized = crate::int8::quantize_compact(x, 4 * w.steps());
                #[cfg(target_arch = "x86_64")]
                if amx_takes(w, x.rows) {
                    let tiles = amx::int8_into_tiles(&quantized);
                    return PanelInput::Int8Tiles {
                        x: quantized,
                        tiles,
                    };
                }
                PanelInput::Int8(quantized)
            }
        }
    }

    /// `x` rounded to bf16 in pairs, for a weight of `steps` pairs.
    pub(super) fn bf16_pairs(x: MatRef<'a>, steps: usize) -> Self {
        let mut pairs = vec![0u32; x.rows * steps];
        for (i, dst) in pairs
            .chunks_exact_mut(steps.max(1))
            .enumerate()
            .take(x.rows)
        {
            bf16_pairs(&x.data[i * x.row_stride..][..x.cols], dst);
        }
        PanelInput::Bf16 {
            pairs,
            rows: x.rows,
        }
    }

    /// `x` rounded to bf16 and kept in f32, for a weight of `steps` pairs.
    pub(super) fn bf16_wide(x: MatRef<'a>, steps: usize) -> Self {
        let k_pad = 2 * steps;
        let mut values = vec![0.0f32; x.rows * k_pad];
        for (i, dst) in values
            .chunks_exact_mut(k_pad.max(1))
            .enumerate()
            .take(x.rows)
        {
            bf16_rounded(&x.data[i * x.row_stride..][..x.cols], &mut dst[..x.cols]);
        }
        PanelInput::Bf16Wide {
            values,
            rows: x.rows,
        }
    }

    /// `x` rounded to bf16 in AMX tiles, for a weight of `steps` pairs (a multiple of 16).
    fn bf16_tiles(x: MatRef<'a>, steps: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let tiles = amx::round_into_tiles(x, steps);
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = unreachable!("AMX tiles for {steps} steps off x86-64");
        PanelInput::Bf16Tiles {
            tiles,
            rows: x.rows,
        }
    }

    /// Rows that a share of the rows should start at a multiple of: AMX's tiles of 16 rows
    /// are computed whole.
    pub fn row_align(&self) -> usize {
        match self {
            PanelInput::Bf16Tiles { .. } | PanelInput::Int8Tiles { .. } => 16,
            _ => 1,
        }
    }

    /// Rows of activations.
    pub(super) fn rows(&self) -> usize {
        match self {
            PanelInput::F32(x) => x.rows,
            PanelInput::Bf16 { rows, .. }
            | PanelInput::Bf16Wide { rows, .. }
            | PanelInput::Bf16Tiles { rows, .. } => *rows,
            PanelInput::Int8(x) | PanelInput::Int8Tiles { x, .. } => x.scale.len(),
        }
    }

    /// The first lane and the lanes from one row to the next, for the AVX-512 tiles (AMX's
    /// tiles are read by `amx.rs`; [`Self::rows`] counts the rows).
    pub(super) fn lanes(&self) -> (*const u32, usize) {
        match self {
            PanelInput::F32(x) => (x.data.as_ptr().cast(), x.row_stride),
            PanelInput::Bf16 { pairs, rows } => (pairs.as_ptr(), pairs.len() / (*rows).max(1)),
            PanelInput::Bf16Wide { values, rows } => {
                (values.as_ptr().cast(), values.len() / (*rows).max(1))
            }
            PanelInput::Int8(x) => (x.q.as_ptr().cast(), x.k_pad / 4),
            PanelInput::Bf16Tiles { .. } | PanelInput::Int8Tiles { .. } => {
                unreachable!("AMX tiles are not rows of lanes")
            }
        }
    }
}

/// Whether a bf16 or int8 product of `rows` rows by `w` runs on AMX tiles (`amx.rs`).
pub(super) fn amx_takes(w: &PanelWeight, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::takes(w, rows)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, rows);
        false
    }
}

/// Fewest rows for which a bf16 product widens its panel to f32 where [`bf16_by_fma`]: one
/// or two rows stream their panel from memory, where `vdpbf16ps`'s fewer instructions cost
/// nothing and the widening only adds work.
const WIDE_MIN_ROWS: usize = 3;

/// `v` rounded to bf16 (nearest, ties to even; a NaN stays a quiet NaN), in the low 16 bits:
/// `half::bf16::from_f32`'s rounding, as plain integer arithmetic that vectorises (the
/// activations of a call are rounded on every call).
#[inline(always)]
pub(super) fn bf16_bits(v: f32) -> u32 {
    let bits = v.to_bits();
    if v.is_nan() {
        (bits >> 16) | 0x40
    } else {
        // Adding 0x7fff, plus 1 when the kept part is odd, carries into it exactly when the
        // dropped half is above half an ulp, or at half an ulp with an odd kept part.
        (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    }
}

/// `row` rounded to bf16 in pairs, `dst[t]` holding inputs `2t` (low half) and `2t + 1`.
#[inline(always)]
fn bf16_pairs_body(row: &[f32], dst: &mut [u32]) {
    let mut pairs = row.chunks_exact(2);
    for (d, pair) in dst.iter_mut().zip(&mut pairs) {
        *d = bf16_bits(pair[0]) | (bf16_bits(pair[1]) << 16);
    }
    if let [last] = pairs.remainder() {
        dst[row.len() / 2] = bf16_bits(*last);
    }
}

crate::simd::dispatch! { pub(super) fn bf16_pairs(row: &[f32], dst: &mut [u32]) => bf16_pairs_body }

/// `row` rounded to bf16, each value kept in an f32.
#[inline(always)]
fn bf16_rounded_body(row: &[f32], dst: &mut [f32]) {
    for (d, v) in dst.iter_mut().zip(row) {
        *d = f32::from_bits(bf16_bits(*v) << 16);
    }
}

crate::simd::dispatch! { fn bf16_rounded(row: &[f32], dst: &mut [f32]) => bf16_rounded_body }
