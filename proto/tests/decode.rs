//! The request decoders on hand-made requests: each kind decodes, and each malformed or
//! oversized request is refused with the error (and limit) that says why, not a panic.

use std::collections::HashMap;

use tideway_proto::decode::{
    DecodeError, InputKind, ModelInputs, RequestError, RequestLimits, StepInput, kserve, native,
};
use tideway_proto::inference::infer_parameter::ParameterChoice;
use tideway_proto::inference::model_infer_request::InferInputTensor;
use tideway_proto::inference::{InferParameter, ModelInferRequest};
use tideway_proto::tideway::v1::StreamChunk;

const LIMITS: RequestLimits = RequestLimits {
    max_request_tokens: 8,
    max_message_bytes: 1 << 20,
};

fn language() -> ModelInputs<'static> {
    ModelInputs {
        name: "lm",
        kind: InputKind::Language {
            vocab: 10,
            width: 10,
        },
    }
}

fn request(name: &str, datatype: &str, shape: &[i64], raw: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn invalid(result: Result<StepInput, DecodeError>) -> String {
    match result {
        Err(DecodeError::Invalid(message)) => message,
        other => panic!("expected an invalid-argument refusal, got {other:?}"),
    }
}

#[test]
fn raw_int64_ids_decode_into_tokens() {
    let ids: Vec<u8> = [1i64, 9, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let step = kserve::infer_input(
        &request("input_ids", "INT64", &[1, 3], ids),
        &language(),
        &LIMITS,
    );
    assert_eq!(step.unwrap(), StepInput::Tokens(vec![1, 9, 0]));
}

#[test]
fn a_shape_beyond_any_message_is_refused_not_overflowed() {
    // 2^61 INT64 values need 2^64 bytes: the byte count overflows a usize.
    let unlimited = RequestLimits {
        max_request_tokens: usize::MAX,
        ..LIMITS
    };
    let message = invalid(kserve::infer_input(
        &request("input_ids", "INT64", &[1 << 61], Vec::new()),
        &language(),
        &unlimited,
    ));
    assert!(
        message.contains("more values than a message can hold"),
        "{message}"
    );
    let features = ModelInputs {
        name: "f",
        kind: InputKind::Features { check_rate: None },
    };
    let message = invalid(kserve::infer_input(
        &request("input", "FP32", &[2, 1 << 62], Vec::new()),
        &features,
        &LIMITS,
    ));
    assert!(message.contains("channels"), "{message}");
    let message = invalid(kserve::infer_input(
        &request("input", "FP32", &[4, (1 << 31) - 1], vec![0; 16]),
        &features,
        &LIMITS,
    ));
    assert!(message.contains("16 raw bytes"), "{message}");
}

#[test]
fn ids_over_the_request_limit_or_the_vocabulary_are_refused() {
    let ids: Vec<u8> = (0..9i32).flat_map(|v| v.to_le_bytes()).collect();
    let err = kserve::infer_input(
        &request("input_ids", "INT32", &[9], ids),
        &language(),
        &LIMITS,
    )
    .unwrap_err();
    assert_eq!(err.limit(), Some("request_tokens"));
    assert!(err.to_string().contains("--max-request-tokens"), "{err}");
    let chunk = StreamChunk {
        tokens: vec![3, 10],
        ..Default::default()
    };
    match native::chunk_input(&chunk, &language(), &LIMITS) {
        Err(DecodeError::Request(RequestError::TokenOutOfRange {
            id: 10,
            position: 1,
            ..
        })) => {}
        other => panic!("expected token 10 out of range, got {other:?}"),
    }
}

#[test]
fn a_sample_rate_is_checked_whole_before_narrowing() {
    let seen = std::cell::Cell::new(0u64);
    let check = |rate: u64| {
        seen.set(rate);
        if rate <= 48_000 {
            Ok(rate as u32)
        } else {
            Err(format!("{rate} Hz is too high"))
        }
    };
    let audio = ModelInputs {
        name: "kws",
        kind: InputKind::Features {
            check_rate: Some(&check),
        },
    };
    let mut r = request("audio", "INT16", &[2], vec![0; 4]);
    r.parameters = HashMap::from([(
        "sample_rate".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Uint64Param((1 << 32) + 1)),
        },
    )]);
    let err = kserve::infer_input(&r, &audio, &LIMITS).unwrap_err();
    assert_eq!(seen.get(), (1 << 32) + 1);
    assert_eq!(err.limit(), Some("sample_rate"));
}

