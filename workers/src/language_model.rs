//! The language model a command or the server runs: whole on the CPU, split over a
//! tensor-parallel group ([`crate::tensor_parallel`]), or on a GPU (feature `cuda`), behind
//! one interface with one session-state type.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tideway_kernels::Tensor;
use tideway_kernels::matmul::LinearFormat;
use tideway_operators::models::{Model, SessionState, check_token_ids, prefill_in_chunks};
use tideway_operators::state_tensors::{StateError, StateTensors};
use tideway_operators::{ForwardError, InputError, LogitRows};

use crate::device::{GpuModelInfo, SessionStartError};
use crate::tensor_parallel::{
    CommStats, ParallelArgs, ParallelModel, ParallelSession, Wiring, load_rank,
};

/// A language model: whole, split over a tensor-parallel group, or on a GPU.
pub enum LanguageModel {
    Whole(Box<Model>),
    Parallel(Box<ParallelModel>),
    /// On a GPU (feature `cuda`), with its sessions' state in the device's slot pool.
    #[cfg(feature = "cuda")]
    Gpu(Box<std::sync::Mutex<tideway_operators::gpu::GpuModel>>),
    /// Split over GPU ranks (`--device` with `--tensor-parallel`).
    #[cfg(feature = "cuda")]
    GpuParallel(Box<crate::gpu_tensor_parallel::GpuParallelModel>),
}

/// One session's state for a [`LanguageModel`].
pub enum LmState {
    Whole(SessionState),
    /// A slot of the GPU's state pool (freed when dropped).
    #[cfg(feature = "cuda")]
    Gpu(tideway_operators::gpu::GpuSession),
    /// Rank 0's slices here; the other ranks hold theirs under its key.
    Parallel(ParallelSession),
    /// Every GPU rank holds its slots under its key.
    #[cfg(feature = "cuda")]
    GpuParallel(crate::gpu_tensor_parallel::GpuParallelSession),
}

impl LmState {
    pub fn position(&self) -> usize {
        match self {
            LmState::Whole(s) => s.position(),
            LmState::Parallel(p) => p.state.position(),
            #[cfg(feature = "cuda")]
            LmState::Gpu(s) => s.position,
            #[cfg(feature = "cuda")]
            LmState::GpuParallel(s) => s.position,
        }
    }
}

/// Each state as the variant `pick` takes, or [`InputError::WrongState`].
fn states_as<'s, T>(
    states: &'s mut [&mut LmState],
    pick: fn(&mut LmState) -> Option<&mut T>,
) -> Result<Vec<&'s mut T>, InputError> {
    states
        .iter_mut()
        .map(|s| pick(s).ok_or(InputError::WrongState))
        .collect()
}

impl LanguageModel {
    /// Loads `dir` on the CPU whole (`parallel.tensor_parallel` 1) or as a tensor-parallel
    /// group, with the residual wiring `wiring`.
    pub fn load_wired(
        dir: &Path,
        parallel: &ParallelArgs,
        wiring: Wiring,
        format: LinearFormat,
    ) -> Result<Self> {
        let context = || format!("cannot load model from {}", dir.display());
        match parallel.tensor_parallel {
            0 => bail!("--tensor-parallel must be at least 1"),
            1 => Ok(LanguageModel::Whole(Box::new(
                load_rank(dir, 0, 1, wiring, format).with_context(context)?,
            ))),
            _ if format != LinearFormat::F32 => bail!(
                "--dtype {} on the CPU runs a whole model; --tensor-parallel keeps f32 weights",
                format!("{format:?}").to_lowercase()
            ),
            size => Ok(LanguageModel::Parallel(Box::new(
                ParallelModel::start(dir, size, parallel, wiring).with_context(context)?,
            ))),
        }
    }

