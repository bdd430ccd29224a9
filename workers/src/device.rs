//! `--device cpu | cuda:N`: where a model runs.

use std::str::FromStr;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The host emulator of the CUDA kernels: the GPU path without a GPU (slow; for tests).
    CudaEmulator,
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not a device: use cpu, cuda or cuda:N (N from 0), or cuda-emulator")
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "cuda-emulator" => Ok(Device::CudaEmulator),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaEmulator => write!(f, "cuda-emulator"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_bad_names_say_what_is_allowed() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!("cuda-emulator".parse::<Device>(), Ok(Device::CudaEmulator));
        for bad in ["gpu", "cuda:x", "cuda:-1"] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(
                err.contains("use cpu, cuda or cuda:N (N from 0), or cuda-emulator"),
                "{err}"
            );
        }
    }
}

/// `--dtype`: how a language model keeps its weights. On a GPU: f32, or bf16 with f32
/// accumulation. On the CPU: the linear layers in f32, bf16 or int8 (LLM.int8: per-row
/// int8 weights, per-token int8 activations, outlier features in f32); norms, convolutions
/// and the recurrences stay f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightStorage {
    F32,
    Bf16,
    Int8,
}

impl WeightStorage {
    /// How the CPU path keeps the linear layers' weights.
    pub fn cpu(self) -> tideway_kernels::matmul::LinearFormat {
        use tideway_kernels::matmul::LinearFormat;
        match self {
            WeightStorage::F32 => LinearFormat::F32,
            WeightStorage::Bf16 => LinearFormat::Bf16,
            WeightStorage::Int8 => LinearFormat::Int8,
        }
    }
}

#[cfg(feature = "cuda")]
impl WeightStorage {
    /// The GPU's storage for these weights.
    pub fn gpu(self) -> tideway_kernels::gpu::WeightDtype {
        match self {
            WeightStorage::F32 => tideway_kernels::gpu::WeightDtype::F32,
            WeightStorage::Bf16 => tideway_kernels::gpu::WeightDtype::Bf16,
            WeightStorage::Int8 => unreachable!("refused for a GPU by LanguageModel::load_placed"),
        }
    }
}

/// What the command line and the server read of a GPU model (of one rank, in a group).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct GpuModelInfo {
    pub family: &'static str,
    pub vocab_size: usize,
    pub output_width: usize,
    pub state_bytes: usize,
    pub weight_bytes: usize,
    pub capacity: usize,
    pub device: Device,
}

impl Default for GpuModelInfo {
    fn default() -> Self {
        GpuModelInfo {
            family: "",
            vocab_size: 0,
            output_width: 0,
            state_bytes: 0,
            weight_bytes: 0,
            capacity: 0,
            device: Device::Cpu,
        }
    }
}

#[cfg(feature = "cuda")]
impl GpuModelInfo {
    pub fn of(m: &tideway_operators::gpu::GpuModel) -> Self {
        let gpu = m.gpu();
        GpuModelInfo {
            family: m.family(),
            vocab_size: m.vocab_size(),
            output_width: m.logits_width(),
            state_bytes: m.state_bytes(),
            weight_bytes: m.weight_bytes(),
            capacity: m.session_capacity(),
            device: match gpu.is_emulated() {
                true => Device::CudaEmulator,
                false => Device::Cuda(gpu.ordinal()),
            },
        }
    }
}

/// Why a session could not start on a model's device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionStartError {
    /// The device's state pool (sized from free device memory) is full.
    #[error(
        "all {slots} session slots on the GPU are in use; end a session first (the pool was sized from free device memory)"
    )]
    PoolFull { slots: usize },
    /// The device failed; the driver's own words.
    #[error("{0}")]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(String),
}

#[cfg(feature = "cuda")]
impl From<tideway_operators::gpu::GpuModelError> for SessionStartError {
    fn from(e: tideway_operators::gpu::GpuModelError) -> Self {
        match e {
            tideway_operators::gpu::GpuModelError::PoolFull { slots } => {
                SessionStartError::PoolFull { slots }
            }
            other => SessionStartError::Device(other.to_string()),
        }
    }
}

#[cfg(feature = "cuda")]
impl<T> From<std::sync::PoisonError<T>> for SessionStartError {
    fn from(_: std::sync::PoisonError<T>) -> Self {
        SessionStartError::Device("the GPU model's lock is poisoned".into())
    }
}