#[test]
fn a_chunk_carries_one_kind_of_whole_input() {
    let two_kinds = StreamChunk {
        tokens: vec![1],
        text: "a".into(),
        ..Default::default()
    };
    assert!(invalid(native::chunk_input(&two_kinds, &language(), &LIMITS)).contains("one kind"));
    let ragged = StreamChunk {
        frames: vec![0.0; 5],
        channels: 2,
        ..Default::default()
    };
    assert!(invalid(native::chunk_input(&ragged, &language(), &LIMITS)).contains("whole frames"));
    let frames = StreamChunk {
        frames: vec![0.0; 6],
        channels: 3,
        ..Default::default()
    };
    assert_eq!(
        native::chunk_input(&frames, &language(), &LIMITS).unwrap(),
        StepInput::Frames {
            values: vec![0.0; 6],
            width: 3
        }
    );
}

fn with_params(mut r: ModelInferRequest, params: &[(&str, ParameterChoice)]) -> ModelInferRequest {
    for (k, v) in params {
        r.parameters.insert(
            k.to_string(),
            InferParameter {
                parameter_choice: Some(v.clone()),
            },
        );
    }
    r
}

#[test]
fn a_generation_request_decodes_its_prompt_and_settings() {
    use tideway_proto::decode::generate::{generate_request, is_generation};
    let mut text = b"\x05\x00\x00\x00Hello".to_vec();
    let r = with_params(
        request("text_input", "BYTES", &[1], text.clone()),
        &[
            ("generate", ParameterChoice::BoolParam(true)),
            ("max_tokens", ParameterChoice::Int64Param(40)),
            ("temperature", ParameterChoice::DoubleParam(0.5)),
            ("top_k", ParameterChoice::Uint64Param(3)),
            ("seed", ParameterChoice::Int64Param(9)),
            ("ignore_eos", ParameterChoice::BoolParam(true)),
            (
                "stop",
                ParameterChoice::StringParam("[\"a\", \"bc\"]".into()),
            ),
        ],
    );
    assert!(is_generation(&r).unwrap());
    let g = generate_request(&r, |_| panic!("a text prompt has no ids")).unwrap();
    assert_eq!(g.model, "m");
    assert_eq!((g.text.as_str(), g.max_tokens, g.top_k), ("Hello", 40, 3));
    assert_eq!(
        (g.temperature, g.seed, g.ignore_eos),
        (Some(0.5), Some(9), true)
    );
    assert_eq!(g.stop, vec!["a".to_string(), "bc".to_string()]);
    assert_eq!(g.top_p, None);

    let ids = request("input_ids", "INT64", &[2], vec![0; 16]);
    let g = generate_request(&ids, |_| Ok(vec![4, 5])).unwrap();
    assert_eq!((g.tokens, g.text), (vec![4, 5], String::new()));
    assert!(!is_generation(&ids).unwrap());

    // Malformed: a length past the bytes, a bad stop, a negative count, a text as temperature.
    text[0] = 9;
    let e = generate_request(&request("text_input", "BYTES", &[1], text), |_| Ok(vec![]));
    assert!(matches!(e, Err(DecodeError::Invalid(m)) if m.contains("state 9 bytes but hold 5")));
    for (key, value, says) in [
        (
            "stop",
            ParameterChoice::StringParam("[1]".into()),
            "JSON array of strings",
        ),
        (
            "stop",
            ParameterChoice::Int64Param(1),
            "must be a string_param",
        ),
        (
            "max_tokens",
            ParameterChoice::Int64Param(-1),
            "whole number ≥ 0",
        ),
        (
            "temperature",
            ParameterChoice::StringParam("hot".into()),
            "must be a number",
        ),
    ] {
        let r = with_params(
            request("input_ids", "INT64", &[1], vec![0; 8]),
            &[(key, value)],
        );
        let e = generate_request(&r, |_| Ok(vec![1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
}
