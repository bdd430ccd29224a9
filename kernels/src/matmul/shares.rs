//! How a product's work is handed to the pool's threads: shares of its output columns taken
//! one after another (guided self-scheduling), and for a tall product whose columns make too
//! few shares, those split by rows as well. [`super::Linear`]'s layouts all run through here.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// Fewest rows of a panel product that [`by_tiles`] splits by rows when its columns
/// make too few shares: two full tiles. Fewer rows are one or two thin tiles, which stream
/// each panel from memory about once; from two full tiles on, the tiles pass over a panel in
/// cache anyway. At 32 rows
/// (mamba-130m's `x_proj`, 80 outputs in two panels, one four times the other: a batch-32
/// step, 2026-12-04) the split took `x_proj` from 1.92-1.98 to 1.54-1.65 ms a step (a
/// temporary timer, three alternated runs) and the step ahead in 4 of 4 alternated rounds.
const ROW_SPLIT_MIN_ROWS: usize = 2 * crate::panels::MAX_TILE_ROWS;

/// Runs `block(cols)` over the output columns `0..n`: split over the pool when the
/// product is `big`, on the calling thread otherwise.
///
/// The pool's threads take [`guided_shares`] one after another from a shared counter
/// (guided self-scheduling, Polychronopoulos & Kuck 1987): the first shares are long
/// contiguous streams of W's rows, the last ones a panel or so, so that no thread waits
/// long for another's last share. Four equal shares a thread, handed out by rayon, left
/// the faster thread waiting up to a share at each product's end: mamba-130m (one binary,
/// the two behind a temporary switch, alternated, 2026-12-05, tok/s) batch 1 51.1-52.4 →
/// 51.5-53.0 and batch 8 346.7-362.1 → 357.8-373.1 (4 of 4 pairs ahead), batch 32
/// 726.6-741.0 → 747.6-760.8 (4 of 4), prefill 512 955.8-970.6 → 965.5-979.8 (3 of 4).
/// Shares of a quarter of what is left did no better than equal shares (batch 1
/// 51.5-52.4, batch 8 349.6-353.7).
pub(super) fn by_columns(n: usize, align: usize, big: bool, block: impl Fn(Range<usize>) + Sync) {
    if !big {
        return block(0..n);
    }
    let threads = rayon::current_num_threads();
    let shares = guided_shares(n, align, threads);
    let next = AtomicUsize::new(0);
    (0..threads).into_par_iter().for_each(|_| {
        while let Some(cols) = shares.get(next.fetch_add(1, Ordering::Relaxed)) {
            block(cols.clone());
        }
    });
}

/// Runs `block(rows, cols)` over the rows `0..m` and output columns `0..n` of a panel
/// product: [`by_columns`] where the columns, cut in four panel-aligned shares a
/// thread, make at least two a thread; where a tall product makes fewer (`x_proj`'s 80
/// outputs make two panels, one thread's share four times the other's), each such column
/// share split by rows as well (as even as can be), until every thread has a few. Both
/// of a column's row shares then read its panel, which a product of several tiles reuses
/// from cache anyway; rows that fit one tile stay whole, each panel streamed from memory
/// once. `row_align` > 1 (AMX's tiles of 16 rows) makes every row share but the last whole
/// tiles of that many rows: a share that started inside a tile would compute all of it.
pub(super) fn by_tiles(
    m: usize,
    n: usize,
    big: bool,
    row_align: usize,
    block: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    let panel = crate::panels::PANEL;
    let col_share = n.div_ceil(4 * threads).next_multiple_of(panel);
    let col_shares = n.div_ceil(col_share);
    if !big || m < ROW_SPLIT_MIN_ROWS || col_shares >= 2 * threads {
        return by_columns(n, panel, big, |cols| block(0..m, cols));
    }
    // A few row shares as even as can be; rows of a few tiles (a decode step's) one
    // share per tile, so that the pool evens out columns of unequal cost.
    let aligned = row_align > 1;
    let tiles = m.div_ceil(if aligned {
        row_align
    } else {
        crate::panels::MAX_TILE_ROWS
    });
    let row_shares = (4 * threads).div_ceil(col_shares);
    let row_shares = if tiles <= 2 * row_shares {
        tiles
    } else {
        row_shares
    };
    let row_start = |r: usize| {
        if aligned {
            (r * tiles / row_shares * row_align).min(m)
        } else {
            r * m / row_shares
        }
    };
    (0..row_shares * col_shares).into_par_iter().for_each(|s| {
        let (r, c) = (s / col_shares, s % col_shares);
        block(
            row_start(r)..row_start(r + 1),
            c * col_share..((c + 1) * col_share).min(n),
        );
    });
}

/// The columns `0..n` in shares for `threads` threads, in order: each share `1 / threads` of
/// the columns left, in whole multiples of `align` and at least `align` (the last may be
/// shorter, where `n` ends).
pub(super) fn guided_shares(n: usize, align: usize, threads: usize) -> Vec<Range<usize>> {
    let mut shares = Vec::new();
    let mut start = 0;
    while start < n {
        let size = ((n - start) / threads.max(1))
            .next_multiple_of(align)
            .max(align);
        let end = (start + size).min(n);
        shares.push(start..end);
        start = end;
    }
    shares
}
