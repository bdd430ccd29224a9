//! Helpers shared by the operator tests: fixture paths, tensors read from fixture files, the
//! relative error every comparison uses, and the ladder fixtures' reference logits.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

/// Tensor `name` of `file`, f32.
pub fn f32s(file: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    file.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Tensor `name` of `file`, i64.
pub fn i64s(file: &safetensors::SafeTensors, name: &str) -> Vec<i64> {
    file.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// ‖got − want‖ / ‖want‖, in f64.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// A copy of a fixture's checkpoint, under `into`, with `ladder_layers` set in its config.
pub fn laddered(dir: &Path, ladder_layers: serde_json::Value, into: &Path) -> PathBuf {
    let out = into.join(dir.file_name().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "config.json" {
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["ladder_layers"] = ladder_layers.clone();
            std::fs::write(out.join(name), config.to_string()).unwrap();
        } else if path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json")
        {
            std::fs::copy(&path, out.join(name)).unwrap();
        }
    }
    out
}

/// A fixture's `expected.safetensors`: the input ids (i64) and the reference logits.
pub fn reference_logits(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    let expected = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&expected).unwrap();
    let ids = i64s(&expected, "input_ids")
        .into_iter()
        .map(|i| i as u32)
        .collect();
    (ids, f32s(&expected, "logits"))
}
