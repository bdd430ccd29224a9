//! Models on a GPU (feature `cuda`): the same checkpoints and math as the CPU models, with
//! weights (f32 or bf16) and every session's recurrent state resident on the device.
//!
//! The CPU models are the reference: `tideway gpu-check` compares the two on the committed
//! fixtures. Every family runs here: Mamba, the linear-attention family and the LMUFormers.

pub mod tensor_parallel;

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tideway_kernels::Tensor;
use tideway_kernels::gpu::{
    Arg, DevMat, DeviceBuffer, DeviceLinear, DeviceMatrix, Gpu, GpuError, Scratch, WeightDtype,
};

use tideway_kernels::collective::CollectiveError;

use crate::LogitRows;
use crate::checkpoint::Checkpoint;
use crate::error::{InputError, LoadError};
use crate::models::config::ConfigJson;
use crate::models::family::Checkpointed;
use tensor_parallel::{DeviceGroup, DeviceResidualStream};

pub use crate::models::fla::gpu::GpuFlaLm;
pub use crate::models::lmuformer::gpu::{GpuLmuFormer, GpuLmuSession};
pub use crate::models::mamba::gpu::GpuMambaLm;

/// Why a GPU model could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum GpuModelError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Group(#[from] CollectiveError),
    #[error(
        "all {slots} session slots on the GPU are in use; end a session first (the pool was sized from free device memory)"
    )]
    PoolFull { slots: usize },
}

/// A session's place in a model's state pool, and how many tokens it has consumed. Dropping
/// it returns the slot to the pool.
#[derive(Debug)]
pub struct GpuSession {
    pub(crate) slot: usize,
    pub position: usize,
    free_slots: Arc<Mutex<Vec<usize>>>,
}

impl Drop for GpuSession {
    fn drop(&mut self) {
        if let Ok(mut free) = self.free_slots.lock() {
            free.push(self.slot);
        }
    }
}

/// The free slots of a device-resident state pool.
pub(crate) struct SlotPool {
    free: Arc<Mutex<Vec<usize>>>,
    pub slots: usize,
}

