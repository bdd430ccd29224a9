//! Compiles the `.proto` files with protox (pure Rust: no system `protoc`) and generates the
//! prost messages and tonic clients/servers. The encoded descriptor set is written to OUT_DIR
//! for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tideway/v1/tideway.proto",
        "proto/inference/grpc_service.proto",
        "proto/inference/model_config.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // A stream chunk's generation settings are rare: boxed, so that every chunk stays small.
        .boxed(".tideway.v1.StreamChunk.generate")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
