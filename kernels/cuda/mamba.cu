// The Mamba (v1) mixer's own kernels (SPEC-MODELS.md §1.2-1.3), over a packed batch: session s
// owns rows [seg_start[s], seg_start[s] + seg_len[s]) and its state lives in slot seg_slot[s]
// of the device-resident state pool. One thread per (session, channel) walks the session's
// rows in order, so a one-row decode step and a long prefill chunk are the same kernel.

#define MAX_CONV 8

// x' = silu(causal_conv1d(x)) continuing the session's window.
// xz: [M, 2E] (x in columns 0..E); w: [E, K]; bias: [E] or null; window: [slots, E, K]
// (oldest first, the CPU layout); out: [M, E].
extern "C" __global__ void mamba_conv_silu(const float* xz, int e, int k, const float* w,
                                           const float* bias, float* window,
                                           const int* seg_start, const int* seg_len,
                                           const int* seg_slot, int segments, float* out) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (c >= e || s >= segments) return;
    float taps[MAX_CONV], win[MAX_CONV];
    for (int j = 0; j < k; ++j) taps[j] = w[(long)c * k + j];
    float* state = window + ((long)seg_slot[s] * e + c) * k;
    for (int j = 0; j < k; ++j) win[j] = state[j];
    float b = bias ? bias[c] : 0.0f;
    int start = seg_start[s], len = seg_len[s];
    for (int t = 0; t < len; ++t) {
        long row = start + t;
        for (int j = 0; j + 1 < k; ++j) win[j] = win[j + 1];
        win[k - 1] = xz[row * 2 * e + c];
        float acc = b;
        for (int j = 0; j < k; ++j) acc += taps[j] * win[j];
        out[row * e + c] = silu(acc);
    }
    for (int j = 0; j < k; ++j) state[j] = win[j];
}

// The same conv for long segments (a prefill chunk): one thread per (channel, row) where
// mamba_conv_silu walks a segment's rows in one thread per channel (1536 threads for a
// 130M Mamba's chunk, 47% of its prefill's device time on an H200). A row's taps before the
// segment read the session's window, which mamba_conv_window then moves on (after this kernel
// has read it). The same sums in the same order as mamba_conv_silu. Launch: grid
// (ceil(E / blockDim.x), row blocks, segments); blockIdx.y strides over the segment's rows.
extern "C" __global__ void mamba_conv_silu_rows(const float* xz, int e, int k, const float* w,
                                                const float* bias, const float* window,
                                                const int* seg_start, const int* seg_len,
                                                const int* seg_slot, int segments, float* out) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.z;
    if (c >= e || s >= segments) return;
    const float* state = window + ((long)seg_slot[s] * e + c) * k;
    float b = bias ? bias[c] : 0.0f;
    int start = seg_start[s], len = seg_len[s];
    for (int t = blockIdx.y; t < len; t += gridDim.y) {
        float acc = b;
        for (int j = 0; j < k; ++j) {
            // Tap j reads row t - (k - 1) + j; rows before the segment are the window's
            // newest entries (oldest first: row -1 is window[k - 1]).
            int u = t - (k - 1) + j;
            float x = u >= 0 ? xz[(long)(start + u) * 2 * e + c] : state[k + u];
            acc += w[(long)c * k + j] * x;
        }
        out[(long)(start + t) * e + c] = silu(acc);
    }
}

// The window after mamba_conv_silu_rows: the last k inputs of (old window ++ the segment's
// rows), oldest first. One thread per (channel, segment), which alone reads and writes its
// window. Launch: grid (ceil(E / blockDim.x), segments).
extern "C" __global__ void mamba_conv_window(const float* xz, int e, int k, float* window,
                                             const int* seg_start, const int* seg_len,
                                             const int* seg_slot, int segments) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (c >= e || s >= segments) return;
    float* state = window + ((long)seg_slot[s] * e + c) * k;
    int start = seg_start[s], len = seg_len[s];
    float next[MAX_CONV];
    for (int j = 0; j < k; ++j) {
        int u = len - k + j;
        next[j] = u >= 0 ? xz[(long)(start + u) * 2 * e + c] : state[j + len];
    }
    for (int j = 0; j < k; ++j) state[j] = next[j];
}

