//! Throughput of the tokenizer stage on one core: the audio front end (Kaldi fbank, 128 mel
//! bins, with and without resampling from 44.1 kHz) in seconds of audio per second, and text
//! tokenization (the fixture byte-level BPE, whole and streamed in 64-byte chunks) in MB/s.
//!
//! `cargo run --release -p tideway-operators --example frontend_throughput`
//! (run it with one thread, e.g. `taskset -c 0`, for the per-core figure).

use std::path::Path;
use std::time::Instant;

use tideway_operators::tokenizers::audio::{AudioFrontend, AudioFrontendConfig};
use tideway_operators::tokenizers::fbank::FbankOptions;
use tideway_operators::tokenizers::text::{TextStream, TextTokenizer};

fn main() {
    let front = AudioFrontend::new(AudioFrontendConfig {
        fbank: FbankOptions {
            sample_rate: 16000,
            num_mel_bins: 128,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            low_freq: 20.0,
            high_freq: 0.0,
        },
        norm_mean: -6.845978,
        norm_std: 5.5654526,
    })
    .unwrap();
    for rate in [16000u32, 44100] {
        let seconds = 60.0;
        let n = (seconds * rate as f64) as usize;
        let samples: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / rate as f32;
                0.3 * (2.0 * std::f32::consts::PI * (300.0 + 200.0 * t) * t).sin()
                    + 0.01 * (((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            })
            .collect();
        // Streamed in 20 ms chunks, as a live feed arrives.
        let chunk = (rate / 50) as usize;
        let t0 = Instant::now();
        let mut stream = front.new_stream();
        let mut frames = 0;
        let chunks: Vec<&[f32]> = samples.chunks(chunk).collect();
        for (i, c) in chunks.iter().enumerate() {
            frames += front
                .push(&mut stream, c, rate, i + 1 == chunks.len())
                .unwrap()
                .len()
                / 128;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "audio front end, {rate} Hz input{}: {seconds:.0} s of audio in {:.3} s = {:.0}x real time ({frames} frames, {:.1} µs/frame)",
            if rate != 16000 {
                " (resampled to 16 kHz)"
            } else {
                ""
            },
            secs,
            seconds / secs,
            1e6 * secs / frames as f64
        );
    }

    let tok_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/text/bpe.tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path).unwrap();
    let base =
        "Streams of sensor data arrive every ten milliseconds; Grüße aus Zürich! 🚀 don't stop. ";
    let text: String = base.repeat(1_000_000 / base.len());
    let t0 = Instant::now();
    let ids = tok.encode(&text).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "text, whole: {:.2} MB in {:.3} s = {:.2} MB/s ({} ids, {:.0} ids/s)",
        text.len() as f64 / 1e6,
        secs,
        text.len() as f64 / 1e6 / secs,
        ids.len(),
        ids.len() as f64 / secs
    );
    let t0 = Instant::now();
    let mut stream = TextStream::default();
    let mut streamed = 0;
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(64).collect();
    for (i, c) in chunks.iter().enumerate() {
        streamed += tok
            .push(&mut stream, c, i + 1 == chunks.len())
            .unwrap()
            .len();
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(streamed, ids.len());
    println!(
        "text, streamed in 64-byte chunks: {:.2} MB/s ({:.0} ids/s)",
        text.len() as f64 / 1e6 / secs,
        ids.len() as f64 / secs
    );
}
