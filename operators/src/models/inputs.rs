//! A forward's token input, checked and cut: ids against the vocabulary, a packed batch's
//! per-session row ranges, and a long prefill in chunks.

use std::ops::Range;

use tideway_kernels::Tensor;

use crate::error::InputError;

/// Checks ids against a vocabulary of `vocab`; `offset` is added to the reported position.
pub fn check_token_ids(tokens: &[u32], vocab: usize, offset: usize) -> Result<(), InputError> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(InputError::TokenOutOfRange {
            token: tokens[i] as u64,
            position: offset + i,
            vocab,
        }),
        None => Ok(()),
    }
}

/// Validates a packed batch (`lens[i]` tokens for each of `sessions` sessions, ids below
/// `vocab`) and returns each session's row range.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the GPU models' check
pub(crate) fn packed_segments(
    tokens: &[u32],
    lens: &[usize],
    sessions: usize,
    vocab: usize,
) -> Result<Vec<Range<usize>>, InputError> {
    let rows = segments(lens, sessions, tokens.len())?;
    check_token_ids(tokens, vocab, 0)?;
    Ok(rows)
}

/// Each session's row range in a packed batch of `rows` rows (`lens[i]` rows for each of
/// `sessions` sessions), or why the batch is malformed.
pub fn segments(
    lens: &[usize],
    sessions: usize,
    rows: usize,
) -> Result<Vec<Range<usize>>, InputError> {
    if lens.len() != sessions || lens.iter().sum::<usize>() != rows {
        return Err(InputError::BatchMismatch {
            sessions,
            tokens: rows,
        });
    }
    if rows == 0 {
        return Err(InputError::Empty);
    }
    let mut start = 0;
    Ok(lens
        .iter()
        .map(|&len| {
            start += len;
            start - len..start
        })
        .collect())
}

/// The chunked form shared by every family: `forward` runs one chunk of at most `chunk_len`
/// tokens (continuing the session) and the rows are gathered into `[T, width]`;
/// `on_chunk(done, total)` after each chunk. (Also the serving layer's, whose forwards can
/// fail in other ways than the input: any error that an input error converts into.)
pub fn prefill_in_chunks<E: From<InputError>>(
    tokens: &[u32],
    vocab: usize,
    width: usize,
    chunk_len: usize,
    mut on_chunk: impl FnMut(usize, usize),
    mut forward: impl FnMut(&[u32]) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    if tokens.is_empty() {
        return Err(InputError::Empty.into());
    }
    check_token_ids(tokens, vocab, 0)?;
    if tokens.len() <= chunk_len {
        // One chunk: its logits are the answer (copying them would write 100 MB again for
        // 512 tokens of a 50k vocabulary).
        let logits = forward(tokens)?;
        assert_eq!(
            logits.data().len(),
            tokens.len() * width,
            "a chunk's logits"
        );
        on_chunk(tokens.len(), tokens.len());
        return Ok(logits);
    }
    let mut logits = Tensor::zeros(&[tokens.len(), width]);
    let mut done = 0;
    for chunk in tokens.chunks(chunk_len.max(1)) {
        let part = forward(chunk)?;
        logits.data_mut()[done * width..(done + chunk.len()) * width].copy_from_slice(part.data());
        done += chunk.len();
        on_chunk(done, tokens.len());
    }
    Ok(logits)
}
