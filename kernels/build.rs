//! With feature `cuda`: compiles the host emulator of the CUDA kernels (`emu/emu.cpp`, which
//! includes `cuda/*.cu`), so that tests run the GPU models' kernels on machines without a GPU.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for file in [
        "emu/emu.cpp",
        "cuda/common.cu",
        "cuda/mamba.cu",
        "cuda/fla.cu",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    #[cfg(feature = "cuda")]
    cc::Build::new()
        .cpp(true)
        .file("emu/emu.cpp")
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2)
        .compile("tideway_cuda_emu");
}
