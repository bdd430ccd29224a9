//! f32 linear layers on AVX-512: `W` packed once, at load, in panels of 64 output columns,
//! and the kernel that multiplies any number of activation rows with them:
//! `out[i, j] = b[j] + Σ_p x[i, p]·W[j, p]`.
//!
//! A panel holds `W`'s rows `64q..64q + 64` transposed: for each input `p`, the 64 weights of
//! the panel's outputs, one cache line per 16. A register tile of up to 6 rows × 64 outputs
//! (24 accumulators) loads the panel's 4 vectors of input `p`, broadcasts `x[i, p]` of each
//! row and does 24 multiply-adds: GotoBLAS's register-blocked outer product, the shape of
//! gemm's own `x4x6` kernel, with no horizontal sums and `W` packed once instead of on every
//! call as gemm packs it.
//!
//! - Up to 6 rows (a decode step of a few streams): one tile per panel over all of `k`, so a
//!   thread reads its panels front to back, one sequential stream at the memory's speed.
//! - More rows: every tile of rows passes over the panel while it sits in L2 (for a long `k`,
//!   in blocks of at most `K_BLOCK` inputs, the partial sums waiting in `out` between blocks),
//!   and each tile asks for its share of the next block, so that memory streams the next
//!   block while the cores work on this one instead of waiting for the first tile's reads.
//!
//! `examples/linear_shapes.rs` measures it against the row-layout kernel of
//! [`crate::skinny`] and gemm (BENCHMARKS.md, 2026-12-03).

use std::ops::Range;

use crate::matmul::MatRef;
use crate::skinny::Out;

/// Output columns per panel: 4 vectors of 16 lanes.
pub const PANEL: usize = 64;

/// Rows of `x` per register tile (6 × 4 accumulators of the 32 registers, beside the 4
/// weight vectors and a broadcast).
const MAX_TILE_ROWS: usize = 6;

/// Most inputs per block when several tiles of rows share a panel: 1024 × 64 weights,
/// 256 KiB, so that the block the tiles pass over and the next one, on its way in, hold half
/// of a 1 MiB L2 (AMD Zen 4; Intel's server cores have 1-2 MiB). A `k` past it is cut in
/// blocks as even as can be (1536 as 768 + 768). Blocks of 64-512 inputs (in L1) measured
/// slower at the mamba-130m shapes, 256 rows: lm_head 57-70 ms against 56 ms unblocked
/// (k = 768), out_proj 1.79-2.11 against 1.72 ms (k = 1536).
const K_BLOCK: usize = 1024;

/// How far ahead a one-stream tile asks for its panel: 32 inputs, 8 KiB. In `tideway bench`
/// (mamba-130m, 2026-12-03) batch 8 went 199 → 228 tok/s with it; 16-64 steps ahead did
/// about as well, 128 worse.
const PREFETCH_STEPS: usize = 32;

/// One cache line of 16 weights, so that every panel vector is an aligned load.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `W` (`[n, k]`, PyTorch's layout) packed in panels of [`PANEL`] output columns; the last
/// panel is as narrow as its columns allow in whole vectors of 16, padded with zeros (a
/// mamba-130m `x_proj` of 80 outputs keeps 64 + 16 columns, not 128).
#[derive(Clone, Debug)]
pub struct PanelWeight {
    lines: std::sync::Arc<[Line]>,
    n: usize,
    k: usize,
}

/// Whether this CPU runs the panel kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PanelWeight {
    /// Packs `w` (`[n, k]` row-major).
    pub fn from_torch(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "weight holds {} values, not {n} × {k}",
            w.len()
        );
        let columns = n.next_multiple_of(16);
        let mut packed = PanelWeight {
            lines: Vec::new().into(),
            n,
            k,
        };
        let mut lines = vec![Line([0.0; 16]); columns * k / 16];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            for (p, &v) in row.iter().enumerate() {
                let at = packed.position(j, p);
                lines[at / 16].0[at % 16] = v;
            }
        }
        packed.lines = lines.into();
        packed
    }

    /// Columns of panel `q`: [`PANEL`], or fewer for the last.
    fn width(&self, q: usize) -> usize {
        (self.n - q * PANEL).min(PANEL).next_multiple_of(16)
    }

    /// Where `W[j, p]` is kept: after the full panels before `j`'s, at row `p` of its panel.
    fn position(&self, j: usize, p: usize) -> usize {
        let (q, c) = (j / PANEL, j % PANEL);
        q * PANEL * self.k + p * self.width(q) + c
    }

    /// Copies row `j` of PyTorch's `W` (`[k]` values) into `dst`.
    pub fn row_f32(&self, j: usize, dst: &mut [f32]) {
        assert!(j < self.n && dst.len() == self.k);
        for (p, d) in dst.iter_mut().enumerate() {
            let at = self.position(j, p);
            *d = self.lines[at / 16].0[at % 16];
        }
    }

    /// Bytes kept (the last panel's padding included).
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.lines)
    }

    /// The first weight of panel `q`.
    fn panel(&self, q: usize) -> *const f32 {
        self.lines[q * PANEL * self.k / 16..].as_ptr().cast()
    }
}

