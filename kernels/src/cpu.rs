//! What the CPU offers the kernels.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The instruction sets the hand-written kernels choose between, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Plain Rust, vectorised by LLVM for the target's baseline.
    Portable,
    /// AVX2 and FMA (256-bit vectors).
    Avx2,
    /// AVX2, FMA and AVX-VNNI (`vpdpbusd` on 256-bit vectors: Alder Lake and later Intel
    /// cores, Zen 5): the int8 products' dot steps. Where a CPU with AVX-512 is capped here,
    /// the int8 kernels use AVX-VNNI only if the CPU has it.
    AvxVnni,
    /// AVX-512F (512-bit vectors; its extensions, BF16, VNNI, DQ, VL, where the CPU has them).
    Avx512,
    /// AVX-512 and AMX-BF16/INT8 (Intel's tile matrix multiply, Sapphire Rapids on), granted
    /// by the OS: bf16 and int8 products of many rows run on the tiles (`panels::amx`).
    Amx,
}

impl SimdLevel {
    /// The names [`SIMD_ENV`] takes, beside each level.
    const NAMES: [(&'static str, SimdLevel); 5] = [
        ("amx", SimdLevel::Amx),
        ("avx512", SimdLevel::Avx512),
        ("avxvnni", SimdLevel::AvxVnni),
        ("avx2", SimdLevel::Avx2),
        ("portable", SimdLevel::Portable),
    ];
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2+fma",
            SimdLevel::AvxVnni => "avx2+fma+avxvnni",
            SimdLevel::Avx512 => "avx512f",
            SimdLevel::Amx => "avx512f+amx",
        })
    }
}

/// The environment variable that caps the kernels' instruction set: `avx512` runs, on a CPU
/// with AMX, the paths of CPUs without it, `avxvnni`, `avx2` or `portable` those of CPUs
/// without AVX-512 (to test and measure them; `avx2` also leaves out AVX-VNNI, as Zen 2 and
/// 3 and Intel cores before Alder Lake lack it); `amx` is the default. A cap above what the CPU has
/// changes nothing. The gemm crate, which multiplies more than `skinny::MAX_ROWS` rows of f32
/// or bf16 weights where there are no AVX-512 panels, picks its own instruction set and does
/// not read it.
pub const SIMD_ENV: &str = "TIDEWAY_SIMD";

/// [`SIMD_ENV`] holds none of the names it takes.
#[derive(Debug, thiserror::Error)]
#[error("{SIMD_ENV}={value:?}: expected amx, avx512, avxvnni, avx2 or portable")]
pub struct SimdEnvError {
    value: String,
}

/// The cap `value` of [`SIMD_ENV`] names.
pub fn parse_simd_cap(value: &str) -> Result<SimdLevel, SimdEnvError> {
    SimdLevel::NAMES
        .iter()
        .find(|(name, _)| value.eq_ignore_ascii_case(name))
        .map(|&(_, level)| level)
        .ok_or_else(|| SimdEnvError {
            value: value.to_string(),
        })
}

/// The cap [`SIMD_ENV`] asks for, if it is set: binaries check it at start, so that a bad
/// value is an error there rather than a panic in the first kernel.
pub fn simd_cap() -> Result<Option<SimdLevel>, SimdEnvError> {
    match std::env::var(SIMD_ENV) {
        Ok(value) => parse_simd_cap(&value).map(Some),
        Err(_) => Ok(None),
    }
}

/// The widest instruction set this CPU offers the kernels.
pub fn detected_simd() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            if amx_granted() {
                return SimdLevel::Amx;
            }
            return SimdLevel::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avxvnni") {
                return SimdLevel::AvxVnni;
            }
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

/// Whether the CPU has AMX (CPUID leaf 7: AMX-TILE, AMX-BF16 and AMX-INT8, which every AMX
/// CPU so far has together) and Linux lets this process use the tiles' 8 KiB of state: a
/// process must ask for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16
/// on) before its first tile instruction, which would otherwise kill it with SIGILL
/// (llama.cpp's AMX build died so on this machine: BENCHMARKS.md). Asked once, for the whole
/// process.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        // Leaf 7 exists on every CPU with AVX-512F (the caller's check).
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let [bf16, tile, int8] = [22, 24, 25].map(|bit| leaf7.edx & (1 << bit) != 0);
        bf16 && tile && int8 && request_tile_state()
    })
}

