//! Any bytes as a WAV file; a recording that reads then goes through the audio front end
//! (whose limits refuse rates that would resample out of proportion).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tideway_operators::models::config::ConfigJson;
use tideway_operators::tokenizers::audio::{AudioFrontend, AudioFrontendConfig, read_wav};

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch("wav", &[]);
    let path = dir.join("input.wav");
    std::fs::write(&path, data).unwrap();
    if let Ok(audio) = read_wav(&path) {
        let config =
            ConfigJson::read(&common::fixtures().join("lmu/lmu_d16_c128_frontend/checkpoint"))
                .unwrap();
        let front = AudioFrontend::new(AudioFrontendConfig::from_config(&config).unwrap().unwrap())
            .unwrap();
        let _ = front.features(&audio);
    }
});
