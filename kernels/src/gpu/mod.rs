//! The CUDA path (feature `cuda`): one GPU, its stream, cuBLAS, and Tideway's own kernels
//! (`kernels/cuda/*.cu`, compiled at run time with NVRTC for the device's architecture).
//!
//! Everything is loaded at run time (cudarc's dynamic loading): this module builds on machines
//! without CUDA, and [`Gpu::open`] says what is missing where it cannot run. Activations and
//! recurrent state are f32 on the device; weights are f32 or bf16 ([`DeviceLinear`]), products
//! accumulate in f32 (cuBLAS `GemmEx`, `CUBLAS_COMPUTE_32F`: no TF32).
//!
//! Every launch goes to the one stream of the [`Gpu`], so kernels run in issue order and the
//! raw device pointers handed to kernels stay valid: buffers are only freed by their owner.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas};
pub use cudarc::driver::CudaSlice;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

/// The CUDA C sources, in the order they are concatenated into one NVRTC program (later files
/// use the helpers of `common.cu`).
pub const KERNEL_SOURCES: [(&str, &str); 3] = [
    ("common.cu", include_str!("../../cuda/common.cu")),
    ("mamba.cu", include_str!("../../cuda/mamba.cu")),
    ("fla.cu", include_str!("../../cuda/fla.cu")),
];

/// Every `extern "C"` kernel of [`KERNEL_SOURCES`].
pub const KERNELS: [&str; 18] = [
    "embed_rows_f32",
    "embed_rows_bf16",
    "rms_norm",
    "add_inplace",
    "f32_to_bf16",
    "add_bias",
    "mamba_conv_silu",
    "mamba_scan",
    "short_conv",
    "activate",
    "gla_gate",
    "sigmoid_scale",
    "gdn_log_decay",
    "head_normalize",
    "rotary",
    "silu_mul",
    "gla_recurrent",
    "delta_recurrent",
];

/// Longest conv kernel and largest SSM state the Mamba kernels hold in registers
/// (`MAX_CONV`, `MAX_STATE` in mamba.cu).
pub const MAX_CONV: usize = 8;
pub const MAX_STATE: usize = 64;
/// Widest key head the linear-attention recurrences hold (`MAX_DK` in fla.cu), and the
/// widest value head (one thread per value column).
pub const MAX_DK: usize = 256;
pub const MAX_DV: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver library (libcuda.so) could be loaded on this machine")]
    NoDriver,
    #[error(
        "no NVRTC library (libnvrtc.so) could be loaded: it compiles Tideway's CUDA kernels at start; install the CUDA runtime (or pip's nvidia-cuda-nvrtc-cu12) and put it on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    #[error("CUDA driver error: {0}")]
    Driver(String),
    #[error("cuBLAS error: {0}")]
    Blas(String),
    #[error("{0}")]
    Unsupported(String),
}

fn driver(e: cudarc::driver::DriverError) -> GpuError {
    GpuError::Driver(e.to_string())
}

/// The concatenated program NVRTC compiles.
pub fn program_source() -> String {
    KERNEL_SOURCES
        .iter()
        .map(|(name, text)| format!("// ---- {name}\n{text}\n"))
        .collect()
}

/// Compiles every kernel to PTX for `arch` (e.g. `compute_90`; None: NVRTC's default).
pub fn compile_ptx(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::NoNvrtc);
    }
    let options = cudarc::nvrtc::CompileOptions {
        arch,
        // Precise division and square roots, as the CPU path computes them.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(program_source(), options)
        .map_err(|e| GpuError::Compile(format!("{e:?}")))
}

/// The architecture name NVRTC takes for a compute capability.
fn arch_name(major: i32, minor: i32) -> Option<&'static str> {
    Some(match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        _ => return None,
    })
}

/// One GPU: its context, the stream every launch goes to, cuBLAS on that stream, and the
/// compiled kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    pub name: String,
    ordinal: usize,
}

/// A row-major `[rows, cols]` f32 matrix on the device, possibly a column block of a wider one
/// (`ld` floats between rows, starting `offset` floats in).
#[derive(Clone, Copy)]
pub struct DevMat {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl DevMat {
    pub fn dense(gpu: &Gpu, buf: &CudaSlice<f32>, rows: usize, cols: usize) -> Self {
        DevMat {
            ptr: gpu.ptr(buf),
            rows,
            cols,
            ld: cols,
        }
    }

