//! Zeroed activation buffers, a large one written by every thread of the pool.

use rayon::prelude::*;

/// Values from which [`zeroed`] shares the writing over the pool (256 KB), and the values a
/// thread takes at a time.
const PARALLEL_MIN: usize = 1 << 16;
const VALUES_PER_TASK: usize = 1 << 15;

/// `len` zeros. `vec![0.0; len]` is `calloc`, which zeroes memory that the heap reuses on the
/// calling thread, while the pool's other threads wait: a 512-token chunk of a 130m-shaped
/// fla model takes seven 1.5 MB buffers a layer (the short convs' outputs, the heads' output,
/// the norms'), ~1% of a DeltaNet prefill in `memset` (perf, 2026-12-05).
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_MIN || rayon::current_num_threads() < 2 {
        return vec![0.0; len];
    }
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(VALUES_PER_TASK)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` values were all written just above.
    unsafe { values.set_len(len) };
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_zero_at_any_length() {
        for len in [
            0,
            1,
            PARALLEL_MIN - 1,
            PARALLEL_MIN,
            3 * VALUES_PER_TASK + 5,
        ] {
            // Memory that held other values, freed first, so that a reused block would show.
            drop(vec![7.0f32; len]);
            let values = zeroed(len);
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|&v| v.to_bits() == 0), "len {len}");
        }
    }
}
