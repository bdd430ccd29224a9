// The linear-attention family's kernels (flash-linear-attention semantics, SPEC-MODELS.md §3):
// short convs, feature maps and gates, per-head norms, RoPE, and the recurrences of gated
// linear attention (GLA, RetNet) and the delta rule (DeltaNet, Gated DeltaNet) over a packed
// batch: session s owns rows [seg_start[s], seg_start[s] + seg_len[s]) and state slot
// seg_slot[s] of the device-resident pool. The recurrences walk each session's rows in order
// (one block per (head, session), one thread per value column holding its column of the
// state), so decode steps and prefill chunks are the same kernel.

#define FLA_MAX_CONV 8

// fla's ShortConvolution over columns [0, c) of x (rows `ld` floats apart), continuing each
// session's window ([slots, c, k], oldest first); out: [M, c] dense.
extern "C" __global__ void short_conv(const float* x, int ld, int c, int k, const float* w,
                                      const float* bias, int has_bias, float* window,
                                      const int* seg_start, const int* seg_len,
                                      const int* seg_slot, int segments, int silu_on,
                                      float* out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (ch >= c || s >= segments) return;
    float taps[FLA_MAX_CONV], win[FLA_MAX_CONV];
    for (int j = 0; j < k; ++j) taps[j] = w[(long)ch * k + j];
    float* state = window + ((long)seg_slot[s] * c + ch) * k;
    for (int j = 0; j < k; ++j) win[j] = state[j];
    float b = has_bias ? bias[ch] : 0.0f;
    for (int t = 0; t < seg_len[s]; ++t) {
        long row = seg_start[s] + t;
        for (int j = 0; j + 1 < k; ++j) win[j] = win[j + 1];
        win[k - 1] = x[row * ld + ch];
        float acc = b;
        for (int j = 0; j < k; ++j) acc += taps[j] * win[j];
        out[row * c + ch] = silu_on ? silu(acc) : acc;
    }
    for (int j = 0; j < k; ++j) state[j] = win[j];
}

// Elementwise maps: 0 silu, 1 relu, 2 sigmoid, 3 elu + 1, 4 identity.
extern "C" __global__ void activate(float* x, long n, int kind) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    switch (kind) {
        case 0: v = silu(v); break;
        case 1: v = fmaxf(v, 0.0f); break;
        case 2: v = 1.0f / (1.0f + expf(-v)); break;
        case 3: v = v > 0.0f ? v + 1.0f : expf(v); break;
        default: break;
    }
    x[i] = v;
}

// GLA's key gate: logsigmoid(x) / normalizer, clamped below by clamp_min when has_clamp.
extern "C" __global__ void gla_gate(float* x, long n, float normalizer, int has_clamp,
                                    float clamp_min) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float ls = fminf(v, 0.0f) - log1pf(expf(-fabsf(v)));
    float l = ls / normalizer;
    if (has_clamp) l = fmaxf(l, clamp_min);
    x[i] = l;
}

// x = scale · sigmoid(x) (DeltaNet's β; scale 2 with negative eigenvalues allowed).
extern "C" __global__ void sigmoid_scale(float* x, long n, float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = scale / (1.0f + expf(-x[i]));
}

// Gated DeltaNet's log decay: g[r, j] = -exp(A_log[j]) · softplus(g[r, j] + dt_bias[j]).
extern "C" __global__ void gdn_log_decay(float* g, int rows, int hv, const float* neg_a,
                                         const float* dt_bias) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * hv) return;
    int j = i % hv;
    g[i] = neg_a[j] * softplus(g[i] + dt_bias[j]);
}

