//! A generation asked over the inference protocol, decoded into the native `GenerateRequest`.
//!
//! As Triton serves decoupled models, a `ModelStreamInfer` request with the parameter
//! `generate` (bool) true is answered by several responses: one per new token (`output_ids`,
//! and `text_output` where the model has a tokenizer), then a last one flagged
//! `triton_final_response`. The prompt is `input_ids` (INT64 or INT32) or `text_input` (BYTES,
//! one element); the sampling settings are request parameters named as `GenerateRequest`'s
//! fields: `max_tokens`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`,
//! `presence_penalty`, `seed`, `stop` (a string, or a JSON array of strings), `ignore_eos`.

use std::collections::HashMap;

use crate::inference::infer_parameter::ParameterChoice;
use crate::inference::{InferParameter, ModelInferRequest};
use crate::tideway::v1::GenerateRequest;

use super::kserve::{bool_param, param};
use super::{DecodeError, invalid};

/// Whether `request` asks for a generation (the `generate` parameter).
pub fn is_generation(request: &ModelInferRequest) -> Result<bool, DecodeError> {
    bool_param(&request.parameters, "generate")
}

/// The generation `request` asks for; `ids` decodes its `input_ids` (the server's decoder,
/// with the model's vocabulary and limits) when the prompt is not text.
pub fn generate_request(
    request: &ModelInferRequest,
    ids: impl FnOnce(&ModelInferRequest) -> Result<Vec<u32>, DecodeError>,
) -> Result<GenerateRequest, DecodeError> {
    let map = &request.parameters;
    let mut out = GenerateRequest {
        model: request.model_name.clone(),
        ..Default::default()
    };
    match request.inputs.iter().position(|i| i.name == "text_input") {
        Some(i) => {
            if request.inputs.len() != 1 {
                return Err(invalid(
                    "give the prompt as \"text_input\" or as \"input_ids\", not both",
                ));
            }
            out.text = text_input(request, i)?;
        }
        None => out.tokens = ids(request)?.into_iter().map(i64::from).collect(),
    }
    out.max_tokens = match unsigned(map, "max_tokens")? {
        Some(n) => u32::try_from(n).map_err(|_| invalid(format!("max_tokens {n} is too large")))?,
        None => 0,
    };
    out.temperature = float(map, "temperature")?;
    out.top_k = match unsigned(map, "top_k")? {
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        None => 0,
    };
    out.top_p = float(map, "top_p")?;
    out.min_p = float(map, "min_p")?.unwrap_or(0.0);
    out.repetition_penalty = float(map, "repetition_penalty")?;
    out.presence_penalty = float(map, "presence_penalty")?.unwrap_or(0.0);
    out.seed = unsigned(map, "seed")?;
    out.ignore_eos = bool_param(map, "ignore_eos")?;
    out.stop = match param(map, "stop") {
        None => Vec::new(),
        Some(ParameterChoice::StringParam(s)) if s.trim_start().starts_with('[') => {
            serde_json::from_str::<Vec<String>>(s).map_err(|e| {
                invalid(format!(
                    "parameter \"stop\" is not a JSON array of strings ({e}): give one string, or [\"a\", \"b\"]"
                ))
            })?
        }
        Some(ParameterChoice::StringParam(s)) => vec![s.clone()],
        Some(other) => {
            return Err(invalid(format!(
                "parameter \"stop\" must be a string_param (one stop string, or a JSON array of them), found {other:?}"
            )));
        }
    };
    Ok(out)
}

/// The one BYTES element of input `i` (raw: a 4-byte little-endian length, then the bytes).
fn text_input(request: &ModelInferRequest, i: usize) -> Result<String, DecodeError> {
    let input = &request.inputs[i];
    if input.datatype != "BYTES" {
        return Err(invalid(format!(
            "input \"text_input\" must be BYTES, found {:?}",
            input.datatype
        )));
    }
    if input.shape.iter().product::<i64>() != 1 {
        return Err(invalid(format!(
            "input \"text_input\" must hold one element (shape [1]), found shape {:?}",
            input.shape
        )));
    }
    let bytes: Vec<u8> = if request.raw_input_contents.is_empty() {
        let contents = input.contents.as_ref().map(|c| &c.bytes_contents);
        match contents.map(|c| c.as_slice()) {
            Some([one]) => one.clone(),
            _ => return Err(invalid("input \"text_input\" has no contents")),
        }
    } else {
        let raw = request.raw_input_contents.get(i).ok_or_else(|| {
            invalid(format!(
                "{} inputs but {} raw_input_contents",
                request.inputs.len(),
                request.raw_input_contents.len()
            ))
        })?;
        let len = raw
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| invalid("input \"text_input\": raw BYTES shorter than their length"))?;
        match raw.get(4..) {
            Some(rest) if rest.len() == len => rest.to_vec(),
            _ => {
                return Err(invalid(format!(
                    "input \"text_input\": raw BYTES state {len} bytes but hold {}",
                    raw.len().saturating_sub(4)
                )));
            }
        }
    };
    String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "input \"text_input\" is not UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn float(map: &HashMap<String, InferParameter>, key: &str) -> Result<Option<f32>, DecodeError> {
    Ok(match param(map, key) {
        None => None,
        Some(ParameterChoice::DoubleParam(v)) => Some(*v as f32),
        Some(ParameterChoice::Int64Param(v)) => Some(*v as f32),
        Some(ParameterChoice::Uint64Param(v)) => Some(*v as f32),
        Some(other) => {
            return Err(invalid(format!(
                "parameter {key:?} must be a number (double_param or int64_param), found {other:?}"
            )));
        }
    })
}

fn unsigned(map: &HashMap<String, InferParameter>, key: &str) -> Result<Option<u64>, DecodeError> {
    Ok(match param(map, key) {
        None => None,
        Some(ParameterChoice::Uint64Param(v)) => Some(*v),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Some(*v as u64),
        Some(other) => {
            return Err(invalid(format!(
                "parameter {key:?} must be a whole number ≥ 0 (int64_param or uint64_param), found {other:?}"
            )));
        }
    })
}
