//! The AVX-512 panel kernel: the block loop shared by every format, and the register tile
//! compiled once per format with its instructions (see the parent module for the layout).

use std::arch::x86_64::*;
use std::ops::Range;

use super::fetch::Fetch;
use super::{
    FEW_TILES, FEW_TILES_FETCH_BLOCKS, K_BLOCK, MAX_TILE_ROWS, OneRowWalk, Out, PANEL,
    PREFETCH_STEPS, PanelFormat, PanelInput, PanelWeight, STREAM_AHEAD_STEPS, few_tiles_block,
    outliers, row_tiles,
};

/// The block loop, the same for every format (no SIMD of its own), for the rows `rows` of
/// `input` over the panels' steps `steps` (checked against `w` by the caller; all of them
/// for int8); one row walks its panels by `walk`.
pub(super) unsafe fn block(
    input: &PanelInput<'_>,
    rows: Range<usize>,
    w: &PanelWeight,
    bias: Option<&[f32]>,
    (cols, steps): (Range<usize>, Range<usize>),
    out: Out,
    walk: OneRowWalk,
) {
    let k = steps.len();
    if rows.is_empty() || cols.is_empty() || k == 0 {
        return;
    }
    // First lane of row 0 and lanes from row to row; an int8 weight's quantized activations
    // (their scales and outliers); whether a bf16 weight's activations are widened, two
    // lanes a step.
    let (x, s) = input.lanes();
    let int8 = match input {
        PanelInput::Int8(x) => Some(x),
        _ => None,
    };
    let wide = matches!(input, PanelInput::Bf16Wide { .. });
    // One row, and a few rows in one tile, of f32 or bf16 in 256-bit halves where the walk
    // says so.
    let half_vectors =
        walk == OneRowWalk::HalfVectors && super::half_vectors::takes(w.format, rows.len());
    let tile: TileFn = match w.format {
        PanelFormat::F32 if half_vectors => super::half_vectors::tile_f32,
        PanelFormat::F32 => tile_f32,
        PanelFormat::Bf16 if wide && half_vectors => super::half_vectors::tile_bf16_by_fma,
        PanelFormat::Bf16 if wide => tile_bf16_by_fma,
        PanelFormat::Bf16 if half_vectors => super::half_vectors::tile_bf16,
        PanelFormat::Bf16 => tile_bf16,
        PanelFormat::Int8 => tile_int8,
    };
    // Lanes of `x` a step of the panel reads.
    let x_per_step = if wide { 2 } else { 1 };
    // One block over all of `k` when one tile holds the rows (nothing shares the panel),
    // blocks that L1 holds for a few tiles, blocks of at most K_BLOCK for more; and how many
    // blocks ahead the tiles that share a panel fetch: the block after the next for blocks in
    // L1, the next for blocks in L2 ([`FEW_TILES_FETCH_BLOCKS`]).
    let tiles = rows.len().div_ceil(MAX_TILE_ROWS);
    let (k_block, blocks_ahead) = match tiles {
        1 => (k, 1),
        2..=FEW_TILES => (
            k.div_ceil(k.div_ceil(few_tiles_block())),
            FEW_TILES_FETCH_BLOCKS,
        ),
        _ => (k.div_ceil(k.div_ceil(K_BLOCK)), 1),
    };
    // LLM.int8's outlier columns, if any, and their weights' scales.
    let int8_outliers = match (int8, &w.columns) {
        (Some(x), Some(c)) if !x.outliers.is_empty() => Some((x, c)),
        _ => None,
    };
    // Whether the outlier pass widens the panel's outlier steps to f32 once (see
    // `outliers`).
    let widen_once = tiles >= outliers::WIDEN_ONCE_MIN_TILES;
    // Where every column of these rows is an outlier (or zero), the int8 pass adds nothing:
    // the outlier pass writes the outputs alone. (Not for the tiles that widen as they go,
    // which add to what the int8 pass wrote.)
    let skip_int8 = widen_once && int8_outliers.is_some_and(|(x, _)| x.no_inliers(rows.clone()));
    let panels = cols.start / PANEL..cols.end.div_ceil(PANEL);
    // Where the weights end (panels lie back to back): no tile asks for lines past them. Near
    // the share's end the tiles ask for the first blocks of the panels after it, the next share
    // in `matmul::shares::by_columns`' list, which a thread of the pool takes next (the same thread
    // where the other is busy): its tiles then find them in L2 or on the way. Against stopping
    // at the share's end, both alternated in one process on weights from memory (2026-12-05,
    // GFLOP/s): out_proj at 32 rows 346.9 / 345.6 → 361.1 / 360.7, at 24 rows 299.6 / 303.4 →
    // 308.0 / 309.4, at 16 rows 230.8 / 231.6 → 235.7 / 235.8; in_proj 0-2% faster; lm_head
    // (far longer shares) and 8 or 512 rows the same.
    let last_panel = w.n.div_ceil(PANEL) - 1;
    let last_lanes = w.steps() * w.width(last_panel);
    let weights_end = w.panel(last_panel).wrapping_add(last_lanes);
    for q in panels.clone() {
        let j = q * PANEL;
        let (valid, width) = (PANEL.min(cols.end - j), w.width(q));
        let mut p0 = if skip_int8 { steps.end } else { steps.start };
        while p0 < steps.end {
            let len = k_block.min(steps.end - p0);
            let (first, last) = (p0 == steps.start, p0 + len == steps.end);
            let block = unsafe { w.panel(q).add(p0 * width) };
            // The block `blocks_ahead` after this one, where the blocks are as long as this
            // (it may lie in the next panel, or the next share's), up to the weights' end:
            // each tile fetches its own part of it.
            let ahead = block.wrapping_add(blocks_ahead * len * width);
            let ahead_lanes =
                (len * width).min((weights_end as usize).saturating_sub(ahead as usize) / 4);
            for (t, tile_rows) in row_tiles(rows.clone()).enumerate() {
                let prefetch = match ahead_lanes {
                    _ if half_vectors || (rows.len() == 1 && walk != OneRowWalk::Prefetched) => {
                        Prefetch::Hardware
                    }
                    // The tile reads its block from memory: it holds all the rows, or it
                    // is the first of the share's first block, which the share before it
                    // fetched only if it ran on this thread.
                    _ if tiles == 1 || (t == 0 && q == panels.start && first) => Prefetch::Stream,
                    0 => Prefetch::None,
                    size => Prefetch::Share(Fetch::share(ahead, size, t, tiles, len)),
                };
                unsafe {
                    let dequant = match (int8, &w.columns) {
                        (Some(x), Some(c)) => Dequant {
                            row_scale: x.scale.as_ptr().add(tile_rows.start),
                            col_scale: c.scale.as_ptr().add(j),
                            col_sums: c.sums.as_ptr().add(j),
                        },
                        _ => Dequant::NONE,
                    };
                    let args = TileArgs {
                        x: x.add(tile_rows.start * s + p0 * x_per_step),
                        x_stride: s,
                        panel: block,
                        len,
                        bias: bias.filter(|_| last).map(|b| b.as_ptr().add(j)),
                        out: out.ptr.add(tile_rows.start * out.n + j),
                        n: out.n,
                        valid,
                        accumulate: !first,
                        prefetch,
                        dequant,
                    };
                    tile(width / 16, tile_rows.len(), args);
                }
            }
            p0 += len;
        }
        // LLM.int8's outlier columns, in f32 against the dequantized weights, while the
        // panel is still in L2.
        if let Some((x, c)) = int8_outliers {
            let panel = outliers::Panel {
                q,
                width,
                valid,
                col_scale: unsafe { c.scale.as_ptr().add(j) },
            };
            let outputs = match skip_int8 {
                true => outliers::Outputs::Unwritten {
                    bias: bias.map(|b| unsafe { b.as_ptr().add(j) }),
                },
                false => outliers::Outputs::Written,
            };
            let out = Out {
                ptr: unsafe { out.ptr.add(j) },
                n: out.n,
            };
            unsafe { outliers::pass(x, w, &panel, rows.clone(), widen_once, outputs, out) };
        }
    }
}