// Per-head normalisation of rows of width dh: 0 = fla's l2norm (x / sqrt(Σx² + 1e-6)),
// 1 = F.normalize(p=1, eps=1e-6).
extern "C" __global__ void head_normalize(float* x, long rows, int dh, int mode) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float* v = x + r * dh;
    float acc = 0.0f;
    for (int i = 0; i < dh; ++i) acc += mode == 0 ? v[i] * v[i] : fabsf(v[i]);
    float norm = mode == 0 ? sqrtf(acc + 1e-6f) : fmaxf(acc, 1e-6f);
    for (int i = 0; i < dh; ++i) v[i] /= norm;
}

// RoPE, NeoX style (rotate half), base 10000, on every dk-wide head of [rows, width] rows;
// row r sits at position row_pos[r] (fla/modules/rotary; RetNet).
extern "C" __global__ void rotary(float* x, int rows, int width, int dk, const int* row_pos) {
    int half = dk / 2;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long per_row = (long)(width / dk) * half;
    if (i >= rows * per_row) return;
    int r = i / per_row, rest = i % per_row;
    int head = rest / half, f = rest % half;
    float inv_freq = 1.0f / powf(10000.0f, (float)(2 * f) / (float)dk);
    float angle = (float)row_pos[r] * inv_freq;
    float sn, cs;
    sincosf(angle, &sn, &cs);
    float* h = x + (long)r * width + head * dk;
    float a = h[f], b = h[f + half];
    h[f] = a * cs - b * sn;
    h[f + half] = b * cs + a * sn;
}

// a = silu(a) · b (GatedMLP), or with `gate_only` a = a · silu(b) (the swish output gate).
extern "C" __global__ void silu_mul(float* a, const float* b, long n, int gate_only) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    a[i] = gate_only ? a[i] * silu(b[i]) : silu(a[i]) * b[i];
}

// Gated linear attention, recurrent form (fla fused_recurrent_gla; SPEC §3.1, §3.4):
//   S_t = diag(exp(g_t)) S_{t-1} + k_t ⊗ v_t,   o_t = S_tᵀ (scale · q_t)
// per q-head h (its k/v head h / groups). One thread per state element (i, j): a block holds
// `tile` value columns of dk threads each (blockDim.x = tile · dk), so one long sequence still
// spreads over H·dk·dv threads; o's column sums go through shared memory.
// q: [M, q_ld] (head h at column h·dk), k and v likewise at the kv head; g: per row and key
// channel at the kv head (g_ld > 0), one constant row per q head (g_ld == 0, RetNet), or none
// (g_ld < 0: no decay). state: [slots, H, dk, dv]; o: [M, H·dv].
// Launch: grid (H · ceil(dv / tile), segments).
extern "C" __global__ void gla_recurrent(const float* q, int q_ld, const float* k, int k_ld,
                                         const float* v, int v_ld, const float* g, int g_ld,
                                         int dk, int dv, int heads, int groups, float scale,
                                         float* state, const int* seg_start, const int* seg_len,
                                         const int* seg_slot, float* o) {
    __shared__ float terms[1024];
    int tile = blockDim.x / dk;
    int tiles = (dv + tile - 1) / tile;
    int h = blockIdx.x / tiles, s = blockIdx.y;
    int i = threadIdx.x % dk, j = (blockIdx.x % tiles) * tile + threadIdx.x / dk;
    bool active = j < dv;
    int kv = h / groups;
    float* st = state + (((long)seg_slot[s] * heads + h) * dk + i) * dv + j;
    float sij = active ? *st : 0.0f;
    for (int t = 0; t < seg_len[s]; ++t) {
        long row = seg_start[s] + t;
        if (active) {
            float decay = g_ld < 0 ? 1.0f
                          : g_ld == 0 ? expf(g[h * dk + i])
                                      : expf(g[row * g_ld + kv * dk + i]);
            sij = decay * sij + k[row * k_ld + kv * dk + i] * v[row * v_ld + kv * dv + j];
            terms[threadIdx.x] = scale * q[row * q_ld + h * dk + i] * sij;
        }
        __syncthreads();
        if (active && i == 0) {
            float acc = 0.0f;
            for (int p = 0; p < dk; ++p) acc += terms[threadIdx.x + p];
            o[row * (long)heads * dv + h * dv + j] = acc;
        }
        __syncthreads();
    }
    if (active) *st = sij;
}

