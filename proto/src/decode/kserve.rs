//! An inference-protocol `ModelInferRequest` decoded into a step: `input_ids` for language
//! models, `input` frames or `audio` samples for feature models, from raw bytes or typed
//! contents, and the sequence parameters Triton's clients send.

use std::collections::HashMap;

use crate::inference::infer_parameter::ParameterChoice;
use crate::inference::model_infer_request::InferInputTensor;
use crate::inference::{InferParameter, ModelInferRequest};

use super::{
    DecodeError, InputKind, LengthLimit, ModelInputs, RequestLimits, StepInput, invalid,
    language_tokens,
};

/// The step a request feeds its session.
pub fn infer_input(
    request: &ModelInferRequest,
    model: &ModelInputs,
    limits: &RequestLimits,
) -> Result<StepInput, DecodeError> {
    match model.kind {
        InputKind::Language { vocab, width } => {
            let mut tokens = None;
            for (i, input) in request.inputs.iter().enumerate() {
                if input.name != "input_ids" {
                    return Err(invalid(format!(
                        "unknown input {:?}; model {:?} takes \"input_ids\" (INT64 or INT32, [T] or [1, T])",
                        input.name, model.name
                    )));
                }
                let ids = input_ids(input, raw_input(request, i)?, limits)?;
                tokens = Some(language_tokens(&ids, vocab, width, limits)?);
            }
            tokens.map(StepInput::Tokens).ok_or_else(|| {
                invalid("missing input \"input_ids\" (INT64 or INT32, [T] or [1, T])")
            })
        }
        InputKind::Features { check_rate } => feature_input(request, model, limits, check_rate),
    }
}

/// The value of request parameter `key`, if sent.
pub fn param<'a>(
    map: &'a HashMap<String, InferParameter>,
    key: &str,
) -> Option<&'a ParameterChoice> {
    map.get(key).and_then(|p| p.parameter_choice.as_ref())
}

/// A bool parameter (false when absent).
pub fn bool_param(map: &HashMap<String, InferParameter>, key: &str) -> Result<bool, DecodeError> {
    match param(map, key) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(other) => Err(invalid(format!(
            "parameter {key:?} must be a bool_param, found {other:?}"
        ))),
    }
}

/// The sequence id as a string ("" when the request is not part of a sequence; 0 means none,
/// as in Triton).
pub fn sequence_id(map: &HashMap<String, InferParameter>) -> Result<String, DecodeError> {
    match param(map, "sequence_id") {
        None => Ok(String::new()),
        Some(ParameterChoice::Int64Param(0)) | Some(ParameterChoice::Uint64Param(0)) => {
            Ok(String::new())
        }
        Some(ParameterChoice::Int64Param(v)) => Ok(v.to_string()),
        Some(ParameterChoice::Uint64Param(v)) => Ok(v.to_string()),
        Some(ParameterChoice::StringParam(s)) => Ok(s.clone()),
        Some(other) => Err(invalid(format!(
            "parameter \"sequence_id\" must be an int64, uint64 or string parameter, found {other:?}"
        ))),
    }
}

/// The raw bytes of input `i`, if the request sends its inputs raw.
fn raw_input(request: &ModelInferRequest, i: usize) -> Result<Option<&Vec<u8>>, DecodeError> {
    if request.raw_input_contents.is_empty() {
        return Ok(None);
    }
    request.raw_input_contents.get(i).map(Some).ok_or_else(|| {
        invalid(format!(
            "{} inputs but {} raw_input_contents",
            request.inputs.len(),
            request.raw_input_contents.len()
        ))
    })
}

/// `count` values of `size` bytes: the raw bytes they need, refused where the shape asks for
/// more than any message could hold (a shape is the client's to choose, up to 2^63).
fn raw_len(input: &InferInputTensor, count: usize, size: usize) -> Result<usize, DecodeError> {
    count.checked_mul(size).ok_or_else(|| {
        invalid(format!(
            "input {:?} has shape {:?}: more values than a message can hold",
            input.name, input.shape
        ))
    })
}

/// The values of an FP32 (or, for audio, INT16) input, from raw bytes or typed contents.
fn float_values(
    input: &InferInputTensor,
    raw: Option<&Vec<u8>>,
    count: usize,
) -> Result<Vec<f32>, DecodeError> {
    let name = &input.name;
    let values: Vec<f32> = match (input.datatype.as_str(), raw) {
        ("FP32", Some(bytes)) if bytes.len() == raw_len(input, count, 4)? => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        ("INT16", Some(bytes)) if name == "audio" && bytes.len() == raw_len(input, count, 2)? => {
            bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes(b.try_into().expect("2 bytes")) as f32 / 32768.0)
                .collect()
        }
        ("FP32", None) => input
            .contents
            .as_ref()
            .map_or(Vec::new(), |c| c.fp32_contents.clone()),
        ("INT16", None) if name == "audio" => {
            input.contents.as_ref().map_or(Ok(Vec::new()), |c| {
                c.int_contents
                    .iter()
                    .map(|&v| {
                        i16::try_from(v).map(|v| v as f32 / 32768.0).map_err(|_| {
                            invalid(format!("input \"audio\": {v} is outside the int16 range"))
                        })
                    })
                    .collect()
            })?
        }
        (dt @ ("FP32" | "INT16"), Some(bytes)) => {
            return Err(invalid(format!(
                "input {name:?}: {} raw bytes for {count} values of {dt}",
                bytes.len()
            )));
        }
        (other, _) => {
            let allowed = if name == "audio" {
                "\"FP32\", \"INT16\""
            } else {
                "\"FP32\""
            };
            return Err(invalid(format!(
                "input {name:?} has datatype {other:?}; allowed: {allowed}"
            )));
        }
    };
    check_count(input, values.len(), count)?;
    Ok(values)
}

