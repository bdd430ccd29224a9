//! Any bytes as a `tideway.v1` stream chunk (protobuf), decoded for a language model and for
//! a feature model with an audio front end. Whatever the chunk, decoding answers a step or an
//! error, and a step holds what the model and the limits allow.
#![no_main]

mod requests;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tideway_proto::decode::native;
use tideway_proto::tideway::v1::StreamChunk;

fuzz_target!(|data: &[u8]| {
    let Ok(chunk) = StreamChunk::decode(data) else {
        return;
    };
    requests::for_each_model(|model| {
        if let Ok(step) = native::chunk_input(&chunk, model, &requests::LIMITS) {
            requests::check_step(&step, model);
        }
    });
});
