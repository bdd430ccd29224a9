//! temp: x_proj at one row, whole vs k split over two threads.
use std::time::Instant;
use tideway_kernels::Weight;
use tideway_kernels::cpu::on_compute_pool;
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::panels::{PanelInput, PanelWeight, block};
use tideway_kernels::skinny::Out;
fn main() {
    let (k, n) = (1536usize, 80usize);
    let copies = 400;
    let w: Vec<f32> = (0..k * n).map(|i| (i % 97) as f32 * 1e-3).collect();
    let whole: Vec<Linear> = (0..copies)
        .map(|_| {
            Linear::from_torch_as(
                &Weight::from_vec(w.clone(), &[n, k]).unwrap(),
                None,
                tideway_kernels::matmul::LinearFormat::F32,
            )
            .unwrap()
        })
        .collect();
    let half = |h: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|j| w[j * k + h * k / 2..j * k + (h + 1) * k / 2].to_vec())
            .collect()
    };
    let (w0, w1) = (half(0), half(1));
    let halves: Vec<(PanelWeight, PanelWeight)> = (0..copies)
        .map(|_| {
            (
                PanelWeight::from_torch(&w0, n, k / 2),
                PanelWeight::from_torch(&w1, n, k / 2),
            )
        })
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 89) as f32 * 1e-3).collect();
    let mut out = vec![0.0f32; n];
    let mut p0 = vec![0.0f32; n];
    let mut p1 = vec![0.0f32; n];
    let mut t = [Vec::new(), Vec::new()];
    on_compute_pool(|| {
        for rep in 0..20000 {
            let c = rep % copies;
            let s = rep % 2;
            let t0 = Instant::now();
            if s == 0 {
                whole[c].forward(MatRef::dense(&x, 1, k), &mut out);
            } else {
                let (a, b) = &halves[c];
                let xa = PanelInput::for_weight(
                    MatRef {
                        data: &x[..k / 2],
                        rows: 1,
                        cols: k / 2,
                        row_stride: k,
                    },
                    a,
                );
                let xb = PanelInput::for_weight(
                    MatRef {
                        data: &x[k / 2..],
                        rows: 1,
                        cols: k / 2,
                        row_stride: k,
                    },
                    b,
                );
                let (oa, ob) = (
                    Out {
                        ptr: p0.as_mut_ptr(),
                        n,
                    },
                    Out {
                        ptr: p1.as_mut_ptr(),
                        n,
                    },
                );
                rayon::join(
                    || unsafe { block(&xa, a, None, 0..1, 0..n, oa) },
                    || unsafe { block(&xb, b, None, 0..1, 0..n, ob) },
                );
                for j in 0..n {
                    out[j] = p0[j] + p1[j];
                }
            }
            t[s].push(t0.elapsed().as_secs_f64() * 1e6);
        }
    });
    for (s, name) in ["whole", "split"].iter().enumerate() {
        let mut v = t[s][100..].to_vec();
        v.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.1} us, p10 {:.1}, p90 {:.1}",
            v[v.len() / 2],
            v[v.len() / 10],
            v[9 * v.len() / 10]
        );
    }
}