impl SlotPool {
    /// Sizes the pool: `wanted` slots, or fewer if free device memory (less a tenth, and room
    /// for `activations` bytes of temporaries) holds fewer sessions of `per_session` bytes.
    pub fn sized(
        gpu: &Gpu,
        wanted: usize,
        per_session: usize,
        activations: usize,
    ) -> Result<Self, GpuError> {
        let (free, _) = gpu.memory()?;
        let budget = (free as f64 * 0.9) as usize;
        let fit = budget.saturating_sub(activations) / per_session.max(1);
        let slots = wanted.min(fit);
        if slots == 0 {
            return Err(GpuError::Unsupported(format!(
                "the GPU has {:.1} GiB free: not enough for one session's state ({per_session} bytes) beside the weights",
                free as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(SlotPool {
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
            slots,
        })
    }

    /// Takes a slot (its state must be zeroed by the caller).
    pub fn take(&self) -> Result<GpuSession, GpuModelError> {
        let slot = self
            .free
            .lock()
            .expect("slot list")
            .pop()
            .ok_or(GpuModelError::PoolFull { slots: self.slots })?;
        Ok(GpuSession {
            slot,
            position: 0,
            free_slots: self.free.clone(),
        })
    }
}

/// Zeroes slot `slot` of a pool buffer holding `per_slot` floats per slot.
pub(crate) fn zero_slot(
    gpu: &Gpu,
    pool: &mut DeviceBuffer<f32>,
    slot: usize,
    per_slot: usize,
) -> Result<(), GpuError> {
    gpu.zero_range(pool, slot * per_slot..(slot + 1) * per_slot)
}

/// A packed batch's layout on the device: each session's first row, row count and slot, and
/// every row's position in its sequence (for RoPE).
pub(crate) struct DeviceBatch {
    pub segments: usize,
    pub starts: u64,
    pub lens: u64,
    pub slots: u64,
    pub positions: u64,
    /// The same layout on the host: each session's rows and slot.
    pub rows: Vec<Range<usize>>,
    pub slot_of: Vec<usize>,
    /// Rows per time chunk of the recurrences' chunked form (one long sequence).
    pub scan_chunk: usize,
    // The buffers the addresses point into.
    _buffers: [DeviceBuffer<i32>; 4],
}

impl DeviceBatch {
    pub fn upload(
        gpu: &Gpu,
        segments: &[Range<usize>],
        sessions: &[&mut GpuSession],
    ) -> Result<Self, GpuError> {
        let starts: Vec<i32> = segments.iter().map(|s| s.start as i32).collect();
        let lens: Vec<i32> = segments.iter().map(|s| s.len() as i32).collect();
        let slots: Vec<i32> = sessions.iter().map(|s| s.slot as i32).collect();
        let positions: Vec<i32> = segments
            .iter()
            .zip(sessions)
            .flat_map(|(rows, s)| (0..rows.len()).map(move |t| (s.position + t) as i32))
            .collect();
        let buffers = [
            gpu.upload(&starts)?,
            gpu.upload(&lens)?,
            gpu.upload(&slots)?,
            gpu.upload(&positions)?,
        ];
        Ok(DeviceBatch {
            rows: segments.to_vec(),
            slot_of: sessions.iter().map(|s| s.slot).collect(),
            scan_chunk: 64,
            segments: segments.len(),
            starts: gpu.ptr(&buffers[0]),
            lens: gpu.ptr(&buffers[1]),
            slots: gpu.ptr(&buffers[2]),
            positions: gpu.ptr(&buffers[3]),
            _buffers: buffers,
        })
    }
}

/// The end of a language model's forward: the final norm and the LM head (its own weight, or
/// the embedding when tied).
pub(crate) struct FinalLayers<'a> {
    pub norm: &'a DeviceBuffer<f32>,
    pub eps: f32,
    pub lm_head: Option<&'a DeviceLinear>,
    pub embedding: &'a DeviceMatrix,
    pub width: usize,
    /// The forward's `[m, d]` buffer the final norm writes.
    pub normed: &'a DeviceBuffer<f32>,
    pub scratch: &'a mut Scratch,
}

impl FinalLayers<'_> {
    /// Finishes a forward on a rank: every sub-block output added to the stream, the sessions
    /// advanced by their rows, then (where `logits` asks: the leader) the final norm and the
    /// head over the rows it names, their logits on the host.
    pub fn finish(
        self,
        gpu: &Gpu,
        stream: DeviceResidualStream,
        group: &mut DeviceGroup<'_>,
        sessions: &mut [&mut GpuSession],
        lens: &[usize],
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, GpuModelError> {
        let residual = stream.finish(gpu, group)?;
        for (session, len) in sessions.iter_mut().zip(lens) {
            session.position += len;
        }
        if logits == LogitRows::None {
            return Ok(None);
        }
        let (d, v) = (self.norm.len(), self.width);
        let p = |b: &DeviceBuffer<f32>| gpu.ptr(b);
        // Only the rows asked for, gathered before the norm.
        let (rows, kept) = match logits.subset(lens) {
            Some(keep) => {
                let kept = gpu.zeros(keep.len() * d)?;
                if !keep.is_empty() {
                    let ids: Vec<u32> = keep.iter().map(|&row| row as u32).collect();
                    let ids = gpu.upload(&ids)?;
                    gpu.gather_rows(p(&residual), gpu.ptr(&ids), keep.len(), d, p(&kept))?;
                }
                (keep.len(), kept)
            }
            None => (lens.iter().sum::<usize>(), residual),
        };
        let normed = self.normed;
        gpu.rms_norm(p(&kept), p(self.norm), rows, d, self.eps, p(normed))?;
        let x = DevMat::dense(gpu, normed, rows, d);
        let out = gpu.zeros(rows * v)?;
        match self.lm_head {
            Some(head) => head.forward(gpu, x, gpu.ptr(&out), self.scratch)?,
            None => gpu.gemm(x, self.embedding, v, gpu.ptr(&out), self.scratch)?,
        }
        let host = gpu.download(&out, rows * v)?;
        Ok(Some(
            Tensor::from_vec(host, &[rows, v]).expect("logits sized [rows, v]"),
        ))
    }
}

impl DeviceBatch {
    /// The one session's rows and slot when the batch is a single sequence long enough for
    /// the recurrences' chunked form (two chunks or more).
    pub fn long_sequence(&self) -> Option<(&Range<usize>, usize)> {
        match (&self.rows[..], &self.slot_of[..]) {
            ([rows], [slot]) if rows.len() >= 2 * self.scan_chunk => Some((rows, *slot)),
            _ => None,
        }
    }

    /// Where a recurrence runs: the chunks of a chunked form over their carried states, or
    /// the batch's sessions over the pool `state`.
    pub fn scan_layout(&self, gpu: &Gpu, chunked: Option<&ChunkedScan>, state: u64) -> ScanLayout {
        match chunked {
            Some(c) => ScanLayout {
                state: gpu.ptr(&c.carried),
                starts: c.starts,
                lens: c.lens,
                slots: c.slots,
                count: c.count,
            },
            None => ScanLayout {
                state,
                starts: self.starts,
                lens: self.lens,
                slots: self.slots,
                count: self.segments,
            },
        }
    }
}

/// The state and segments a recurrence kernel walks.
pub(crate) struct ScanLayout {
    pub state: u64,
    pub starts: u64,
    pub lens: u64,
    pub slots: u64,
    pub count: usize,
}

/// The carried states of a recurrence run in time chunks, and the chunks as segments of it.
pub(crate) struct ChunkedScan {
    pub carried: DeviceBuffer<f32>,
    pub starts: u64,
    pub lens: u64,
    pub slots: u64,
    pub count: usize,
    _segments: [DeviceBuffer<i32>; 3],
}

impl ChunkedScan {
    /// Pass B over `elements` state values per slot (`mamba_chunk_carry`: the session's pooled
    /// state `state` at `slot` enters chunk 0; afterwards it holds the state after the last),
    /// given pass A's per-chunk ends and decay products; and the chunks of `rows` as segments.
    pub fn carry(
        gpu: &Gpu,
        ends: (&DeviceBuffer<f32>, &DeviceBuffer<f32>),
        elements: usize,
        state: u64,
        slot: usize,
        rows: &Range<usize>,
        len: usize,
    ) -> Result<Self, GpuError> {
        let chunks = rows.len().div_ceil(len);
        let carried = gpu.zeros(chunks * elements)?;
        gpu.launch_grid(
            "mamba_chunk_carry",
            (elements.div_ceil(128) as u32, 1),
            128,
            &[
                Arg::Ptr(gpu.ptr(ends.0)),
                Arg::Ptr(gpu.ptr(ends.1)),
                Arg::I32(chunks as i32),
                Arg::I32(elements as i32),
                Arg::I32(1),
                Arg::Ptr(state),
                Arg::I32(slot as i32),
                Arg::Ptr(gpu.ptr(&carried)),
            ],
        )?;
        Self::segments(gpu, carried, rows, len)
    }

    /// The chunks of `rows` (`len` rows each) as segments over `carried`'s slots.
    pub fn segments(
        gpu: &Gpu,
        carried: DeviceBuffer<f32>,
        rows: &Range<usize>,
        len: usize,
    ) -> Result<Self, GpuError> {
        let chunks = rows.len().div_ceil(len);
        let starts: Vec<i32> = (0..chunks).map(|k| (rows.start + k * len) as i32).collect();
        let lens: Vec<i32> = (0..chunks)
            .map(|k| len.min(rows.len() - k * len) as i32)
            .collect();
        let slots: Vec<i32> = (0..chunks as i32).collect();
        let segments = [
            gpu.upload(&starts)?,
            gpu.upload(&lens)?,
            gpu.upload(&slots)?,
        ];
        Ok(ChunkedScan {
            starts: gpu.ptr(&segments[0]),
            lens: gpu.ptr(&segments[1]),
            slots: gpu.ptr(&segments[2]),
            count: chunks,
            carried,
            _segments: segments,
        })
    }
}

/// A language model of one family on a GPU: what every family's GPU model implements once
/// (the device side of [`crate::models::LanguageFamily`]), its sessions' state in a
/// device-resident pool.
pub trait GpuLanguageFamily: Send {
    fn gpu(&self) -> &Gpu;
    fn family(&self) -> &'static str;
    fn vocab_size(&self) -> usize;
    fn logits_width(&self) -> usize;
    /// Bytes of one session's state (on the device).
    fn state_bytes(&self) -> usize;
    fn weight_bytes(&self) -> usize;
    /// Sessions the state pool holds.
    fn session_capacity(&self) -> usize;
    /// Rows per time chunk of the recurrences' chunked form for one long sequence.
    fn set_scan_chunk(&mut self, rows: usize);
    /// A fresh session: a free slot, its state zeroed.
    fn new_session(&mut self) -> Result<GpuSession, GpuModelError>;
    /// One rank's forward of a packed batch in a tensor-parallel group (the logits of the
    /// rows `logits` asks for).
    fn forward_in_group(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
        group: &mut tensor_parallel::DeviceGroup<'_>,
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, GpuModelError>;
    fn ladder(&self) -> &[bool];
    fn ladder_mut(&mut self) -> &mut Vec<bool>;
}

/// Where a GPU model loads: the device, its weights' storage, the state pool's size, and the
/// tensor-parallel rank's shard.
pub struct GpuPlacement {
    pub gpu: Gpu,
    pub dtype: WeightDtype,
    pub max_sessions: usize,
    pub rank: usize,
    pub size: usize,
}

/// A GPU language-model family: its model loads from the checkpoint that its CPU family opens
/// for a tensor-parallel rank ([`Checkpointed::open`]).
pub trait GpuFamily: GpuLanguageFamily + Sized + 'static {
    type Cpu: Checkpointed;
    /// Loads the checkpoint onto `gpu` in `dtype`, with a state pool of up to `max_sessions`
    /// slots (fewer if free device memory, after the weights, holds fewer).
    fn load(
        config: <Self::Cpu as Checkpointed>::Config,
        checkpoint: &Checkpoint,
        gpu: Gpu,
        dtype: WeightDtype,
        max_sessions: usize,
    ) -> Result<Self, GpuModelError>;
}

/// The registry's GPU loader of family `G`: the placement's shard of the checkpoint in `dir`.
pub fn load_gpu_family<G: GpuFamily>(
    config: &ConfigJson,
    dir: &Path,
    placement: GpuPlacement,
) -> Result<GpuModel, GpuModelError> {
    let (family_config, checkpoint) = G::Cpu::open(config, dir, placement.rank, placement.size)?;
    let model = G::load(
        family_config,
        &checkpoint,
        placement.gpu,
        placement.dtype,
        placement.max_sessions,
    )?;
    Ok(GpuModel::new(Box::new(model)))
}

/// A GPU language model of any family the GPU path runs.
pub struct GpuModel(Box<dyn GpuLanguageFamily>);

impl GpuModel {
    pub fn new(family: Box<dyn GpuLanguageFamily>) -> Self {
        GpuModel(family)
    }

    pub fn gpu(&self) -> &Gpu {
        self.0.gpu()
    }

    pub fn family(&self) -> &'static str {
        self.0.family()
    }

    pub fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }

    pub fn logits_width(&self) -> usize {
        self.0.logits_width()
    }

    pub fn state_bytes(&self) -> usize {
        self.0.state_bytes()
    }

    pub fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }

