//! Generated ids to text as they come: a piece is released only when it is valid UTF-8 and
//! can no longer change.
//!
//! A byte-level token may end inside a character (its decoder then writes U+FFFD), and some
//! decoders change a piece's start by what follows (word-piece "##", SentencePiece's leading
//! space). As text-generation-inference does, the text of the ids since a prefix offset is
//! decoded whole and compared with the text of the same ids without the newest ones; the
//! difference is released unless it ends in U+FFFD (an unfinished character waits, for up to
//! 4 tokens).

use crate::tokenizers::text::{TextError, TextTokenizer};

/// One generation's detokenizer.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Ids before this one are released text and no longer decoded.
    prefix: usize,
    /// Ids before this one are in released text.
    read: usize,
}

impl Detokenizer {
    /// Adds `token`; the text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> Result<String, TextError> {
        self.ids.push(token);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        // A UTF-8 character is at most 4 bytes: ids that have not made one in 4 tokens are
        // not valid UTF-8 (a model can make any bytes) and are released as U+FFFD.
        let unfinished = now.ends_with('\u{FFFD}') && self.ids.len() - self.read < 4;
        if now.len() > before.len()
            && !unfinished
            && let Some(piece) = now.get(before.len()..).filter(|_| now.starts_with(&before))
        {
            let piece = piece.to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// The text still held back at the end of the generation (an unfinished character
    /// comes out as U+FFFD, as a whole decode would write it).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, TextError> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(match now.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => now,
        })
    }
}
