//! The machine's floors for a model of WEIGHT_BYTES bytes of weights, measured now (this
//! machine's speed varies from day to day, so a floor means something only beside the figures
//! measured in the same run): the memory's read bandwidth (best of 5 passes over 1 GiB with
//! every thread, AVX2 loads, on 4 KiB pages and on huge pages: the faster) gives batch-1
//! decode's floor, `bandwidth / WEIGHT_BYTES` tokens/s; the best f32 GFLOP/s on a
//! prefill-chunk-sized product gives the compute floor, `GFLOP/s / (2 × parameters)` tokens/s.
//! That product runs twice: in the gemm crate, a reference independent of Tideway's kernels,
//! and in Tideway's own `Linear` (the panel kernel where the CPU has AVX-512), and the floor
//! is the faster of the two, so that it is never below what the machine was shown to do.
//! Beside them, the arithmetic's own peak: multiply-adds on registers alone, every thread at
//! once, best of 5. No product reaches it (a product also loads its operands); it says how
//! much of the sgemm floor is the kernels' and how much the machine's (a floor above the
//! peak of the same run is a lucky moment of this VM's clock).
//!
//! `cargo run --release -p tideway-kernels --example floors -- WEIGHT_BYTES`

use std::time::Instant;

use rayon::prelude::*;
use tideway_kernels::Weight;
use tideway_kernels::huge_pages::HugeBuffer;
use tideway_kernels::matmul::{Linear, MatRef};

fn main() {
    let weight_bytes: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: floors WEIGHT_BYTES");
    let threads = rayon::current_num_threads();

    // Read bandwidth: each thread sums its contiguous share, 64 bytes a load into 8
    // independent sums where the CPU has AVX2 (so the adds never wait on each other and the
    // loads are the limit). Over a buffer on 4 KiB pages and over one on huge pages where the
    // OS gives them (as Tideway's weights are, `huge_pages`): the floor is the faster.
    let len = 1usize << 28;
    let mut total = 0.0f32;
    let mut on_pages = |buffer: &[f32]| {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            total += buffer
                .par_chunks(buffer.len().div_ceil(threads))
                .map(sum)
                .sum::<f32>();
            best = best.min(start.elapsed().as_secs_f64());
        }
        (len * 4) as f64 / best
    };
    let small_pages = {
        let buffer: Vec<f32> = (0..len).map(|i| (i & 7) as f32).collect();
        on_pages(&buffer)
    };
    let huge_pages = {
        let mut buffer = HugeBuffer::<f32>::zeroed(len);
        buffer
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i & 7) as f32);
        on_pages(&buffer)
    };
    let bandwidth = small_pages.max(huge_pages);

    // Compute: a [512, 768] × [768, 3072] product (a prefill chunk through mamba-130m's
    // in_proj), best of 10, in the gemm crate and in Tideway's `Linear`.
    let (m, k, n) = (512, 768, 3072);
    let w: Vec<f32> = (0..n * k).map(|i| (i % 97) as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 89) as f32 * 1e-3).collect();
    let mut out = vec![0.0f32; m * n];
    let best_of_10 = |product: &mut dyn FnMut()| {
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let start = Instant::now();
            product();
            best = best.min(start.elapsed().as_secs_f64());
        }
        2.0 * (m * k * n) as f64 / best
    };
    let gemm_flops = best_of_10(&mut || {
        // out (m × n, row-major) = x (m × k) · wᵀ, w as PyTorch keeps it (n × k): gemm's
        // column stride first, `dst = outᵀ = w · xᵀ` by swapped strides.
        // SAFETY: `x` holds m × k, `w` n × k and `out` m × n values; `out` aliases neither.
        unsafe {
            gemm::gemm(
                n,
                m,
                k,
                out.as_mut_ptr(),
                n as isize,
                1,
                false,
                w.as_ptr(),
                1,
                k as isize,
                x.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        }
    });
    let layer = Linear::from_torch(&Weight::from_vec(w.clone(), &[n, k]).unwrap(), None).unwrap();
    let tideway_flops = best_of_10(&mut || layer.forward(MatRef::dense(&x, m, k), &mut out));
    let flops = gemm_flops.max(tideway_flops);
    let parameters = weight_bytes / 4.0;
    let peak = fma_peak();

    println!("threads {threads} (checksum {total})");
    println!(
        "read bandwidth {:.1} GB/s -> batch-1 f32 decode floor {:.1} tok/s ({:.0} MB of weights; \
         4 KiB pages {:.1} GB/s, huge pages {:.1} GB/s)",
        bandwidth / 1e9,
        bandwidth / weight_bytes,
        weight_bytes / 1e6,
        small_pages / 1e9,
        huge_pages / 1e9
    );
    println!(
        "sgemm {:.1} GFLOP/s -> compute floor {:.1} tok/s ({:.1}M parameters; gemm crate {:.1} \
         GFLOP/s, Tideway's Linear {:.1})",
        flops / 1e9,
        flops / (2.0 * parameters),
        parameters / 1e6,
        gemm_flops / 1e9,
        tideway_flops / 1e9
    );
    println!(
        "FMA peak {:.1} GFLOP/s -> arithmetic floor {:.1} tok/s (register-only multiply-adds on \
         every thread; the sgemm floor is {:.2} of it)",
        peak / 1e9,
        peak / (2.0 * parameters),
        flops / peak
    );
}