/// An input's values must be as many as its shape says.
fn check_count(input: &InferInputTensor, found: usize, count: usize) -> Result<(), DecodeError> {
    if found != count {
        return Err(invalid(format!(
            "input {:?} holds {found} values but its shape {:?} says {count}",
            input.name, input.shape
        )));
    }
    Ok(())
}

/// A feature model's request: `input` (FP32, [T, C] or [1, T, C]) or `audio` (FP32 or INT16,
/// [S] or [1, S], with the request parameter `sample_rate`).
fn feature_input(
    request: &ModelInferRequest,
    model: &ModelInputs,
    limits: &RequestLimits,
    check_rate: Option<super::RateCheck>,
) -> Result<StepInput, DecodeError> {
    let allowed = "\"input\" (FP32, [T, C]) or \"audio\" (FP32 or INT16 samples, [S], with a \"sample_rate\" parameter)";
    let [input] = request.inputs.as_slice() else {
        return Err(invalid(format!(
            "model {:?} takes one input: {allowed}",
            model.name
        )));
    };
    let raw = raw_input(request, 0)?;
    match input.name.as_str() {
        "input" => {
            let (t, c) = match input.shape.as_slice() {
                [t, c] | [1, t, c] if *t >= 0 && *c > 0 => (*t as usize, *c as usize),
                other => {
                    return Err(invalid(format!(
                        "input \"input\" has shape {other:?}; allowed: [T, C] or [1, T, C]"
                    )));
                }
            };
            LengthLimit::request(limits.max_request_tokens).check("frames", t)?;
            let width = u32::try_from(c).map_err(|_| {
                invalid(format!(
                    "input \"input\" has {c} channels; at most {} are allowed",
                    u32::MAX
                ))
            })?;
            Ok(StepInput::Frames {
                values: float_values(input, raw, raw_len(input, t, c)?)?,
                width,
            })
        }
        "audio" => {
            let s = match input.shape.as_slice() {
                [s] | [1, s] if *s >= 0 => *s as usize,
                other => {
                    return Err(invalid(format!(
                        "input \"audio\" has shape {other:?}; allowed: [S] or [1, S]"
                    )));
                }
            };
            let rate = match param(&request.parameters, "sample_rate") {
                Some(ParameterChoice::Int64Param(r)) if *r > 0 => *r as u64,
                Some(ParameterChoice::Uint64Param(r)) if *r > 0 => *r,
                _ => {
                    return Err(invalid(
                        "input \"audio\" needs the request parameter \"sample_rate\" (a positive integer, Hz)",
                    ));
                }
            };
            // Checked whole, before any narrowing (2^32 + 1 is not 1 Hz). A model without an
            // audio front end refuses audio at its front-end stage.
            let rate = match check_rate {
                Some(check) => check(rate).map_err(DecodeError::SampleRate)?,
                None => rate.min(u32::MAX as u64) as u32,
            };
            Ok(StepInput::Audio {
                samples: float_values(input, raw, s)?,
                rate,
            })
        }
        other => Err(invalid(format!(
            "unknown input {other:?}; model {:?} takes {allowed}",
            model.name
        ))),
    }
}

/// `input_ids` as sent (INT64 or INT32, raw or typed), before the vocabulary check. A shape
/// over the request limit is refused before any value is read.
fn input_ids(
    input: &InferInputTensor,
    raw: Option<&Vec<u8>>,
    limits: &RequestLimits,
) -> Result<Vec<i64>, DecodeError> {
    let count = match input.shape.as_slice() {
        [t] if *t >= 0 => *t as usize,
        [1, t] if *t >= 0 => *t as usize,
        other => {
            return Err(invalid(format!(
                "input \"input_ids\" has shape {other:?}; allowed: [T] or [1, T]"
            )));
        }
    };
    LengthLimit::request(limits.max_request_tokens).check("tokens", count)?;
    let ids: Vec<i64> = match (input.datatype.as_str(), raw) {
        ("INT64", Some(bytes)) => raw_ids::<8>(input, bytes, count, "INT64", i64::from_le_bytes)?,
        ("INT32", Some(bytes)) => raw_ids::<4>(input, bytes, count, "INT32", |b| {
            i32::from_le_bytes(b) as i64
        })?,
        ("INT64", None) => input
            .contents
            .as_ref()
            .map_or(Vec::new(), |c| c.int64_contents.clone()),
        ("INT32", None) => input.contents.as_ref().map_or(Vec::new(), |c| {
            c.int_contents.iter().map(|&v| v as i64).collect()
        }),
        (other, _) => {
            return Err(invalid(format!(
                "input \"input_ids\" has datatype {other:?}; allowed: \"INT64\", \"INT32\""
            )));
        }
    };
    check_count(input, ids.len(), count)?;
    Ok(ids)
}

/// `count` ids of `N` little-endian bytes each from an input's raw bytes.
fn raw_ids<const N: usize>(
    input: &InferInputTensor,
    bytes: &[u8],
    count: usize,
    datatype: &str,
    decode: impl Fn([u8; N]) -> i64,
) -> Result<Vec<i64>, DecodeError> {
    let needs = raw_len(input, count, N)?;
    if bytes.len() != needs {
        return Err(invalid(format!(
            "input \"input_ids\": {} raw bytes for shape {:?} of {datatype} (needs {needs})",
            bytes.len(),
            input.shape,
        )));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|b| decode(b.try_into().expect("N bytes")))
        .collect())
}