    /// Loads `dir` where `device` says, with `dtype` weights (bf16 on a GPU only), whole or
    /// split over `parallel`'s tensor-parallel group: the one place that decides device,
    /// dtype and split for `run`, `bench` and `serve`. A GPU's state pool holds up to
    /// `gpu_sessions` sessions.
    pub fn load_placed(
        dir: &Path,
        device: crate::device::Device,
        dtype: crate::device::WeightStorage,
        gpu_sessions: usize,
        parallel: &ParallelArgs,
        wiring: Wiring,
    ) -> Result<Self> {
        match device {
            crate::device::Device::Cpu => Self::load_wired(dir, parallel, wiring, dtype.cpu()),
            #[cfg(feature = "cuda")]
            _ if dtype == crate::device::WeightStorage::Int8 => {
                bail!("--dtype int8 is for the CPU (LLM.int8); a GPU keeps f32 or bf16 weights")
            }
            #[cfg(feature = "cuda")]
            device => Self::load_gpu(
                dir,
                device,
                dtype.gpu(),
                gpu_sessions.max(1),
                parallel,
                wiring,
            ),
            #[cfg(not(feature = "cuda"))]
            device => {
                let _ = gpu_sessions;
                bail!(
                    "--device {device}: this tideway was built without CUDA support; build it with `cargo build --release --features cuda`"
                )
            }
        }
    }

    /// Loads `dir` onto a GPU `device` with a state pool of up to `max_sessions` slots; with
    /// `--tensor-parallel`, split over GPU ranks (see [`crate::gpu_tensor_parallel`]).
    #[cfg(feature = "cuda")]
    pub fn load_gpu(
        dir: &Path,
        device: crate::device::Device,
        dtype: tideway_kernels::gpu::WeightDtype,
        max_sessions: usize,
        parallel: &ParallelArgs,
        wiring: Wiring,
    ) -> Result<Self> {
        let context = || format!("cannot load model from {} onto {device}", dir.display());
        match parallel.tensor_parallel {
            0 => bail!("--tensor-parallel must be at least 1"),
            1 => {
                let gpu = crate::gpu::open_device(device)?;
                let mut model =
                    tideway_operators::gpu::load_gpu_model(dir, gpu, dtype, max_sessions)
                        .with_context(context)?;
                if let Some(ladder) = wiring.ladder_for(model.ladder_layers()) {
                    model.set_ladder_layers(ladder);
                }
                Ok(LanguageModel::Gpu(Box::new(std::sync::Mutex::new(model))))
            }
            size => {
                if parallel.tp_transport != crate::tensor_parallel::Transport::Threads {
                    bail!(
                        "on a GPU the tensor-parallel ranks are threads of this process, one GPU each (NCCL between them): leave out --tp-transport"
                    );
                }
                let group = crate::gpu_tensor_parallel::GpuParallelModel::start(
                    dir,
                    device,
                    dtype,
                    max_sessions,
                    size,
                    wiring,
                )
                .with_context(context)?;
                tracing::info!(
                    ranks = size,
                    transport = ?group.transport,
                    "GPU tensor-parallel group started"
                );
                Ok(LanguageModel::GpuParallel(Box::new(group)))
            }
        }
    }

    /// The model on this host's CPU (the whole model, or rank 0's shard); None on a GPU.
    fn cpu(&self) -> Option<&Model> {
        match self {
            LanguageModel::Whole(m) => Some(m),
            LanguageModel::Parallel(p) => Some(p.leader()),
            #[cfg(feature = "cuda")]
            LanguageModel::Gpu(_) | LanguageModel::GpuParallel(_) => None,
        }
    }

    /// What is read of a GPU model (or of rank 0 of a GPU group); None on the CPU.
    #[cfg(feature = "cuda")]
    fn gpu_info(&self) -> Option<GpuModelInfo> {
        match self {
            // Reading a property is safe even after a forward panicked inside the lock.
            LanguageModel::Gpu(m) => Some(GpuModelInfo::of(
                &m.lock().unwrap_or_else(|p| p.into_inner()),
            )),
            LanguageModel::GpuParallel(g) => Some(g.info.clone()),
            _ => None,
        }
    }

