//! Times `Linear::forward` at the shapes of a mamba-130m layer for a range of batch sizes,
//! with the weights in f32, bf16 or int8:
//! `cargo run --release -p tideway-kernels --example linear_shapes [-- f32|bf16|int8 [cold]]`.
//! `cold` cycles through copies of each matrix totalling 1 GB, more than the last-level cache
//! holds, so that the weights come from memory as in a model's decode step. `ROWS=1,8`
//! picks the row counts (default 1-512). The products run on the compute pool, as a model's
//! step runs them.

use std::time::Instant;

use tideway_kernels::Weight;
use tideway_kernels::cpu::on_compute_pool;
use tideway_kernels::matmul::{Linear, LinearFormat, MatRef};

fn main() {
    let format: LinearFormat = std::env::args()
        .nth(1)
        .map_or(Ok(LinearFormat::F32), |a| a.parse())
        .unwrap_or_else(|e| panic!("{e}"));
    let cold = std::env::args().nth(2).as_deref() == Some("cold");
    let shapes = [
        (768usize, 3072usize, "in_proj"),
        (1536, 768, "out_proj"),
        (1536, 80, "x_proj"),
        (48, 1536, "dt_proj"),
        (768, 50280, "lm_head"),
    ];
    for &(k, n, name) in &shapes {
        let w: Vec<f32> = (0..k * n).map(|i| (i % 97) as f32 * 1e-3).collect();
        let load = || {
            Linear::from_torch_as(&Weight::from_vec(w.clone(), &[n, k]).unwrap(), None, format)
                .unwrap()
        };
        let first = load();
        let copies = if cold {
            (1e9 / first.size_bytes() as f64).ceil() as usize
        } else {
            1
        };
        // Each copy its own storage: a clone of a `Linear` shares its weights.
        let layers: Vec<Linear> = std::iter::once(first)
            .chain((1..copies).map(|_| load()))
            .collect();
        for m in std::env::var("ROWS").map_or(vec![1usize, 2, 4, 8, 16, 32, 64, 256, 512], |r| {
            r.split(',')
                .map(|v| v.parse().expect("ROWS: numbers"))
                .collect()
        }) {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 89) as f32 * 1e-3).collect();
            let mut out = vec![0.0f32; m * n];
            layers[0].forward(MatRef::dense(&x, m, k), &mut out);
            let reps = (2e9 / (m * k * n) as f64).clamp(3.0, 2000.0) as usize;
            let reps = reps.max(copies);
            // On the compute pool, as a model's step runs its products (`on_compute_pool`).
            let secs = on_compute_pool(|| {
                let t0 = Instant::now();
                for rep in 0..reps {
                    layers[rep % copies].forward(MatRef::dense(&x, m, k), &mut out);
                }
                t0.elapsed().as_secs_f64() / reps as f64
            });
            println!(
                "{name:>8} m={m:>3} k={k:>5} n={n:>5}: {:>8.3} ms  {:>6.1} GFLOP/s  {:>5.1} GB/s of weights",
                secs * 1e3,
                2.0 * (m * k * n) as f64 / secs / 1e9,
                layers[0].size_bytes() as f64 / secs / 1e9
            );
        }
    }
}
