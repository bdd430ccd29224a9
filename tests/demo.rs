//! `tideway demo` and `tideway stream`: the embedded keyword spotter on the bundled clip
//! detects the clip's keywords in order, whatever the chunk size, in-process or against a
//! running `tideway serve` (which serves the same default model without arguments).

mod common;

use common::*;

fn expected_keywords() -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kws/demo.json"),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["keywords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// The detection lines of a run (`detected <label> at <t> s (score ..)`).
fn detections(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("detected "))
        .map(str::to_string)
        .collect()
}

fn labels(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

fn demo(extra: &[&str]) -> String {
    let output = tideway().arg("demo").args(extra).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_demo_detects_the_clips_keywords_in_order_for_any_chunking() {
    let out = demo(&[]);
    eprintln!("{out}");
    let lines = detections(&out);
    assert_eq!(labels(&lines), expected_keywords(), "{out}");
    assert!(out.contains("summary: 1 stream(s)"), "{out}");
    for chunk in ["7", "130", "1000"] {
        let other = demo(&["--chunk-ms", chunk]);
        assert_eq!(detections(&other), lines, "chunks of {chunk} ms: {other}");
    }
    let many = demo(&["--streams", "4"]);
    assert_eq!(detections(&many), lines);
    assert!(many.contains("summary: 4 stream(s)"), "{many}");
}

#[test]
fn stream_against_a_running_server_gives_the_same_detections() {
    let server = Server::start(&[]);
    let output = tideway()
        .args(["stream", "--server", &server.addr, "--chunk-ms", "33"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = String::from_utf8(output.stdout).unwrap();
    assert_eq!(labels(&detections(&out)), expected_keywords(), "{out}");
    let output = tideway()
        .args(["stream", "--server", &server.addr, "--model", "nope"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("unknown model \"nope\""),
        "{}",
        stderr(&output)
    );
}

/// The share of frames a run's summary says the gate kept (`kept N% of the frames`).
fn kept_percent(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("frame pruning ("))
        .unwrap_or_else(|| panic!("no frame pruning line in\n{out}"));
    let after = line.split("kept ").nth(1).unwrap();
    after.split('%').next().unwrap().parse().unwrap()
}

#[test]
fn the_demo_with_frame_pruning_skips_frames_and_still_spots_the_keywords() {
    let out = demo(&["--prune"]);
    eprintln!("{out}");
    assert_eq!(labels(&detections(&out)), expected_keywords(), "{out}");
    let kept = kept_percent(&out);
    assert!(kept > 50.0 && kept < 100.0, "kept {kept}%: {out}");
    assert!(
        out.contains("frame pruning (frames: similarity 0.99)"),
        "{out}"
    );
    // A stricter gate keeps fewer frames; without --prune there is no pruning line.
    let strict = demo(&["--prune", "0.95,-0.3"]);
    assert!(kept_percent(&strict) < kept, "{strict}");
    assert!(!demo(&[]).contains("frame pruning"));
    let output = tideway().args(["demo", "--prune", "1.5"]).output().unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("similarity 1.5"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_served_model_with_a_frame_gate_reports_it_and_counts_its_frames() {
    // models/kws with a tideway_frame_gate block in its config.json.
    let dir = scratch_dir("gated-kws");
    let kws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kws");
    for name in ["model.safetensors", "config.json"] {
        std::fs::copy(kws.join(name), dir.join(name)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["tideway_frame_gate"] = serde_json::json!({ "similarity": 0.99 });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let model = format!("kws={}", dir.display());
    let server = Server::start(&["--model", &model, "--metrics", "127.0.0.1:0"]);
    let output = tideway()
        .args(["stream", "--server", &server.addr])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = String::from_utf8(output.stdout).unwrap();
    assert_eq!(labels(&detections(&out)), expected_keywords(), "{out}");
    // The client counted the skipped rows the server flagged; the server counted the same.
    let kept = kept_percent(&out);
    let page = scrape(&server.metrics_addr());
    let served_kept = metric(&page, "tideway_frames_total{model=\"kws\",fate=\"kept\"}");
    let skipped = metric(
        &page,
        "tideway_frames_total{model=\"kws\",fate=\"skipped\"}",
    );
    assert!(skipped > 0.0, "{page}");
    let share = 100.0 * served_kept / (served_kept + skipped);
    assert!(
        (share - kept).abs() < 0.1,
        "server {share}%, client {kept}%"
    );
    // A gate needs the whole model in one place: a pipeline is refused by name.
    let output = tideway()
        .args(["serve", "--listen", "127.0.0.1:0", "--model", &model])
        .args(["--workers", "2", "--pipeline", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("tideway_frame_gate"),
        "{}",
        stderr(&output)
    );
}
