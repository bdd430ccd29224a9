//! The Mamba (v1) language model on a GPU (`shared/SPEC-MODELS.md` §1; the CPU model in
//! `mod.rs` beside it is the reference). Products through cuBLAS, the conv and the selective
//! scan through `kernels/cuda/mamba.cu`; every session's conv window and SSM state live in a
//! device-resident pool of slots, so a batched step reads and writes them in place.

use tideway_kernels::Tensor;
use tideway_kernels::gpu::{
    Arg, DevMat, DeviceBuffer, DeviceLinear, DeviceMatrix, Gpu, GpuError, MAX_CONV, MAX_STATE,
    Scratch, WeightDtype,
};

use crate::LogitRows;
use crate::checkpoint::Checkpoint;
use crate::gpu::tensor_parallel::{DeviceGroup, DeviceResidualStream};
use crate::gpu::{
    ChunkedScan, DeviceBatch, FinalLayers, GpuFamily, GpuLanguageFamily, GpuModelError, GpuSession,
    SlotPool, zero_slot,
};
use crate::models::mamba::MambaConfig;
use crate::models::packed_segments;

/// A batch whose longest segment has this many rows or more runs the conv over (channel, row)
/// threads (`mamba_conv_silu_rows` and `mamba_conv_window`, two launches); shorter ones (a
/// decode step's one row a session) walk their rows in one launch (`mamba_conv_silu`).
const CONV_ROWS_MIN: usize = 8;

struct GpuMixer {
    in_proj: DeviceLinear,
    conv_weight: DeviceBuffer<f32>,
    conv_bias: DeviceBuffer<f32>,
    x_proj: DeviceLinear,
    /// dt_proj without its bias: the scan kernel adds `dt_bias` before the softplus.
    dt_proj: DeviceLinear,
    dt_bias: DeviceBuffer<f32>,
    /// `A = -exp(A_log)`, `[E, N]`.
    a: DeviceBuffer<f32>,
    d: DeviceBuffer<f32>,
    out_proj: DeviceLinear,
}

struct GpuBlock {
    norm: DeviceBuffer<f32>,
    mixer: GpuMixer,
}

/// One layer's state pool: `[slots, E, K]` conv windows and `[slots, E, N]` SSM states.
struct LayerPool {
    conv: DeviceBuffer<f32>,
    ssm: DeviceBuffer<f32>,
}

pub struct GpuMambaLm {
    pub config: MambaConfig,
    pub dtype: WeightDtype,
    gpu: Gpu,
    /// The input embedding (`[V, D]`); a tied head reads the same matrix.
    embedding: DeviceMatrix,
    blocks: Vec<GpuBlock>,
    norm_f: DeviceBuffer<f32>,
    /// The LM head when untied.
    lm_head: Option<DeviceLinear>,
    pools: Vec<LayerPool>,
    slots: SlotPool,
    scratch: Scratch,
    /// Rows per time chunk of the scan for one long sequence.
    scan_chunk: usize,
}

/// Addresses the chunked scan reads.
struct ScanInputs {
    xc: u64,
    dt: u64,
    dt_bias: u64,
    a: u64,
    dbc: u64,
    r: usize,
    state: u64,
}

/// Passes A and B of the chunked scan for the one session's rows `rows` (slot `slot`).
fn chunk_starts(
    gpu: &Gpu,
    rows: &std::ops::Range<usize>,
    slot: usize,
    len: usize,
    (e, n): (usize, usize),
    x: &ScanInputs,
) -> Result<ChunkedScan, GpuError> {
    let total = rows.len();
    let chunks = total.div_ceil(len);
    let h_end = gpu.zeros(chunks * e * n)?;
    let p_end = gpu.zeros(chunks * e * n)?;
    let threads = (e * n).div_ceil(128) as u32;
    gpu.launch_grid(
        "mamba_chunk_ends",
        (threads, chunks as u32),
        128,
        &[
            Arg::Ptr(x.xc),
            Arg::Ptr(x.dt),
            Arg::Ptr(x.dt_bias),
            Arg::Ptr(x.a),
            Arg::Ptr(x.dbc),
            Arg::I32(x.r as i32),
            Arg::I32(n as i32),
            Arg::I32(e as i32),
            Arg::I32(rows.start as i32),
            Arg::I32(total as i32),
            Arg::I32(len as i32),
            Arg::Ptr(gpu.ptr(&h_end)),
            Arg::Ptr(gpu.ptr(&p_end)),
        ],
    )?;
    // h_end and p_end are freed after the carry is enqueued: frees are ordered on the stream.
    ChunkedScan::carry(gpu, (&h_end, &p_end), e * n, x.state, slot, rows, len)
}

