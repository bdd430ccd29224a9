//! Any bytes as an LMUFormer's `torch.save` checkpoint (`best_model.pth`, a zip of pickles)
//! beside its config.json: refused with a typed error (never unpickled beyond plain data).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tideway_operators::models::load_lmuformer;

fuzz_target!(|data: &[u8]| {
    let fixture = common::fixtures().join("lmu/slmu_d32_c16_pth/checkpoint");
    let dir = common::scratch("pth", &[(&fixture.join("config.json"), "config.json")]);
    std::fs::write(dir.join("best_model.pth"), data).unwrap();
    let _ = load_lmuformer(&dir);
});