// Pass A of gla_recurrent in time chunks (one long sequence; see mamba_chunk_ends): every
// chunk from a zero state at once, keeping its final state and decay product per state
// element; pass B is mamba_chunk_carry over H·dk·dv elements, pass C gla_recurrent with each
// chunk a segment starting from its carried state. One thread per (element, chunk).
extern "C" __global__ void gla_chunk_ends(const float* k, int k_ld, const float* v, int v_ld,
                                          const float* g, int g_ld, int dk, int dv, int heads,
                                          int groups, int row0, int total, int len,
                                          float* s_end, float* p_end) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    long count = (long)heads * dk * dv;
    if (id >= count) return;
    int h = id / ((long)dk * dv), i = (id / dv) % dk, j = id % dv;
    int kv = h / groups;
    float sij = 0.0f, p = 1.0f;
    int start = row0 + chunk * len, stop = min(start + len, row0 + total);
    for (long row = start; row < stop; ++row) {
        float decay = g_ld < 0 ? 1.0f
                      : g_ld == 0 ? expf(g[h * dk + i])
                                  : expf(g[row * g_ld + kv * dk + i]);
        sij = decay * sij + k[row * k_ld + kv * dk + i] * v[row * v_ld + kv * dv + j];
        p *= decay;
    }
    s_end[(long)chunk * count + id] = sij;
    p_end[(long)chunk * count + id] = p;
}

// The delta rule, recurrent form (fla fused_recurrent_delta_rule / gated_delta_rule; SPEC
// §3.2-3.3), per value head vh (q/k head vh / groups):
//   S ← exp(g_t)·S (with g);  u = β_t (v_t − Sᵀk_t);  S ← S + k_t uᵀ;  o_t = Sᵀ(scale·q_t)
// One thread per state element, blocks as gla_recurrent's. q, k: [M, qk_ld] at column
// (vh / groups)·dk; v: [M, v_ld] at vh·dv; beta, g: [M, vheads] (no g: has_g 0);
// state: [slots, vheads, dk, dv]; o: [M, vheads·dv].
extern "C" __global__ void delta_recurrent(const float* q, const float* k, int qk_ld,
                                           const float* v, int v_ld, const float* beta,
                                           const float* g, int has_g, int dk, int dv,
                                           int vheads, int groups, float scale, float* state,
                                           const int* seg_start, const int* seg_len,
                                           const int* seg_slot, float* o) {
    __shared__ float terms[1024];
    __shared__ float u[1024];
    int tile = blockDim.x / dk;
    int tiles = (dv + tile - 1) / tile;
    int vh = blockIdx.x / tiles, s = blockIdx.y;
    int jl = threadIdx.x / dk;
    int i = threadIdx.x % dk, j = (blockIdx.x % tiles) * tile + jl;
    bool active = j < dv;
    int qk = vh / groups;
    float* st = state + (((long)seg_slot[s] * vheads + vh) * dk + i) * dv + j;
    float sij = active ? *st : 0.0f;
    for (int t = 0; t < seg_len[s]; ++t) {
        long row = seg_start[s] + t;
        float ki = 0.0f;
        if (active) {
            ki = k[row * qk_ld + qk * dk + i];
            if (has_g) sij *= expf(g[row * vheads + vh]);
            terms[threadIdx.x] = ki * sij;
        }
        __syncthreads();
        if (active && i == 0) {
            float proj = 0.0f;
            for (int p = 0; p < dk; ++p) proj += terms[threadIdx.x + p];
            u[jl] = beta[row * vheads + vh] * (v[row * v_ld + vh * dv + j] - proj);
        }
        __syncthreads();
        if (active) {
            sij += ki * u[jl];
            terms[threadIdx.x] = scale * q[row * qk_ld + qk * dk + i] * sij;
        }
        __syncthreads();
        if (active && i == 0) {
            float acc = 0.0f;
            for (int p = 0; p < dk; ++p) acc += terms[threadIdx.x + p];
            o[row * (long)vheads * dv + vh * dv + j] = acc;
        }
        __syncthreads();
    }
    if (active) *st = sij;
}