/// Asks Linux for the AMX tile data state (`arch_prctl` codes from `asm/prctl.h`; feature 18
/// is XTILEDATA); false where it refuses (an older kernel, a hypervisor without it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request that changes only which register state the kernel saves for us.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// The instruction set the hand-written kernels dispatch to (see `simd`): the CPU's widest,
/// capped by [`SIMD_ENV`]. Read once, before the first kernel runs (weights are laid out
/// for it at load); panics on a value [`simd_cap`] refuses.
pub fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| match simd_cap() {
        Ok(cap) => detected_simd().min(cap.unwrap_or(SimdLevel::Amx)),
        Err(e) => panic!("{e}"),
    })
}

/// Whether the kernels take their AVX-512 paths ([`simd_level`]; true where they take AMX's
/// too); each path checks the extensions beyond AVX-512F it needs itself.
#[inline]
pub(crate) fn avx512() -> bool {
    simd_level() >= SimdLevel::Avx512
}

/// Whether bf16 and int8 products of many rows may run on AMX tiles ([`simd_level`]).
#[inline]
pub(crate) fn amx() -> bool {
    simd_level() == SimdLevel::Amx
}

/// Whether the kernels may use AVX2 and FMA ([`simd_level`]; true where they take AVX-512).
#[inline]
pub(crate) fn avx2_fma() -> bool {
    simd_level() >= SimdLevel::Avx2
}

/// Whether the int8 kernels of CPUs without AVX-512 may use AVX-VNNI's 256-bit `vpdpbusd`
/// (`int8::avx_vnni_tile`): the CPU has it and [`simd_level`] is at least
/// [`SimdLevel::AvxVnni`].
#[inline]
pub(crate) fn avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        simd_level() >= SimdLevel::AvxVnni
            && *HAS.get_or_init(|| std::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes of one core's level-1 data cache: Linux's `/sys/devices/system/cpu/cpu0/cache`
/// entry of level 1 and type `Data`, or 32 KiB (the smallest of the x86 cores Tideway is
/// measured on) where the system does not say. Read once.
pub fn l1_data_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| l1_data_from_sysfs().unwrap_or(32 << 10))
}

fn l1_data_from_sysfs() -> Option<usize> {
    let read = |dir: &std::path::Path, name: &str| {
        std::fs::read_to_string(dir.join(name)).map(|s| s.trim().to_string())
    };
    std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache")
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| {
            read(dir, "level").is_ok_and(|l| l == "1")
                && read(dir, "type").is_ok_and(|t| t == "Data")
        })
        .find_map(|dir| parse_cache_size(&read(&dir, "size").ok()?))
}

/// A sysfs cache size, `48K` or `2048K` or `1M`, in bytes.
fn parse_cache_size(size: &str) -> Option<usize> {
    let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
    let scale = match unit {
        "K" => 1 << 10,
        "M" => 1 << 20,
        _ => return None,
    };
    Some(digits.parse::<usize>().ok()? * scale).filter(|&b| b > 0)
}

/// Runs `work` on a thread of the compute pool (rayon's global pool) and returns its result;
/// on a pool thread already, runs it in place.
///
/// A decode step issues about a hundred parallel products, scans and activations. Issued from
/// a thread outside the pool, each one queues its shares for the pool and puts the caller to
/// sleep until they are done: two cross-thread wake-ups per product, which at batch 1 cost
/// more than the smaller products themselves. Issued from a pool thread, the caller takes its
/// own share and the other threads steal theirs: one hand-off per step instead of one per
/// product (`tideway bench --batches 1`, mamba-130m: 46.9 → 52.6 tok/s in f32, BENCHMARKS.md).
///
/// The other threads are kept awake for the step (`keep_stealing`): left to rayon, a thread
/// that found nothing for ~30 yields sleeps on a futex, and the step's serial stretches (the
/// conv, the small projections) are longer than that, so most products began with a wake-up
/// that on a virtual machine takes longer than a one-row product (~37 context switches a step
/// at batch 1, 7 with the helpers).
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    let _in_flight = InFlight::enter();
    let step_done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        if IN_FLIGHT.load(Ordering::Acquire) == 1 {
            for _ in 1..rayon::current_num_threads() {
                scope.spawn(move |_| keep_stealing(step_done, owner));
            }
        }
        let result = work();
        step_done.store(true, Ordering::Release);
        result
    })
}

/// Calls of `on_compute_pool` running now (several where several timely workers compute).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// One call counted in `IN_FLIGHT` until dropped (also when the work panics).
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a helper goes on looking for work that does not come before it leaves the thread
/// to rayon's own idling: longer than a step's serial stretches at small batches.
const HELPER_PATIENCE: Duration = Duration::from_micros(500);

