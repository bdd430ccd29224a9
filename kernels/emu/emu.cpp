// A host emulator for Tideway's CUDA kernels (kernels/cuda/*.cu), for tests on machines
// without a GPU: the same sources compiled as C++, each launch run block by block on the
// calling thread. Kernels that synchronise their block (__syncthreads) run each GPU thread as
// a fiber (ucontext) so that barriers and shared memory behave as on the device; the others
// run their threads one after another. Shared memory is a thread-local static: one block runs
// at a time on each OS thread. Launch arguments arrive as CUDA's kernelParams do (an
// array of pointers to each value), with their sizes, which are checked against the kernel's
// signature.

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Per OS thread: tests launch from several threads at once; fibers share their thread's copy.
thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

// --- the fiber scheduler of one cooperative block -------------------------------------------
struct Fiber {
    ucontext_t context;
    bool done = false;
};

thread_local ucontext_t scheduler;
thread_local std::vector<Fiber> fibers;
thread_local std::vector<std::vector<char>> stacks;
thread_local unsigned current = 0;
thread_local unsigned live = 0, arrived = 0, phase = 0;
thread_local bool cooperative = false;
thread_local std::function<void()> block_body;

const size_t STACK_BYTES = 64 * 1024;

void yield_to_scheduler() { swapcontext(&fibers[current].context, &scheduler); }

void fiber_entry() {
    block_body();
    fibers[current].done = true;
    // A finished thread no longer takes part in barriers (as an exited CUDA thread).
    --live;
    if (arrived > 0 && arrived == live) {
        arrived = 0;
        ++phase;
    }
}

void syncthreads_impl() {
    if (!cooperative) {
        std::fprintf(stderr, "emulator: __syncthreads in a kernel not marked cooperative\n");
        std::abort();
    }
    unsigned my_phase = phase;
    if (++arrived == live) {
        arrived = 0;
        ++phase;
        return;
    }
    while (phase == my_phase) yield_to_scheduler();
}

void run_block_fibers(unsigned threads) {
    if (stacks.size() < threads) stacks.resize(threads);
    fibers.assign(threads, Fiber{});
    live = threads;
    arrived = 0;
    phase = 0;
    for (unsigned t = 0; t < threads; ++t) {
        if (stacks[t].size() < STACK_BYTES) stacks[t].resize(STACK_BYTES);
        getcontext(&fibers[t].context);
        fibers[t].context.uc_stack.ss_sp = stacks[t].data();
        fibers[t].context.uc_stack.ss_size = STACK_BYTES;
        fibers[t].context.uc_link = &scheduler;
        makecontext(&fibers[t].context, fiber_entry, 0);
    }
    unsigned remaining = threads;
    while (remaining > 0) {
        remaining = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = t;
            threadIdx = Dim3{t, 0, 0};
            swapcontext(&scheduler, &fibers[t].context);
            if (!fibers[t].done) ++remaining;
        }
    }
}

}  // namespace

// --- what the kernels use of CUDA ---------------------------------------------------------------
#define __global__
#define __device__ static
#define __forceinline__ inline
#define __shared__ static thread_local
#define __syncthreads() syncthreads_impl()

