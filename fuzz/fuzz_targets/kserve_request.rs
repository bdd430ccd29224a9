//! Any bytes as an inference-protocol `ModelInferRequest` (protobuf), decoded for a language
//! model and for a feature model with an audio front end. Whatever the request, decoding
//! answers a step or an error, and a step holds what the model and the limits allow; the
//! generation decoder answers a request or an error.
#![no_main]

mod requests;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tideway_proto::decode::{generate, kserve};
use tideway_proto::inference::ModelInferRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ModelInferRequest::decode(data) else {
        return;
    };
    let _ = kserve::sequence_id(&request.parameters);
    let _ = kserve::bool_param(&request.parameters, "sequence_start");
    if generate::is_generation(&request).unwrap_or(true) {
        let _ = generate::generate_request(&request, |_| Ok(vec![1, 2]));
    }
    requests::for_each_model(|model| {
        if let Ok(step) = kserve::infer_input(&request, model, &requests::LIMITS) {
            requests::check_step(&step, model);
        }
    });
});
