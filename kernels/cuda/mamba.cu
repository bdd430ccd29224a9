// The Mamba (v1) mixer's own kernels (SPEC-MODELS.md §1.2-1.3), over a packed batch: session s
// owns rows [seg_start[s], seg_start[s] + seg_len[s]) and its state lives in slot seg_slot[s]
// of the device-resident state pool. One thread per (session, channel) walks the session's
// rows in order, so a one-row decode step and a long prefill chunk are the same kernel.

#define MAX_CONV 8
#define MAX_STATE 64

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

// The selective scan with its gate (SPEC §1.2): per channel c and row t,
//   Δ = softplus(dt[t, c] + dt_bias[c]);  h = exp(Δ·A[c, :]) ⊙ h + Δ·B_t·x[t, c]
//   y[t, c] = (⟨h, C_t⟩ + D[c]·x[t, c]) · silu(z[t, c])
// x: [M, E]; dt: [M, E] (dt_proj without its bias); a: [E, N] (A = -exp(A_log));
// dbc: [M, R + 2N] (B at column R, C at R + N); xz: [M, 2E] (z at column E);
// state: [slots, E, N]; y: [M, E].
extern "C" __global__ void mamba_scan(const float* x, const float* dt, const float* dt_bias,
                                      const float* a, const float* dbc, int r, int n,
                                      const float* d_skip, const float* xz, int e, float* state,
                                      const int* seg_start, const int* seg_len,
                                      const int* seg_slot, int segments, float* y) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (c >= e || s >= segments) return;
    float h[MAX_STATE], ac[MAX_STATE];
    float* hs = state + ((long)seg_slot[s] * e + c) * n;
    for (int j = 0; j < n; ++j) {
        h[j] = hs[j];
        ac[j] = a[(long)c * n + j];
    }
    int w = r + 2 * n;
    float bias = dt_bias[c], dc = d_skip[c];
    int start = seg_start[s], len = seg_len[s];
    for (int t = 0; t < len; ++t) {
        long row = start + t;
        float xv = x[row * e + c];
        float delta = softplus(dt[row * e + c] + bias);
        const float* b = dbc + row * w + r;
        const float* cc = b + n;
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) {
            h[j] = expf(delta * ac[j]) * h[j] + delta * b[j] * xv;
            acc += h[j] * cc[j];
        }
        float z = xz[row * 2 * e + e + c];
        y[row * e + c] = (acc + dc * xv) * silu(z);
    }
    for (int j = 0; j < n; ++j) hs[j] = h[j];
}
