//! Text tokenization against the Python `tokenizers` package (tests/fixtures/text, written by
//! tools/gen_text_fixtures.py): ids and decoded text of every case; streams cut at random
//! byte positions (inside words and inside UTF-8 sequences) give the ids of the whole text;
//! invalid UTF-8 is refused, and so is more undecided text than the limit; a refused push
//! leaves the stream as it was.

use std::path::PathBuf;

use tideway_operators::tokenizers::text::{TextError, TextStream, TextTokenizer};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/text")
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn ids_of(case: &serde_json::Value, tokenizer: &str) -> Vec<u32> {
    case[tokenizer]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

const TOKENIZERS: [&str; 2] = ["bpe", "wordpiece"];

#[test]
fn ids_and_decoding_equal_the_python_tokenizer() {
    for name in TOKENIZERS {
        let tok = TextTokenizer::from_file(&dir().join(format!("{name}.tokenizer.json"))).unwrap();
        for case in cases() {
            let text = case["text"].as_str().unwrap();
            let want = ids_of(&case, name);
            assert_eq!(tok.encode(text).unwrap(), want, "{name}: {text:?}");
            assert_eq!(
                tok.decode(&want).unwrap(),
                case[name]["decoded"].as_str().unwrap(),
                "{name}: decoding {text:?}"
            );
        }
    }
}

#[test]
fn streams_cut_anywhere_give_the_ids_of_the_whole_text() {
    for name in TOKENIZERS {
        let tok = TextTokenizer::from_file(&dir().join(format!("{name}.tokenizer.json"))).unwrap();
        for case in cases() {
            let text = case["text"].as_str().unwrap();
            let bytes = text.as_bytes();
            let want = ids_of(&case, name);
            for seed in 1..=20u64 {
                let mut x = seed;
                let mut stream = TextStream::default();
                let mut got = Vec::new();
                let mut at = 0;
                loop {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let n = ((x >> 33) as usize % 6).min(bytes.len() - at);
                    let end = at + n == bytes.len();
                    got.extend(tok.push(&mut stream, &bytes[at..at + n], end).unwrap());
                    at += n;
                    if end {
                        break;
                    }
                }
                assert_eq!(got, want, "{name}: {text:?} cut with seed {seed}");
            }
        }
    }
}

#[test]
fn invalid_utf8_is_refused_with_a_message() {
    let tok = TextTokenizer::from_file(&dir().join("bpe.tokenizer.json")).unwrap();
    let mut stream = TextStream::default();
    tok.push(&mut stream, b"ok ", false).unwrap();
    assert_eq!(
        tok.push(&mut stream, &[b'a', 0xff, b'b'], false),
        Err(TextError::InvalidUtf8 { offset: 4 })
    );
    // The first two bytes of "€" (E2 82 AC), then the end: a character that never completes.
    let mut stream = TextStream::default();
    tok.push(&mut stream, &[b'x', 0xe2, 0x82], false).unwrap();
    let err = tok.push(&mut stream, &[], true).unwrap_err();
    assert_eq!(err, TextError::UnfinishedUtf8 { bytes: 2 });
    assert!(err.to_string().contains("ended inside a UTF-8 sequence"));
    // A refused push leaves the stream as it was: the character can still complete.
    let ids = tok.push(&mut stream, &[0xac], true).unwrap();
    assert_eq!(
        ids,
        tok.push(&mut TextStream::default(), "x€".as_bytes(), true)
            .unwrap()
    );
    assert_eq!(tok.push(&mut stream, b"more", false), Err(TextError::Ended));
}

#[test]
fn text_without_a_word_boundary_is_held_up_to_the_limit() {
    let mut tok = TextTokenizer::from_file(&dir().join("bpe.tokenizer.json")).unwrap();
    tok.set_max_held(64);
    let mut stream = TextStream::default();
    tok.push(&mut stream, "x".repeat(60).as_bytes(), false)
        .unwrap();
    let before = stream.clone();
    let err = tok.push(&mut stream, b"yyyyyyyy", false).unwrap_err();
    assert_eq!(err, TextError::HeldTooLong { held: 68, max: 64 });
    // The stream is as it was: a boundary now decides the held word.
    assert_eq!(stream, before);
    let ids = tok.push(&mut stream, b" and more", true).unwrap();
    assert_eq!(
        ids,
        tok.push(
            &mut TextStream::default(),
            format!("{} and more", "x".repeat(60)).as_bytes(),
            true
        )
        .unwrap()
    );
}

#[test]
fn a_tokenizer_json_that_panics_the_tokenizers_crate_is_a_load_error() {
    // Found by fuzz/fuzz_targets/tokenizer_json.rs: a `decoder` object cut off mid-string.
    let path = dir().join("malformed_decoder.tokenizer.json");
    let err = TextTokenizer::from_file(&path).unwrap_err();
    assert!(
        err.to_string().contains("not a usable tokenizer.json"),
        "{err}"
    );
}
