//! What the CPU offers the kernels.

/// The instruction set the hand-written kernels dispatch to on this CPU (see `simd`).
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    "portable"
}

/// Runs `work` on a thread of the compute pool (rayon's global pool) and returns its result;
/// on a pool thread already, runs it in place.
///
/// A decode step issues about a hundred parallel products, scans and activations. Issued from
/// a thread outside the pool, each one queues its shares for the pool and puts the caller to
/// sleep until they are done: two cross-thread wake-ups per product, which at batch 1 cost
/// more than the smaller products themselves. Issued from a pool thread, the caller takes its
/// own share and the other threads, still spinning from the last product, steal theirs. One
/// hand-off per step instead of one per product: `tideway bench --batches 1` on the
/// mamba-130m shape went 46.9 → 52.6 tok/s in f32 and 65.2 → 76.1 in bf16 (BENCHMARKS.md).
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    rayon::scope(|_| work())
}