/// What a tile asks for beyond its own next steps, which every one-segment tile asks for
/// [`PREFETCH_STEPS`] ahead into L1 (`tile`).
#[derive(Clone, Copy)]
pub(super) enum Prefetch {
    /// Nothing more: a tile before it fetched the block, and no block follows in the share.
    None,
    /// The tile streams its block from memory: each of its segments asks for its lines
    /// [`STREAM_AHEAD_STEPS`] ahead into L2 (past the block into the next panel: panels lie
    /// back to back, and a prefetch past the weights never faults).
    Stream,
    /// A one-row tile, or a tile in 256-bit halves, streams its block from memory as
    /// segments that the core's L2 prefetcher follows, asking for nothing itself
    /// ([`OneRowWalk::HardwareStreams`] and [`OneRowWalk::HalfVectors`]).
    Hardware,
    /// Its share of the next block, for the tiles after it.
    Share(Fetch),
}

/// One tile's work: `MR` rows of x from `x` (rows `x_stride` lanes apart) against `len`
/// steps of a panel from `panel`; the first `valid` of the panel's columns go to `out`
/// (rows `n` apart), added to what is there when `accumulate`, with the bias when there is
/// one.
pub(super) struct TileArgs {
    pub(super) x: *const u32,
    pub(super) x_stride: usize,
    pub(super) panel: *const u32,
    pub(super) len: usize,
    pub(super) bias: Option<*const f32>,
    pub(super) out: *mut f32,
    pub(super) n: usize,
    pub(super) valid: usize,
    pub(super) accumulate: bool,
    pub(super) prefetch: Prefetch,
    pub(super) dequant: Dequant,
}

