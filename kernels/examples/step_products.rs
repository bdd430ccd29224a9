//! Times a mamba-130m decode step's products (24 layers' `in_proj`, `x_proj`, `dt_proj`,
//! `out_proj` and the LM head) at batch ROWS, with two copies of the weights, one on huge
//! pages (`huge_pages`) and one on 4 KiB pages (`TIDEWAY_SMALL_PAGES`), alternated step by
//! step in one process so that the machine's drifting speed falls on both alike:
//! `ROWS=1 cargo run --release -p tideway-kernels --example step_products [-- f32|bf16|int8]`.
use std::time::Instant;

use tideway_kernels::Weight;
use tideway_kernels::cpu::on_compute_pool;
use tideway_kernels::matmul::{Linear, LinearFormat, MatRef};

fn main() {
    let format: LinearFormat = std::env::args()
        .nth(1)
        .map_or(Ok(LinearFormat::F32), |a| a.parse())
        .unwrap_or_else(|e| panic!("{e}"));
    let m: usize = std::env::var("ROWS").map_or(1, |r| r.parse().expect("ROWS: a number"));
    let shapes = [(768usize, 3072usize), (1536, 80), (48, 1536), (1536, 768)];
    let load = |k: usize, n: usize| {
        let w: Vec<f32> = (0..k * n).map(|i| (i % 97) as f32 * 1e-3).collect();
        Linear::from_torch_as(&Weight::from_vec(w, &[n, k]).unwrap(), None, format).unwrap()
    };
    let model = |small: bool| {
        // SAFETY: no other thread runs yet (the compute pool starts with the first product).
        if small {
            unsafe { std::env::set_var("TIDEWAY_SMALL_PAGES", "1") };
        } else {
            unsafe { std::env::remove_var("TIDEWAY_SMALL_PAGES") };
        }
        let mut layers: Vec<Linear> = Vec::new();
        for _ in 0..24 {
            for &(k, n) in &shapes {
                layers.push(load(k, n));
            }
        }
        layers.push(load(768, 50280));
        layers
    };
    let sets = [model(true), model(false)];
    let x: Vec<f32> = (0..m * 1536).map(|i| (i % 89) as f32 * 1e-3).collect();
    let mut out = vec![0.0f32; m * 50280];
    let mut times = [Vec::new(), Vec::new()];
    on_compute_pool(|| {
        for step in 0..400 {
            // Even steps on 4 KiB pages, odd ones on huge pages.
            let s = step % 2;
            let t0 = Instant::now();
            for l in &sets[s] {
                l.forward(
                    MatRef::dense(&x[..m * l.in_features()], m, l.in_features()),
                    &mut out,
                );
            }
            times[s].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    });
    for (s, name) in ["4 KiB", "huge"].iter().enumerate() {
        // The first steps warm the pool and the caches.
        let mut t = times[s][10..].to_vec();
        t.sort_by(f64::total_cmp);
        println!(
            "{name:>5} pages: median {:.2} ms/step, p10 {:.2}, p90 {:.2} ({} steps)",
            t[t.len() / 2],
            t[t.len() / 10],
            t[9 * t.len() / 10],
            t.len()
        );
    }
}
