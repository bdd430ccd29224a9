// The LMUFormer's kernels (SPEC-MODELS.md §4): streaming k = 3 frame convolutions and the
// one-frame residual delay, folded BatchNorm, GELU, the LIF neuron, and the LMU memory
// recurrence, over packed sessions. The host keeps each session's bookkeeping (how full a conv
// window is, whether a residual frame is held); frames and states stay on the device.

// Unrolls each session's new frames through its conv window ([slots, 2c], the last two frames
// seen): for a frame with a full window it emits [w0, w1, frame] (a row of 3c) and shifts; with
// a half-filled window (one zero frame of left padding) it only stores the frame; at the end of
// a stream it emits [w0, w1, 0] (the right zero padding). Per session s: input rows
// [in_start, in_start + in_count), output rows from out_start, window state filled[s]
// (1 or 2) and end flag. One thread per (channel, session).
extern "C" __global__ void frame_unroll(const float* x, int c, float* window,
                                        const int* in_start, const int* in_count,
                                        const int* out_start, const int* filled,
                                        const int* ends, const int* slots, int sessions,
                                        float* out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (ch >= c || s >= sessions) return;
    float* w = window + (long)slots[s] * 2 * c;
    float w0 = w[ch], w1 = w[c + ch];
    int full = filled[s];
    long row = out_start[s];
    for (int t = 0; t < in_count[s]; ++t) {
        float f = x[(long)(in_start[s] + t) * c + ch];
        if (full == 2) {
            float* dst = out + row * 3 * c;
            dst[ch] = w0;
            dst[c + ch] = w1;
            dst[2 * c + ch] = f;
            ++row;
            w0 = w1;
        } else {
            full = 2;
        }
        w1 = f;
    }
    if (ends[s] && full == 2) {
        float* dst = out + row * 3 * c;
        dst[ch] = w0;
        dst[c + ch] = w1;
        dst[2 * c + ch] = 0.0f;
    }
    w[ch] = w0;
    w[c + ch] = w1;
}

// Delays each session's frames by one (held frame in held_pool [slots, c]; held[s] says
// whether one is held), releasing the held frame at the end of a stream.
extern "C" __global__ void delay_frame(const float* x, int c, float* held_pool,
                                       const int* in_start, const int* in_count,
                                       const int* out_start, const int* held, const int* ends,
                                       const int* slots, int sessions, float* out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (ch >= c || s >= sessions) return;
    float* h = held_pool + (long)slots[s] * c + ch;
    int has = held[s];
    float value = *h;
    long row = out_start[s];
    for (int t = 0; t < in_count[s]; ++t) {
        float f = x[(long)(in_start[s] + t) * c + ch];
        if (has) out[(row++) * c + ch] = value;
        value = f;
        has = 1;
    }
    if (ends[s] && has) out[row * c + ch] = value;
    *h = value;
}

// y = x·scale[c] + shift[c] per channel (BatchNorm1d folded for inference).
extern "C" __global__ void affine_channels(float* x, long rows, int c, const float* scale,
                                           const float* shift) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * c) return;
    int ch = i % c;
    x[i] = x[i] * scale[ch] + shift[ch];
}

// nn.GELU() (exact, erf form), in double as the CPU path.
extern "C" __global__ void gelu(float* x, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double z = (double)x[i];
    x[i] = (float)(0.5 * z * (1.0 + erf(z / 1.4142135623730951)));
}

// The multi-step LIF neuron (spikingjelly's charge h = v + (x - v)/tau, fire at h >= threshold,
// hard reset to 0): each session's rows in time order, membranes in pool [slots, c]; x is
// overwritten with the spikes (0 or 1). One thread per (channel, session).
extern "C" __global__ void lif_fire(float* x, int c, float* membranes, const int* seg_start,
                                    const int* seg_len, const int* seg_slot, int sessions,
                                    float tau, float threshold) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (ch >= c || s >= sessions) return;
    float* m = membranes + (long)seg_slot[s] * c + ch;
    float v = *m;
    for (int t = 0; t < seg_len[s]; ++t) {
        float* xv = x + (long)(seg_start[s] + t) * c + ch;
        float h = v + (*xv - v) / tau;
        bool spike = h >= threshold;
        v = spike ? 0.0f : h;
        *xv = spike ? 1.0f : 0.0f;
    }
    *m = v;
}

// The LMU memory, recurrent form: m_t = Ā m_{t-1} + B̄ u_t per session (memories [slots, d];
// Ā [d, d] row-major; u [rows]); writes every m_t to out [rows, d]. One block per session,
// one thread per memory index (d <= 1024), m in shared memory.
extern "C" __global__ void lmu_memory(const float* a, const float* b, const float* u, int d,
                                      float* memories, const int* seg_start, const int* seg_len,
                                      const int* seg_slot, float* out) {
    __shared__ float m[1024];
    int s = blockIdx.x, i = threadIdx.x;
    float* mem = memories + (long)seg_slot[s] * d;
    if (i < d) m[i] = mem[i];
    __syncthreads();
    for (int t = 0; t < seg_len[s]; ++t) {
        long row = seg_start[s] + t;
        float next = 0.0f;
        if (i < d) {
            for (int j = 0; j < d; ++j) next += a[(long)i * d + j] * m[j];
            next += b[i] * u[row];
        }
        __syncthreads();
        if (i < d) {
            m[i] = next;
            out[row * d + i] = next;
        }
        __syncthreads();
    }
    if (i < d) mem[i] = m[i];
}

// out[r] = [a[r] | b[r]] for rows of widths wa and wb.
extern "C" __global__ void concat_rows(const float* a, int wa, const float* b, int wb,
                                       long rows, float* out) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int w = wa + wb;
    if (i >= rows * w) return;
    long r = i / w;
    int col = i % w;
    out[i] = col < wa ? a[r * wa + col] : b[r * wb + col - wa];
}