/// An int8 tile's scales: `sx` of its rows, `sw` and `Σ_p Q` of its panel's columns (null
/// for the other formats).
pub(super) struct Dequant {
    row_scale: *const f32,
    col_scale: *const f32,
    col_sums: *const i32,
}

impl Dequant {
    pub(super) const NONE: Dequant = Dequant {
        row_scale: std::ptr::null(),
        col_scale: std::ptr::null(),
        col_sums: std::ptr::null(),
    };
}

/// A tile of (vectors per step of the panel, rows) for one format.
type TileFn = unsafe fn(usize, usize, TileArgs);

/// Which lanes of a tile's vector `c` hold one of its `valid` columns; none past them.
#[inline(always)]
pub(super) fn valid_lanes(valid: usize, c: usize) -> Option<__mmask16> {
    match valid.saturating_sub(16 * c).min(16) {
        0 => None,
        16 => Some(0xffff),
        lanes => Some(((1u32 << lanes) - 1) as u16),
    }
}

/// How one row's step of activations (the same in every lane) and a vector of a panel's
/// lanes add into 16 sums (f32; int8's are i32 in the same registers).
pub(super) trait Lanes {
    /// Parts a step is done in, each with its own lane of a row's activations (`x` holds
    /// `HALVES` lanes a step) and its own view of the panel's vectors ([`Lanes::weights`]).
    const HALVES: usize = 1;

    /// The panel vector at `w` as `madd` takes it in part `half` of a step.
    #[inline(always)]
    unsafe fn weights(w: *const u32, _half: usize) -> __m512i {
        unsafe { _mm512_load_si512(w.cast()) }
    }

    /// A row's step of activations, as `madd` takes it.
    #[inline(always)]
    unsafe fn broadcast(x: u32) -> __m512i {
        unsafe { _mm512_set1_epi32(x as i32) }
    }

    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512;

    /// Two segments' sums added.
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }

    /// The sums of row `i` and the panel's vector `c` as f32 outputs.
    #[inline(always)]
    unsafe fn finish(sum: __m512, _a: &TileArgs, _i: usize, _c: usize) -> __m512 {
        sum
    }
}

/// f32 × f32, fused multiply-add.
pub(super) struct F32Lanes;

impl Lanes for F32Lanes {
    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        unsafe { _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc) }
    }
}

/// Pairs of bf16: `acc + x₀·w₀ + x₁·w₁` (`vdpbf16ps`).
pub(super) struct Bf16Lanes;

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

