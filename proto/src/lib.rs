//! Tideway's gRPC APIs, generated from `proto/` at build time.
//!
//! - [`tideway::v1`]: the native API (`Streams`, `Models`, `Admin`);
//! - [`inference`]: the Open Inference Protocol (KServe v2) service with Triton's extensions,
//!   wire-compatible with `tritonclient[grpc]`;
//! - [`decode`]: both APIs' requests decoded and checked into the engine's [`decode::StepInput`].

pub mod decode;

pub mod tideway {
    pub mod v1 {
        tonic::include_proto!("tideway.v1");
    }
}

pub mod inference {
    tonic::include_proto!("inference");
}

/// The encoded `FileDescriptorSet` of every service here, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
