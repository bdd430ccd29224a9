//! `tideway devices`: the compute this node can use.

use anyhow::Result;

pub fn devices(threads: usize) -> Result<()> {
    println!(
        "cpu: {threads} compute threads, kernels use {}",
        tideway_kernels::cpu::simd_level()
    );
    #[cfg(feature = "cuda")]
    match tideway_kernels::cuda::cuda_devices() {
        Ok(list) if list.is_empty() => println!("cuda: the driver sees no devices"),
        Ok(list) => {
            for d in list {
                println!(
                    "cuda:{}: {} ({:.1} GiB)",
                    d.ordinal,
                    d.name,
                    d.total_memory_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("cuda: unavailable: {e}"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not in this build (build with --features cuda)");
    Ok(())
}
