//! A `tideway.v1` stream chunk decoded into a step: at most one kind of input (token ids,
//! text, audio samples or frames), checked where it does not need the session (ids against
//! the vocabulary, the int16 range, a sample rate with audio). The model's front end does the
//! rest at the session.

use crate::tideway::v1::StreamChunk;

use super::{DecodeError, InputKind, LengthLimit, ModelInputs, RequestLimits, StepInput, invalid};

/// The step a chunk feeds its session.
pub fn chunk_input(
    chunk: &StreamChunk,
    model: &ModelInputs,
    limits: &RequestLimits,
) -> Result<StepInput, DecodeError> {
    let kinds = [
        !chunk.tokens.is_empty(),
        !chunk.text.is_empty(),
        !chunk.samples_f32.is_empty(),
        !chunk.samples_i16.is_empty(),
        !chunk.frames.is_empty(),
    ];
    if kinds.iter().filter(|&&k| k).count() > 1 {
        return Err(invalid(
            "a chunk carries one kind of input: tokens, text, samples_f32, samples_i16 or frames",
        ));
    }
    if !chunk.text.is_empty() {
        return Ok(StepInput::Text(chunk.text.as_bytes().to_vec()));
    }
    if !chunk.samples_f32.is_empty() || !chunk.samples_i16.is_empty() {
        if chunk.sample_rate == 0 {
            return Err(invalid("audio samples need their `sample_rate` (Hz)"));
        }
        let samples = if chunk.samples_f32.is_empty() {
            chunk
                .samples_i16
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i16::try_from(v).map(|v| v as f32 / 32768.0).map_err(|_| {
                        invalid(format!(
                            "samples_i16[{i}] = {v} is outside the int16 range -32768..=32767"
                        ))
                    })
                })
                .collect::<Result<Vec<f32>, DecodeError>>()?
        } else {
            chunk.samples_f32.clone()
        };
        return Ok(StepInput::Audio {
            samples,
            rate: chunk.sample_rate,
        });
    }
    if !chunk.frames.is_empty() {
        if chunk.channels == 0 || !chunk.frames.len().is_multiple_of(chunk.channels as usize) {
            return Err(invalid(format!(
                "{} frame values are not whole frames of `channels` = {} values",
                chunk.frames.len(),
                chunk.channels
            )));
        }
        LengthLimit::request(limits.max_request_tokens)
            .check("frames", chunk.frames.len() / chunk.channels as usize)?;
        return Ok(StepInput::Frames {
            values: chunk.frames.clone(),
            width: chunk.channels,
        });
    }
    match model.kind {
        InputKind::Language { vocab, width } => Ok(StepInput::Tokens(super::language_tokens(
            &chunk.tokens,
            vocab,
            width,
            limits,
        )?)),
        InputKind::Features { .. } if chunk.tokens.is_empty() => Ok(StepInput::Tokens(Vec::new())),
        InputKind::Features { .. } => Err(invalid(format!(
            "model {:?} is a feature model: it takes audio samples or frames, not tokens",
            model.name
        ))),
    }
}
