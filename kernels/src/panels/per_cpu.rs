//! Which of the panel kernel's variants this CPU takes, where the fastest differs between
//! AMD's cores and Intel's (each measured on both, or on the one this VM had: see each).

/// How a one-row tile (a batch-1 decode step's products) reads its panel from memory; on
/// CPUs that take [`OneRowWalk::HalfVectors`], products of a few rows too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneRowWalk {
    /// Two segments, each asking for its lines `STREAM_AHEAD_STEPS` ahead into L2.
    Prefetched,
    /// Four segments and no prefetch instructions: four sequential streams that the core's
    /// own L2 prefetcher follows.
    HardwareStreams,
    /// f32 and bf16 weights as three segments read in 256-bit halves, no prefetch
    /// instructions (`half_vectors.rs`), for one row and for products of up to four rows
    /// (one tile); int8 weights, and CPUs without AVX-512VL, as
    /// [`OneRowWalk::HardwareStreams`] (one row) and the 512-bit tiles (more).
    HalfVectors,
}

impl OneRowWalk {
    pub const ALL: [OneRowWalk; 3] = [
        OneRowWalk::Prefetched,
        OneRowWalk::HardwareStreams,
        OneRowWalk::HalfVectors,
    ];
}

/// The walk this CPU's one-row tiles take: [`OneRowWalk::HalfVectors`] on Intel's cores,
/// [`OneRowWalk::Prefetched`] elsewhere. `TIDEWAY_ONE_ROW_WALK=prefetched`, `=hardware` or
/// `=half` overrides the choice, for measuring each.
///
/// On AMD's Zen 4 the prefetches won (`STREAM_AHEAD_STEPS`). On an Intel Xeon (2
/// vCPUs, 48 KiB L1, 2 MiB L2, 2026-12-05) they lost. A mamba-130m step's products at batch
/// 1 (the loop of `examples/step_products.rs`, the walks behind a temporary switch,
/// alternated step by step in one process), f32 medians: 18.30 → 17.14, 18.39 → 17.29,
/// 18.72 → 17.51 ms; two segments without prefetches 17.2-18.7, four with them 17.9-18.2,
/// three or six segments without them as four; bf16 (8.84 / 8.92 → 8.96 / 8.88 ms) and
/// int8 (3.23 / 3.27 → 3.24 / 3.24) the same. `tideway bench --batches 1`, the two by this
/// override, alternated (tok/s): mamba-130m f32 51.7, 49.0, 49.0, 48.8 → 54.6, 51.3, 52.6,
/// 53.6; GLA 58.7, 62.1, 61.7 → 65.5, 66.8, 67.9; DeltaNet 58.4, 58.4, 58.7 → 63.2, 61.3,
/// 63.4; bf16 96.9, 101.3, 101.4 → 102.2, 104.6, 101.8; int8 the same (192.7, 177.5, 188.9,
/// 206.0 → 192.0, 188.1, 201.4, 202.0). A likely cause, not verified (the VM exposes no
/// hardware counters): on Intel's cores a software prefetch holds one of L1's fill buffers
/// until its line arrives, where the L2 prefetcher's own requests do not, so four streams
/// that it follows keep more lines in flight. Two-row tiles keep their prefetches there:
/// without them they were slower (19.04 → 20.20 ms), and four segments of two rows would
/// hold 32 accumulators. The same day f32's tiles gained again from reading their panels in
/// 256-bit halves (`half_vectors.rs`): `tideway bench --batches 1`, mamba-130m f32, this
/// override alternated (tok/s), `hardware` 56.1, 56.2, 56.5, 56.9, 57.1, 57.5 → `half`
/// 57.6, 57.9, 58.2, 58.7, 58.8, 59.9; bf16 116.5, 117.4, 121.3, 123.2 → 121.3, 122.9,
/// 126.0, 127.4; int8 250.2, 252.4, 254.4, 256.1 → 241.8, 245.6, 246.1, 247.5 (so int8 keeps
/// four segments of 512 bits).
pub fn one_row_walk() -> OneRowWalk {
    static WALK: std::sync::OnceLock<OneRowWalk> = std::sync::OnceLock::new();
    *WALK.get_or_init(|| match std::env::var("TIDEWAY_ONE_ROW_WALK").as_deref() {
        Ok("prefetched") => OneRowWalk::Prefetched,
        Ok("hardware") => OneRowWalk::HardwareStreams,
        Ok("half") => OneRowWalk::HalfVectors,
        _ if cpu_vendor_is_intel() => OneRowWalk::HalfVectors,
        _ => OneRowWalk::Prefetched,
    })
}

/// Whether bf16 products of several rows widen the panel's bf16 pairs to f32 (a shift and a
/// mask) and multiply with FMAs instead of `vdpbf16ps`. On Intel's cores `vdpbf16ps` issues
/// on one port where a 512-bit FMA has two: measured on a Xeon with AVX-512 BF16 (2 vCPUs,
/// 2026-12-04, `examples/linear_shapes` at 512 rows) bf16 in_proj ran 137-161 GFLOP/s
/// against f32's 292-302, where AMD's Zen 4 ran bf16 faster than f32 (BENCHMARKS.md). The
/// two give the same bits there: Intel's `vdpbf16ps` adds the odd input's product and then
/// the even one's, each rounded once, which is what two FMAs in that order do (`tests.rs`
/// holds them to it wherever this picks the FMAs), but for bf16 subnormals (below 1.2e-38),
/// which `vdpbf16ps` reads as zero. `TIDEWAY_BF16_DOT=fma` or `=vdpbf16ps`
/// overrides the choice, for measuring both; on a CPU whose `vdpbf16ps` rounds otherwise,
/// forcing the FMAs can change the last bit of a row with the batch it runs in.
pub fn bf16_by_fma() -> bool {
    static BY_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BY_FMA.get_or_init(|| match std::env::var("TIDEWAY_BF16_DOT").as_deref() {
        Ok("fma") => true,
        Ok("vdpbf16ps") => false,
        _ => cpu_vendor_is_intel(),
    })
}

fn cpu_vendor_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        // The vendor string "GenuineIntel" in EBX, EDX, ECX.
        [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
