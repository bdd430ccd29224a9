//! `Linear` in f32 (the panel and the row layouts) and `matmul_small` against products
//! computed in f64; the bf16 and int8 kernels have their own tests.

use super::*;

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    crate::test_util::pseudo(n, seed, -1.0, 1.0)
}

fn naive(x: &[f32], m: usize, k: usize, stride: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                y[i * n + j] += x[i * stride + p] as f64 * w[j * k + p] as f64;
            }
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

/// A layer kept in PyTorch's layout whatever the CPU (the skinny kernel and gemm; CPUs
/// without AVX-512 keep every f32 layer so).
fn row_layout(weight: &Weight, bias: Option<Weight>) -> Linear {
    let mut layer = Linear::from_torch(weight, bias).unwrap();
    layer.weight = Stored::F32(std::sync::Arc::new(HugeBuffer::copy_of(weight.as_slice())));
    layer
}

#[test]
fn matches_naive_product_with_bias_and_strides() {
    // Shapes on both sides of the threading threshold, one row (the split path) included.
    // Every skinny tile shape (rows 1-17 against 1-4 weight rows, k not a multiple of
    // the vector width), both sides of the switch to gemm and of the threading threshold;
    // panel products with few columns over several tiles of rows, which the threads share
    // by rows too (`by_tiles`: 65 × 129, 130 × 80 and 32 × 80, x_proj's two panels, in a
    // few shares or one per tile; 13 × 20, tiles of 5 and 4 rows).
    for &(m, k, n) in &[
        (1, 7, 5),
        (3, 64, 33),
        (65, 70, 129),
        (130, 40, 80),
        (32, 70, 80),
        (13, 300, 20),
        (1, 768, 1000),
        // One row too narrow for its columns to keep two threads busy: its inputs in parts
        // (`Linear::by_steps`; x_proj's shape).
        (1, 1536, 80),
        (2, 300, 900),
        (5, 17, 7),
        (7, 33, 6),
        (16, 100, 403),
        (17, 100, 403),
        (9, 1, 3),
    ] {
        let stride = k + 3;
        let x = pseudo(m * stride, 1);
        let w = pseudo(n * k, 2);
        let b = pseudo(n, 3);
        let weight = Weight::from_vec(w.clone(), &[n, k]).unwrap();
        let want = naive(&x, m, k, stride, &w, n);
        let view = MatRef {
            data: &x,
            rows: m,
            cols: k,
            row_stride: stride,
        };

        let bias = Weight::from_vec(b.clone(), &[n]).unwrap();
        // As this CPU keeps f32 layers (panels where it has AVX-512), and in rows.
        let layouts = [
            Linear::from_torch(&weight, Some(bias.clone())).unwrap(),
            row_layout(&weight, Some(bias)),
        ];
        for with_bias in layouts {
            let mut out = vec![f32::NAN; m * n];
            with_bias.forward(view, &mut out);
            for i in 0..m * n {
                let expect = want[i] + b[i % n];
                assert!(
                    (out[i] - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                    "({m},{k},{n})[{i}]: {} vs {expect}",
                    out[i]
                );
            }
        }
        for plain in [
            Linear::from_torch(&weight, None).unwrap(),
            row_layout(&weight, None),
        ] {
            let mut out = vec![f32::NAN; m * n];
            plain.forward(MatRef::columns(&x, m, stride, 0, k), &mut out);
            for i in 0..m * n {
                assert!((out[i] - want[i]).abs() <= 1e-4 * (1.0 + want[i].abs()));
            }
            let mut row = vec![0.0; k];
            plain.torch_weight_row(n - 1, &mut row);
            assert_eq!(row, &w[(n - 1) * k..]);
        }
    }
}

/// `forward_new` (written once, by the product, where the panel kernel runs) gives
/// `forward`'s bits in every format this CPU runs, with and without bias, in the row layout
/// (zeroed first), for one tile of rows and several, and a `k` the kernel cuts in blocks.
#[test]
fn a_new_buffer_gets_the_same_outputs() {
    for &(m, k, n) in &[
        (1, 70, 129),
        (1, 1536, 80),
        (8, 300, 80),
        (40, 2100, 70),
        (130, 64, 200),
    ] {
        let x = pseudo(m * k, 4);
        let weight = Weight::from_vec(pseudo(n * k, 5), &[n, k]).unwrap();
        let bias = Weight::from_vec(pseudo(n, 6), &[n]).unwrap();
        let mut layers = vec![row_layout(&weight, Some(bias.clone()))];
        for format in [LinearFormat::F32, LinearFormat::Bf16, LinearFormat::Int8] {
            if format.unsupported_here().is_none() {
                for bias in [Some(bias.clone()), None] {
                    layers.push(Linear::from_torch_as(&weight, bias, format).unwrap());
                }
            }
        }
        for layer in &layers {
            let mut want = vec![f32::NAN; m * n];
            layer.forward(MatRef::dense(&x, m, k), &mut want);
            let got = layer.forward_new(MatRef::dense(&x, m, k));
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let case = format!("({m},{k},{n}) {:?}", layer.format());
            assert_eq!(bits(&got), bits(&want), "{case}");
        }
    }
}

#[test]
fn small_product_over_strided_and_transposed_views() {
    let (m, k, n) = (5, 7, 6);
    let a = pseudo(k * m, 4); // stored transposed: [k, m]
    let b = pseudo(k * (n + 2), 5); // [k, n] inside rows of n + 2
    let mut dst = pseudo(m * (n + 1), 6);
    let before = dst.clone();
    let a_view = Strided::dense(&a, k, m).t();
    let b_view = Strided::rows(&b, k, n, n + 2);
    matmul_small(&mut dst, n + 1, true, -0.5, a_view, b_view);
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| a[p * m + i] as f64 * b[p * (n + 2) + j] as f64)
                .sum();
            let want = before[i * (n + 1) + j] as f64 - 0.5 * dot;
            let got = dst[i * (n + 1) + j] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
        // The padding column between rows is untouched.
        assert_eq!(dst[i * (n + 1) + n], before[i * (n + 1) + n]);
    }
    matmul_small(&mut dst, n + 1, false, 2.0, a_view, b_view);
    let dot: f64 = (0..k)
        .map(|p| a[p * m] as f64 * b[p * (n + 2)] as f64)
        .sum();
    assert!((dst[0] as f64 - 2.0 * dot).abs() <= 1e-5);
}

