// Kernels shared by every model family (compiled at run time with NVRTC, see
// kernels/src/gpu/mod.rs). Activations and recurrent state are f32; bf16 weights are stored
// as raw 16-bit words (no cuda_bf16.h needed) and widened on load.

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_float(bf16_t h) {
    return __uint_as_float(((unsigned)h) << 16);
}

// Round to nearest even, as torch's .to(torch.bfloat16) (NaN stays NaN).
__device__ __forceinline__ bf16_t float_to_bf16(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float softplus(float x) {
    // torch.nn.functional.softplus with threshold 20.
    return x > 20.0f ? x : log1pf(expf(x));
}

// out[i, :] = table[ids[i], :]   (one block per row)
extern "C" __global__ void embed_rows_f32(const float* table, const unsigned* ids, int rows,
                                          int d, float* out) {
    int i = blockIdx.x;
    if (i >= rows) return;
    const float* src = table + (long)ids[i] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long)i * d + j] = src[j];
}

extern "C" __global__ void embed_rows_bf16(const bf16_t* table, const unsigned* ids, int rows,
                                           int d, float* out) {
    int i = blockIdx.x;
    if (i >= rows) return;
    const bf16_t* src = table + (long)ids[i] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        out[(long)i * d + j] = bf16_to_float(src[j]);
}

// RMSNorm over rows of width d: out = x / sqrt(mean(x^2) + eps) * w. One block (a power of
// two of threads, 32..1024) per row; the sum is a shared-memory tree in f32.
extern "C" __global__ void rms_norm(const float* x, const float* w, int rows, int d, float eps,
                                    float* out) {
    __shared__ float partial[1024];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long)row * d;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) sum += xr[j] * xr[j];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    float scale = rsqrtf(partial[0] / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        out[(long)row * d + j] = xr[j] * scale * w[j];
}

// r += x
extern "C" __global__ void add_inplace(float* r, const float* x, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) r[i] += x[i];
}

// The activations of a bf16 product as two bf16 matrices whose sum is x to ~16 bits:
// y[r] = bf16(x[r]) (rows 0..rows) and y[rows + r] = bf16(x[r] - y[r]), for a [rows, cols]
// block of a matrix with rows `ld` floats apart. One product over both halves reads the bf16
// weights once; adding the halves of its result keeps f32-like activations (SPLIT in gemm).
extern "C" __global__ void f32_to_bf16_split(const float* x, long ld, bf16_t* y, int rows,
                                             int cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * cols) return;
    long r = i / cols, c = i % cols;
    float v = x[r * ld + c];
    bf16_t hi = float_to_bf16(v);
    y[i] = hi;
    y[(long)rows * cols + i] = float_to_bf16(v - bf16_to_float(hi));
}

// out[i] = halves[i] + halves[n + i]
extern "C" __global__ void add_halves(const float* halves, long n, float* out) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = halves[i] + halves[n + i];
}

// out[i, j] += bias[j] for a [rows, cols] matrix (the bias of a Linear after its GEMM).
extern "C" __global__ void add_bias(float* out, const float* bias, int rows, int cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)rows * cols) out[i] += bias[i % cols];
}
