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
//!
//! Length: ~1000 lines of code, the whole device seam (device and stream, buffers, cuBLAS
//! products, kernel launches with their argument checks, the emulator switch) that every GPU
//! model goes through; splitting buffers and products into their own files is the next step
//! when this module is touched again.

pub mod collective;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas};
use cudarc::driver::CudaSlice;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

/// The CUDA C sources, in the order they are concatenated into one NVRTC program (later files
/// use the helpers of `common.cu`).
pub const KERNEL_SOURCES: [(&str, &str); 4] = [
    ("common.cu", include_str!("../../cuda/common.cu")),
    ("mamba.cu", include_str!("../../cuda/mamba.cu")),
    ("fla.cu", include_str!("../../cuda/fla.cu")),
    ("lmu.cu", include_str!("../../cuda/lmu.cu")),
];

/// Every `extern "C"` kernel of [`KERNEL_SOURCES`].
pub const KERNELS: [&str; 38] = [
    "embed_rows_f32",
    "embed_rows_bf16",
    "rms_norm",
    "add_inplace",
    "f32_to_bf16_split",
    "add_halves",
    "add_bias",
    "mamba_conv_silu",
    "mamba_conv_silu_rows",
    "mamba_conv_window",
    "mamba_scan",
    "mamba_chunk_ends",
    "mamba_chunk_carry",
    "short_conv",
    "activate",
    "gla_gate",
    "sigmoid_scale",
    "gdn_log_decay",
    "head_normalize",
    "rotary",
    "silu_mul",
    "gla_recurrent",
    "gla_chunk_ends",
    "delta_recurrent",
    "delta_chunk_ends",
    "delta_chunk_carry",
    "mul_inplace",
    "hedgehog",
    "dpfp",
    "sum_normalize",
    "linear_attn_normalize",
    "frame_unroll",
    "delay_frame",
    "affine_channels",
    "gelu",
    "lif_fire",
    "lmu_memory",
    "concat_rows",
];

/// Longest conv kernel the conv kernels hold in registers (`MAX_CONV` in mamba.cu), and the
/// largest SSM state the scan's blocks hold (one thread per state index, up to 1024).
pub const MAX_CONV: usize = 8;
pub const MAX_STATE: usize = 1024;
/// Widest key head the linear-attention recurrences hold (one thread per key channel and
/// value column, a block holding at least one column), and the widest value head.
pub const MAX_DK: usize = 1024;
pub const MAX_DV: usize = 1 << 16;

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