/// Shapes through every path of `matmul_small`: the register blocks of 64, 32 and 16 columns,
/// the rows and columns left over, and a `b` stored transposed (gathered into rows first),
/// against a sum in f64.
#[test]
fn small_products_of_every_block_shape() {
    for (m, k, n) in [
        (4, 64, 64),
        (17, 7, 100),
        (9, 64, 16),
        (1, 1, 37),
        (16, 16, 48),
    ] {
        for transposed in [false, true] {
            let a = pseudo(m * k, 7);
            let b = pseudo(k * n * 3, 8);
            // b is [k, n]: rows of 2n + 1 values, or stored as bᵀ in rows of 3k.
            let (b_view, b_at): (Strided<'_>, Box<dyn Fn(usize, usize) -> f32>) = if transposed {
                (
                    Strided::rows(&b, n, k, 3 * k).t(),
                    Box::new(|p, j| b[j * 3 * k + p]),
                )
            } else {
                (
                    Strided::rows(&b, k, n, 2 * n + 1),
                    Box::new(|p, j| b[p * (2 * n + 1) + j]),
                )
            };
            let mut dst = pseudo(m * (n + 3), 9);
            let before = dst.clone();
            matmul_small(
                &mut dst,
                n + 3,
                true,
                0.75,
                Strided::dense(&a, m, k),
                b_view,
            );
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|p| a[i * k + p] as f64 * b_at(p, j) as f64)
                        .sum();
                    let want = before[i * (n + 3) + j] as f64 + 0.75 * dot;
                    let got = dst[i * (n + 3) + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "({m},{k},{n}) transposed {transposed} at ({i},{j}): {got} vs {want}"
                    );
                }
                for j in n..n + 3 {
                    assert_eq!(dst[i * (n + 3) + j], before[i * (n + 3) + j], "padding");
                }
            }
        }
    }
}

#[test]
fn rejects_bias_of_wrong_length() {
    let w = Weight::from_vec(vec![0.0; 6], &[3, 2]).unwrap();
    let b = Weight::from_vec(vec![0.0; 2], &[2]).unwrap();
    assert!(Linear::from_torch(&w, Some(b)).is_err());
}

/// Guided shares cover the columns once, in order, each starting at a multiple of the
/// alignment, never growing, and at least one alignment wide but for the last.
#[test]
fn guided_shares_cover_the_columns_in_shrinking_aligned_shares() {
    for &(n, align, threads) in &[
        (3072usize, 64usize, 2usize),
        (50280, 64, 2),
        (80, 64, 2),
        (1, 16, 2),
        (1536, 16, 16),
        (1000, 16, 1),
        (0, 64, 2),
    ] {
        let shares = super::shares::guided_shares(n, align, threads);
        let mut next = 0;
        for (i, s) in shares.iter().enumerate() {
            assert_eq!(s.start, next, "{n} {align} {threads}: {shares:?}");
            assert!(s.start.is_multiple_of(align) && s.end > s.start);
            assert!(s.len() >= align || s.end == n);
            if i > 0 && s.end < n {
                assert!(s.len() <= shares[i - 1].len(), "{shares:?}");
            }
            next = s.end;
        }
        assert_eq!(next, n);
        if threads == 2 && n == 3072 {
            assert_eq!(shares[0], 0..1536, "the first share is half the columns");
        }
    }
}
