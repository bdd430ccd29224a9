//! What every loader target shares: a scratch directory per process, holding the file under
//! test beside the fixture files the loader needs.

// Each target uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A directory of this process (reused by every input), with `files` copied in.
pub fn scratch(name: &str, files: &[(&Path, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tideway-fuzz-{name}-{}", std::process::id()));
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        for (from, to) in files {
            std::fs::copy(from, dir.join(to)).unwrap();
        }
    }
    dir
}
