//! Any bytes as config.json beside a valid Mamba checkpoint's weights.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tideway_operators::models::{is_lmuformer, load_model};

fuzz_target!(|data: &[u8]| {
    let fixture = common::fixtures().join("mamba/hf_odd_tied");
    let dir = common::scratch(
        "config",
        &[(&fixture.join("model.safetensors"), "model.safetensors")],
    );
    std::fs::write(dir.join("config.json"), data).unwrap();
    let _ = is_lmuformer(&dir);
    let _ = load_model(&dir);
});
