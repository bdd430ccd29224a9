//! Runtime CPU-feature dispatch for the hand-written kernels.
//!
//! The kernel bodies are plain Rust loops written so that LLVM vectorises them. Compiling the
//! same body inside a `#[target_feature]` function lets it use AVX-512 or AVX2+FMA when the
//! CPU has them, while the binary still runs on any x86-64 (or other) machine.

/// Defines `pub fn $name(args) -> ret` that calls `$body_fn(args)` compiled for the best
/// instruction set available at run time.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                if $crate::cpu::avx512() {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::cpu::avx2_fma() {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use dispatch;

/// Asks for the cache line holding `p` into L1 (a hint: never faults, so `p` may point
/// anywhere, past a buffer's end included).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for the cache line holding `p` into L2 (a hint, as [`prefetch`]).
#[inline(always)]
pub(crate) fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T1 }, T>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_hint<const HINT: i32, T>(p: *const T) {
    // SAFETY: a prefetch reads nothing the program sees and does not fault on any address.
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.cast()) }
}

/// Asks for the line `ahead` bytes past element `at` of each of a row-layout tile's `rows`
/// weight rows (`row_len` elements apart, from `w`) into L1; nothing where `ahead` is 0.
///
/// The row-layout kernels call it once per 64 bytes of each row, so that every line is asked
/// for once. Their tiles read 4 rows side by side, and where the rows are shorter than a 4 KiB
/// page (bf16 and int8 at mamba-130m's `k` of 768) several of them run through the same page
/// at once, which the L2 streamer, one forward stream a page, follows badly: without these
/// hints AVX2's bf16 and int8 tiles at one row read 14-18 GB/s against f32's 28-30
/// (BENCHMARKS.md, "The row-layout kernels' weights asked for ahead").
#[inline(always)]
pub(crate) fn prefetch_rows<T>(w: *const T, rows: usize, row_len: usize, at: usize, ahead: usize) {
    if ahead == 0 {
        return;
    }
    for r in 0..rows {
        // `wrapping_add`: the line ahead may lie past the buffer (the next thread's rows, or
        // none), which a prefetch may name but `add` may not.
        let line = w
            .wrapping_add(r * row_len + at)
            .cast::<u8>()
            .wrapping_add(ahead);
        prefetch(line);
    }
}

/// Later tiles of activation rows a group of weight rows must have for
/// [`prefetch_next_group`] to ask for the next group. At 8 rows (three later tiles of two
/// rows) asking during the second tile alone changed nothing (BENCHMARKS.md, "The row-layout
/// kernels' weights asked for ahead"), and f32 and bf16 take 6-8 rows in whole-rows tiles
/// now, so in effect they ask from 9 rows.
const NEXT_GROUP_MIN_TILES: usize = 3;

/// For the tile of activation rows from `i` (of `rows`, `mr_max` a tile, as [`for_each_tile`]
/// walks them) against the weight rows `j..j + nr`: asks for this tile's share of the next
/// group of weight rows (up to 4 from `j + nr`, none at or past `end`; rows `row_len` elements
/// long from `w`) into L2. A group's first tile reads its weight rows from memory and the later
/// tiles find them in L1, leaving the memory idle while they compute; spread over the later
/// tiles, the next group's lines arrive meanwhile. Nothing for the first tile, or with fewer
/// than [`NEXT_GROUP_MIN_TILES`] later ones. A mamba-130m step capped at AVX2 (`tideway bench
/// --batches 1,16,32`, three rounds alternated, the Xeon VM, 2026-12-06): f32 batch 32 398.2 /
/// 405.6 / 412.4 → 427.2 / 430.5 / 440.5 tok/s, bf16 batch 16 341.0 / 343.8 / 338.4 → 419.3 /
/// 410.1 / 407.1, batch 1 the same. int8's tiles, bound by their arithmetic, gained nothing
/// (`examples/linear_shapes int8 cold`), so they do not ask.
#[inline(always)]
pub(crate) fn prefetch_next_group<T>(
    w: *const T,
    row_len: usize,
    (rows, mr_max, i): (usize, usize, usize),
    (j, nr, end): (usize, usize, usize),
) {
    let later_tiles = rows.div_ceil(mr_max).saturating_sub(1);
    if i == 0 || later_tiles < NEXT_GROUP_MIN_TILES {
        return;
    }
    let next = (j + nr)..(j + nr + 4).min(end);
    let bytes = next.len() * row_len * size_of::<T>();
    let share = bytes.div_ceil(later_tiles).next_multiple_of(64);
    let from = (i / mr_max - 1) * share;
    // `wrapping_add`: a prefetch may name any address (see `prefetch`).
    let base = w.wrapping_add(next.start * row_len).cast::<u8>();
    for at in (from..(from + share).min(bytes)).step_by(64) {
        prefetch_l2(base.wrapping_add(at));
    }
}

/// Calls `$tile::<MR, NR>(args)` for a tile of `$mr` rows of activations and `$nr` rows of
/// weights, each 1 to 4, known only at run time (the kernels' edge tiles).
macro_rules! tile_match {
    ($mr:expr, $nr:expr, $tile:ident, ($($arg:expr),* $(,)?)) => {
        match ($mr, $nr) {
            (1, 1) => $tile::<1, 1>($($arg),*),
            (1, 2) => $tile::<1, 2>($($arg),*),
            (1, 3) => $tile::<1, 3>($($arg),*),
            (1, _) => $tile::<1, 4>($($arg),*),
            (2, 1) => $tile::<2, 1>($($arg),*),
            (2, 2) => $tile::<2, 2>($($arg),*),
            (2, 3) => $tile::<2, 3>($($arg),*),
            (2, _) => $tile::<2, 4>($($arg),*),
            (3, 1) => $tile::<3, 1>($($arg),*),
            (3, 2) => $tile::<3, 2>($($arg),*),
            (3, 3) => $tile::<3, 3>($($arg),*),
            (3, _) => $tile::<3, 4>($($arg),*),
            (_, 1) => $tile::<4, 1>($($arg),*),
            (_, 2) => $tile::<4, 2>($($arg),*),
            (_, 3) => $tile::<4, 3>($($arg),*),
            (_, _) => $tile::<4, 4>($($arg),*),
        }
    };
}

pub(crate) use tile_match;

/// Calls `tile(i, mr, j, nr)` over a product's tiles: `rows` rows of activations in groups of
/// at most `mr_max` (what the instruction set's registers hold), and the weight rows `cols`
/// in groups of at most 4, each group of weight rows against every group of activations
/// (so the weight rows stay in L1 while the activations pass).
pub(crate) fn for_each_tile(
    rows: usize,
    cols: std::ops::Range<usize>,
    mr_max: usize,
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    let mut j = cols.start;
    while j < cols.end {
        let nr = 4.min(cols.end - j);
        let mut i = 0;
        while i < rows {
            let mr = mr_max.min(rows - i);
            tile(i, mr, j, nr);
            i += mr;
        }
        j += nr;
    }
}