/// FLOP/s of f32 multiply-adds on registers alone, on every thread of the pool at once:
/// 24 independent sums per thread (enough to cover the FMA units' latency on two pipes),
/// 16 lanes each where the CPU has AVX-512 (8 with AVX2 + FMA), best of 5 passes.
fn fma_peak() -> f64 {
    const ITERATIONS: usize = 4_000_000;
    let mut best = f64::INFINITY;
    let mut lanes = 1;
    for _ in 0..5 {
        let start = Instant::now();
        // `black_box`: the sums are used, so the multiply-adds are not dead code.
        let sums = std::hint::black_box(rayon::broadcast(|_| multiply_adds(ITERATIONS)));
        best = best.min(start.elapsed().as_secs_f64());
        lanes = sums[0].1;
    }
    let threads = rayon::current_num_threads();
    (threads * ITERATIONS * 24 * lanes * 2) as f64 / best
}

/// `iterations` rounds of 24 independent multiply-adds, and the lanes each one has.
fn multiply_adds(iterations: usize) -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // The kernels' instruction set, `TIDEWAY_SIMD`'s cap included (a cap never exceeds
        // what the CPU has).
        use tideway_kernels::cpu::{SimdLevel, simd_level};
        if simd_level() >= SimdLevel::Avx512 {
            // SAFETY: the CPU has AVX-512F.
            return (unsafe { multiply_adds_avx512(iterations) }, 16);
        }
        if simd_level() >= SimdLevel::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            return (unsafe { multiply_adds_avx2(iterations) }, 8);
        }
    }
    let mut sums = [0.0f32; 24];
    for _ in 0..iterations {
        for s in sums.iter_mut() {
            *s = s.mul_add(1.000_000_1, 0.999_999_9);
        }
    }
    (std::hint::black_box(sums).iter().sum(), 1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn multiply_adds_avx512(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
    let mut sums = [_mm512_setzero_ps(); 24];
    for _ in 0..iterations {
        for s in sums.iter_mut() {
            *s = _mm512_fmadd_ps(*s, a, b);
        }
    }
    let total = sums
        .iter()
        .fold(_mm512_setzero_ps(), |t, s| _mm512_add_ps(t, *s));
    _mm512_reduce_add_ps(total)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn multiply_adds_avx2(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
    // 12 sums twice a round: 24 sums and the two constants would not fit AVX2's 16 registers
    // (the spills read as a peak ~15% below MKL's AVX2 sgemm, 2026-12-06); 12 chains still
    // cover the FMA units' latency.
    let mut sums = [_mm256_setzero_ps(); 12];
    for _ in 0..iterations {
        for _ in 0..2 {
            for s in sums.iter_mut() {
                *s = _mm256_fmadd_ps(*s, a, b);
            }
        }
    }
    let total = sums
        .iter()
        .fold(_mm256_setzero_ps(), |t, s| _mm256_add_ps(t, *s));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 values.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

/// The sum of `values`, read as fast as the CPU can.
fn sum(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_avx2(values) };
    }
    values.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(values: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut sums = [_mm256_setzero_ps(); 8];
    let blocks = values.chunks_exact(64);
    let rest: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (s, eight) in sums.iter_mut().zip(block.chunks_exact(8)) {
            // SAFETY: `eight` holds 8 values.
            *s = _mm256_add_ps(*s, unsafe { _mm256_loadu_ps(eight.as_ptr()) });
        }
    }
    let mut lanes = [0.0f32; 8];
    for s in sums {
        let mut v = [0.0f32; 8];
        // SAFETY: `v` holds 8 values.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), s) };
        lanes.iter_mut().zip(v).for_each(|(l, x)| *l += x);
    }
    lanes.iter().sum::<f32>() + rest
}