/// Pairs of bf16 widened to f32 (exact) and multiplied with FMAs, the odd input first, as
/// `vdpbf16ps` adds them ([`super::bf16_by_fma`]): the activations come as f32 already
/// rounded to bf16, two lanes a step (`x[2t + 1]`, then `x[2t]`).
pub(super) struct Bf16ByFmaLanes;

impl Lanes for Bf16ByFmaLanes {
    const HALVES: usize = 2;

    /// The odd inputs' weights are the lanes' high halves, the even inputs' the low halves
    /// moved up: bf16 is f32's top 16 bits.
    ///
    /// Each part loads the vector anew (a volatile load, which the compiler cannot merge
    /// with the other part's): kept from one part to the next, the four raw vectors beside
    /// the four widened ones pushed a 6-row tile's accumulators out of the 32 registers onto
    /// the stack (`perf annotate`, 2026-12-04).
    #[inline(always)]
    unsafe fn weights(w: *const u32, half: usize) -> __m512i {
        unsafe {
            let w = std::ptr::read_volatile(w.cast::<__m512i>());
            if half == 0 {
                _mm512_and_si512(w, _mm512_set1_epi32(0xffff_0000_u32 as i32))
            } else {
                _mm512_slli_epi32::<16>(w)
            }
        }
    }

    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        unsafe { F32Lanes::madd(acc, x, w) }
    }
}

/// Quads of int8: `acc + Σ_u (x_u + 128)·w_u` in i32 (`vpdpbusd` multiplies unsigned bytes
/// by signed ones), dequantized at the end: `(acc − 128·Σ_p Q_jp)·sx_i·sw_j`. The offset comes
/// off with the first block's sums, in i32, so a `k` in several blocks adds up exactly.
struct Int8Lanes;

impl Lanes for Int8Lanes {
    #[inline(always)]
    unsafe fn broadcast(x: u32) -> __m512i {
        unsafe { _mm512_set1_epi32((x ^ 0x8080_8080) as i32) }
    }

    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        unsafe { _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_castps_si512(acc), x, w)) }
    }

    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe {
            _mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_castps_si512(a),
                _mm512_castps_si512(b),
            ))
        }
    }

    #[inline(always)]
    unsafe fn finish(sum: __m512, a: &TileArgs, i: usize, c: usize) -> __m512 {
        unsafe {
            let d = &a.dequant;
            let mut dots = _mm512_castps_si512(sum);
            if !a.accumulate {
                let sums = _mm512_loadu_si512(d.col_sums.add(16 * c).cast());
                dots = _mm512_sub_epi32(dots, _mm512_slli_epi32::<7>(sums));
            }
            let scale = _mm512_mul_ps(
                _mm512_set1_ps(*d.row_scale.add(i)),
                _mm512_loadu_ps(d.col_scale.add(16 * c)),
            );
            _mm512_mul_ps(_mm512_cvtepi32_ps(dots), scale)
        }
    }
}

// Each format's tiles compiled with its instructions: the generic tile below is inlined
// into these, where its intrinsics can be inlined too.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_f32(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<F32Lanes>(nv, rows, args) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_bf16(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<Bf16Lanes>(nv, rows, args) }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile_bf16_by_fma(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<Bf16ByFmaLanes>(nv, rows, args) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_int8(nv: usize, rows: usize, args: TileArgs) {
    unsafe { tile_of::<Int8Lanes>(nv, rows, args) }
}

/// The tile for `rows` rows of a panel `nv` vectors wide: 1-2 rows walk it as 2 segments
/// (more streams in flight; 1 row as 4 with [`Prefetch::Hardware`]), more rows as one.
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
            1 if matches!(args.prefetch, Prefetch::Hardware) => tile::<L, 1, 4, NV>(args),
            1 => tile::<L, 1, 2, NV>(args),
            2 => tile::<L, 2, 2, NV>(args),
            3 => tile::<L, 3, 1, NV>(args),
            4 => tile::<L, 4, 1, NV>(args),
            5 => tile::<L, 5, 1, NV>(args),
            _ => tile::<L, 6, 1, NV>(args),
        }
    }
}

