//! What the request-decoder targets share: the models a request is decoded for, small limits
//! (so that the fuzzer reaches them), and the properties every decoded step keeps.

use tideway_proto::decode::{InputKind, ModelInputs, RequestLimits, StepInput};

pub const LIMITS: RequestLimits = RequestLimits {
    max_request_tokens: 64,
    max_message_bytes: 64 * 1024,
};

const VOCAB: usize = 50;
const WIDTH: usize = 50;
const RATES: std::ops::RangeInclusive<u64> = 8_000..=48_000;

/// Runs `f` for a language model and for a feature model with an audio front end.
pub fn for_each_model(mut f: impl FnMut(&ModelInputs)) {
    f(&ModelInputs {
        name: "language",
        kind: InputKind::Language {
            vocab: VOCAB,
            width: WIDTH,
        },
    });
    let check = |rate: u64| {
        if RATES.contains(&rate) {
            Ok(rate as u32)
        } else {
            Err(format!("sample rate {rate} Hz is outside {RATES:?}"))
        }
    };
    f(&ModelInputs {
        name: "audio",
        kind: InputKind::Features {
            check_rate: Some(&check),
        },
    });
}

/// A decoded step holds only what the model takes, within the limits.
pub fn check_step(step: &StepInput, model: &ModelInputs) {
    match (step, &model.kind) {
        (StepInput::Tokens(ids), InputKind::Language { .. }) => {
            assert!(ids.len() <= LIMITS.max_request_tokens);
            assert!(ids.iter().all(|&id| (id as usize) < VOCAB));
            assert!(ids.len() * WIDTH * 4 + 1024 <= LIMITS.max_message_bytes);
        }
        (StepInput::Tokens(ids), InputKind::Features { .. }) => assert!(ids.is_empty()),
        (StepInput::Frames { values, width }, _) => {
            assert!(*width > 0);
            assert_eq!(values.len() % *width as usize, 0);
            assert!(values.len() / *width as usize <= LIMITS.max_request_tokens);
        }
        (StepInput::Audio { rate, .. }, _) => assert!(*rate > 0),
        (StepInput::Text(_), _) => {}
    }
}