    /// Columns `start..start + cols` of a `[rows, width]` buffer.
    pub fn columns(
        gpu: &Gpu,
        buf: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        start: usize,
        cols: usize,
    ) -> Self {
        DevMat {
            ptr: gpu.ptr(buf) + 4 * start as u64,
            rows,
            cols,
            ld: width,
        }
    }
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(driver)?.max(0) as usize;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let ptx = compile_ptx(arch_name(major, minor))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let mut functions = HashMap::new();
        for name in KERNELS {
            functions.insert(name, module.load_function(name).map_err(driver)?);
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| GpuError::Blas(e.to_string()))?;
        Ok(Gpu {
            name: ctx.name().map_err(driver)?,
            ordinal,
            ctx,
            stream,
            blas,
            functions,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        cudarc::driver::result::mem_get_info().map_err(driver)
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, GpuError> {
        self.stream.clone_htod(data).map_err(driver)
    }

    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(driver)
    }

    pub fn download(&self, buf: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, GpuError> {
        let mut all = self.stream.clone_dtoh(buf).map_err(driver)?;
        all.truncate(len);
        Ok(all)
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver)
    }

    /// The raw device address of a buffer (valid while the buffer lives; see the module docs).
    pub fn ptr<T>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    fn launch(
        &self,
        name: &'static str,
        config: LaunchConfig,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        let function = &self.functions[name];
        let mut builder = self.stream.launch_builder(function);
        for arg in args {
            match arg {
                Arg::Ptr(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: each wrapper below passes the argument list its kernel declares, with
        // device addresses of live buffers sized for the launch.
        unsafe { builder.launch(config) }
            .map(|_| ())
            .map_err(driver)
    }

    fn grid_1d(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `out[i] = table[ids[i]]` for `rows` ids (`ids` on the device).
    pub fn embed_rows(
        &self,
        table: &DeviceMatrix,
        ids: u64,
        rows: usize,
        d: usize,
        out: u64,
    ) -> Result<(), GpuError> {
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (name, table) = match table {
            DeviceMatrix::F32(t) => ("embed_rows_f32", self.ptr(t)),
            DeviceMatrix::Bf16(t) => ("embed_rows_bf16", self.ptr(t)),
        };
        let args = [
            Arg::Ptr(table),
            Arg::Ptr(ids),
            Arg::I32(rows as i32),
            Arg::I32(d as i32),
            Arg::Ptr(out),
        ];
        self.launch(name, config, &args)
    }

    pub fn rms_norm(
        &self,
        x: u64,
        weight: u64,
        rows: usize,
        d: usize,
        eps: f32,
        out: u64,
    ) -> Result<(), GpuError> {
        let threads = d.next_power_of_two().clamp(32, 1024) as u32;
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(weight),
            Arg::I32(rows as i32),
            Arg::I32(d as i32),
            Arg::F32(eps),
            Arg::Ptr(out),
        ];
        self.launch("rms_norm", config, &args)
    }

    /// `r += x` over `n` floats.
    pub fn add_inplace(&self, r: u64, x: u64, n: usize) -> Result<(), GpuError> {
        let args = [Arg::Ptr(r), Arg::Ptr(x), Arg::I64(n as i64)];
        self.launch("add_inplace", Self::grid_1d(n), &args)
    }

    /// `y = bf16(x)` for the `[rows, cols]` matrix `x` (y dense).
    fn to_bf16(&self, x: DevMat, y: u64) -> Result<(), GpuError> {
        let args = [
            Arg::Ptr(x.ptr),
            Arg::I64(x.ld as i64),
            Arg::Ptr(y),
            Arg::I32(x.rows as i32),
            Arg::I32(x.cols as i32),
        ];
        self.launch("f32_to_bf16", Self::grid_1d(x.rows * x.cols), &args)
    }

    fn add_bias(&self, out: u64, bias: u64, rows: usize, cols: usize) -> Result<(), GpuError> {
        let args = [
            Arg::Ptr(out),
            Arg::Ptr(bias),
            Arg::I32(rows as i32),
            Arg::I32(cols as i32),
        ];
        self.launch("add_bias", Self::grid_1d(rows * cols), &args)
    }

    /// Launches kernel `name` on a `grid` of blocks of `block` threads.
    pub fn launch_grid(
        &self,
        name: &'static str,
        grid: (u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        let config = LaunchConfig {
            grid_dim: (grid.0.max(1), grid.1.max(1), 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(name, config, args)
    }

    /// Launches an elementwise kernel over `n` items (one thread each).
    pub fn launch_elementwise(
        &self,
        name: &'static str,
        n: usize,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        self.launch(name, Self::grid_1d(n), args)
    }

    /// A kernel over (channels, segments): `mamba_conv_silu` and `mamba_scan`.
    pub fn launch_per_channel(
        &self,
        name: &'static str,
        channels: usize,
        segments: usize,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        let config = LaunchConfig {
            grid_dim: (channels.div_ceil(128) as u32, segments as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(name, config, args)
    }

    /// `C[m, n] (row-major, ld n) = A[m, k] · Bᵀ` where `B` is a torch `[n, k]` weight, in f32
    /// or bf16 (then `A` is rounded to bf16 into `scratch` first); f32 accumulation.
    pub fn gemm(
        &self,
        a: DevMat,
        weight: &DeviceMatrix,
        n: usize,
        c: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        let (m, k) = (a.rows, a.cols);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a_ptr, a_type, lda, w_ptr, w_type) = match weight {
            DeviceMatrix::F32(w) => (
                a.ptr,
                cudaDataType::CUDA_R_32F,
                a.ld,
                self.ptr(w),
                cudaDataType::CUDA_R_32F,
            ),
            DeviceMatrix::Bf16(w) => {
                // Round the activations to bf16 (dense, ld = k), as a bf16 model computes.
                let buf = scratch.bf16(self, m * k)?;
                let dst = self.ptr(buf);
                self.to_bf16(a, dst)?;
                (
                    dst,
                    cudaDataType::CUDA_R_16BF,
                    k,
                    self.ptr(w),
                    cudaDataType::CUDA_R_16BF,
                )
            }
        };
        // Row-major C = A·Wᵀ is column-major Cᵀ = W·Aᵀ: W (col-major [k, n], ld k) transposed,
        // A (col-major [k, m], ld lda) as is.
        // SAFETY: the pointers are live device buffers of the sizes the shapes say.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w_ptr as *const std::ffi::c_void,
                w_type,
                k as i32,
                a_ptr as *const std::ffi::c_void,
                a_type,
                lda as i32,
                (&beta as *const f32).cast(),
                c as *mut std::ffi::c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| GpuError::Blas(e.to_string()))
    }
}

/// A kernel argument: a device address or a scalar.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Reusable device scratch space (bf16 copies of activations).
#[derive(Default)]
pub struct Scratch {
    bf16: Option<(CudaSlice<u16>, usize)>,
}

impl Scratch {
    fn bf16(&mut self, gpu: &Gpu, len: usize) -> Result<&CudaSlice<u16>, GpuError> {
        if self.bf16.as_ref().is_none_or(|(_, cap)| *cap < len) {
            let buf = gpu.stream.alloc_zeros::<u16>(len.max(1)).map_err(driver)?;
            self.bf16 = Some((buf, len));
        }
        Ok(&self.bf16.as_ref().expect("allocated").0)
    }
}

/// A weight matrix on the device, in f32 or bf16 (raw bf16 words).
pub enum DeviceMatrix {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// Storage precision of the weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl DeviceMatrix {
    /// Uploads `values` (f32 on the host) in `dtype`.
    pub fn upload(gpu: &Gpu, values: &[f32], dtype: WeightDtype) -> Result<Self, GpuError> {
        Ok(match dtype {
            WeightDtype::F32 => DeviceMatrix::F32(gpu.upload(values)?),
            WeightDtype::Bf16 => {
                let words: Vec<u16> = values
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                DeviceMatrix::Bf16(gpu.upload(&words)?)
            }
        })
    }

    pub fn size_bytes(&self) -> usize {
        match self {
            DeviceMatrix::F32(b) => 4 * b.len(),
            DeviceMatrix::Bf16(b) => 2 * b.len(),
        }
    }
}

/// A PyTorch `nn.Linear` on the device: the torch-layout weight `[out, in]` and an f32 bias.
pub struct DeviceLinear {
    weight: DeviceMatrix,
    bias: Option<CudaSlice<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

impl DeviceLinear {
    /// From a torch-layout weight (`[out, in]` row-major, f32 on the host).
    pub fn upload(
        gpu: &Gpu,
        weight: &[f32],
        bias: Option<&[f32]>,
        out_features: usize,
        in_features: usize,
        dtype: WeightDtype,
    ) -> Result<Self, GpuError> {
        assert_eq!(weight.len(), out_features * in_features);
        Ok(DeviceLinear {
            weight: DeviceMatrix::upload(gpu, weight, dtype)?,
            bias: bias.map(|b| gpu.upload(b)).transpose()?,
            out_features,
            in_features,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.len())
    }

    pub fn weight(&self) -> &DeviceMatrix {
        &self.weight
    }

    /// `out[M, out] = x · Wᵀ + b` (`out` dense on the device).
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: DevMat,
        out: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        assert_eq!(x.cols, self.in_features);
        gpu.gemm(x, &self.weight, self.out_features, out, scratch)?;
        if let Some(b) = &self.bias {
            gpu.add_bias(out, gpu.ptr(b), x.rows, self.out_features)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles with NVRTC wherever libnvrtc can be loaded (CI installs pip's
    /// nvidia-cuda-nvrtc-cu12 for this); elsewhere the error says what is missing.
    #[test]
    fn the_kernels_compile_with_nvrtc_or_the_error_says_why_not() {
        match compile_ptx(Some("compute_90")) {
            Ok(ptx) => {
                let text = ptx.to_src();
                eprintln!(
                    "{} kernels compiled to {} bytes of PTX",
                    KERNELS.len(),
                    text.len()
                );
                for name in KERNELS {
                    assert!(
                        text.contains(&format!(".entry {name}(")),
                        "{name} missing from the PTX"
                    );
                }
            }
            Err(GpuError::NoNvrtc) if std::env::var_os("TIDEWAY_REQUIRE_NVRTC").is_none() => {
                eprintln!("libnvrtc not found: kernels not compiled here")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