/// Step `p` of a tile: `MR` rows' activations against the panel's `NV` vectors.
#[inline(always)]
unsafe fn step<L: Lanes, const MR: usize, const NV: usize>(
    acc: &mut [[__m512; NV]; MR],
    a: &TileArgs,
    p: usize,
) {
    unsafe {
        let wp = a.panel.add(p * 16 * NV);
        for half in 0..L::HALVES {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = L::weights(wp.add(16 * c), half);
            }
            // Part `half` reads lane `HALVES - 1 - half` of the row's step (one part: the
            // step's only lane).
            let lane = L::HALVES * p + L::HALVES - 1 - half;
            for (i, row) in acc.iter_mut().enumerate() {
                // Unaligned: int8 activations are a byte buffer.
                let xb = L::broadcast(a.x.add(i * a.x_stride + lane).read_unaligned());
                for (acc, v) in row.iter_mut().zip(&wv) {
                    *acc = L::madd(*acc, xb, *v);
                }
            }
        }
    }
}

/// `MR` rows against `a.len` steps of a panel `NV` vectors wide, the steps walked as `S`
/// segments at once (`S` sequential streams in flight, `S × MR × NV` accumulators summed
/// at the end), asking for lines as `a.prefetch` says. A one-segment tile also asks for its
/// own steps [`PREFETCH_STEPS`] ahead into L1 (the last steps' requests run into the next
/// block: a few lines asked for early).
#[inline(always)]
unsafe fn tile<L: Lanes, const MR: usize, const S: usize, const NV: usize>(a: TileArgs) {
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); NV]; MR]; S];
        let mut share = match a.prefetch {
            Prefetch::Share(fetch) => fetch,
            _ => Fetch::NONE,
        };
        // The hardware prefetcher alone keeps too few lines in flight, and stops at every
        // 4 KiB page (where more segments do not make up for it: `OneRowWalk`).
        let stream = matches!(a.prefetch, Prefetch::Stream);
        let segment = a.len / S;
        for p in 0..segment {
            if S == 1 {
                let ahead = a.panel.wrapping_add((p + PREFETCH_STEPS) * 16 * NV);
                for c in 0..NV {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * c).cast());
                }
                share.step();
            }
            if stream {
                for s in 0..S {
                    let ahead = a
                        .panel
                        .wrapping_add((s * segment + p + STREAM_AHEAD_STEPS) * 16 * NV);
                    for c in 0..NV {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(16 * c).cast());
                    }
                }
            }
            for (s, acc) in acc.iter_mut().enumerate() {
                step::<L, MR, NV>(acc, &a, s * segment + p);
            }
        }
        for p in S * segment..a.len {
            step::<L, MR, NV>(&mut acc[0], &a, p);
        }
        for i in 0..MR {
            let mut sums = acc[0][i];
            for segment in &acc[1..] {
                for (sum, s) in sums.iter_mut().zip(&segment[i]) {
                    *sum = L::add(*sum, *s);
                }
            }
            write_row::<L, NV>(&sums, &a, i);
        }
    }
}

/// Row `i` of a tile, its `NV` vectors' sums (its segments added), to `a.out`: finished
/// for the format, with the bias, added to what is there when `a.accumulate`, masked to
/// the panel's valid columns.
#[inline(always)]
pub(super) unsafe fn write_row<L: Lanes, const NV: usize>(
    sums: &[__m512; NV],
    a: &TileArgs,
    i: usize,
) {
    unsafe {
        for (c, &sum) in sums.iter().enumerate() {
            let Some(mask) = valid_lanes(a.valid, c) else {
                break;
            };
            // No closures here: this body is compiled where it is inlined, with that
            // function's instructions, and a closure need not be inlined with it.
            let b = match a.bias {
                Some(b) => _mm512_maskz_loadu_ps(mask, b.add(16 * c)),
                None => _mm512_setzero_ps(),
            };
            let dst = a.out.add(i * a.n + 16 * c);
            let mut value = _mm512_add_ps(L::finish(sum, a, i, c), b);
            if a.accumulate {
                value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, dst));
            }
            _mm512_mask_storeu_ps(dst, mask, value);
        }
    }
}