    pub fn session_capacity(&self) -> usize {
        self.0.session_capacity()
    }

    pub fn check_tokens(&self, tokens: &[u32], offset: usize) -> Result<(), InputError> {
        crate::models::check_token_ids(tokens, self.vocab_size(), offset)
    }

    /// Rows per time chunk of the recurrences' chunked form for one long sequence.
    pub fn set_scan_chunk(&mut self, rows: usize) {
        self.0.set_scan_chunk(rows)
    }

    pub fn new_session(&mut self) -> Result<GpuSession, GpuModelError> {
        self.0.new_session()
    }

    /// The packed batch (see `Model::forward_packed`): session `i` takes the next `lens[i]`
    /// tokens; logits for every row, on the host.
    pub fn forward_packed(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
    ) -> Result<Tensor, GpuModelError> {
        self.forward_packed_rows(tokens, lens, sessions, LogitRows::All)
    }

    /// [`forward_packed`](Self::forward_packed) with the logits of `rows` only (the final norm
    /// and the head run over those rows alone, and only they are downloaded).
    pub fn forward_packed_rows(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
        rows: LogitRows<'_>,
    ) -> Result<Tensor, GpuModelError> {
        let width = self.logits_width();
        tensor_parallel::single_gpu(|group| {
            self.forward_in_group(tokens, lens, sessions, group, rows)
        })
        .map(|logits| logits.unwrap_or_else(|| Tensor::zeros(&[0, width])))
    }

