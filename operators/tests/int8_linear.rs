//! Int8 linear layers (`--dtype int8` on the CPU) against LLM.int8's math computed in numpy
//! (`tools/gen_int8_fixtures.py`): per-row absmax int8 weights, per-token absmax int8
//! activations with int32 sums, and the outlier columns (|x| ≥ 6) in floating point against
//! the dequantized weights. Every output must be within 1e-5 of the reference (relative to
//! its magnitude, at least 1), for one row, a few, more than the skinny kernel's 64 and a
//! ragged width, with and without outlier columns, with many over several tiles of rows, and
//! with every column an outlier.

mod common;

use common::{f32s, i64s};
use safetensors::SafeTensors;
use tideway_kernels::Weight;
use tideway_kernels::int8::quantize;
use tideway_kernels::matmul::{Linear, LinearFormat, MatRef};

#[test]
fn int8_products_equal_llm_int8s_reference_math() {
    if let Some(why) = LinearFormat::Int8.unsupported_here() {
        panic!("this test needs the int8 kernels: {why}");
    }
    let bytes = std::fs::read(common::fixture("int8/linear.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut cases: Vec<String> = file
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".out").map(str::to_string))
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let shape = |name: &str| {
            file.tensor(&format!("{case}.{name}"))
                .unwrap()
                .shape()
                .to_vec()
        };
        let (m, k) = (shape("x")[0], shape("x")[1]);
        let n = shape("w")[0];
        let x = f32s(&file, &format!("{case}.x"));
        let w = Weight::from_vec(f32s(&file, &format!("{case}.w")), &[n, k]).unwrap();
        let b = Weight::from_vec(f32s(&file, &format!("{case}.b")), &[n]).unwrap();
        let want = f32s(&file, &format!("{case}.out"));
        let outliers: Vec<usize> = i64s(&file, &format!("{case}.outliers"))
            .into_iter()
            .map(|p| p as usize)
            .collect();
        assert_eq!(
            quantize(MatRef::dense(&x, m, k), k.next_multiple_of(64)).outliers(),
            outliers,
            "{case}: outlier columns"
        );
        let layer = Linear::from_torch_as(&w, Some(b), LinearFormat::Int8).unwrap();
        let mut got = vec![f32::NAN; m * n];
        layer.forward(MatRef::dense(&x, m, k), &mut got);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| ((g - w).abs() / w.abs().max(1.0)) as f64)
            .fold(0.0, f64::max);
        eprintln!(
            "{case}: [{m}, {k}] x [{n}, {k}]^T, {} outlier columns, worst relative error {worst:e}",
            outliers.len()
        );
        assert!(worst <= 1e-5, "{case}: {worst:e}");
        // A quarter of the bytes of f32, plus a scale and a sum per row and the layout's
        // padding: the row layout of CPUs without AVX-512 VNNI pads `k` to 64 (k = 96 here
        // takes 128), the panels pad `n` to 64.
        assert!(
            layer.size_bytes() < n * k * 4 / 2,
            "{case}: {}",
            layer.size_bytes()
        );
    }
}
