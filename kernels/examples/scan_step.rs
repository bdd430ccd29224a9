//! Times one decode step's selective scan at mamba-130m's shapes (24 layers, E = 1536, N = 16)
//! with the states and `A` cold, as in a model's step, where the layers' weights stream
//! through the caches between two scans: `cargo run --release -p tideway-kernels --example
//! scan_step [-- ROWS]` (ROWS one-row sessions; default 1). Between two layers' scans it
//! reads `EVICT` 8-byte words (default 2²⁰, 8 MB); `EVICT=0` leaves the states warm (the
//! scan's arithmetic alone). `PREFILL=1` makes the ROWS rows one session's (a prefill chunk)
//! instead of ROWS sessions' one row each.

use std::time::Instant;

use rayon::prelude::*;
use tideway_kernels::matmul::MatRef;
use tideway_kernels::scan::{ScanInputs, ScanSegment, SsmParams, selective_scan};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(1, |a| a.parse().expect("ROWS"));
    let (layers, e, n) = (24usize, 1536usize, 16usize);
    let a: Vec<Vec<f32>> = (0..layers)
        .map(|l| (0..e * n).map(|i| -1.0 - ((i + l) % 16) as f32).collect())
        .collect();
    let d = vec![1.0f32; e];
    let prefill = std::env::var("PREFILL").is_ok_and(|v| v == "1");
    let sessions = if prefill { 1 } else { rows };
    let mut states: Vec<Vec<Vec<f32>>> = (0..layers)
        .map(|_| (0..sessions).map(|_| vec![0.01f32; e * n]).collect())
        .collect();
    let x = vec![0.5f32; rows * e];
    let delta = vec![0.1f32; rows * e];
    let bc = vec![0.2f32; rows * n];
    let z = vec![0.3f32; rows * e];
    let mut y = vec![0.0f32; rows * e];
    // Stands in for a layer's weights: read between two scans.
    let evict: Vec<u64> =
        (0..std::env::var("EVICT").map_or(1 << 20, |v| v.parse().unwrap())).collect();
    let steps = if prefill { 10 } else { 400 };
    let mut scan_secs = 0.0;
    let mut sink = 0u64;
    rayon::ThreadPoolBuilder::new()
        .build()
        .unwrap()
        .install(|| {
            for _ in 0..steps {
                for l in 0..layers {
                    sink = sink.wrapping_add(
                        evict
                            .par_chunks(1 << 16)
                            .map(|c| c.iter().sum::<u64>())
                            .sum::<u64>(),
                    );
                    let t0 = Instant::now();
                    let mut segments: Vec<ScanSegment<'_>> = states[l]
                        .iter_mut()
                        .enumerate()
                        .map(|(i, s)| ScanSegment {
                            rows: if prefill { 0..rows } else { i..i + 1 },
                            state: s,
                        })
                        .collect();
                    selective_scan(
                        SsmParams {
                            a_t: &a[l],
                            d: &d,
                            channels: e,
                            state_size: n,
                        },
                        ScanInputs {
                            x: &x,
                            delta: &delta,
                            b: MatRef::dense(&bc, rows, n),
                            c: MatRef::dense(&bc, rows, n),
                            z: MatRef::dense(&z, rows, e),
                        },
                        &mut segments,
                        &mut y,
                    );
                    scan_secs += t0.elapsed().as_secs_f64();
                }
            }
        });
    let ms = scan_secs / steps as f64 * 1e3;
    let cells = (layers * rows * e * n) as f64;
    println!(
        "rows {rows}{}: scan {ms:.3} ms a step (24 layers), {:.3} ns a cell [{sink}]",
        if prefill { " of one session" } else { "" },
        ms * 1e6 / cells
    );
}