// a *= b
extern "C" __global__ void mul_inplace(float* a, const float* b, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] *= b[i];
}

// Hedgehog's feature map on rows of width dk: softmax([2y, -2y]) over 2dk (fla's
// HedgehogFeatureMap; the sum in double, as the CPU path). out: [rows, 2dk].
extern "C" __global__ void hedgehog(const float* y, long rows, int dk, float* out) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* src = y + r * dk;
    float* dst = out + r * 2 * dk;
    float mx = 0.0f;
    for (int i = 0; i < dk; ++i) mx = fmaxf(mx, fabsf(2.0f * src[i]));
    double sum = 0.0;
    for (int i = 0; i < dk; ++i) {
        float a = expf(2.0f * src[i] - mx), b = expf(-2.0f * src[i] - mx);
        dst[i] = a;
        dst[i + dk] = b;
        sum += (double)a + (double)b;
    }
    for (int i = 0; i < 2 * dk; ++i) dst[i] = (float)((double)dst[i] / sum);
}

// DPFP's feature map (Schlag et al. 2021; fla DPFPFeatureMap): r = [relu(x), relu(-x)] and
// out = cat_{j=1..nu} r ⊙ roll(r, j), roll(r, j)[i] = r[(i - j) mod 2dk]. out: [rows, 2dk·nu].
extern "C" __global__ void dpfp(const float* x, long rows, int dk, int nu, float* out) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* src = x + r * dk;
    int w = 2 * dk;
    float* dst = out + r * (long)w * nu;
    for (int j = 1; j <= nu; ++j)
        for (int i = 0; i < w; ++i) {
            int k = (i + w - j) % w;
            float ri = i < dk ? fmaxf(src[i], 0.0f) : fmaxf(-src[i - dk], 0.0f);
            float rk = k < dk ? fmaxf(src[k], 0.0f) : fmaxf(-src[k - dk], 0.0f);
            dst[(j - 1) * w + i] = ri * rk;
        }
}

// x / (Σx + 1e-4) over rows of width f (linear attention's norm_q / norm_k).
extern "C" __global__ void sum_normalize(float* x, long rows, int f) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float* v = x + r * f;
    float sum = 1e-4f;
    for (int i = 0; i < f; ++i) sum += v[i];
    for (int i = 0; i < f; ++i) v[i] /= sum;
}

// Linear attention's normaliser (norm_feature_map): z_t = z_{t-1} + k_t and
// o_t /= scale·⟨q_t, z_t⟩ + 1e-10, per q head h (its k head h / groups), continuing each
// session's z ([slots, heads, f]). One thread per (head, session): grid (heads, sessions).
extern "C" __global__ void linear_attn_normalize(float* o, const float* q, int q_ld,
                                                 const float* k, int k_ld, float* z_pool, int f,
                                                 int dv, int heads, int groups, float scale,
                                                 const int* seg_start, const int* seg_len,
                                                 const int* seg_slot) {
    int h = blockIdx.x, s = blockIdx.y;
    if (threadIdx.x != 0) return;
    int kv = h / groups;
    float* z = z_pool + ((long)seg_slot[s] * heads + h) * f;
    for (int t = 0; t < seg_len[s]; ++t) {
        long row = seg_start[s] + t;
        float denom = 0.0f;
        for (int i = 0; i < f; ++i) {
            z[i] += k[row * k_ld + kv * f + i];
            denom += scale * q[row * q_ld + h * f + i] * z[i];
        }
        denom += 1e-10f;
        for (int j = 0; j < dv; ++j) o[row * (long)heads * dv + h * dv + j] /= denom;
    }
}