// The selective scan with its gate (SPEC §1.2): per channel c and row t,
//   Δ = softplus(dt[t, c] + dt_bias[c]);  h = exp(Δ·A[c, :]) ⊙ h + Δ·B_t·x[t, c]
//   y[t, c] = (⟨h, C_t⟩ + D[c]·x[t, c]) · silu(z[t, c])
// One thread per (channel, state index): a block holds `channels_per_block` channels of n
// threads each (blockDim.x = channels_per_block · n), so a single long sequence still spreads
// over E·N threads; ⟨h, C_t⟩ is a warp's shuffle sum per row (a shared-memory sum where n
// is not a power of two up to 32). Launch: grid
// (ceil(E / channels_per_block), segments).
// x: [M, E]; dt: [M, E] (dt_proj without its bias); a: [E, N] (A = -exp(A_log));
// dbc: [M, R + 2N] (B at column R, C at R + N); xz: [M, 2E] (z at column E);
// state: [slots, E, N]; y: [M, E].
extern "C" __global__ void mamba_scan(const float* x, const float* dt, const float* dt_bias,
                                      const float* a, const float* dbc, int r, int n,
                                      const float* d_skip, const float* xz, int e, float* state,
                                      const int* seg_start, const int* seg_len,
                                      const int* seg_slot, int segments, float* y) {
    __shared__ float terms[1024];
    int per_block = blockDim.x / n;
    int local = threadIdx.x / n, j = threadIdx.x % n;
    int c = blockIdx.x * per_block + local;
    int s = blockIdx.y;
    bool active = local < per_block && c < e && s < segments;
    float h = 0.0f, ac = 0.0f, bias = 0.0f, dc = 0.0f;
    float* hs = 0;
    if (active) {
        hs = state + ((long)seg_slot[s] * e + c) * n + j;
        h = *hs;
        ac = a[(long)c * n + j];
        bias = dt_bias[c];
        dc = d_skip[c];
    }
    int w = r + 2 * n;
    int len = s < segments ? seg_len[s] : 0;
    // A channel's n lanes lie in one warp where n is a power of two up to 32: they sum
    // ⟨h, C_t⟩ by shuffles, and each warp walks its rows at its own pace (no barrier; the
    // shared-memory sum cost a prefill's scan two barriers and a 16-term serial sum a row).
    bool in_warp = n <= 32 && (n & (n - 1)) == 0;
    for (int t = 0; t < len; ++t) {
        long row = seg_start[s] + t;
        float xv = 0.0f, term = 0.0f;
        if (active) {
            xv = x[row * e + c];
            float delta = softplus(dt[row * e + c] + bias);
            const float* b = dbc + row * w + r;
            h = expf(delta * ac) * h + delta * b[j] * xv;
            term = h * b[n + j];
        }
        float acc = 0.0f;
        if (in_warp) {
            // Every lane of the warp takes part (inactive ones with 0); a butterfly leaves the
            // channel's sum in each of its lanes.
            acc = term;
            for (int lane = n / 2; lane > 0; lane >>= 1)
                acc += __shfl_xor_sync(0xffffffffu, acc, lane);
        } else {
            terms[threadIdx.x] = term;
            __syncthreads();
            if (j == 0)
                for (int q = 0; q < n; ++q) acc += terms[threadIdx.x + q];
            __syncthreads();
        }
        if (active && j == 0) {
            float z = xz[row * 2 * e + e + c];
            y[row * e + c] = (acc + dc * xv) * silu(z);
        }
    }
    if (active) *hs = h;
}

// The selective scan in time chunks, for one long sequence (prefill): pass A walks every chunk
// from a zero state at once, keeping the chunk's final state h_end and its decay product
// p = Π exp(Δ·A); pass B carries the state across chunks (h_in[c+1] = p[c]·h_in[c] +
// h_end[c]); pass C is mamba_scan itself, each chunk a segment starting from its carried
// state. The recurrence is linear in h, so the result is the sequential scan's.
// Pass A: one thread per (channel·n + j, chunk); chunk c covers rows
// [row0 + c·len, min(.., row0 + total)).
extern "C" __global__ void mamba_chunk_ends(const float* x, const float* dt, const float* dt_bias,
                                            const float* a, const float* dbc, int r, int n, int e,
                                            int row0, int total, int len, float* h_end,
                                            float* p_end) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (id >= (long)e * n) return;
    int c = id / n, j = id % n;
    float ac = a[(long)c * n + j], bias = dt_bias[c];
    int w = r + 2 * n;
    float h = 0.0f, p = 1.0f;
    int start = row0 + chunk * len, stop = min(start + len, row0 + total);
    for (long row = start; row < stop; ++row) {
        float delta = softplus(dt[row * e + c] + bias);
        float decay = expf(delta * ac);
        h = decay * h + delta * dbc[row * w + r + j] * x[row * e + c];
        p *= decay;
    }
    h_end[(long)chunk * e * n + id] = h;
    p_end[(long)chunk * e * n + id] = p;
}

// Pass B: one thread per (channel·n + j): carried[c] = the state entering chunk c (from the
// session's pooled state), and the pooled state becomes the state after the last chunk.
extern "C" __global__ void mamba_chunk_carry(const float* h_end, const float* p_end, int chunks,
                                             int e, int n, float* state, int slot,
                                             float* carried) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)e * n) return;
    float* pooled = state + (long)slot * e * n + id;
    float h = *pooled;
    for (int k = 0; k < chunks; ++k) {
        carried[(long)k * e * n + id] = h;
        h = p_end[(long)k * e * n + id] * h + h_end[(long)k * e * n + id];
    }
    *pooled = h;
}
