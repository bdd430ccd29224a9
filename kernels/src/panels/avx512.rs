//! The AVX-512 panel kernel: the block loop shared by every format, and the register tile
//! compiled once per format with its instructions (see the parent module for the layout).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{
    K_BLOCK, MAX_TILE_ROWS, Out, PANEL, PREFETCH_STEPS, PanelFormat, PanelWeight, row_tiles,
};

/// The block loop, the same for every format (no SIMD of its own): `x` is (rows, first
/// lane, lanes from row to row).
pub(super) unsafe fn block(
    (rows, x, s): (usize, *const u32, usize),
    w: &PanelWeight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    let k = w.steps();
    if rows == 0 {
        return;
    }
    let tile: TileFn = match w.format {
        PanelFormat::F32 => tile_f32,
        PanelFormat::Bf16 => tile_bf16,
    };
    // One block over all of `k` when one tile holds the rows (nothing shares the panel),
    // blocks of at most K_BLOCK otherwise.
    let tiles = rows.div_ceil(MAX_TILE_ROWS);
    let k_block = if tiles == 1 {
        k
    } else {
        k.div_ceil(k.div_ceil(K_BLOCK))
    };
    let panels = cols.start / PANEL..cols.end.div_ceil(PANEL);
    for q in panels.clone() {
        let j = q * PANEL;
        let (valid, width) = (PANEL.min(cols.end - j), w.width(q));
        let mut p0 = 0;
        while p0 < k {
            let len = k_block.min(k - p0);
            let (first, last) = (p0 == 0, p0 + len == k);
            let block = unsafe { w.panel(q).add(p0 * width) };
            // The next block starts where this one ends (panels lie back to back); none
            // after the share's last. Each tile fetches its own part of it.
            let next = (!last || q + 1 < panels.end).then(|| unsafe { block.add(len * width) });
            for (t, tile_rows) in row_tiles(rows).enumerate() {
                let prefetch = match next {
                    // One or two rows walk the panel as several streams at once (enough
                    // lines in flight without help).
                    _ if rows <= 2 => Prefetch::NONE,
                    _ if tiles == 1 => Prefetch::ahead(block, len, width),
                    // Nothing fetched the share's first block for its first tile.
                    _ if t == 0 && q == panels.start && first => Prefetch::ahead(block, len, width),
                    Some(next) => Prefetch::share(next, len * width, t, tiles, len),
                    None => Prefetch::NONE,
                };
                unsafe {
                    let args = TileArgs {
                        x: x.add(tile_rows.start * s + p0),
                        x_stride: s,
                        panel: block,
                        len,
                        bias: bias.filter(|_| last).map(|b| b.as_ptr().add(j)),
                        out: out.ptr.add(tile_rows.start * out.n + j),
                        n: out.n,
                        valid,
                        accumulate: !first,
                        prefetch,
                    };
                    tile(width / 16, tile_rows.len(), args);
                }
            }
            p0 += len;
        }
    }
}

/// Which lines a tile asks for, and how: from `from`, `per_step` lines of 16 lanes at
/// each step, up to `to`.
#[derive(Clone, Copy)]
struct Prefetch {
    from: *const u32,
    to: *const u32,
    per_step: usize,
    /// To L1 (the tile's own panel, read a few steps later) or to L2 (the next block,
    /// read by the next tiles; in L1 it would push out the rows of `x` the tile reuses).
    near: bool,
}

impl Prefetch {
    const NONE: Prefetch = Prefetch {
        from: std::ptr::null(),
        to: std::ptr::null(),
        per_step: 0,
        near: false,
    };

    /// The tile's own block of `len` steps × `width` columns, `PREFETCH_STEPS` steps
    /// ahead of its reads (past the block into the next panel: panels lie back to back,
    /// and a prefetch past the weights never faults).
    fn ahead(block: *const u32, len: usize, width: usize) -> Prefetch {
        let from = block.wrapping_add(PREFETCH_STEPS * width);
        Prefetch {
            from,
            to: from.wrapping_add(len * width),
            per_step: width / 16,
            near: true,
        }
    }

    /// Tile `t`'s `1 / tiles` of the next block (`size` lanes from `next`), spread over
    /// its `len` steps.
    fn share(next: *const u32, size: usize, t: usize, tiles: usize, len: usize) -> Prefetch {
        let lines = (size / 16).div_ceil(tiles);
        let from = next.wrapping_add(t * lines * 16);
        Prefetch {
            from,
            to: from.wrapping_add(lines * 16),
            per_step: lines.div_ceil(len.max(1)),
            near: false,
        }
    }
}

/// One tile's work: `MR` rows of x from `x` (rows `x_stride` lanes apart) against `len`
/// steps of a panel from `panel`; the first `valid` of the panel's columns go to `out`
/// (rows `n` apart), added to what is there when `accumulate`, with the bias when there is
/// one.
struct TileArgs {
    x: *const u32,
    x_stride: usize,
    panel: *const u32,
    len: usize,
    bias: Option<*const f32>,
    out: *mut f32,
    n: usize,
    valid: usize,
    accumulate: bool,
    prefetch: Prefetch,
}

/// A tile of (vectors per step of the panel, rows) for one format.
type TileFn = unsafe fn(usize, usize, TileArgs);