// A warp's shuffle as block-wide exchanges: every thread of the block must call it together
// (as the kernels that use it do), which makes the two barriers sound.
static float shfl_xor_impl(float value, int lane_mask) {
    static thread_local float slots[1024];
    slots[threadIdx.x] = value;
    syncthreads_impl();
    float other = slots[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
    syncthreads_impl();
    return other;
}
#define __shfl_xor_sync(mask, value, lane_mask) shfl_xor_impl(value, lane_mask)

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::max;
using std::min;

#include "../cuda/common.cu"
#include "../cuda/mamba.cu"
#include "../cuda/fla.cu"
#include "../cuda/lmu.cu"

// --- the launch table ---------------------------------------------------------------------------
namespace {

template <typename T>
T arg_at(void** params, size_t i) {
    T value;
    std::memcpy(&value, params[i], sizeof(T));
    return value;
}

template <typename... A, size_t... I>
void invoke(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    kernel(arg_at<A>(params, I)...);
}

struct Launcher {
    std::function<void(void**)> call;
    std::vector<unsigned> sizes;
    bool cooperative;
};

template <typename... A>
Launcher make(void (*kernel)(A...), bool coop) {
    return Launcher{[kernel](void** params) {
                        invoke(kernel, params, std::index_sequence_for<A...>{});
                    },
                    {static_cast<unsigned>(sizeof(A))...}, coop};
}

const std::unordered_map<std::string, Launcher>& table() {
    static const std::unordered_map<std::string, Launcher> kernels = {
        {"embed_rows_f32", make(embed_rows_f32, false)},
        {"embed_rows_bf16", make(embed_rows_bf16, false)},
        {"rms_norm", make(rms_norm, true)},
        {"add_inplace", make(add_inplace, false)},
        {"add_bias", make(add_bias, false)},
        {"f32_to_bf16_split", make(f32_to_bf16_split, false)},
        {"add_halves", make(add_halves, false)},
        {"mamba_conv_silu", make(mamba_conv_silu, false)},
        {"mamba_conv_silu_rows", make(mamba_conv_silu_rows, false)},
        {"mamba_conv_window", make(mamba_conv_window, false)},
        {"mamba_scan", make(mamba_scan, true)},
        {"mamba_chunk_ends", make(mamba_chunk_ends, false)},
        {"mamba_chunk_carry", make(mamba_chunk_carry, false)},
        {"short_conv", make(short_conv, false)},
        {"activate", make(activate, false)},
        {"gla_gate", make(gla_gate, false)},
        {"sigmoid_scale", make(sigmoid_scale, false)},
        {"gdn_log_decay", make(gdn_log_decay, false)},
        {"head_normalize", make(head_normalize, false)},
        {"rotary", make(rotary, false)},
        {"silu_mul", make(silu_mul, false)},
        {"gla_recurrent", make(gla_recurrent, true)},
        {"gla_chunk_ends", make(gla_chunk_ends, false)},
        {"delta_recurrent", make(delta_recurrent, true)},
        {"delta_chunk_ends", make(delta_chunk_ends, true)},
        {"delta_chunk_carry", make(delta_chunk_carry, true)},
        {"mul_inplace", make(mul_inplace, false)},
        {"hedgehog", make(hedgehog, false)},
        {"dpfp", make(dpfp, false)},
        {"sum_normalize", make(sum_normalize, false)},
        {"linear_attn_normalize", make(linear_attn_normalize, false)},
        {"frame_unroll", make(frame_unroll, false)},
        {"delay_frame", make(delay_frame, false)},
        {"affine_channels", make(affine_channels, false)},
        {"gelu", make(gelu, false)},
        {"lif_fire", make(lif_fire, false)},
        {"lmu_memory", make(lmu_memory, true)},
        {"concat_rows", make(concat_rows, false)},
    };
    return kernels;
}

}  // namespace

// Runs kernel `name` over a grid of blocks. Returns 0, or 1 for an unknown kernel, 2 for an
// argument list that does not match its signature (count or sizes), writing why to stderr.
extern "C" int tideway_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                                  unsigned bx, unsigned by, unsigned bz, void** params,
                                  const unsigned* sizes, unsigned count) {
    auto found = table().find(name);
    if (found == table().end()) {
        std::fprintf(stderr, "emulator: no kernel %s\n", name);
        return 1;
    }
    const Launcher& launcher = found->second;
    if (launcher.sizes.size() != count) {
        std::fprintf(stderr, "emulator: %s takes %zu arguments, given %u\n", name,
                     launcher.sizes.size(), count);
        return 2;
    }
    for (unsigned i = 0; i < count; ++i) {
        if (launcher.sizes[i] != sizes[i]) {
            std::fprintf(stderr, "emulator: %s argument %u is %u bytes, given %u\n", name, i,
                         launcher.sizes[i], sizes[i]);
            return 2;
        }
    }
    gridDim = Dim3{gx, gy, gz};
    blockDim = Dim3{bx, by, bz};
    cooperative = launcher.cooperative;
    unsigned threads = bx * by * bz;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = Dim3{x, y, z};
                if (launcher.cooperative) {
                    block_body = [&] { launcher.call(params); };
                    run_block_fibers(threads);
                } else {
                    for (unsigned t = 0; t < threads; ++t) {
                        threadIdx = Dim3{t, 0, 0};
                        launcher.call(params);
                    }
                }
            }
    return 0;
}
