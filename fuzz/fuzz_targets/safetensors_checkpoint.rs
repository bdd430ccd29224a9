//! Any bytes as a checkpoint's `model.safetensors` beside a valid Mamba config.json: the
//! loader answers a typed error or a model, never a panic, a hang or an outsized allocation.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tideway_operators::models::load_model;

fuzz_target!(|data: &[u8]| {
    let fixture = common::fixtures().join("mamba/hf_odd_tied");
    let dir = common::scratch(
        "safetensors",
        &[(&fixture.join("config.json"), "config.json")],
    );
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = load_model(&dir);
});
