//! `--device cpu | cuda:N`: where a model runs.

use std::str::FromStr;

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
