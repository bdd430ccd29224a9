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
