//! Zero-TPrune's pruning layer against the independent numpy oracle
//! (`tools/gen_zero_tprune.py`, float64, written from ../shared/SPEC-MODELS.md §6): on random
//! row-stochastic graphs and random causal matrices, the same tokens dropped as near-duplicates,
//! the same kept set, and the scores within 1e-4.

mod common;

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use tideway_operators::prune::zero_tprune::{ZeroTPrune, zero_tprune};

fn values(file: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

fn indices(file: &SafeTensors, name: &str) -> Vec<usize> {
    values(file, name).1.iter().map(|&v| v as usize).collect()
}

#[test]
fn the_pruning_layer_equals_the_numpy_oracle() {
    let bytes = std::fs::read(common::fixture("prune/zero_tprune.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata.metadata().clone().unwrap();
    assert_eq!(cases.len(), 6, "every case the generator writes");
    let mut checked = 0;
    for (case, config) in cases {
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        let (shape, graphs) = values(&file, &format!("{case}.graphs"));
        let (key_shape, keys) = values(&file, &format!("{case}.keys"));
        let graphs: Vec<f32> = graphs.iter().map(|&v| v as f32).collect();
        let keys: Vec<f32> = keys.iter().map(|&v| v as f32).collect();
        let usizes = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        let prune = ZeroTPrune {
            causal: config["causal"].as_bool().unwrap(),
            iterations: usizes(&config["iterations"]),
            keep: usizes(&config["keep"]),
            drop_similar: usizes(&config["drop_similar"]),
            protected: config["protected"]
                .as_array()
                .unwrap()
                .iter()
                .map(usizes)
                .collect(),
            vhf: (
                config["vhf"][0].as_f64().unwrap(),
                config["vhf"][1].as_f64().unwrap(),
            ),
        };
        let got = zero_tprune(&graphs, shape[0], &keys, key_shape[1], &prune).unwrap();

        let (_, i_prime) = values(&file, &format!("{case}.i_prime"));
        let worst = got
            .i_prime
            .iter()
            .zip(&i_prime)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{case}: I′ differs by {worst:e}");
        assert_eq!(
            got.dropped,
            indices(&file, &format!("{case}.dropped")),
            "{case}: S stage"
        );
        assert_eq!(
            got.kept,
            indices(&file, &format!("{case}.kept")),
            "{case}: kept"
        );
        let (_, scores) = values(&file, &format!("{case}.scores"));
        let worst = got
            .scores
            .iter()
            .zip(&scores)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-4,
            "{case}: scores differ by {worst:e} (relative)"
        );
        checked += 1;
    }
    assert_eq!(checked, 6);
}