impl GpuFamily for GpuMambaLm {
    type Cpu = crate::models::mamba::MambaLm;

    fn load(
        config: MambaConfig,
        checkpoint: &Checkpoint,
        gpu: Gpu,
        dtype: WeightDtype,
        max_sessions: usize,
    ) -> Result<Self, GpuModelError> {
        let c = config.mixer;
        let (d, e, n, k, r) = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank);
        if k > MAX_CONV || n > MAX_STATE {
            return Err(GpuError::Unsupported(format!(
                "the GPU kernels hold conv kernels up to {MAX_CONV} and states up to {MAX_STATE} wide; this model has {k} and {n}"
            ))
            .into());
        }
        let v = config.padded_vocab_size;
        let up = |values: &[f32]| gpu.upload(values);
        let linear = |name: &str, bias: Option<&str>, out: usize, inp: usize| {
            let w = checkpoint.load(name, &[out, inp])?;
            let b = bias.map(|b| checkpoint.load(b, &[out])).transpose()?;
            let layer = DeviceLinear::upload(
                &gpu,
                w.as_slice(),
                b.as_ref().map(|b| b.as_slice()),
                out,
                inp,
                dtype,
            )?;
            checkpoint.release(name);
            Ok::<_, GpuModelError>(layer)
        };
        let mut blocks = Vec::new();
        for i in 0..config.num_layers {
            let p = format!("backbone.layers.{i}.");
            let m = format!("{p}mixer.");
            let conv = checkpoint.load(&format!("{m}conv1d.weight"), &[e, 1, k])?;
            let conv_bias = match c.conv_bias {
                true => checkpoint
                    .load(&format!("{m}conv1d.bias"), &[e])?
                    .as_slice()
                    .to_vec(),
                false => vec![0.0; e],
            };
            let a_log = checkpoint.load(&format!("{m}A_log"), &[e, n])?;
            let a: Vec<f32> = a_log.as_slice().iter().map(|x| -x.exp()).collect();
            let bias = |s: &str| c.bias.then(|| format!("{m}{s}"));
            blocks.push(GpuBlock {
                norm: up(checkpoint
                    .load(&format!("{p}norm.weight"), &[d])?
                    .as_slice())?,
                mixer: GpuMixer {
                    in_proj: linear(
                        &format!("{m}in_proj.weight"),
                        bias("in_proj.bias").as_deref(),
                        2 * e,
                        d,
                    )?,
                    conv_weight: up(conv.as_slice())?,
                    conv_bias: up(&conv_bias)?,
                    x_proj: linear(&format!("{m}x_proj.weight"), None, r + 2 * n, e)?,
                    dt_proj: linear(&format!("{m}dt_proj.weight"), None, e, r)?,
                    dt_bias: up(checkpoint
                        .load(&format!("{m}dt_proj.bias"), &[e])?
                        .as_slice())?,
                    a: up(&a)?,
                    d: up(checkpoint.load(&format!("{m}D"), &[e])?.as_slice())?,
                    out_proj: linear(
                        &format!("{m}out_proj.weight"),
                        bias("out_proj.bias").as_deref(),
                        d,
                        e,
                    )?,
                },
            });
        }
        let embedding = DeviceMatrix::upload(
            &gpu,
            checkpoint.load(&config.embedding_name, &[v, d])?.as_slice(),
            dtype,
        )?;
        let lm_head = match config.tie_embeddings {
            true => None,
            false => Some(linear("lm_head.weight", None, v, d)?),
        };
        let norm_f = up(checkpoint.load("backbone.norm_f.weight", &[d])?.as_slice())?;
        // The state pool: what free memory holds after the weights, with room for a
        // 1024-token chunk's activations.
        let per_session = 4 * config.num_layers * e * (k + n);
        let activations = 4 * 1024 * (4 * e + 2 * d + r + 2 * n + v);
        let pool = SlotPool::sized(&gpu, max_sessions, per_session, activations)?;
        let slots = pool.slots;
        let pools = (0..config.num_layers)
            .map(|_| {
                Ok(LayerPool {
                    conv: gpu.zeros(slots * e * k)?,
                    ssm: gpu.zeros(slots * e * n)?,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(GpuMambaLm {
            config,
            dtype,
            gpu,
            embedding,
            blocks,
            norm_f,
            lm_head,
            pools,
            slots: pool,
            scratch: Scratch::default(),
            scan_chunk: 64,
        })
    }
}

impl GpuLanguageFamily for GpuMambaLm {
    fn family(&self) -> &'static str {
        "mamba"
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn ladder(&self) -> &[bool] {
        &self.config.ladder
    }

    fn ladder_mut(&mut self) -> &mut Vec<bool> {
        &mut self.config.ladder
    }

    fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Rows per time chunk when one long sequence is scanned in chunks (default 64).
    fn set_scan_chunk(&mut self, rows: usize) {
        self.scan_chunk = rows.max(1);
    }

    /// Sessions the state pool holds.
    fn session_capacity(&self) -> usize {
        self.slots.slots
    }

    /// Bytes of one session's state (on the device).
    fn state_bytes(&self) -> usize {
        let c = &self.config.mixer;
        4 * self.config.num_layers * c.d_inner * (c.d_conv + c.d_state)
    }

    fn weight_bytes(&self) -> usize {
        self.embedding.size_bytes()
            + self.lm_head.as_ref().map_or(0, DeviceLinear::size_bytes)
            + self
                .blocks
                .iter()
                .map(|b| {
                    let m = &b.mixer;
                    m.in_proj.size_bytes()
                        + m.x_proj.size_bytes()
                        + m.dt_proj.size_bytes()
                        + m.out_proj.size_bytes()
                        + 4 * (b.norm.len() + m.conv_weight.len() + m.conv_bias.len())
                        + 4 * (m.dt_bias.len() + m.a.len() + m.d.len())
                })
                .sum::<usize>()
    }

    fn logits_width(&self) -> usize {
        self.config.padded_vocab_size
    }

    /// A fresh session: a free slot, its state zeroed.
    fn new_session(&mut self) -> Result<GpuSession, GpuModelError> {
        let session = self.slots.take()?;
        let c = self.config.mixer;
        let (e, k, n) = (c.d_inner, c.d_conv, c.d_state);
        for pool in &mut self.pools {
            zero_slot(&self.gpu, &mut pool.conv, session.slot, e * k)?;
            zero_slot(&self.gpu, &mut pool.ssm, session.slot, e * n)?;
        }
        Ok(session)
    }

    /// The packed batch (see `MambaLm::forward_packed`: session `i` takes the next `lens[i]`
    /// tokens) on one rank of a tensor-parallel group (a group of one: the whole model; see
    /// `MambaLm::forward_in_group`): `x_proj`'s `[δ|B|C]` and each mixer's output are partial
    /// sums the group all-reduces; ladder-wired layers queue their mixer before the previous
    /// output's reduction is waited. Logits of the rows `logits` asks for (the leader's).
    fn forward_in_group(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
        group: &mut DeviceGroup<'_>,
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, GpuModelError> {
        let segments = packed_segments(tokens, lens, sessions.len(), self.config.vocab_size)?;
        let c = self.config.mixer;
        let (d, e, n, k, r) = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank);
        let (m, v, eps) = (tokens.len(), self.logits_width(), self.config.norm_eps);
        let gpu = &self.gpu;
        let ids = gpu.upload(tokens)?;
        let mut batch = DeviceBatch::upload(gpu, &segments, sessions)?;
        batch.scan_chunk = self.scan_chunk;
        let (starts, lens_dev, slots) = (batch.starts, batch.lens, batch.slots);
        let segment_count = segments.len() as i32;
        let longest = lens.iter().copied().max().unwrap_or(0);

        let residual = gpu.zeros(m * d)?;
        let normed = gpu.zeros(m * d)?;
        let xz = gpu.zeros(m * 2 * e)?;
        let xc = gpu.zeros(m * e)?;
        let dt = gpu.zeros(m * e)?;
        let y = gpu.zeros(m * e)?;
        let mut dbc = gpu.zeros(m * (r + 2 * n))?;
        let p = |b: &DeviceBuffer<f32>| gpu.ptr(b);
        gpu.embed_rows(&self.embedding, gpu.ptr(&ids), m, d, p(&residual))?;
        let mut stream = DeviceResidualStream::new(residual);
        let (e_i, k_i, n_i, r_i) = (e as i32, k as i32, n as i32, r as i32);
        for (i, (block, pool)) in self.blocks.iter().zip(&self.pools).enumerate() {
            let mx = &block.mixer;
            let ladder = self.config.ladder[i];
            let read = p(stream.read(ladder, gpu, group)?);
            gpu.rms_norm(read, p(&block.norm), m, d, eps, p(&normed))?;
            let s = &mut self.scratch;
            mx.in_proj
                .forward(gpu, DevMat::dense(gpu, &normed, m, d), p(&xz), s)?;
            let (xz_p, w_p, b_p, win_p, xc_p) = (
                p(&xz),
                p(&mx.conv_weight),
                p(&mx.conv_bias),
                p(&pool.conv),
                p(&xc),
            );
            let conv_args = [
                Arg::Ptr(xz_p),
                Arg::I32(e_i),
                Arg::I32(k_i),
                Arg::Ptr(w_p),
                Arg::Ptr(b_p),
                Arg::Ptr(win_p),
                Arg::Ptr(starts),
                Arg::Ptr(lens_dev),
                Arg::Ptr(slots),
                Arg::I32(segment_count),
                Arg::Ptr(xc_p),
            ];
            if longest >= CONV_ROWS_MIN {
                // Every row at once, then the windows moved on (see mamba_conv_silu_rows).
                gpu.launch_per_channel_row(
                    "mamba_conv_silu_rows",
                    e,
                    longest,
                    segments.len(),
                    &conv_args,
                )?;
                gpu.launch_per_channel(
                    "mamba_conv_window",
                    e,
                    segments.len(),
                    &[
                        Arg::Ptr(xz_p),
                        Arg::I32(e_i),
                        Arg::I32(k_i),
                        Arg::Ptr(win_p),
                        Arg::Ptr(starts),
                        Arg::Ptr(lens_dev),
                        Arg::Ptr(slots),
                        Arg::I32(segment_count),
                    ],
                )?;
            } else {
                gpu.launch_per_channel("mamba_conv_silu", e, segments.len(), &conv_args)?;
            }
            mx.x_proj
                .forward(gpu, DevMat::dense(gpu, &xc, m, e), p(&dbc), s)?;
            // Row-parallel x_proj: each rank holds part of [δ|B|C] (the buffer comes back
            // summed, for the next layer to overwrite).
            dbc = group.all_reduce_sum(gpu, dbc)?;
            mx.dt_proj.forward(
                gpu,
                DevMat::columns(gpu, &dbc, m, r + 2 * n, 0, r),
                p(&dt),
                s,
            )?;
            let (dt_p, dtb_p, a_p, dbc_p, d_p, ssm_p, y_p) = (
                p(&dt),
                p(&mx.dt_bias),
                p(&mx.a),
                p(&dbc),
                p(&mx.d),
                p(&pool.ssm),
                p(&y),
            );
            // One long sequence: the scan in time chunks (see mamba_chunk_ends), each chunk a
            // segment of the scan starting from its carried state.
            let chunked = match batch.long_sequence() {
                Some((rows, slot)) => Some(chunk_starts(
                    gpu,
                    rows,
                    slot,
                    self.scan_chunk,
                    (e, n),
                    &ScanInputs {
                        xc: xc_p,
                        dt: dt_p,
                        dt_bias: dtb_p,
                        a: a_p,
                        dbc: dbc_p,
                        r,
                        state: ssm_p,
                    },
                )?),
                _ => None,
            };
            let layout = batch.scan_layout(gpu, chunked.as_ref(), ssm_p);
            // One thread per (channel, state index), 128-thread blocks where N allows.
            let per_block = (128 / n).max(1);
            gpu.launch_grid(
                "mamba_scan",
                (e.div_ceil(per_block) as u32, layout.count as u32),
                (per_block * n) as u32,
                &[
                    Arg::Ptr(xc_p),
                    Arg::Ptr(dt_p),
                    Arg::Ptr(dtb_p),
                    Arg::Ptr(a_p),
                    Arg::Ptr(dbc_p),
                    Arg::I32(r_i),
                    Arg::I32(n_i),
                    Arg::Ptr(d_p),
                    Arg::Ptr(xz_p),
                    Arg::I32(e_i),
                    Arg::Ptr(layout.state),
                    Arg::Ptr(layout.starts),
                    Arg::Ptr(layout.lens),
                    Arg::Ptr(layout.slots),
                    Arg::I32(layout.count as i32),
                    Arg::Ptr(y_p),
                ],
            )?;
            drop(chunked);
            let mixed = stream.output(gpu)?;
            mx.out_proj
                .forward(gpu, DevMat::dense(gpu, &y, m, e), p(&mixed), s)?;
            stream.push(mixed, ladder, gpu, group)?;
        }
        FinalLayers {
            norm: &self.norm_f,
            eps,
            lm_head: self.lm_head.as_ref(),
            embedding: &self.embedding,
            width: v,
            normed: &normed,
            scratch: &mut self.scratch,
        }
        .finish(gpu, stream, group, sessions, lens, logits)
    }
}