/// Writes `out[i, j]` for every row `i` of `x` and the output columns `cols`, which start at
/// a panel's first column; `bias` `[n]` if any.
///
/// # Safety
/// [`available`] must be true; `out.ptr` must hold `x.rows × out.n` values with
/// `out.n == w`'s outputs, `cols` must lie in `0..out.n`, `x.cols` must be `w`'s inputs, and
/// no other thread may write the same columns at the same time.
pub unsafe fn block(
    x: MatRef<'_>,
    w: &PanelWeight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    assert!(cols.start.is_multiple_of(PANEL) && cols.end <= w.n && x.cols == w.k && out.n == w.n);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::block(x, w, bias, cols, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w, bias, cols, out);
        unreachable!("the panel kernel needs x86-64 (see `available`)");
    }
}

/// Splits `rows` into tiles of at most [`MAX_TILE_ROWS`] rows, as even as can be (8 rows run
/// as 4 + 4, not 6 + 2: a thin tile does as many loads for fewer multiply-adds).
fn row_tiles(rows: usize) -> impl Iterator<Item = Range<usize>> {
    let tiles = rows.div_ceil(MAX_TILE_ROWS).max(1);
    let (base, extra) = (rows / tiles, rows % tiles);
    (0..tiles).scan(0, move |start, t| {
        let len = base + usize::from(t < extra);
        let range = *start..*start + len;
        *start += len;
        Some(range)
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{K_BLOCK, MAX_TILE_ROWS, Out, PANEL, PREFETCH_STEPS, PanelWeight, row_tiles};
    use crate::matmul::MatRef;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        x: MatRef<'_>,
        w: &PanelWeight,
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let (k, s) = (w.k, x.row_stride);
        if x.rows == 0 {
            return;
        }
        // One block over all of `k` when one tile holds the rows (nothing shares the panel),
        // blocks of at most K_BLOCK otherwise.
        let tiles = x.rows.div_ceil(MAX_TILE_ROWS);
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
                for (t, rows) in row_tiles(x.rows).enumerate() {
                    let prefetch = match next {
                        // One or two rows walk the panel as several streams at once (enough
                        // lines in flight without help).
                        _ if x.rows <= 2 => Prefetch::NONE,
                        _ if tiles == 1 => Prefetch::ahead(block, len, width),
                        // Nothing fetched the share's first block for its first tile.
                        _ if t == 0 && q == panels.start && first => {
                            Prefetch::ahead(block, len, width)
                        }
                        Some(next) => Prefetch::share(next, len * width, t, tiles, len),
                        None => Prefetch::NONE,
                    };
                    unsafe {
                        let args = TileArgs {
                            x: x.data.as_ptr().add(rows.start * s + p0),
                            x_stride: s,
                            panel: block,
                            len,
                            bias: bias.filter(|_| last).map(|b| b.as_ptr().add(j)),
                            out: out.ptr.add(rows.start * out.n + j),
                            n: out.n,
                            valid,
                            accumulate: !first,
                            prefetch,
                        };
                        match width / 16 {
                            1 => tile_of::<1>(rows.len(), args),
                            2 => tile_of::<2>(rows.len(), args),
                            3 => tile_of::<3>(rows.len(), args),
                            _ => tile_of::<4>(rows.len(), args),
                        }
                    }
                }
                p0 += len;
            }
        }
    }

    /// Which lines a tile asks for, and how: from `from`, `per_step` lines of 16 weights at
    /// each input, up to `to`.
    #[derive(Clone, Copy)]
    struct Prefetch {
        from: *const f32,
        to: *const f32,
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

        /// The tile's own block of `len` inputs × `width` columns, `PREFETCH_STEPS` inputs
        /// ahead of its reads (past the block into the next panel: panels lie back to back,
        /// and a prefetch past the weights never faults).
        fn ahead(block: *const f32, len: usize, width: usize) -> Prefetch {
            let from = block.wrapping_add(PREFETCH_STEPS * width);
            Prefetch {
                from,
                to: from.wrapping_add(len * width),
                per_step: width / 16,
                near: true,
            }
        }

        /// Tile `t`'s `1 / tiles` of the next block (`size` weights from `next`), spread
        /// over its `len` inputs.
        fn share(next: *const f32, size: usize, t: usize, tiles: usize, len: usize) -> Prefetch {
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

    /// One tile's work: `MR` rows of x from `x` (rows `x_stride` apart) against `len` inputs
    /// of a panel from `panel`; the first `valid` of the panel's columns go to `out` (rows `n`
    /// apart), added to what is there when `accumulate`, with the bias when there is one.
    struct TileArgs {
        x: *const f32,
        x_stride: usize,
        panel: *const f32,
        len: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
        valid: usize,
        accumulate: bool,
        prefetch: Prefetch,
    }

    /// The tile for `rows` rows of a panel `NV` vectors wide. One row walks the panel as 4
    /// segments and two rows as 2 (more streams in flight); more rows as one.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_of<const NV: usize>(rows: usize, args: TileArgs) {
        unsafe {
            match rows {
                1 => tile::<1, 4, NV>(args),
                2 => tile::<2, 2, NV>(args),
                3 => tile::<3, 1, NV>(args),
                4 => tile::<4, 1, NV>(args),
                5 => tile::<5, 1, NV>(args),
                _ => tile::<6, 1, NV>(args),
            }
        }
    }

    /// `MR` rows against `a.len` inputs of a panel `NV` vectors wide, the inputs walked as
    /// `S` segments at once (`S` sequential streams in flight, `S × MR × NV` accumulators
    /// summed at the end).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const MR: usize, const S: usize, const NV: usize>(a: TileArgs) {
        unsafe {
            let mut acc = [[[_mm512_setzero_ps(); NV]; MR]; S];
            let mut fetch = a.prefetch.from;
            let mut step = |acc: &mut [[__m512; NV]; MR], p: usize| {
                let wp = a.panel.add(p * 16 * NV);
                // One stream: the hardware prefetcher alone keeps too few lines in flight.
                // (The addresses are never read: a prefetch does not fault.) Several
                // segments are streams enough: their loop stays as it was without this.
                for _ in 0..if S == 1 { a.prefetch.per_step } else { 0 } {
                    if fetch >= a.prefetch.to {
                        break;
                    }
                    if a.prefetch.near {
                        _mm_prefetch::<_MM_HINT_T0>(fetch.cast());
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(fetch.cast());
                    }
                    fetch = fetch.wrapping_add(16);
                }
                let mut wv = [_mm512_setzero_ps(); NV];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_load_ps(wp.add(16 * c));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*a.x.add(i * a.x_stride + p));
                    for (acc, v) in row.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xb, *v, *acc);
                    }
                }
            };
            let segment = a.len / S;
            for p in 0..segment {
                for (s, acc) in acc.iter_mut().enumerate() {
                    step(acc, s * segment + p);
                }
            }
            for p in S * segment..a.len {
                step(&mut acc[0], p);
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
                let b = a.bias.map_or(_mm512_setzero_ps(), |b| {
                    _mm512_maskz_loadu_ps(mask, b.add(16 * c))
                });
                for i in 0..MR {
                    let sum = acc[1..]
                        .iter()
                        .fold(acc[0][i][c], |t, s| _mm512_add_ps(t, s[i][c]));
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
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn row_tiles_cover_the_rows_in_even_tiles_of_at_most_six() {
        for rows in 0..40 {
            let tiles: Vec<_> = row_tiles(rows).collect();
            assert_eq!(tiles.iter().map(|t| t.len()).sum::<usize>(), rows);
            assert!(tiles.iter().all(|t| t.len() <= MAX_TILE_ROWS));
            let (min, max) = tiles.iter().fold((usize::MAX, 0), |(a, b), t| {
                (a.min(t.len()), b.max(t.len()))
            });
            assert!(rows == 0 || max - min <= 1, "{rows}: {tiles:?}");
        }
        assert_eq!(row_tiles(8).collect::<Vec<_>>(), vec![0..4, 4..8]);
    }

    #[test]
    fn a_packed_row_reads_back_as_the_torch_row() {
        let (n, k) = (70, 5);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let packed = PanelWeight::from_torch(&w, n, k);
        let mut row = vec![0.0; k];
        for j in [0, 63, 64, 69] {
            packed.row_f32(j, &mut row);
            assert_eq!(row, &w[j * k..(j + 1) * k]);
        }
        // 64 columns, then 6 kept in one vector of 16.
        assert_eq!(packed.size_bytes(), (PANEL + 16) * k * 4);
    }

    /// Against a product in f64: one tile and many (a `k` over several blocks and ragged),
    /// strided rows, a partial last panel, two column shares as two threads take them.
    #[test]
    fn the_kernel_matches_the_naive_product() {
        if !available() {
            return;
        }
        // Last panels of 1 to 4 vectors (70, 100, 130 and 150 columns).
        for (m, k, n) in [
            (1, 37, 70),
            (2, 300, 100),
            (5, 300, 130),
            (7, 129, 64),
            (20, 260, 150),
            // Three blocks of 700 inputs, each tile fetching its share of the next.
            (9, 2100, 100),
        ] {
            let stride = k + 3;
            let x = crate::test_util::pseudo(m * stride, 31, -1.0, 1.0);
            let w = crate::test_util::pseudo(n * k, 32, -1.0, 1.0);
            let b = crate::test_util::pseudo(n, 33, -1.0, 1.0);
            let packed = PanelWeight::from_torch(&w, n, k);
            let view = MatRef {
                data: &x,
                rows: m,
                cols: k,
                row_stride: stride,
            };
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // SAFETY: AVX-512F is there; `out` holds m × n; the shares are disjoint.
            unsafe {
                block(view, &packed, Some(&b), 0..PANEL.min(n), target);
                if n > PANEL {
                    block(view, &packed, Some(&b), PANEL..n, target);
                }
            }
            let what = format!("{m}×{k}×{n}");
            crate::test_util::assert_linear_matches_f64(&out, &x, stride, &w, &b, (m, k, n), &what);
        }
    }
}
