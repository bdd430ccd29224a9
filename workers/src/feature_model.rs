//! The feature model (LMUFormer) a server runs: on the CPU, or on a GPU (feature `cuda`),
//! behind one interface with one stream-state type. The CPU model is always loaded: its
//! config, front end and metadata answer for both.

use tideway_operators::InputError;
use tideway_operators::layers::frames::Frames;
use tideway_operators::models::{LmuFormer, LmuFormerState};
use tideway_operators::state_tensors::{StateError, StateTensors};

use crate::device::{Device, SessionStartError};

pub struct FeatureModel {
    model: LmuFormer,
    #[cfg(feature = "cuda")]
    gpu: Option<std::sync::Mutex<tideway_operators::gpu::GpuLmuFormer>>,
}

/// One stream's state.
pub enum FeatureState {
    Cpu(LmuFormerState),
    #[cfg(feature = "cuda")]
    Gpu(tideway_operators::gpu::GpuLmuSession),
}

impl FeatureState {
    /// Which rows of the last forward's output the frame gate skipped (CPU streams; empty:
    /// none).
    pub fn take_skipped(&mut self) -> Vec<bool> {
        match self {
            FeatureState::Cpu(s) => s.take_skipped(),
            #[cfg(feature = "cuda")]
            FeatureState::Gpu(_) => Vec::new(),
        }
    }

    /// Output frames emitted so far.
    pub fn frames_out(&self) -> usize {
        match self {
            FeatureState::Cpu(s) => s.frames_out(),
            #[cfg(feature = "cuda")]
            FeatureState::Gpu(s) => s.frames_out(),
        }
    }
}

/// Why a feature forward failed: the input, or the device.
pub enum FeatureError {
    Input(InputError),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(String),
}

impl std::ops::Deref for FeatureModel {
    type Target = LmuFormer;

    fn deref(&self) -> &LmuFormer {
        &self.model
    }
}

impl FeatureModel {
    /// `model` on `device` (a GPU holds a pool of up to `max_sessions` streams).
    pub fn place(
        model: LmuFormer,
        device: Device,
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] max_sessions: usize,
    ) -> anyhow::Result<Self> {
        if device != Device::Cpu && model.gates_frames() {
            anyhow::bail!(
                "frame pruning (tideway_frame_gate in config.json) runs on the CPU path; leave out --device {device} or the block"
            );
        }
        match device {
            Device::Cpu => Ok(FeatureModel {
                model,
                #[cfg(feature = "cuda")]
                gpu: None,
            }),
            #[cfg(feature = "cuda")]
            device => {
                let gpu = crate::gpu::open_device(device)?;
                let placed =
                    tideway_operators::gpu::GpuLmuFormer::upload(&model, gpu, max_sessions)?;
                Ok(FeatureModel {
                    model,
                    gpu: Some(std::sync::Mutex::new(placed)),
                })
            }
            #[cfg(not(feature = "cuda"))]
            device => anyhow::bail!(
                "--device {device}: this tideway was built without CUDA support; build it with `cargo build --release --features cuda`"
            ),
        }
    }

    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu
            && let Ok(g) = gpu.lock()
        {
            return match g.gpu().is_emulated() {
                true => Device::CudaEmulator,
                false => Device::Cuda(g.gpu().ordinal()),
            };
        }
        Device::Cpu
    }

    /// Streams that fit (a GPU's pool); None where only host memory limits them.
    pub fn session_capacity(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.lock().ok().map(|g| g.session_capacity());
        }
        None
    }

    /// A fresh stream, or why none can start (a GPU's pool is full).
    pub fn new_stream(&self) -> Result<FeatureState, SessionStartError> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return Ok(FeatureState::Gpu(gpu.lock()?.new_session()?));
        }
        Ok(FeatureState::Cpu(self.model.new_state()))
    }

    /// Writes a stream's state as named tensors (CPU streams only).
    pub fn export_state(
        &self,
        state: &FeatureState,
        out: &mut StateTensors,
    ) -> Result<(), StateError> {
        match state {
            FeatureState::Cpu(s) => {
                self.model.export_state(s, out);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            FeatureState::Gpu(_) => Err(StateError::Unsupported {
                what: "a stream on a GPU".into(),
            }),
        }
    }

    /// A stream taken from named tensors (on the CPU; a GPU's pool takes none yet).
    pub fn import_state(&self, from: &StateTensors) -> Result<FeatureState, StateError> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return Err(StateError::Unsupported {
                what: "a stream on a GPU".into(),
            });
        }
        Ok(FeatureState::Cpu(self.model.import_state(from)?))
    }

    /// Every stream's new frames (see `LmuFormer::forward`); a model that gates its frames
    /// takes the prune stage's decisions, `keep[i]` for stream i.
    pub fn forward(
        &self,
        states: &mut [&mut FeatureState],
        input: &Frames,
        ends: &[bool],
        keep: &[Vec<bool>],
    ) -> Result<Frames, FeatureError> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            use tideway_operators::gpu::GpuModelError;
            let mut sessions = states
                .iter_mut()
                .map(|s| match &mut **s {
                    FeatureState::Gpu(g) => Ok(g),
                    FeatureState::Cpu(_) => Err(FeatureError::Input(InputError::WrongState)),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut g = gpu
                .lock()
                .map_err(|_| FeatureError::Device("the GPU model's lock is poisoned".into()))?;
            return g.forward(&mut sessions, input, ends).map_err(|e| match e {
                GpuModelError::Input(e) => FeatureError::Input(e),
                other => FeatureError::Device(other.to_string()),
            });
        }
        let mut cpu = states
            .iter_mut()
            .map(|s| match &mut **s {
                FeatureState::Cpu(c) => Ok(c),
                #[cfg(feature = "cuda")]
                FeatureState::Gpu(_) => Err(FeatureError::Input(InputError::WrongState)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match self.model.gates_frames() {
            true => self.model.forward_decided(&mut cpu, input, ends, keep),
            false => self.model.forward(&mut cpu, input, ends),
        }
        .map_err(FeatureError::Input)
    }
}
