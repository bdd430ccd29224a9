//! Any bytes as a session state blob (`StreamStart.state`, a store's value): the decoder
//! answers a typed error or a snapshot, and a snapshot's tensors imported into a model's state
//! (`tests/fixtures/mamba/hf_k4_sharded`) answer a typed error or a state, never a panic, a hang
//! or an outsized allocation.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tideway_operators::models::{Model, load_model};
use tideway_operators::state_blob::decode;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load_model(&common::fixtures().join("mamba/hf_k4_sharded")).unwrap())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = decode(data) {
        let _ = model().import_state(&snapshot.tensors);
    }
});
