//! The audio front end against the references (tests/fixtures/audio, written by
//! tools/gen_audio_fixtures.py with kaldi-native-fbank and torchaudio): WAV decoding, Kaldi
//! fbank, normalisation; streams cut anywhere give the features of the whole input; bad audio
//! is refused with a message.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use tideway_operators::tokenizers::audio::{
    AudioError, AudioFrontend, AudioFrontendConfig, AudioLimits, read_wav,
};
use tideway_operators::tokenizers::fbank::{Fbank, FbankOptions};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio")
}

fn tensor(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn options(bins: usize, rate: u32) -> FbankOptions {
    FbankOptions {
        sample_rate: rate,
        num_mel_bins: bins,
        frame_length_ms: 25.0,
        frame_shift_ms: 10.0,
        low_freq: 20.0,
        high_freq: 0.0,
    }
}

fn frontend() -> AudioFrontend {
    AudioFrontend::new(AudioFrontendConfig {
        fbank: options(128, 16000),
        norm_mean: -6.845978,
        norm_std: 5.5654526,
    })
    .unwrap()
}

const AT_16K: [&str; 3] = [
    "chirp_16k_s16",
    "noise_tone_16k_s24_stereo",
    "speech_yes_16k_f32",
];

#[test]
fn fbank_equals_kaldi_native_fbank_and_torchaudio() {
    for name in AT_16K {
        let expected = dir().join(format!("{name}.features.safetensors"));
        let audio = read_wav(&dir().join(format!("{name}.wav"))).unwrap();
        assert_eq!(audio.sample_rate, 16000);
        // Decoding (PCM 16/24-bit scaled by 2^(bits-1), float as is, stereo averaged).
        let samples = tensor(&expected, "samples");
        let decode = relative_error(&audio.samples, &samples);
        assert!(
            decode <= 1e-7,
            "{name}: decoded samples differ by {decode:.2e}"
        );
        for (bins, reference, limit) in [
            (80, "knf80", 1e-4),
            (80, "torchaudio80", 1e-4),
            (128, "torchaudio", 1e-4),
        ] {
            let got = Fbank::new(&options(bins, 16000))
                .unwrap()
                .compute(&audio.samples);
            let err = relative_error(&got, &tensor(&expected, reference));
            eprintln!("{name}: fbank {bins} bins vs {reference}: relative error {err:.2e}");
            assert!(err <= limit, "{name} vs {reference}: {err:.3e}");
        }
        let got = frontend().features(&audio).unwrap();
        let err = relative_error(&got, &tensor(&expected, "normalised"));
        eprintln!("{name}: normalised features: relative error {err:.2e}");
        assert!(err <= 1e-4, "{name}: normalised features {err:.3e}");
    }
}

/// Sizes in 1..=max from a seed, covering `total`.
fn chunking(total: usize, max: usize, seed: u64) -> Vec<usize> {
    let (mut left, mut x, mut sizes) = (total, seed, Vec::new());
    while left > 0 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (1 + (x >> 33) as usize % max).min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

#[test]
fn random_chunkings_give_exactly_the_features_of_the_whole_input() {
    let front = frontend();
    for name in ["chirp_16k_s16", "speech_seven_22k_s16"] {
        let audio = read_wav(&dir().join(format!("{name}.wav"))).unwrap();
        let whole = front.features(&audio).unwrap();
        assert!(!whole.is_empty());
        for (seed, max) in [(1u64, 7usize), (2, 300), (3, 5000)] {
            let mut stream = front.new_stream();
            let mut got = Vec::new();
            let sizes = chunking(audio.samples.len(), max, seed);
            let mut at = 0;
            for (i, &n) in sizes.iter().enumerate() {
                let end = i + 1 == sizes.len();
                got.extend(
                    front
                        .push(
                            &mut stream,
                            &audio.samples[at..at + n],
                            audio.sample_rate,
                            end,
                        )
                        .unwrap(),
                );
                at += n;
            }
            assert_eq!(got, whole, "{name}: chunks of up to {max} samples");
        }
    }
}

#[test]
fn resampled_audio_is_close_to_the_reference_resampler() {
    // 22.05 kHz speech: Tideway resamples with rubato's FFT resampler, the reference with
    // torchaudio's windowed sinc; the features agree closely but not to the last bit.
    let name = "speech_seven_22k_s16";
    let audio = read_wav(&dir().join(format!("{name}.wav"))).unwrap();
    assert_eq!(audio.sample_rate, 22050);
    let got = frontend().features(&audio).unwrap();
    let want = tensor(
        &dir().join(format!("{name}.features.safetensors")),
        "normalised",
    );
    let err = relative_error(&got, &want);
    // Below 7 kHz (mel bins 0..115), away from the two filters' different transition bands.
    let low = |x: &[f32]| -> Vec<f32> { x.chunks(128).flat_map(|r| r[..115].to_vec()).collect() };
    let err_low = relative_error(&low(&got), &low(&want));
    eprintln!(
        "{name}: resampled features vs torchaudio.functional.resample: relative error {err:.2e} ({err_low:.2e} below 7 kHz)"
    );
    assert!(
        err <= 5e-2 && err_low <= 5e-3,
        "{name}: {err:.3e}, {err_low:.3e} below 7 kHz"
    );
}

#[test]
fn bad_audio_is_refused_with_a_message() {
    let err = read_wav(&dir().join("alaw_8k.wav"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unsupported WAV encoding: Tideway reads PCM"),
        "{err}"
    );
    let err = read_wav(&dir().join("chirp_16k_s16.features.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a readable WAV file"), "{err}");
    let front = frontend();
    let mut samples = vec![0.1f32; 1000];
    samples[417] = f32::NAN;
    assert_eq!(
        front.push(&mut front.new_stream(), &samples, 16000, false),
        Err(AudioError::NonFinite { index: 417 })
    );
    let err = front
        .push(&mut front.new_stream(), &[0.0; 10], 0, false)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("a sample rate of 0 Hz is outside the accepted range, 8000 to 192000 Hz"),
        "{err}"
    );
    // 1 Hz would resample ×16000; a prime rate would need an FFT of that many points.
    for (rate, what) in [
        (1, "outside the accepted range"),
        (191_999, "ratio 16000:191999"),
    ] {
        let err = front
            .push(&mut front.new_stream(), &[0.0; 10], rate, false)
            .unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    for rate in [
        8000, 11025, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000,
    ] {
        front
            .push(&mut front.new_stream(), &[0.0; 10], rate, false)
            .unwrap_or_else(|e| panic!("{rate} Hz: {e}"));
    }
    // A stream keeps its first rate, resampled or not.
    for first in [8000, 16000] {
        let mut stream = front.new_stream();
        front.push(&mut stream, &[0.0; 500], first, false).unwrap();
        let other = if first == 8000 { 44100 } else { 8000 };
        let err = front
            .push(&mut stream, &[0.0; 500], other, false)
            .unwrap_err();
        assert_eq!(err, AudioError::RateChanged { first, now: other });
    }
    let mut stream = front.new_stream();
    front.push(&mut stream, &[0.0; 500], 8000, false).unwrap();
    // A chunk's resampled length is bounded.
    let mut limited = front.clone();
    limited.set_limits(AudioLimits {
        max_chunk_samples: 1000,
        ..AudioLimits::default()
    });
    let err = limited
        .push(&mut limited.new_stream(), &[0.0; 501], 8000, false)
        .unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::ChunkTooLong {
                resampled: 1002,
                ..
            }
        ),
        "{err}"
    );
    front.push(&mut stream, &[], 8000, true).unwrap();
    assert_eq!(
        front.push(&mut stream, &[0.0], 8000, false),
        Err(AudioError::Ended)
    );
}