    /// One rank's forward in a tensor-parallel group (the logits of `logits`' rows).
    pub fn forward_in_group(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
        group: &mut tensor_parallel::DeviceGroup<'_>,
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, GpuModelError> {
        self.0
            .forward_in_group(tokens, lens, sessions, group, logits)
    }

    pub fn ladder_layers(&self) -> &[bool] {
        self.0.ladder()
    }

    /// Rewires the model (see `Model::set_ladder_layers`).
    pub fn set_ladder_layers(&mut self, ladder: Vec<bool>) {
        let config_ladder = self.0.ladder_mut();
        assert_eq!(ladder.len(), config_ladder.len(), "one flag per layer");
        *config_ladder = ladder;
    }
}

/// Loads the checkpoint in `dir` onto `gpu`: Mamba or the linear-attention family, or an
/// error naming what must stay on the CPU.
pub fn load_gpu_model(
    dir: &Path,
    gpu: Gpu,
    dtype: WeightDtype,
    max_sessions: usize,
) -> Result<GpuModel, GpuModelError> {
    load_gpu_model_rank(dir, gpu, dtype, max_sessions, 0, 1)
}

/// Loads rank `rank`'s shard of the model in `dir` (a tensor-parallel group of `size`) onto
/// `gpu` through its family's GPU loader: the same slices as the CPU ranks (each family's
/// `open`).
pub fn load_gpu_model_rank(
    dir: &Path,
    gpu: Gpu,
    dtype: WeightDtype,
    max_sessions: usize,
    rank: usize,
    size: usize,
) -> Result<GpuModel, GpuModelError> {
    let config = ConfigJson::read(dir)?;
    let Some(load) = crate::models::family::family_of(&config)?.load_gpu else {
        return Err(GpuModelError::Load(LoadError::Unsupported {
            path: config.path().to_path_buf(),
            reason: "this model's family has no GPU model here; leave out --device".into(),
        }));
    };
    load(
        &config,
        dir,
        GpuPlacement {
            gpu,
            dtype,
            max_sessions,
            rank,
            size,
        },
    )
}