// The delta rule in time chunks (one long sequence). Each step is affine in the state:
// S_t = A_t S_{t-1} + B_t with A_t = d_t (I - β_t k_t k_tᵀ) and B_t = β_t k_t v_tᵀ, so a chunk
// maps its entering state S to P S + L (P the product of its A_t, L its state from zero).
// Pass A computes [L | P] for every chunk at once by running the step on the augmented
// [dk, dv + dk] matrix from [0 | I] (P's columns take a zero value row); pass B carries S
// across the chunks column by column; pass C is delta_recurrent per chunk from its carried
// state. Pass A: one thread per element of the augmented matrix (blocks of `tile` columns ×
// dk rows, as delta_recurrent), grid (vheads · column tiles, chunks); ends: [chunks,
// vheads, dk, dv + dk].
extern "C" __global__ void delta_chunk_ends(const float* k, int qk_ld, const float* v, int v_ld,
                                            const float* beta, const float* g, int has_g, int dk,
                                            int dv, int vheads, int groups, int row0, int total,
                                            int len, float* ends) {
    __shared__ float terms[1024];
    __shared__ float u[1024];
    int w = dv + dk;
    int tile = blockDim.x / dk;
    int tiles = (w + tile - 1) / tile;
    int vh = blockIdx.x / tiles, chunk = blockIdx.y;
    int jl = threadIdx.x / dk;
    int i = threadIdx.x % dk, j = (blockIdx.x % tiles) * tile + jl;
    bool active = j < w;
    int qk = vh / groups;
    float x = (j >= dv && j - dv == i) ? 1.0f : 0.0f;
    int start = row0 + chunk * len, stop = min(start + len, row0 + total);
    for (long row = start; row < stop; ++row) {
        float ki = 0.0f;
        if (active) {
            ki = k[row * qk_ld + qk * dk + i];
            if (has_g) x *= expf(g[row * vheads + vh]);
            terms[threadIdx.x] = ki * x;
        }
        __syncthreads();
        if (active && i == 0) {
            float proj = 0.0f;
            for (int p = 0; p < dk; ++p) proj += terms[threadIdx.x + p];
            float value = j < dv ? v[row * v_ld + vh * dv + j] : 0.0f;
            u[jl] = beta[row * vheads + vh] * (value - proj);
        }
        __syncthreads();
        if (active) x += ki * u[jl];
        __syncthreads();
    }
    if (active) ends[(((long)chunk * vheads + vh) * dk + i) * w + j] = x;
}

// Pass B: per (value head, value column): the column entering chunk c is carried[c]; the
// next is P_c·column + L_c's column. The pooled state ends as the state after the last chunk.
// One block per (vh, j), one thread per key row (dk <= 1024), the column in shared memory.
extern "C" __global__ void delta_chunk_carry(const float* ends, int chunks, int dk, int dv,
                                             int vheads, float* state, int slot,
                                             float* carried) {
    __shared__ float col[1024];
    int vh = blockIdx.x / dv, j = blockIdx.x % dv, i = threadIdx.x;
    int w = dv + dk;
    long head = (long)vh * dk * dv;
    float* pooled = state + (long)slot * vheads * dk * dv + head;
    if (i < dk) col[i] = pooled[(long)i * dv + j];
    __syncthreads();
    for (int c = 0; c < chunks; ++c) {
        if (i < dk) carried[(long)c * vheads * dk * dv + head + (long)i * dv + j] = col[i];
        const float* e = ends + ((long)c * vheads + vh) * dk * w;
        float next = 0.0f;
        if (i < dk) {
            next = e[(long)i * w + j];
            for (int m = 0; m < dk; ++m) next += e[(long)i * w + dv + m] * col[m];
        }
        __syncthreads();
        if (i < dk) col[i] = next;
        __syncthreads();
    }
    if (i < dk) pooled[(long)i * dv + j] = col[i];
}
