//! The default model, embedded in the binary: `models/kws` (a spiking LMUFormer keyword
//! spotter trained by `tools/train_kws/train.py`, see its MODEL_CARD.md) and its demo clip.
//! Loaders read checkpoint directories, so the files are written once to a cache directory
//! named after their content.

use std::path::PathBuf;

use anyhow::{Context, Result};

pub const NAME: &str = "kws";
const CONFIG: &[u8] = include_bytes!("../../models/kws/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../models/kws/model.safetensors");
/// A few seconds of keywords among other words (tools/train_kws/make_demo_clip.py).
pub const DEMO_WAV: &[u8] = include_bytes!("../../models/kws/demo.wav");

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes `data` to `path` unless it already holds exactly that (via a temporary file and a
/// rename, so that concurrent processes never read a half-written file).
fn write_once(path: &std::path::Path, data: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The default model's checkpoint directory (created on first use).
pub fn materialize() -> Result<PathBuf> {
    materialize_config(CONFIG)
}

/// The default model with `block` set as `key` in its config.json (a directory of its own).
pub fn materialize_with(key: &str, block: serde_json::Value) -> Result<PathBuf> {
    let mut config: serde_json::Value =
        serde_json::from_slice(CONFIG).context("the embedded config.json")?;
    config[key] = block;
    materialize_config(serde_json::to_string_pretty(&config)?.as_bytes())
}

fn materialize_config(config: &[u8]) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tideway-default-{NAME}-{:016x}",
        fnv(config) ^ fnv(WEIGHTS).rotate_left(1)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_once(&dir.join("config.json"), config)?;
    write_once(&dir.join("model.safetensors"), WEIGHTS)?;
    Ok(dir)
}

/// The demo clip as a file (for the WAV reader).
pub fn demo_wav() -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("tideway-demo-{:016x}.wav", fnv(DEMO_WAV)));
    write_once(&path, DEMO_WAV)?;
    Ok(path)
}