/// A helper of `on_compute_pool`: runs the step's shares as they are queued until the step is
/// done. It leaves at once on the step's own thread (which pops it from its deque while it
/// waits for a share: spinning there would wait for itself); after `HELPER_PATIENCE` without
/// work (it may have been picked up by a thread waiting inside one of the step's own shares,
/// which it must not hold up for long); and as soon as another call is in flight (the work it
/// would pick up next may be that whole call, which the step would then wait for). Between
/// fruitless looks it yields the core now and then, so that other threads on it (the server's
/// I/O) still run.
fn keep_stealing(step_done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle_since = Instant::now();
    let mut fruitless = 0u32;
    while !step_done.load(Ordering::Acquire) && IN_FLIGHT.load(Ordering::Acquire) == 1 {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            fruitless = 0;
            continue;
        }
        if fruitless == 0 {
            idle_since = Instant::now();
        }
        fruitless += 1;
        if fruitless.is_multiple_of(64) {
            if idle_since.elapsed() > HELPER_PATIENCE {
                return;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use rayon::prelude::*;

    use super::*;

    #[test]
    fn simd_cap_names() {
        assert_eq!(parse_simd_cap("avx2").unwrap(), SimdLevel::Avx2);
        assert_eq!(parse_simd_cap("avxvnni").unwrap(), SimdLevel::AvxVnni);
        assert_eq!(parse_simd_cap("AVX512").unwrap(), SimdLevel::Avx512);
        assert_eq!(parse_simd_cap("amx").unwrap(), SimdLevel::Amx);
        assert_eq!(parse_simd_cap("portable").unwrap(), SimdLevel::Portable);
        let e = parse_simd_cap("avx2+fma").unwrap_err().to_string();
        assert_eq!(
            e,
            "TIDEWAY_SIMD=\"avx2+fma\": expected amx, avx512, avxvnni, avx2 or portable"
        );
        // A cap never asks for more than the CPU has.
        assert!(simd_level() <= detected_simd());
    }

    /// A step's worth of small parallel products: sums that each thread checks.
    fn step(seed: u64) -> u64 {
        (0..64u64)
            .map(|product| {
                (0..4096u64)
                    .into_par_iter()
                    .map(|i| i ^ (seed + product))
                    .sum::<u64>()
            })
            .sum()
    }

    fn serial(seed: u64) -> u64 {
        (0..64u64)
            .map(|product| (0..4096u64).map(|i| i ^ (seed + product)).sum::<u64>())
            .sum()
    }

    #[test]
    fn steps_from_several_threads_at_once_all_finish_with_their_results() {
        // Timely workers call in concurrently; a helper must never wait on a step that waits
        // on it. A deadlock shows as the timeout.
        let (done, results) = mpsc::channel();
        for caller in 0..4u64 {
            let done = done.clone();
            std::thread::spawn(move || {
                for round in 0..50 {
                    let seed = caller * 1000 + round;
                    let got = on_compute_pool(|| step(seed));
                    // Nested calls run in place.
                    let nested = on_compute_pool(|| on_compute_pool(|| step(seed)));
                    done.send((got, nested, serial(seed))).unwrap();
                }
            });
        }
        drop(done);
        for _ in 0..200 {
            let (got, nested, want) = results
                .recv_timeout(Duration::from_secs(60))
                .expect("every step finishes");
            assert_eq!(got, want);
            assert_eq!(nested, want);
        }
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("48K"), Some(48 << 10));
        assert_eq!(parse_cache_size("2048K"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        for bad in ["", "K", "48", "48KB", "0K", "x8K"] {
            assert_eq!(parse_cache_size(bad), None, "{bad:?}");
        }
        assert!(l1_data_bytes() >= 4 << 10);
    }

    #[test]
    fn a_panicking_step_propagates_and_leaves_the_next_one_its_helpers() {
        let caught = std::panic::catch_unwind(|| on_compute_pool(|| panic!("the step failed")));
        assert!(caught.is_err());
        // The panicked call no longer counts as in flight, or every later step would go
        // without helpers. (Other tests' calls may be in flight for a while.)
        let since = std::time::Instant::now();
        while IN_FLIGHT.load(Ordering::Acquire) != 0 {
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "a call stays in flight"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(on_compute_pool(|| step(7)), serial(7));
    }
}
