//! Text to token ids with the Hugging Face `tokenizers` crate and a model's `tokenizer.json`,
//! for whole texts and for streams of UTF-8 bytes cut anywhere.
//!
//! A stream may end a chunk inside a word, or inside a UTF-8 sequence. The stream holds back
//! the undecided tail: bytes of an unfinished character, and the last two pre-tokens (words,
//! for the usual pre-tokenizers) of the decoded text, whose split and merges can still change
//! when more text arrives. Everything before them is encoded and emitted. Token merges never
//! cross pre-token boundaries, so the ids of a stream equal the ids of the whole text, however
//! it was cut. Without a pre-tokenizer the whole text is held until the end. Ids are
//! encoded without special tokens (`add_special_tokens = false`), whole texts too.

use std::path::{Path, PathBuf};

use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer,
};

use crate::error::LoadError;
use crate::state_tensors::{StateError, StateTensors};

/// Text that cannot be tokenized.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum TextError {
    #[error("invalid UTF-8 at byte {offset} of the text stream")]
    InvalidUtf8 { offset: usize },
    #[error(
        "the text stream ended inside a UTF-8 sequence ({bytes} byte(s) of an unfinished character)"
    )]
    UnfinishedUtf8 { bytes: usize },
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("the stream has ended; start a new one to send more text")]
    Ended,
    #[error(
        "the stream would hold {held} bytes of text with no word boundary; at most {max} are held (the server's --max-held-text-bytes): send whitespace, or end the text"
    )]
    HeldTooLong { held: usize, max: usize },
}

/// A model's tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    /// Bytes of undecided text a stream may hold (text with no word boundary is held until
    /// one comes, and each chunk pre-tokenizes what is held).
    max_held: usize,
}

/// The default of [`TextTokenizer::set_max_held`]: 16 KiB, far beyond any word.
pub const DEFAULT_MAX_HELD_TEXT: usize = 16 << 10;

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({})", self.path.display())
    }
}

/// One text stream's carry-over: bytes of an unfinished character and undecided text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextStream {
    bytes: Vec<u8>,
    text: String,
    consumed: usize,
    ended: bool,
}

impl TextStream {
    pub fn size_bytes(&self) -> usize {
        self.bytes.len() + self.text.len()
    }

    /// Writes the carry-over (unfinished character, undecided text) as named tensors.
    pub fn export(&self, out: &mut StateTensors) {
        out.put_bytes("frontend.text.bytes", &self.bytes);
        out.put_bytes("frontend.text.text", self.text.as_bytes());
        out.put_u64("frontend.text.consumed", self.consumed as u64);
        out.put_u64("frontend.text.ended", self.ended as u64);
    }

    /// The stream whose carry-over [`export`](Self::export) wrote.
    pub fn import(from: &StateTensors) -> Result<Self, StateError> {
        let text = from.bytes("frontend.text.text")?;
        let text = String::from_utf8(text.to_vec()).map_err(|_| StateError::Shape {
            name: "frontend.text.text".into(),
            found_dtype: "U8 (not UTF-8)".into(),
            found: text.len(),
            expected_dtype: "U8 (UTF-8 text)".into(),
            expected: text.len(),
        })?;
        Ok(TextStream {
            bytes: from.bytes("frontend.text.bytes")?.to_vec(),
            text,
            consumed: from.u64("frontend.text.consumed")? as usize,
            ended: from.u64("frontend.text.ended")? != 0,
        })
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let unusable = |reason: String| LoadError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("not a usable tokenizer.json: {reason}"),
        };
        // The tokenizers crate (0.23) panics on some malformed files instead of answering an
        // error (`decoders/mod.rs`: `expect("Helper")` on a bad `decoder` object; found by
        // fuzz/fuzz_targets/tokenizer_json.rs): a bad file must not take the server down.
        let loaded = std::panic::catch_unwind(|| Tokenizer::from_file(path)).map_err(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the tokenizers crate panicked");
            unusable(message.to_string())
        })?;
        let inner = loaded.map_err(|e| unusable(e.to_string()))?;
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
            max_held: DEFAULT_MAX_HELD_TEXT,
        })
    }

    /// `tokenizer.json` in a checkpoint directory, if there is one.
    pub fn find(dir: &Path) -> Result<Option<Self>, LoadError> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            Self::from_file(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of a whole text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text for ids (the tokenizer's decoder; special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    /// Byte offsets in `text` where its pre-tokens start (after normalisation; offsets
    /// refer to the original text).
    fn pre_token_starts(&self, text: &str) -> Result<Vec<usize>, TextError> {
        let fail = |e: tokenizers::Error| TextError::Tokenizer(e.to_string());
        let mut normalized = NormalizedString::from(text);
        if let Some(n) = self.inner.get_normalizer() {
            n.normalize(&mut normalized).map_err(fail)?;
        }
        let mut pre = PreTokenizedString::from(normalized);
        match self.inner.get_pre_tokenizer() {
            Some(p) => p.pre_tokenize(&mut pre).map_err(fail)?,
            None => return Ok(vec![0]),
        }
        Ok(pre
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (start, _), _)| start)
            .collect())
    }

    pub fn set_max_held(&mut self, bytes: usize) {
        self.max_held = bytes;
    }

    /// Feeds a stream's next bytes; returns the ids now decided (all of them when `end`). A
    /// push that would leave more undecided text than the limit is refused, and the stream
    /// stays as it was.
    pub fn push(
        &self,
        stream: &mut TextStream,
        bytes: &[u8],
        end: bool,
    ) -> Result<Vec<u32>, TextError> {
        let mut next = stream.clone();
        let ids = self.push_unchecked(&mut next, bytes, end)?;
        if next.size_bytes() > self.max_held {
            return Err(TextError::HeldTooLong {
                held: next.size_bytes(),
                max: self.max_held,
            });
        }
        *stream = next;
        Ok(ids)
    }

    fn push_unchecked(
        &self,
        stream: &mut TextStream,
        bytes: &[u8],
        end: bool,
    ) -> Result<Vec<u32>, TextError> {
        if stream.ended {
            return Err(TextError::Ended);
        }
        stream.bytes.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&stream.bytes) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                return Err(TextError::InvalidUtf8 {
                    offset: stream.consumed + e.valid_up_to(),
                });
            }
            Err(e) => e.valid_up_to(),
        };
        let decoded: Vec<u8> = stream.bytes.drain(..valid).collect();
        stream.consumed += valid;
        stream
            .text
            .push_str(std::str::from_utf8(&decoded).expect("validated above"));
        if end {
            stream.ended = true;
            if !stream.bytes.is_empty() {
                return Err(TextError::UnfinishedUtf8 {
                    bytes: stream.bytes.len(),
                });
            }
            let text = std::mem::take(&mut stream.text);
            return self.encode(&text);
        }
        let starts = self.pre_token_starts(&stream.text)?;
        // Hold the last two pre-tokens back: the last may still grow, and its start decides
        // where the one before it ends.
        if starts.len() < 3 {
            return Ok(Vec::new());
        }
        let split = starts[starts.len() - 2];
        let rest = stream.text.split_off(split);
        let ready = std::mem::replace(&mut stream.text, rest);
        self.encode(&ready)
    }
}