    /// A property of the model, wherever it runs.
    fn info<T>(
        &self,
        cpu: impl FnOnce(&Model) -> T,
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] gpu: impl FnOnce(&GpuModelInfo) -> T,
    ) -> T {
        if let Some(m) = self.cpu() {
            return cpu(m);
        }
        #[cfg(feature = "cuda")]
        if let Some(info) = self.gpu_info() {
            return gpu(&info);
        }
        unreachable!("a language model runs on the CPU or a GPU")
    }

    /// Ranks in the group (1 for a whole model).
    pub fn ranks(&self) -> usize {
        match self {
            LanguageModel::Parallel(p) => p.size(),
            #[cfg(feature = "cuda")]
            LanguageModel::GpuParallel(g) => g.size(),
            _ => 1,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.info(Model::vocab_size, |g| g.vocab_size)
    }

    pub fn output_width(&self) -> usize {
        self.info(Model::output_width, |g| g.output_width)
    }

    pub fn family(&self) -> &'static str {
        self.info(Model::family, |g| g.family)
    }

    /// Bytes of one session's state, over all ranks.
    pub fn state_bytes(&self) -> usize {
        self.info(
            |m| m.state_bytes() * self.ranks(),
            |g| g.state_bytes * self.ranks(),
        )
    }

    /// Bytes of the parameters one rank (or the GPU) holds.
    pub fn weight_bytes(&self) -> usize {
        self.info(Model::weight_bytes, |g| g.weight_bytes)
    }

    /// Where the model runs.
    pub fn device(&self) -> crate::device::Device {
        #[cfg(feature = "cuda")]
        if let Some(info) = self.gpu_info() {
            return info.device;
        }
        crate::device::Device::Cpu
    }

    /// Sessions that fit (the GPU's state pool); None where only host memory limits them.
    pub fn session_capacity(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let LanguageModel::GpuParallel(g) = self {
            return Some(g.session_capacity());
        }
        self.info(|_| None, |g| Some(g.capacity))
    }

    /// A fresh session, or why none can start (the GPU's state pool is full).
    pub fn new_state(&self) -> Result<LmState, SessionStartError> {
        match self {
            LanguageModel::Whole(m) => Ok(LmState::Whole(m.new_state())),
            LanguageModel::Parallel(p) => Ok(LmState::Parallel(p.new_state())),
            #[cfg(feature = "cuda")]
            LanguageModel::Gpu(m) => Ok(LmState::Gpu(m.lock()?.new_session()?)),
            #[cfg(feature = "cuda")]
            LanguageModel::GpuParallel(g) => g.new_state().map(LmState::GpuParallel),
        }
    }

    /// Writes a session's state as named tensors (a whole CPU model's sessions only: a
    /// tensor-parallel group's or a GPU's state is spread over ranks or device memory).
    pub fn export_state(&self, state: &LmState, out: &mut StateTensors) -> Result<(), StateError> {
        match (self, state) {
            (LanguageModel::Whole(m), LmState::Whole(s)) => {
                m.export_state(s, out);
                Ok(())
            }
            _ => Err(self.no_state_io()),
        }
    }

    /// A session taken from named tensors (a whole CPU model only).
    pub fn import_state(&self, from: &StateTensors) -> Result<LmState, StateError> {
        match self {
            LanguageModel::Whole(m) => Ok(LmState::Whole(m.import_state(from)?)),
            _ => Err(self.no_state_io()),
        }
    }

    fn no_state_io(&self) -> StateError {
        StateError::Unsupported {
            what: match self {
                LanguageModel::Parallel(_) => "a session of a tensor-parallel group".into(),
                _ => "a session on a GPU".into(),
            },
        }
    }

    /// The packed batch (see `Model::forward_packed`); on a group, run by every rank.
    pub fn forward_packed(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut LmState],
    ) -> Result<Tensor, ForwardError> {
        self.forward_packed_rows(tokens, lens, states, LogitRows::All)
    }

    /// [`forward_packed`](Self::forward_packed) with the logits of `rows` only: the head runs
    /// over those rows alone (on a group, rank 0's).
    pub fn forward_packed_rows(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut LmState],
        rows: LogitRows<'_>,
    ) -> Result<Tensor, ForwardError> {
        match self {
            LanguageModel::Whole(m) => {
                let mut inner = states_as(states, |s| match s {
                    LmState::Whole(s) => Some(s),
                    _ => None,
                })?;
                Ok(m.forward_packed_rows(tokens, lens, &mut inner, rows)?)
            }
            LanguageModel::Parallel(p) => {
                let mut inner = states_as(states, |s| match s {
                    LmState::Parallel(s) => Some(s),
                    _ => None,
                })?;
                p.forward_packed(tokens, lens, &mut inner, rows)
            }
            #[cfg(feature = "cuda")]
            LanguageModel::Gpu(m) => {
                use tideway_operators::gpu::GpuModelError;
                let mut sessions = states_as(states, |s| match s {
                    LmState::Gpu(g) => Some(g),
                    _ => None,
                })?;
                let mut m = m
                    .lock()
                    .map_err(|_| ForwardError::Device("the GPU model's lock is poisoned".into()))?;
                m.forward_packed_rows(tokens, lens, &mut sessions, rows)
                    .map_err(|e| match e {
                        GpuModelError::Input(e) => ForwardError::Input(e),
                        other => ForwardError::Device(other.to_string()),
                    })
            }
            #[cfg(feature = "cuda")]
            LanguageModel::GpuParallel(g) => {
                let mut inner = states_as(states, |s| match s {
                    LmState::GpuParallel(s) => Some(s),
                    _ => None,
                })?;
                g.forward_packed(tokens, lens, &mut inner, rows)
            }
        }
    }

    /// The chunked form over a whole sequence in chunks of `chunk_len`, `on_chunk(done,
    /// total)` after each.
    pub fn prefill_chunked_with_progress(
        &self,
        tokens: &[u32],
        state: &mut LmState,
        chunk_len: usize,
        on_chunk: impl FnMut(usize, usize),
    ) -> Result<Tensor, ForwardError> {
        let (vocab, width) = (self.vocab_size(), self.output_width());
        prefill_in_chunks(tokens, vocab, width, chunk_len, on_chunk, |chunk| {
            self.forward_packed(chunk, &[chunk.len()], &mut [&mut *state])
        })
    }

    /// A prompt in chunks of `chunk_len` (`on_chunk(done, total)` after each), as
    /// [`prefill_chunked_with_progress`](Self::prefill_chunked_with_progress), with the logits
    /// of its last row only: what generation needs (the head runs over one row a chunk).
    pub fn prefill_last_logits(
        &self,
        tokens: &[u32],
        state: &mut LmState,
        chunk_len: usize,
        mut on_chunk: impl FnMut(usize, usize),
    ) -> Result<Vec<f32>, ForwardError> {
        // The whole prompt is checked first, so that a bad id never leaves the state advanced
        // by the chunks before it.
        if tokens.is_empty() {
            return Err(InputError::Empty.into());
        }
        check_token_ids(tokens, self.vocab_size(), 0)?;
        let mut last = Vec::new();
        let mut done = 0;
        for chunk in tokens.chunks(chunk_len.max(1)) {
            let logits = self.forward_packed_rows(
                chunk,
                &[chunk.len()],
                &mut [&mut *state],
                LogitRows::LastOf(&[true]),
            )?;
            last = logits.into_vec();
            done += chunk.len();
            on_chunk(done, tokens.len());
        }
        Ok(last)
    }

    /// One token for each session.
    pub fn step(
        &self,
        tokens: &[u32],
        states: &mut [&mut LmState],
    ) -> Result<Tensor, ForwardError> {
        if tokens.len() != states.len() {
            return Err(InputError::BatchMismatch {
                sessions: states.len(),
                tokens: tokens.len(),
            }
            .into());
        }
        self.forward_packed(tokens, &vec![1; tokens.len()], states)
    }

    /// Communication so far (zeros without tensor parallelism).
    pub fn comm_stats(&self) -> CommStats {
        match self {
            LanguageModel::Parallel(p) => p.comm_stats(),
            #[cfg(feature = "cuda")]
            LanguageModel::GpuParallel(g) => g.comm_stats(),
            _ => CommStats::default(),
        }
    }
}
