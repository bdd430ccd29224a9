//! `tideway run --input` against the LMUFormer reference modules on every committed fixture
//! (tests/fixtures/lmu/*, written by tools/gen_lmu_fixtures.py), in both forms: output and
//! clip mean within 1e-4 (LMUFormer) / 1e-3 (spiking LMUFormer), and every neuron's spike
//! train compared spike by spike.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn lmu_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join("lmu"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 6,
        "expected the committed lmu fixtures, found {dirs:?}"
    );
    dirs
}

fn run(model: &Path, input: &Path, extra: &[&str]) -> (PathBuf, std::process::Output) {
    run_with(model, "--input", input, extra)
}

/// `tideway run --model MODEL FLAG FILE --out OUT EXTRA…` (FLAG: `--input` or `--audio`).
fn run_with(
    model: &Path,
    flag: &str,
    file: &Path,
    extra: &[&str],
) -> (PathBuf, std::process::Output) {
    let out = scratch_dir("lmu-run").join("out.safetensors");
    let output = tideway()
        .args(["run", "--model"])
        .arg(model)
        .arg(flag)
        .arg(file)
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    (out, output)
}

fn spike_tensors(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| n.starts_with("spikes."))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn run_matches_the_reference_on_every_fixture_in_both_modes() {
    for dir in lmu_fixtures() {
        let expected = dir.join("expected.safetensors");
        let spiking = dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("slmu");
        let limit = if spiking { 1e-3 } else { 1e-4 };
        for mode in ["chunked", "recurrent"] {
            let (out, output) = run(
                &dir.join("checkpoint"),
                &dir.join("input.safetensors"),
                &["--mode", mode, "--record-spikes"],
            );
            assert!(
                output.status.success(),
                "{}: {}",
                dir.display(),
                stderr(&output)
            );
            for name in ["output", "pooled"] {
                let (got, want) = (read_tensor(&out, name), read_tensor(&expected, name));
                assert_eq!(got.shape, want.shape, "{} {name}", dir.display());
                let err = relative_error(&got.values, &want.values);
                eprintln!("{} {mode} {name}: relative error {err:.2e}", dir.display());
                assert!(
                    err <= limit,
                    "{} {mode} {name}: relative error {err:.3e}",
                    dir.display()
                );
            }
            let want_neurons = spike_tensors(&expected);
            assert_eq!(
                spike_tensors(&out),
                want_neurons,
                "{}: neurons",
                dir.display()
            );
            let (mut differing, mut total, mut fired) = (0usize, 0usize, 0usize);
            for name in &want_neurons {
                let (got, want) = (read_tensor(&out, name), read_tensor(&expected, name));
                assert_eq!(got.shape, want.shape, "{name}");
                differing += got
                    .values
                    .iter()
                    .zip(&want.values)
                    .filter(|(a, b)| a != b)
                    .count();
                total += want.values.len();
                fired += want.values.iter().filter(|&&v| v == 1.0).count();
            }
            if spiking {
                eprintln!(
                    "{} {mode}: {differing} of {total} spike slots differ ({fired} spikes in the reference)",
                    dir.display()
                );
                assert!(fired > 0, "{}: the fixture fires no spikes", dir.display());
            }
            assert_eq!(
                differing,
                0,
                "{} {mode}: spikes differ from the reference",
                dir.display()
            );
        }
    }
}

#[test]
fn bad_feature_input_is_refused_with_a_message() {
    let dir = fixtures_dir().join("lmu/lmu_d32_c16");
    let checkpoint = dir.join("checkpoint");
    let scratch = scratch_dir("lmu-bad");
    let write = |name: &str, shape: &[usize], values: &[f32]| {
        let path = scratch.join(name);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::tensor::Dtype::F32,
            shape.to_vec(),
            &bytes,
        )
        .unwrap();
        safetensors::serialize_to_file([("input", view)], None, &path).unwrap();
        path
    };
    let mut with_nan = vec![0.5f32; 4 * 16];
    with_nan[2 * 16 + 5] = f32::NAN;
    for (input, needle) in [
        (
            write("narrow.safetensors", &[4, 15], &[0.0; 60]),
            "the model takes [frames ≥ 1, 16]",
        ),
        (
            write("nan.safetensors", &[4, 16], &with_nan),
            "frame 2, channel 5 is NaN or infinite",
        ),
        (
            write("flat.safetensors", &[64], &[0.0; 64]),
            "expected [frames, 16]",
        ),
        (dir.join("expected.safetensors"), "no tensor `input`"),
    ] {
        let (_, output) = run(&checkpoint, &input, &[]);
        assert!(!output.status.success());
        let text = stderr(&output);
        assert!(text.contains(needle), "want {needle:?} in: {text}");
    }
    // Token ids for a feature model, and feature frames for a language model.
    let out = scratch.join("o.safetensors");
    let output = tideway()
        .args(["run", "--model"])
        .arg(&checkpoint)
        .args(["--tokens", "1,2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        stderr(&output).contains("is a feature model (LMUFormer): give its frames with --input")
    );
    let (_, output) = run(
        &fixtures_dir().join("fla/gla_basic"),
        &dir.join("input.safetensors"),
        &[],
    );
    assert!(stderr(&output).contains("is a language model: give its input with --tokens"));
}

