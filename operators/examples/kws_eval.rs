//! Held-out accuracy of the keyword spotter through Tideway's own pipeline (WAV → front end →
//! model), on the voice-disjoint clips `tools/train_kws/train.py` writes to
//! `target/kws-heldout/`, compared with the PyTorch evaluation of the same clips.
//!
//! `cargo run --release -p tideway-operators --example kws_eval [MODEL_DIR] [CLIPS_DIR]`

use std::path::PathBuf;

use tideway_operators::models::load_lmuformer;
use tideway_operators::tokenizers::audio::read_wav;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = std::env::args().skip(1);
    let model_dir = args.next().map_or(root.join("models/kws"), PathBuf::from);
    let clips = args
        .next()
        .map_or(root.join("target/kws-heldout"), PathBuf::from);
    let model =
        load_lmuformer(&model_dir).unwrap_or_else(|e| panic!("{}: {e}", model_dir.display()));
    let front = model
        .audio_frontend()
        .expect("the keyword spotter has an audio front end");
    let labels: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(clips.join("labels.json")).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run tools/train_kws/train.py first)",
                clips.display()
            )
        }),
    )
    .unwrap();
    let items = labels["clips"].as_array().unwrap();
    let (mut correct, mut agree) = (0usize, 0usize);
    for item in items {
        let audio = read_wav(&clips.join(item["file"].as_str().unwrap())).unwrap();
        let features = front.features(&audio).unwrap();
        let (_, pooled) = model.run_clip(&mut model.new_state(), &features).unwrap();
        let predicted = (0..pooled.len())
            .max_by(|&a, &b| pooled[a].total_cmp(&pooled[b]))
            .unwrap();
        correct += (predicted as u64 == item["label"].as_u64().unwrap()) as usize;
        agree += (predicted as u64 == item["torch_prediction"].as_u64().unwrap()) as usize;
    }
    let n = items.len() as f64;
    let torch = labels["torch_accuracy"].as_f64().unwrap() * 100.0;
    let ours = correct as f64 / n * 100.0;
    println!(
        "{} held-out clips: Tideway accuracy {ours:.2}%, PyTorch {torch:.2}% (difference {:.2} points); predictions agree on {:.2}% of clips",
        items.len(),
        (ours - torch).abs(),
        agree as f64 / n * 100.0
    );
}