/// How one row's step of activations (the same in every lane) and a vector of a panel's
/// lanes add into 16 f32 sums.
trait Lanes {
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512;
}

/// f32 × f32, fused multiply-add.
struct F32Lanes;

impl Lanes for F32Lanes {
    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        unsafe { _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc) }
    }
}

/// Pairs of bf16: `acc + x₀·w₀ + x₁·w₁` (`vdpbf16ps`).
struct Bf16Lanes;

impl Lanes for Bf16Lanes {
    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        unsafe {
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(x),
                std::mem::transmute::<__m512i, __m512bh>(w),
            )
        }
    }
}

// Each format's tiles compiled with its instructions: the generic tile below is inlined
// into these, where its intrinsics can be inlined too.
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<F32Lanes>(nv, rows, args) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_bf16(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<Bf16Lanes>(nv, rows, args) }
}

/// The tile for `rows` rows of a panel `nv` vectors wide. One row walks the panel as 4
/// segments and two rows as 2 (more streams in flight); more rows as one.
#[inline(always)]
unsafe fn tile_of<L: Lanes>(nv: usize, rows: usize, args: TileArgs) {
    unsafe {
        match nv {
            1 => tile_rows::<L, 1>(rows, args),
            2 => tile_rows::<L, 2>(rows, args),
            3 => tile_rows::<L, 3>(rows, args),
            _ => tile_rows::<L, 4>(rows, args),
        }
    }
}

#[inline(always)]
unsafe fn tile_rows<L: Lanes, const NV: usize>(rows: usize, args: TileArgs) {
    unsafe {
        match rows {
            1 => tile::<L, 1, 4, NV>(args),
            2 => tile::<L, 2, 2, NV>(args),
            3 => tile::<L, 3, 1, NV>(args),
            4 => tile::<L, 4, 1, NV>(args),
            5 => tile::<L, 5, 1, NV>(args),
            _ => tile::<L, 6, 1, NV>(args),
        }
    }
}

/// Step `p` of a tile: `MR` rows' activations against the panel's `NV` vectors, asking
/// for the prefetch's lines on the way (`fetch`: the next one).
#[inline(always)]
unsafe fn step<L: Lanes, const MR: usize, const NV: usize>(
    acc: &mut [[__m512; NV]; MR],
    a: &TileArgs,
    p: usize,
    fetch: &mut *const u32,
    prefetch: bool,
) {
    unsafe {
        // One stream: the hardware prefetcher alone keeps too few lines in flight. (The
        // addresses are never read: a prefetch does not fault.)
        for _ in 0..if prefetch { a.prefetch.per_step } else { 0 } {
            if *fetch >= a.prefetch.to {
                break;
            }
            if a.prefetch.near {
                _mm_prefetch::<_MM_HINT_T0>(fetch.cast());
            } else {
                _mm_prefetch::<_MM_HINT_T1>(fetch.cast());
            }
            *fetch = fetch.wrapping_add(16);
        }
        let wp = a.panel.add(p * 16 * NV);
        let mut wv = [_mm512_setzero_si512(); NV];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = _mm512_load_si512(wp.add(16 * c).cast());
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_epi32(*a.x.add(i * a.x_stride + p) as i32);
            for (acc, v) in row.iter_mut().zip(&wv) {
                *acc = L::madd(*acc, xb, *v);
            }
        }
    }
}

/// `MR` rows against `a.len` steps of a panel `NV` vectors wide, the steps walked as `S`
/// segments at once (`S` sequential streams in flight, `S × MR × NV` accumulators summed
/// at the end).
#[inline(always)]
unsafe fn tile<L: Lanes, const MR: usize, const S: usize, const NV: usize>(a: TileArgs) {
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); NV]; MR]; S];
        let mut fetch = a.prefetch.from;
        // Several segments are streams enough: their loop goes without the prefetch check.
        let prefetch = S == 1 && a.prefetch.per_step > 0;
        let segment = a.len / S;
        for p in 0..segment {
            for (s, acc) in acc.iter_mut().enumerate() {
                step::<L, MR, NV>(acc, &a, s * segment + p, &mut fetch, prefetch);
            }
        }
        for p in S * segment..a.len {
            step::<L, MR, NV>(&mut acc[0], &a, p, &mut fetch, prefetch);
        }
        for c in 0..NV {
            let lanes = a.valid.saturating_sub(16 * c).min(16);
            if lanes == 0 {
                break;
            }
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                ((1u32 << lanes) - 1) as u16
            };
            // No closures here: this body is compiled where it is inlined, with that
            // function's instructions, and a closure need not be inlined with it.
            let b = match a.bias {
                Some(b) => _mm512_maskz_loadu_ps(mask, b.add(16 * c)),
                None => _mm512_setzero_ps(),
            };
            for i in 0..MR {
                let mut sum = acc[0][i][c];
                for segment in &acc[1..] {
                    sum = _mm512_add_ps(sum, segment[i][c]);
                }
                let dst = a.out.add(i * a.n + 16 * c);
                let mut value = _mm512_add_ps(sum, b);
                if a.accumulate {
                    value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, dst));
                }
                _mm512_mask_storeu_ps(dst, mask, value);
            }
        }
    }
}
