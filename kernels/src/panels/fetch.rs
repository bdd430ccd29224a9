//! Lines a tile asks for into L2 ahead of the tiles after it: its share of the next block
//! (`Prefetch::Share` in `avx512.rs`).

use std::arch::x86_64::*;

/// Lines asked for into L2 (in L1 they would push out the rows of `x` the tile reuses):
/// `lines` lines of 16 lanes from `next`, spread evenly over the tile's `steps` steps.
///
/// Asked for one a step from the tile's first step, they left memory in a burst, more at
/// once than the core's fill buffers hold, and the tile's multiply-adds waited behind them.
/// Spread evenly, they arrive as the tile computes. The products on weights from memory,
/// both ways alternated in one process (2026-12-05, 11-21 rounds, GFLOP/s): at 32 rows
/// (a batch-32 decode step) in_proj 251 → 272, out_proj 247 → 275, lm_head 275 → 297; at
/// 8 rows the same. At 512 rows (a prefill chunk) a first form, one line every power of
/// two of steps, gave in_proj 319.6 → 323.2, out_proj 316.9 → 320.3, lm_head 311.5 → 315.6,
/// and this one the same as that.
#[derive(Clone, Copy)]
pub(super) struct Fetch {
    next: *const u32,
    lines: usize,
    steps: usize,
    /// `lines` × the steps so far, less `steps` for each line asked for: a line is due
    /// when it reaches `steps` (Bresenham's rule).
    due: usize,
}

impl Fetch {
    pub(super) const NONE: Fetch = Fetch {
        next: std::ptr::null(),
        lines: 0,
        steps: 1,
        due: 0,
    };

    /// Tile `t`'s `1 / tiles` of the next block (`size` lanes from `next`), spread over
    /// its `len` steps.
    pub(super) fn share(
        next: *const u32,
        size: usize,
        t: usize,
        tiles: usize,
        len: usize,
    ) -> Fetch {
        let lines = (size / 16).div_ceil(tiles);
        Fetch {
            next: next.wrapping_add(t * lines * 16),
            lines,
            steps: len.max(1),
            due: 0,
        }
    }

    /// Asks for this step's lines, if any: `lines` in all over `steps` calls. (The
    /// addresses are never read: a prefetch does not fault.)
    #[inline(always)]
    pub(super) unsafe fn step(&mut self) {
        self.due += self.lines;
        while self.due >= self.steps {
            self.due -= self.steps;
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.next.cast()) };
            self.next = self.next.wrapping_add(16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Fetch;

    /// Where the share's `next` stands after each step, in lines from its start.
    fn asked_by_step(lines: usize, steps: usize) -> Vec<usize> {
        let start = std::ptr::null::<u32>().wrapping_add(1 << 20);
        let mut fetch = Fetch::share(start, lines * 16, 0, 1, steps);
        (0..steps)
            .map(|_| {
                unsafe { fetch.step() };
                (fetch.next as usize - start as usize) / 64
            })
            .collect()
    }

    #[test]
    fn a_share_is_asked_for_evenly_over_the_steps() {
        for (lines, steps) in [(36, 768), (86, 128), (256, 128), (3, 7), (128, 128), (1, 1)] {
            let asked = asked_by_step(lines, steps);
            // Every line by the last step, none twice, and after step p (1-based) as many
            // as an even spread gives: floor(p · lines / steps).
            for (p, &n) in asked.iter().enumerate() {
                assert_eq!(
                    n,
                    (p + 1) * lines / steps,
                    "{lines} lines over {steps} steps"
                );
            }
            assert_eq!(asked[steps - 1], lines);
        }
        // Nothing asked for where there is nothing to ask for.
        let mut none = Fetch::NONE;
        for _ in 0..10 {
            unsafe { none.step() };
        }
        assert!(none.next.is_null());
    }
}