#[test]
fn malformed_lmuformer_checkpoints_are_refused_by_name() {
    let src = fixtures_dir().join("lmu/slmu_d32_c16");
    let input = src.join("input.safetensors");
    for (edit, needle) in [
        (
            r#""variant": "slmu_rnn_conv1d""#,
            r#"LMUFormer variant "slmu_rnn_conv1d" is not supported; supported: "lmu_rnn_conv1d", "slmu_rnn_ms_conv1d""#,
        ),
        (
            r#""dim": 33"#,
            r#"tensor "patch_embed.proj_conv.weight" has shape [32, 16, 3], expected [33, 16, 3]"#,
        ),
        (
            r#""depths": 2"#,
            r#"tensor "block.1.attn.prev_bn.weight" is missing"#,
        ),
    ] {
        let dir = scratch_dir("lmu-broken");
        copy_dir(&src.join("checkpoint"), &dir);
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let key = edit.split(':').next().unwrap();
        let line = config
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap();
        let comma = if line.trim_end().ends_with(',') {
            ","
        } else {
            ""
        };
        let config = config.replace(line, &format!("  {edit}{comma}"));
        std::fs::write(dir.join("config.json"), config).unwrap();
        let (_, output) = run(&dir, &input, &[]);
        assert!(!output.status.success());
        let text = stderr(&output);
        assert!(text.contains(needle), "want {needle:?} in: {text}");
    }
    // A checkpoint with weights in two formats is ambiguous.
    let dir = scratch_dir("lmu-two-formats");
    copy_dir(&src.join("checkpoint"), &dir);
    std::fs::copy(
        fixtures_dir().join("lmu/slmu_d32_c16_pth/checkpoint/best_model.pth"),
        dir.join("best_model.pth"),
    )
    .unwrap();
    let (_, output) = run(&dir, &input, &[]);
    assert!(
        stderr(&output).contains("keep the weights in one format"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_pth_stating_a_length_past_its_end_is_refused_before_it_is_read() {
    // 408 bytes whose pickle asks for a 1.2 GB string (found by fuzz/fuzz_targets/pth.rs):
    // candle's reader would allocate it before reading; the scan refuses it by name.
    let src = fixtures_dir().join("lmu/slmu_d32_c16_pth/checkpoint");
    let dir = scratch_dir("lmu-oversized-pickle");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(
        fixtures_dir().join("lmu/malformed/oversized_unicode.pth"),
        dir.join("best_model.pth"),
    )
    .unwrap();
    let input = fixtures_dir().join("lmu/slmu_d32_c16/input.safetensors");
    let (_, output) = run(&dir, &input, &[]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("archive/data.pkl") && text.contains("states 1195853639 bytes"),
        "{text}"
    );
}

#[test]
fn run_audio_goes_from_a_wav_file_to_the_reference_outputs() {
    // An LMUFormer whose config.json has the audio front end, on a 16 kHz recording: the
    // features must equal torchaudio's (tools/gen_audio_fixtures.py) and the outputs the
    // reference model's on them.
    let dir = fixtures_dir().join("lmu/lmu_d16_c128_frontend");
    let wav = fixtures_dir().join("audio/chirp_16k_s16.wav");
    let want_features = fixtures_dir().join("audio/chirp_16k_s16.features.safetensors");
    let expected = dir.join("expected.safetensors");
    for mode in ["chunked", "recurrent"] {
        let (out, output) = run_with(&dir.join("checkpoint"), "--audio", &wav, &["--mode", mode]);
        assert!(output.status.success(), "{}", stderr(&output));
        let features = read_tensor(&out, "features");
        assert_eq!(features.shape, vec![128, 128]);
        let err = relative_error(
            &features.values,
            &read_tensor(&want_features, "normalised").values,
        );
        eprintln!("{mode}: features vs torchaudio: relative error {err:.2e}");
        assert!(err <= 1e-4, "features: {err:.3e}");
        for name in ["output", "pooled"] {
            let err = relative_error(
                &read_tensor(&out, name).values,
                &read_tensor(&expected, name).values,
            );
            eprintln!("{mode}: {name}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{name}: {err:.3e}");
        }
    }
    // Refusals: an encoding that is not PCM/float, a model without a front end, a front end
    // whose mel bins do not match the model.
    let (_, output) = run_audio(
        &dir.join("checkpoint"),
        &fixtures_dir().join("audio/alaw_8k.wav"),
    );
    assert!(
        stderr(&output).contains("unsupported WAV encoding"),
        "{}",
        stderr(&output)
    );
    let (_, output) = run_audio(&fixtures_dir().join("lmu/lmu_d32_c16/checkpoint"), &wav);
    assert!(
        stderr(&output).contains("has no audio front end"),
        "{}",
        stderr(&output)
    );
    let broken = scratch_dir("lmu-frontend-bins");
    copy_dir(&dir.join("checkpoint"), &broken);
    let config = std::fs::read_to_string(broken.join("config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        config.replace("\"num_mel_bins\": 128", "\"num_mel_bins\": 80"),
    )
    .unwrap();
    let (_, output) = run_audio(&broken, &wav);
    assert!(
        stderr(&output)
            .contains("frontend num_mel_bins is 80 but the model takes 128 input channels"),
        "{}",
        stderr(&output)
    );
}

fn run_audio(model: &Path, wav: &Path) -> (PathBuf, std::process::Output) {
    let (out, output) = run_with(model, "--audio", wav, &[]);
    assert!(!output.status.success());
    (out, output)
}

fn write_input(path: &Path, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::tensor::Dtype::F32,
        shape.to_vec(),
        &bytes,
    )
    .unwrap();
    safetensors::serialize_to_file([("input", view)], None, path).unwrap();
}

#[test]
fn a_sensor_front_end_standardises_and_patches_raw_frames() {
    // lmu_d32_c16 takes 16 features: a front end of 4 channels in patches of 4 frames every
    // 2 frames. Its output on raw frames must equal the plain model's on the patches built
    // here by definition.
    let src = fixtures_dir().join("lmu/lmu_d32_c16/checkpoint");
    let dir = scratch_dir("lmu-sensor");
    copy_dir(&src, &dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let (mean, std) = ([0.5f32, -1.0, 0.0, 2.0], [2.0f32, 0.5, 1.0, 4.0]);
    let frontend = format!(
        r#"{{"kind": "sensor", "channels": 4, "patch_len": 4, "stride": 2, "mean": {mean:?}, "std": {std:?}}}"#
    );
    let config = config.replacen('{', &format!("{{\n  \"frontend\": {frontend},"), 1);
    std::fs::write(dir.join("config.json"), config).unwrap();
    let frames = 51;
    let raw: Vec<f32> = (0..frames * 4)
        .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 20.0)
        .collect();
    let mut patches = Vec::new();
    let mut start = 0;
    while start + 4 <= frames {
        for t in start..start + 4 {
            for c in 0..4 {
                patches.push((raw[t * 4 + c] - mean[c]) / std[c]);
            }
        }
        start += 2;
    }
    let scratch = scratch_dir("lmu-sensor-io");
    let (raw_path, patch_path) = (
        scratch.join("raw.safetensors"),
        scratch.join("patches.safetensors"),
    );
    write_input(&raw_path, &[frames, 4], &raw);
    write_input(&patch_path, &[patches.len() / 16, 16], &patches);
    let (got, output) = run(&dir, &raw_path, &["--mode", "recurrent"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (want, output) = run(&src, &patch_path, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let features = read_tensor(&got, "features");
    assert_eq!(features.shape, vec![24, 16]);
    let patches64: Vec<f64> = patches.iter().map(|&v| v as f64).collect();
    assert!(relative_error(&features.values, &patches64) <= 1e-6);
    let err = relative_error(
        &read_tensor(&got, "output").values,
        &read_tensor(&want, "output").values,
    );
    assert!(err <= 1e-5, "output: {err:.3e}");
    // Frames with the wrong channel count are refused.
    write_input(&raw_path, &[frames, 3], &raw[..frames * 3]);
    let (_, output) = run(&dir, &raw_path, &[]);
    assert!(
        stderr(&output).contains("sensor frames have 3 channels; the model takes 4"),
        "{}",
        stderr(&output)
    );
}
