//! CUDA devices through cudarc's driver API. The driver library (`libcuda`) is loaded at run
//! time, so this module builds on machines without CUDA and reports its absence as an error.

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver library (libcuda.so) could be loaded on this machine")]
    NoDriver,
    #[error("CUDA driver error: {0}")]
    Driver(String),
}

/// The CUDA devices the driver sees (an empty list when it sees none).
pub fn cuda_devices() -> Result<Vec<CudaDeviceInfo>, CudaError> {
    use cudarc::driver::CudaContext;
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let driver = |e: cudarc::driver::DriverError| CudaError::Driver(e.to_string());
    let count = CudaContext::device_count().map_err(driver)?;
    (0..count.max(0) as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(driver)?;
            Ok(CudaDeviceInfo {
                ordinal,
                name: ctx.name().map_err(driver)?,
                total_memory_bytes: ctx.total_mem().map_err(driver)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_devices_never_panics() {
        // Here (no GPU) this is the NoDriver path; on a GPU machine, a list with names.
        match cuda_devices() {
            Ok(devices) => {
                for d in devices {
                    assert!(!d.name.is_empty() && d.total_memory_bytes > 0);
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