/// [`compile_ptx`], once per architecture in a process (every model opens its own [`Gpu`]).
fn cached_ptx(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    static CACHE: std::sync::Mutex<Vec<(Option<&'static str>, String)>> =
        std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE
        .lock()
        .map_err(|_| GpuError::Compile("PTX cache poisoned".into()))?;
    if let Some((_, text)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ok(cudarc::nvrtc::Ptx::from_src(text.clone()));
    }
    let text = compile_ptx(arch)?.to_src();
    cache.push((arch, text.clone()));
    Ok(cudarc::nvrtc::Ptx::from_src(text))
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
/// compiled kernels; or the host emulator of the same kernels (tests without a GPU).
pub struct Gpu {
    backend: Backend,
    pub name: String,
    ordinal: usize,
    work: WorkCounters,
}

/// What a [`Gpu`] has been asked to do so far: the host-side work behind each forward (every
/// item is at least one driver call; at batch 1 their latency, not the device, bounds decode).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GpuWork {
    /// Tideway's kernels launched.
    pub kernels: u64,
    /// cuBLAS products.
    pub gemms: u64,
    /// Device allocations (each freed later: a second call).
    pub allocations: u64,
    /// Copies between host and device.
    pub copies: u64,
}

impl std::ops::Sub for GpuWork {
    type Output = GpuWork;
    fn sub(self, before: GpuWork) -> GpuWork {
        GpuWork {
            kernels: self.kernels - before.kernels,
            gemms: self.gemms - before.gemms,
            allocations: self.allocations - before.allocations,
            copies: self.copies - before.copies,
        }
    }
}

#[derive(Default)]
struct WorkCounters {
    kernels: AtomicU64,
    gemms: AtomicU64,
    allocations: AtomicU64,
    copies: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

enum Backend {
    Cuda {
        /// Kept alive for the stream, cuBLAS and the module.
        _ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        blas: CudaBlas,
        functions: HashMap<&'static str, CudaFunction>,
    },
    /// `kernels/emu/emu.cpp`: the CUDA sources run on the host, buffers in host memory.
    Emulated,
}

/// Device memory: a CUDA allocation, or host memory standing in for it on the emulator.
pub struct DeviceBuffer<T> {
    inner: BufferInner<T>,
}

enum BufferInner<T> {
    Cuda(CudaSlice<T>),
    Host(Vec<T>),
}

impl<T> DeviceBuffer<T> {
    /// The CUDA allocation (None on the emulator).
    pub(crate) fn cuda_slice_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        match &mut self.inner {
            BufferInner::Cuda(b) => Some(b),
            BufferInner::Host(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        match &self.inner {
            BufferInner::Cuda(b) => b.len(),
            BufferInner::Host(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

unsafe extern "C" {
    fn tideway_emu_launch(
        name: *const std::ffi::c_char,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        params: *const *const std::ffi::c_void,
        sizes: *const u32,
        count: u32,
    ) -> i32;
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
    pub fn dense(gpu: &Gpu, buf: &DeviceBuffer<f32>, rows: usize, cols: usize) -> Self {
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
        buf: &DeviceBuffer<f32>,
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
    /// How many CUDA devices this machine has.
    pub fn device_count() -> Result<usize, GpuError> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        Ok(CudaContext::device_count().map_err(driver)?.max(0) as usize)
    }

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
        let ptx = cached_ptx(arch_name(major, minor))?;
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
            work: WorkCounters::default(),
            backend: Backend::Cuda {
                _ctx: ctx,
                stream,
                blas,
                functions,
            },
        })
    }

    /// The host emulator of the kernels (`kernels/emu/emu.cpp`): the GPU models' whole code
    /// path on machines without a GPU, for tests. Products are computed on the host with the
    /// same operand layout and precision as the cuBLAS calls.
    pub fn emulated() -> Self {
        Gpu {
            backend: Backend::Emulated,
            name: "host emulator".into(),
            ordinal: 0,
            work: WorkCounters::default(),
        }
    }

    /// The compute stream every launch goes to (None on the emulator).
    pub(crate) fn cuda_stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.backend {
            Backend::Cuda { stream, .. } => Some(stream),
            Backend::Emulated => None,
        }
    }

    /// The work issued so far (subtract two readings for one forward's).
    pub fn work(&self) -> GpuWork {
        let w = &self.work;
        GpuWork {
            kernels: w.kernels.load(Ordering::Relaxed),
            gemms: w.gemms.load(Ordering::Relaxed),
            allocations: w.allocations.load(Ordering::Relaxed),
            copies: w.copies.load(Ordering::Relaxed),
        }
    }

    pub fn is_emulated(&self) -> bool {
        matches!(self.backend, Backend::Emulated)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Free and total device memory, in bytes (the emulator claims 8 GiB).
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        match &self.backend {
            Backend::Cuda { .. } => cudarc::driver::result::mem_get_info().map_err(driver),
            Backend::Emulated => Ok((8 << 30, 8 << 30)),
        }
    }

    pub fn upload<T: cudarc::driver::DeviceRepr + Clone>(
        &self,
        data: &[T],
    ) -> Result<DeviceBuffer<T>, GpuError> {
        count(&self.work.allocations);
        count(&self.work.copies);
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.clone_htod(data).map_err(driver)?)
            }
            Backend::Emulated => BufferInner::Host(data.to_vec()),
        };
        Ok(DeviceBuffer { inner })
    }

    /// `len` zeros (at least one element, so that every buffer has an address).
    pub fn zeros_of<T>(&self, len: usize) -> Result<DeviceBuffer<T>, GpuError>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone,
    {
        let len = len.max(1);
        count(&self.work.allocations);
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.alloc_zeros::<T>(len).map_err(driver)?)
            }
            Backend::Emulated => BufferInner::Host(vec![T::default(); len]),
        };
        Ok(DeviceBuffer { inner })
    }

    pub fn zeros(&self, len: usize) -> Result<DeviceBuffer<f32>, GpuError> {
        self.zeros_of::<f32>(len)
    }

    /// Sets elements `range` of `buf` to zero.
    pub fn zero_range(
        &self,
        buf: &mut DeviceBuffer<f32>,
        range: std::ops::Range<usize>,
    ) -> Result<(), GpuError> {
        match (&self.backend, &mut buf.inner) {
            (Backend::Cuda { stream, .. }, BufferInner::Cuda(b)) => {
                let mut view = b.slice_mut(range);
                stream.memset_zeros(&mut view).map_err(driver)
            }
            (_, BufferInner::Host(v)) => {
                v[range].fill(0.0);
                Ok(())
            }
            (Backend::Emulated, BufferInner::Cuda(_)) => {
                unreachable!("a CUDA buffer on the emulator")
            }
        }
    }

    pub fn download(&self, buf: &DeviceBuffer<f32>, len: usize) -> Result<Vec<f32>, GpuError> {
        count(&self.work.copies);
        let mut all = match (&self.backend, &buf.inner) {
            (Backend::Cuda { stream, .. }, BufferInner::Cuda(b)) => {
                stream.clone_dtoh(b).map_err(driver)?
            }
            (_, BufferInner::Host(v)) => v.clone(),
            (Backend::Emulated, BufferInner::Cuda(_)) => {
                unreachable!("a CUDA buffer on the emulator")
            }
        };
        all.truncate(len);
        Ok(all)
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        match &self.backend {
            Backend::Cuda { stream, .. } => stream.synchronize().map_err(driver),
            Backend::Emulated => Ok(()),
        }
    }

    /// The raw device address of a buffer (valid while the buffer lives; see the module docs).
    pub fn ptr<T>(&self, buf: &DeviceBuffer<T>) -> u64 {
        match (&self.backend, &buf.inner) {
            (Backend::Cuda { stream, .. }, BufferInner::Cuda(b)) => {
                let (ptr, _sync) = b.device_ptr(stream);
                ptr
            }
            (_, BufferInner::Host(v)) => v.as_ptr() as u64,
            (Backend::Emulated, BufferInner::Cuda(_)) => {
                unreachable!("a CUDA buffer on the emulator")
            }
        }
    }

    fn launch(
        &self,
        name: &'static str,
        config: LaunchConfig,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        count(&self.work.kernels);
        let (stream, functions) = match &self.backend {
            Backend::Cuda {
                stream, functions, ..
            } => (stream, functions),
            Backend::Emulated => return emulated_launch(name, config, args),
        };
        let function = &functions[name];
        let mut builder = stream.launch_builder(function);
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
        let (name, table) = match table {
            DeviceMatrix::F32(t) => ("embed_rows_f32", self.ptr(t)),
            DeviceMatrix::Bf16(t) => ("embed_rows_bf16", self.ptr(t)),
        };
        self.launch_rows(name, table, ids, rows, d, out)
    }

    /// `out[i] = x[ids[i]]` for `rows` ids, rows `d` floats wide (all on the device): the
    /// embedding's gather over any f32 matrix.
    pub fn gather_rows(
        &self,
        x: u64,
        ids: u64,
        rows: usize,
        d: usize,
        out: u64,
    ) -> Result<(), GpuError> {
        self.launch_rows("embed_rows_f32", x, ids, rows, d, out)
    }

    fn launch_rows(
        &self,
        name: &'static str,
        table: u64,
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

    /// A kernel over (channels, segments): `mamba_conv_silu`.
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

    /// A kernel over (channels, rows, segments): `mamba_conv_silu_rows`. `rows` (a segment's
    /// longest) becomes at most 65535 row blocks, the grid's limit; the kernel strides.
    pub fn launch_per_channel_row(
        &self,
        name: &'static str,
        channels: usize,
        rows: usize,
        segments: usize,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        let config = LaunchConfig {
            grid_dim: (
                channels.div_ceil(128) as u32,
                rows.clamp(1, 65535) as u32,
                segments as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(name, config, args)
    }

    /// `C[m, n] (row-major, ld n) = A[m, k] · Bᵀ` where `B` is a torch `[n, k]` weight, in f32
    /// or bf16; f32 accumulation. With bf16 weights the activations are split into two bf16
    /// matrices (high and low halves, `f32_to_bf16_split`) stacked into one product that reads
    /// the weights once, and its two halves are summed: the result keeps the f32 activations
    /// to ~16 bits (rounding them to bf16 alone cost 2e-3 relative error on the logits).
    pub fn gemm(
        &self,
        a: DevMat,
        weight: &DeviceMatrix,
        n: usize,
        c: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        let (m, k) = (a.rows, a.cols);
        match weight {
            DeviceMatrix::F32(w) => self.gemm_raw(a.ptr, a.ld, false, m, self.ptr(w), n, k, c),
            DeviceMatrix::Bf16(w) => {
                let (split, halves) = scratch.bf16_split(self, m * k, m * n)?;
                let (split, halves) = (self.ptr(split), self.ptr(halves));
                let args = [
                    Arg::Ptr(a.ptr),
                    Arg::I64(a.ld as i64),
                    Arg::Ptr(split),
                    Arg::I32(m as i32),
                    Arg::I32(k as i32),
                ];
                self.launch("f32_to_bf16_split", Self::grid_1d(m * k), &args)?;
                self.gemm_raw(split, k, true, 2 * m, self.ptr(w), n, k, halves)?;
                let args = [Arg::Ptr(halves), Arg::I64((m * n) as i64), Arg::Ptr(c)];
                self.launch("add_halves", Self::grid_1d(m * n), &args)
            }
        }
    }

    /// `C[m, n] = A[m, k] · W[n, k]ᵀ` on device addresses: A's rows `lda` elements apart, A and
    /// W both bf16 words (`bf16`) or both f32; C f32, dense.
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        a_ptr: u64,
        lda: usize,
        bf16: bool,
        m: usize,
        w_ptr: u64,
        n: usize,
        k: usize,
        c: u64,
    ) -> Result<(), GpuError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dtype = match bf16 {
            true => cudaDataType::CUDA_R_16BF,
            false => cudaDataType::CUDA_R_32F,
        };
        let (a_type, w_type) = (dtype, dtype);
        count(&self.work.gemms);
        let blas_handle = match &self.backend {
            Backend::Cuda { blas, .. } => *blas.handle(),
            Backend::Emulated => {
                // SAFETY: host buffers of the sizes the shapes say (see emulated_gemm).
                unsafe { emulated_gemm(a_ptr, lda, w_ptr, bf16, c, m, n, k) };
                return Ok(());
            }
        };
        // Row-major C = A·Wᵀ is column-major Cᵀ = W·Aᵀ: W (col-major [k, n], ld k) transposed,
        // A (col-major [k, m], ld lda) as is.
        // SAFETY: the pointers are live device buffers of the sizes the shapes say.
        unsafe {
            blas::gemm_ex(
                blas_handle,
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

/// The emulator's product, with the operands cuBLAS gets: `C[m, n] = A[m, k] · W[n, k]ᵀ`, A's
/// rows `lda` elements apart (bf16 words when `bf16`, as W then is), f32 accumulation.
///
/// # Safety
/// The pointers are host buffers holding the elements the shapes say.
#[allow(clippy::too_many_arguments)]
unsafe fn emulated_gemm(
    a: u64,
    lda: usize,
    w: u64,
    bf16: bool,
    c: u64,
    m: usize,
    n: usize,
    k: usize,
) {
    let widen = |bits: u16| half::bf16::from_bits(bits).to_f32();
    // SAFETY: the caller's contract.
    let c = unsafe { std::slice::from_raw_parts_mut(c as *mut f32, m * n) };
    for r in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for t in 0..k {
                // SAFETY: the caller's contract.
                let (x, y) = unsafe {
                    if bf16 {
                        (
                            widen(*(a as *const u16).add(r * lda + t)),
                            widen(*(w as *const u16).add(j * k + t)),
                        )
                    } else {
                        (
                            *(a as *const f32).add(r * lda + t),
                            *(w as *const f32).add(j * k + t),
                        )
                    }
                };
                acc += x * y;
            }
            c[r * n + j] = acc;
        }
    }
}

/// A launch on the host emulator: the arguments as CUDA's kernelParams, with their sizes.
fn emulated_launch(name: &'static str, config: LaunchConfig, args: &[Arg]) -> Result<(), GpuError> {
    let values: Vec<[u8; 8]> = args
        .iter()
        .map(|a| {
            let mut bytes = [0u8; 8];
            match a {
                Arg::Ptr(v) => bytes.copy_from_slice(&v.to_ne_bytes()),
                Arg::I64(v) => bytes.copy_from_slice(&v.to_ne_bytes()),
                Arg::I32(v) => bytes[..4].copy_from_slice(&v.to_ne_bytes()),
                Arg::F32(v) => bytes[..4].copy_from_slice(&v.to_ne_bytes()),
            }
            bytes
        })
        .collect();
    let params: Vec<*const std::ffi::c_void> = values.iter().map(|v| v.as_ptr().cast()).collect();
    let sizes: Vec<u32> = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(_) | Arg::I64(_) => 8,
            Arg::I32(_) | Arg::F32(_) => 4,
        })
        .collect();
    let c_name = std::ffi::CString::new(name).expect("kernel names have no NUL");
    let (g, b) = (config.grid_dim, config.block_dim);
    // SAFETY: params point at `args.len()` live values of the sizes given; the emulator checks
    // them against the kernel's signature before calling it.
    let status = unsafe {
        tideway_emu_launch(
            c_name.as_ptr(),
            g.0,
            g.1,
            g.2,
            b.0,
            b.1,
            b.2,
            params.as_ptr(),
            sizes.as_ptr(),
            args.len() as u32,
        )
    };
    match status {
        0 => Ok(()),
        _ => Err(GpuError::Driver(format!(
            "emulated launch of {name} failed (status {status}; see stderr)"
        ))),
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

/// Reusable device scratch space for bf16 products: the split activations and the product's
/// two halves.
#[derive(Default)]
pub struct Scratch {
    bf16: Option<(DeviceBuffer<u16>, usize)>,
    halves: Option<(DeviceBuffer<f32>, usize)>,
}

impl Scratch {
    /// Room for `2·split` bf16 words and `2·product` floats.
    fn bf16_split(
        &mut self,
        gpu: &Gpu,
        split: usize,
        product: usize,
    ) -> Result<(&DeviceBuffer<u16>, &DeviceBuffer<f32>), GpuError> {
        if self.bf16.as_ref().is_none_or(|(_, cap)| *cap < 2 * split) {
            self.bf16 = Some((gpu.zeros_of::<u16>(2 * split)?, 2 * split));
        }
        if self
            .halves
            .as_ref()
            .is_none_or(|(_, cap)| *cap < 2 * product)
        {
            self.halves = Some((gpu.zeros(2 * product)?, 2 * product));
        }
        Ok((
            &self.bf16.as_ref().expect("allocated").0,
            &self.halves.as_ref().expect("allocated").0,
        ))
    }
}

/// A weight matrix on the device, in f32 or bf16 (raw bf16 words).
pub enum DeviceMatrix {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<u16>),
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
    bias: Option<DeviceBuffer<f32>>,
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
