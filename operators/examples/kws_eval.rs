//! Held-out accuracy of the keyword spotter through Tideway's own pipeline (WAV → front end →
//! model), on the voice-disjoint clips in `target/kws-heldout/` (written by
//! `tools/train_kws/train.py`, or by `tools/train_kws/heldout_gate.py` with its frame-pruning
//! sweep), compared with the PyTorch evaluation of the same clips.
//!
//! `cargo run --release -p tideway-operators --example kws_eval [MODEL_DIR] [CLIPS_DIR]`
//!
//! With `--gate-sweep`, also every frame-pruning setting of the clips' `gate.json`: accuracy
//! against the frames kept, and on how many clips Tideway's keep mask and prediction both
//! equal PyTorch's — PyTorch on its own features (kaldi-native-fbank, `gate.json`) and on
//! Tideway's (`gate_tideway.json`, which separates the policy from the front ends).
//! `--dump-features` writes Tideway's features of the clips to `tideway_features.safetensors`
//! there (`[clips, frames, mel]`) for `heldout_gate.py --tideway-features`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tideway_operators::models::{LmuFormer, load_lmuformer};
use tideway_operators::prune::frames::FrameGate;
use tideway_operators::tokenizers::audio::read_wav;

/// One clip through the model: the prediction and, with a gate, which frames it kept.
fn classify(model: &LmuFormer, features: &[f32]) -> (usize, Vec<bool>) {
    let mut state = model.new_state();
    let (_, pooled) = model.run_clip(&mut state, features).unwrap();
    let kept = state.take_skipped().iter().map(|&s| !s).collect();
    // The highest score, ties to the lowest class (as torch.argmax): a clip whose every frame
    // a gate skipped pools zeros.
    let predicted = (0..pooled.len())
        .max_by(|&a, &b| pooled[a].total_cmp(&pooled[b]).then(b.cmp(&a)))
        .unwrap();
    (predicted, kept)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tools/train_kws/train.py or tools/train_kws/heldout_gate.py first)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let sweep = std::env::args().any(|a| a == "--gate-sweep");
    let dump = std::env::args().any(|a| a == "--dump-features");
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| a != "--gate-sweep" && a != "--dump-features");
    let model_dir = args.next().map_or(root.join("models/kws"), PathBuf::from);
    let clips = args
        .next()
        .map_or(root.join("target/kws-heldout"), PathBuf::from);
    let mut model =
        load_lmuformer(&model_dir).unwrap_or_else(|e| panic!("{}: {e}", model_dir.display()));
    let front = model
        .audio_frontend()
        .expect("the keyword spotter has an audio front end")
        .clone();
    let labels = read_json(&clips.join("labels.json"));
    let items = labels["clips"].as_array().unwrap();
    let features: Vec<Vec<f32>> = items
        .iter()
        .map(|item| {
            let audio = read_wav(&clips.join(item["file"].as_str().unwrap())).unwrap();
            front.features(&audio).unwrap()
        })
        .collect();
    let truth: Vec<u64> = items.iter().map(|i| i["label"].as_u64().unwrap()).collect();
    let n = items.len() as f64;
    if dump {
        let frames = features[0].len() / front.num_mel_bins();
        assert!(features.iter().all(|f| f.len() == features[0].len()));
        let bytes: Vec<u8> = features
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let shape = vec![features.len(), frames, front.num_mel_bins()];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).unwrap();
        let path = clips.join("tideway_features.safetensors");
        safetensors::serialize_to_file([("features", view)], None, &path).unwrap();
        println!("wrote {}", path.display());
        return;
    }

    let started = Instant::now();
    let (mut correct, mut agree) = (0usize, 0usize);
    for ((item, f), &label) in items.iter().zip(&features).zip(&truth) {
        let (predicted, _) = classify(&model, f);
        correct += (predicted as u64 == label) as usize;
        agree += (predicted as u64 == item["torch_prediction"].as_u64().unwrap()) as usize;
    }
    let seconds = started.elapsed().as_secs_f64();
    let torch = labels["torch_accuracy"].as_f64().unwrap() * 100.0;
    let ours = correct as f64 / n * 100.0;
    println!(
        "{} held-out clips: Tideway accuracy {ours:.2}%, PyTorch {torch:.2}% (difference {:.2} points); predictions agree on {:.2}% of clips; {:.0} clips/s",
        items.len(),
        (ours - torch).abs(),
        agree as f64 / n * 100.0,
        n / seconds
    );
    if !sweep {
        return;
    }
    let gate = read_json(&clips.join("gate.json"));
    let on_ours = clips
        .join("gate_tideway.json")
        .exists()
        .then(|| read_json(&clips.join("gate_tideway.json")));
    println!(
        "| similarity | quiet floor | frames kept | Tideway accuracy | PyTorch accuracy | same mask and prediction (PyTorch on its features) | same (PyTorch on Tideway's features) | clips/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (k, setting) in gate["settings"].as_array().unwrap().iter().enumerate() {
        let similarity = setting["similarity"].as_f64().unwrap() as f32;
        let quiet = setting["quiet_below"].as_f64().map(|q| q as f32);
        model
            .set_frame_gate(Some(FrameGate::new(similarity, quiet).unwrap()))
            .unwrap();
        let started = Instant::now();
        let runs: Vec<(usize, Vec<bool>)> = features.iter().map(|f| classify(&model, f)).collect();
        let seconds = started.elapsed().as_secs_f64();
        let correct = runs
            .iter()
            .zip(&truth)
            .filter(|((p, _), label)| *p as u64 == **label)
            .count();
        let kept: usize = runs
            .iter()
            .map(|(_, m)| m.iter().filter(|&&k| k).count())
            .sum();
        let frames: usize = runs.iter().map(|(_, m)| m.len()).sum();
        let same_as = |reference: &serde_json::Value| {
            let clips = reference["clips"].as_array().unwrap();
            let same = runs
                .iter()
                .zip(clips)
                .filter(|((p, mask), r)| {
                    let torch_mask: Vec<bool> = r["mask"]
                        .as_str()
                        .unwrap()
                        .chars()
                        .map(|c| c == '1')
                        .collect();
                    *mask == torch_mask && *p as u64 == r["prediction"].as_u64().unwrap()
                })
                .count();
            format!("{:.2}%", 100.0 * same as f64 / n)
        };
        let on_ours = on_ours
            .as_ref()
            .map_or("-".to_string(), |g| same_as(&g["settings"][k]));
        println!(
            "| {similarity} | {} | {:.1}% | {:.2}% | {:.2}% | {} | {on_ours} | {:.0} |",
            quiet.map_or("-".to_string(), |q| q.to_string()),
            100.0 * kept as f64 / frames.max(1) as f64,
            100.0 * correct as f64 / n,
            100.0 * setting["torch_accuracy"].as_f64().unwrap(),
            same_as(setting),
            n / seconds
        );
    }
}
