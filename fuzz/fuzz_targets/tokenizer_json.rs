//! Any bytes as tokenizer.json; a tokenizer that loads then streams a fixed text.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tideway_operators::tokenizers::text::{TextStream, TextTokenizer};

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts at any panic, even one the loader catches: the tokenizers crate
    // panics on some malformed files and `TextTokenizer::from_file` turns that into an error.
    // With the default hook back, a caught panic is an error; an uncaught one still aborts.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    let dir = common::scratch("tokenizer", &[]);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, data).unwrap();
    if let Ok(tokenizer) = TextTokenizer::from_file(&path) {
        let mut stream = TextStream::default();
        let _ = tokenizer.push(&mut stream, "Hello wor".as_bytes(), false);
        let _ = tokenizer.push(&mut stream, "ld, é€🙂!".as_bytes(), true);
    }
});
