//! Generation on the inference protocol, as Triton serves decoupled models: a
//! `ModelStreamInfer` request with the parameter `generate` true is answered by one response
//! per new token (`output_ids`, INT64 `[n]`; `text_output`, BYTES `[1]`, where the model has a
//! tokenizer), then a last one without outputs that carries `triton_final_response` true and
//! the finish (`finish_reason`, `prompt_tokens`, `completion_tokens`, `seed`). Every response
//! carries `triton_final_response`, so tritonclient's stream callback knows the last one.
//! The request decodes into the native `GenerateRequest` (`tideway_proto::decode::generate`)
//! and runs as `tideway.v1.Generation` does (`generation.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use tideway_proto::decode::{StepInput, generate, kserve};
use tideway_proto::inference as ipb;
use tideway_proto::inference::infer_parameter::ParameterChoice;
use tideway_proto::tideway::v1 as pb;

use super::auth::Identity;
use super::engine::Engine;
use super::generation::{Asked, drive};
use super::requests::Refuse;
use super::served::ServedKind;

/// The responses of one generation, as the native API makes them.
pub type Generated = mpsc::Receiver<Result<pb::GenerateResponse, Status>>;

/// Checks `request` (a generation) and starts it.
pub fn start(
    engine: &Arc<Engine>,
    owner: &Identity,
    request: &ipb::ModelInferRequest,
) -> Result<Generated, Status> {
    let model = engine.model_index(&request.model_name);
    let native = generate::generate_request(request, |request| {
        let Some(model) = model else {
            return Ok(Vec::new()); // Asked::parse names the unknown model
        };
        let served = &engine.models[model as usize];
        let limits = engine.config.limits.requests();
        match served.with_inputs(|inputs| kserve::infer_input(request, inputs, &limits))? {
            StepInput::Tokens(ids) => Ok(ids),
            _ => Ok(Vec::new()), // a feature model: Asked::parse refuses it by name
        }
    })
    .map_err(|e| e.refuse(&engine.board))?;
    let asked = Asked::parse(engine, native)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(drive(engine.clone(), owner.name.clone(), asked, tx));
    Ok(rx)
}

/// Whether model `name`'s generations answer text too.
pub fn has_text(engine: &Engine, name: &str) -> bool {
    engine.model_index(name).is_some_and(|m| {
        matches!(
            &engine.models[m as usize].kind,
            ServedKind::Language {
                tokenizer: Some(_),
                ..
            }
        )
    })
}

/// One native response as an inference-protocol response to request `id`.
pub fn response(
    id: &str,
    model_name: &str,
    has_text: bool,
    generated: pb::GenerateResponse,
) -> ipb::ModelInferResponse {
    use ipb::model_infer_response::InferOutputTensor;
    let mut parameters = HashMap::new();
    let param = |choice| ipb::InferParameter {
        parameter_choice: Some(choice),
    };
    let (mut outputs, mut raw) = (Vec::new(), Vec::new());
    match &generated.finished {
        Some(finished) => {
            parameters.insert(
                "finish_reason".to_string(),
                param(ParameterChoice::StringParam(finished.finish_reason.clone())),
            );
            for (key, value) in [
                ("prompt_tokens", finished.prompt_tokens as u64),
                ("completion_tokens", finished.completion_tokens as u64),
                ("seed", finished.seed),
            ] {
                parameters.insert(key.to_string(), param(ParameterChoice::Uint64Param(value)));
            }
        }
        None => {
            outputs.push(InferOutputTensor {
                name: "output_ids".into(),
                datatype: "INT64".into(),
                shape: vec![generated.tokens.len() as i64],
                ..Default::default()
            });
            raw.push(
                generated
                    .tokens
                    .iter()
                    .flat_map(|t| t.to_le_bytes())
                    .collect(),
            );
            if has_text {
                outputs.push(InferOutputTensor {
                    name: "text_output".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                });
                let text = generated.text.as_bytes();
                let mut bytes = (text.len() as u32).to_le_bytes().to_vec();
                bytes.extend_from_slice(text);
                raw.push(bytes);
            }
        }
    }
    parameters.insert(
        "triton_final_response".to_string(),
        param(ParameterChoice::BoolParam(generated.finished.is_some())),
    );
    ipb::ModelInferResponse {
        model_name: model_name.to_string(),
        model_version: "1".into(),
        id: id.to_string(),
        parameters,
        outputs,
        raw_output_contents: raw,
    }
}
