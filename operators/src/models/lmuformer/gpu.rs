//! The LMUFormer and the spiking LMUFormer on a GPU (`shared/SPEC-MODELS.md` §4; the CPU model
//! in `mod.rs` beside it is the reference and the source of the parameters). Streams of
//! feature frames as on the CPU: the host keeps each stream's bookkeeping (how full each conv
//! window is, whether a residual frame is held, the clip sums); frames, conv windows, LMU
//! memories and LIF membranes stay on the device, in a pool of session slots. The LMU memory
//! runs its recurrent form for every frame.
//!
//! Length: ~800 lines: the patch embedding, LMU, LIF and head on the device with each stream's
//! host bookkeeping, mirroring the CPU model in `mod.rs` piece for piece so the two can be
//! compared side by side.

use tideway_kernels::gpu::{
    Arg, DevMat, DeviceBuffer, DeviceLinear, Gpu, GpuError, Scratch, WeightDtype,
};
use tideway_kernels::matmul::Linear;

use crate::gpu::{GpuModelError, GpuSession, SlotPool, zero_slot};
use crate::layers::batch_norm::BatchNorm;
use crate::layers::frames::Frames;
use crate::models::lmuformer::blocks::ChannelMixer;
use crate::models::lmuformer::{LmuFormer, LmuFormerConfig, check_frames};
use crate::spiking::LifLayer;

/// Frames of several sessions on the device: session `i` owns the next `counts[i]` rows.
struct DevFrames {
    buf: DeviceBuffer<f32>,
    width: usize,
    counts: Vec<usize>,
}

impl DevFrames {
    fn rows(&self) -> usize {
        self.counts.iter().sum()
    }
}

fn linear(gpu: &Gpu, layer: &Linear) -> Result<DeviceLinear, GpuError> {
    let (w, b) = layer.to_torch();
    DeviceLinear::upload(
        gpu,
        &w,
        b.as_deref(),
        layer.out_features(),
        layer.in_features(),
        WeightDtype::F32,
    )
}

/// A folded BatchNorm on the device.
struct Bn {
    scale: DeviceBuffer<f32>,
    shift: DeviceBuffer<f32>,
}

impl Bn {
    fn upload(gpu: &Gpu, bn: &BatchNorm) -> Result<Self, GpuError> {
        let (scale, shift) = bn.folded();
        Ok(Bn {
            scale: gpu.upload(scale)?,
            shift: gpu.upload(shift)?,
        })
    }

    fn apply(&self, gpu: &Gpu, x: &DevFrames) -> Result<(), GpuError> {
        let rows = x.rows();
        gpu.launch_elementwise(
            "affine_channels",
            rows * x.width,
            &[
                Arg::Ptr(gpu.ptr(&x.buf)),
                Arg::I64(rows as i64),
                Arg::I32(x.width as i32),
                Arg::Ptr(gpu.ptr(&self.scale)),
                Arg::Ptr(gpu.ptr(&self.shift)),
            ],
        )
    }
}

/// A LIF population: its membrane pool and constants.
struct Lif {
    slot: usize,
    tau: f32,
    threshold: f32,
}

impl Lif {
    fn of(layer: &LifLayer) -> Self {
        Lif {
            slot: layer.slot,
            tau: layer.lif.tau,
            threshold: layer.lif.threshold,
        }
    }
}

/// One block: the LMU mixer and the channel mixer.
struct Block {
    prev: Option<(Bn, Lif)>,
    w_u: DeviceLinear,
    w_h: DeviceLinear,
    /// Ā `[d, d]` and B̄ `[d]`.
    a: DeviceBuffer<f32>,
    b: DeviceBuffer<f32>,
    memory: usize,
    gates: Option<[(Bn, Lif); 3]>,
    proj: DeviceLinear,
    proj_bn: Bn,
    ffn: Ffn,
}

enum Ffn {
    Plain {
        fc1: DeviceLinear,
        fc1_bn: Bn,
        fc2: DeviceLinear,
        fc2_bn: Bn,
    },
    Spiking {
        fc1_bn: Bn,
        fc1_lif: Lif,
        fc1: DeviceLinear,
        fc2_bn: Bn,
        fc2_lif: Lif,
        fc2: DeviceLinear,
    },
}

/// One stream: its slot in the device pools and the host-side bookkeeping.
pub struct GpuLmuSession {
    slot: GpuSession,
    /// Each conv window's fill (1: the left zero padding only, 2: two frames, 0: ended).
    filled: [u8; 5],
    /// Whether the residual delay holds a frame.
    held: bool,
    output_sum: Vec<f64>,
    frames_out: usize,
    ended: bool,
}

impl GpuLmuSession {
    pub fn frames_out(&self) -> usize {
        self.frames_out
    }

    /// The mean of the per-frame outputs so far (the clip-level scores at the end).
    pub fn pooled(&self) -> Vec<f32> {
        let n = self.frames_out.max(1) as f64;
        self.output_sum.iter().map(|s| (s / n) as f32).collect()
    }
}

pub struct GpuLmuFormer {
    gpu: Gpu,
    pub config: LmuFormerConfig,
    /// The four patch-embedding convs and the rpe conv, with their input widths.
    convs: Vec<(DeviceLinear, usize)>,
    embed_norms: Vec<Bn>,
    embed_lifs: Vec<Lif>,
    blocks: Vec<Block>,
    head_gate: Option<(Bn, Lif)>,
    head: DeviceLinear,
    /// Per slot: the five conv windows `[2c]`, the held residual `[dim]`, each block's LMU
    /// memory, each LIF population's membranes.
    windows: Vec<DeviceBuffer<f32>>,
    residual: DeviceBuffer<f32>,
    memories: Vec<DeviceBuffer<f32>>,
    membranes: Vec<DeviceBuffer<f32>>,
    neuron_channels: Vec<usize>,
    slots: SlotPool,
    scratch: Scratch,
    /// The last stream layout's segment arrays (see `segments`).
    segment_cache: std::cell::RefCell<Option<(Vec<usize>, Ints, Ints)>>,
}

/// Per-session `i32` arrays uploaded for one launch.
struct Ints {
    _buf: DeviceBuffer<i32>,
    ptr: u64,
}

fn ints(gpu: &Gpu, values: &[i32]) -> Result<Ints, GpuError> {
    let buf = gpu.upload(values)?;
    Ok(Ints {
        ptr: gpu.ptr(&buf),
        _buf: buf,
    })
}

/// Row offsets of consecutive runs of `counts` rows.
fn starts(counts: &[usize]) -> Vec<i32> {
    let mut at = 0;
    counts
        .iter()
        .map(|&n| {
            at += n;
            (at - n) as i32
        })
        .collect()
}

/// A per-session frame-window kernel (`frame_unroll`, `delay_frame`): both read each
/// session's input frames and held window (`state`, with a per-session `flags` word) and write
/// `out_counts[i]` rows of `out_width` floats.
struct FrameWindow<'a> {
    kernel: &'static str,
    state: u64,
    flags: &'a [i32],
    out_counts: &'a [usize],
    out_width: usize,
}

impl FrameWindow<'_> {
    /// Launches the kernel over `x` (one block row per session) and returns its output.
    fn run(
        &self,
        gpu: &Gpu,
        x: &DevFrames,
        slots: &Ints,
        ends: &Ints,
    ) -> Result<DeviceBuffer<f32>, GpuError> {
        let c = x.width;
        let in_counts: Vec<i32> = x.counts.iter().map(|&n| n as i32).collect();
        let (in_start, in_count, out_start, flags) = (
            ints(gpu, &starts(&x.counts))?,
            ints(gpu, &in_counts)?,
            ints(gpu, &starts(self.out_counts))?,
            ints(gpu, self.flags)?,
        );
        let rows: usize = self.out_counts.iter().sum();
        let out = gpu.zeros(rows * self.out_width)?;
        let sessions = x.counts.len();
        gpu.launch_grid(
            self.kernel,
            (c.div_ceil(128) as u32, sessions as u32),
            128,
            &[
                Arg::Ptr(gpu.ptr(&x.buf)),
                Arg::I32(c as i32),
                Arg::Ptr(self.state),
                Arg::Ptr(in_start.ptr),
                Arg::Ptr(in_count.ptr),
                Arg::Ptr(out_start.ptr),
                Arg::Ptr(flags.ptr),
                Arg::Ptr(ends.ptr),
                Arg::Ptr(slots.ptr),
                Arg::I32(sessions as i32),
                Arg::Ptr(gpu.ptr(&out)),
            ],
        )?;
        Ok(out)
    }
}

impl GpuLmuFormer {
    /// The CPU model's parameters on `gpu`, with a pool of up to `max_sessions` streams.
    pub fn upload(model: &LmuFormer, gpu: Gpu, max_sessions: usize) -> Result<Self, GpuModelError> {
        let c = model.config.clone();
        let (Some(embed), Some(model_head)) = (&model.embed, &model.head) else {
            return Err(GpuError::Unsupported(format!(
                "the GPU runs an LMUFormer whole; this is the part with blocks {:?}",
                model.part.layers
            ))
            .into());
        };
        let mut convs = Vec::new();
        for conv in embed.convs.iter().chain([&embed.rpe]) {
            convs.push((linear(&gpu, &conv.taps)?, conv.c_in));
        }
        let embed_norms = embed
            .norms
            .iter()
            .map(|n| Bn::upload(&gpu, n))
            .collect::<Result<_, _>>()?;
        let embed_lifs = embed.lifs.iter().map(Lif::of).collect();
        let mut blocks = Vec::new();
        for block in &model.blocks {
            let mixer = &block.mixer;
            let cell = &mixer.cell;
            if cell.memory.size() > 1024 {
                return Err(GpuError::Unsupported(format!(
                    "LMU memories up to 1024 wide run on the GPU; this model's is {}",
                    cell.memory.size()
                ))
                .into());
            }
            let (a, b) = cell.memory.matrices();
            let gates = match &cell.gates {
                Some(g) => Some([
                    (Bn::upload(&gpu, &g.bn_u)?, Lif::of(&g.lif_u)),
                    (Bn::upload(&gpu, &g.bn_m)?, Lif::of(&g.lif_m)),
                    (Bn::upload(&gpu, &g.bn_h)?, Lif::of(&g.lif_h)),
                ]),
                None => None,
            };
            let ffn = match &block.ffn {
                ChannelMixer::Plain {
                    fc1,
                    fc1_bn,
                    fc2,
                    fc2_bn,
                } => Ffn::Plain {
                    fc1: linear(&gpu, fc1)?,
                    fc1_bn: Bn::upload(&gpu, fc1_bn)?,
                    fc2: linear(&gpu, fc2)?,
                    fc2_bn: Bn::upload(&gpu, fc2_bn)?,
                },
                ChannelMixer::Spiking {
                    fc1_bn,
                    fc1_lif,
                    fc1,
                    fc2_bn,
                    fc2_lif,
                    fc2,
                } => Ffn::Spiking {
                    fc1_bn: Bn::upload(&gpu, fc1_bn)?,
                    fc1_lif: Lif::of(fc1_lif),
                    fc1: linear(&gpu, fc1)?,
                    fc2_bn: Bn::upload(&gpu, fc2_bn)?,
                    fc2_lif: Lif::of(fc2_lif),
                    fc2: linear(&gpu, fc2)?,
                },
            };
            blocks.push(Block {
                prev: match &mixer.prev {
                    Some((bn, lif)) => Some((Bn::upload(&gpu, bn)?, Lif::of(lif))),
                    None => None,
                },
                w_u: linear(&gpu, &cell.w_u)?,
                w_h: linear(&gpu, &cell.w_h)?,
                a: gpu.upload(&a)?,
                b: gpu.upload(&b)?,
                memory: cell.memory.size(),
                gates,
                proj: linear(&gpu, &mixer.proj)?,
                proj_bn: Bn::upload(&gpu, &mixer.proj_bn)?,
                ffn,
            });
        }
        let head_gate = match &model_head.gate {
            Some((bn, lif)) => Some((Bn::upload(&gpu, bn)?, Lif::of(lif))),
            None => None,
        };
        let head = linear(&gpu, &model_head.linear)?;
        let neuron_channels = model.neurons.channels().to_vec();
        let window_widths: Vec<usize> = convs.iter().map(|(_, c_in)| 2 * c_in).collect();
        let per_session = 4
            * (window_widths.iter().sum::<usize>()
                + c.dim
                + blocks.iter().map(|b| b.memory).sum::<usize>()
                + neuron_channels.iter().sum::<usize>());
        let activations = 4 * 4096 * (8 * c.dim + 2 * c.mlp_hidden);
        let slots = SlotPool::sized(&gpu, max_sessions, per_session, activations)?;
        let n = slots.slots;
        Ok(GpuLmuFormer {
            windows: window_widths
                .iter()
                .map(|w| gpu.zeros(n * w))
                .collect::<Result<_, _>>()?,
            residual: gpu.zeros(n * c.dim)?,
            memories: blocks
                .iter()
                .map(|b| gpu.zeros(n * b.memory))
                .collect::<Result<_, _>>()?,
            membranes: neuron_channels
                .iter()
                .map(|ch| gpu.zeros(n * ch))
                .collect::<Result<_, _>>()?,
            neuron_channels,
            gpu,
            config: c,
            convs,
            embed_norms,
            embed_lifs,
            blocks,
            head_gate,
            head,
            slots,
            scratch: Scratch::default(),
            segment_cache: std::cell::RefCell::new(None),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn session_capacity(&self) -> usize {
        self.slots.slots
    }

    /// A fresh stream: a free slot, its state zeroed.
    pub fn new_session(&mut self) -> Result<GpuLmuSession, GpuModelError> {
        let slot = self.slots.take()?;
        let s = slot.slot;
        for (buf, (_, c_in)) in self.windows.iter_mut().zip(&self.convs) {
            zero_slot(&self.gpu, buf, s, 2 * c_in)?;
        }
        zero_slot(&self.gpu, &mut self.residual, s, self.config.dim)?;
        for (buf, block) in self.memories.iter_mut().zip(&self.blocks) {
            zero_slot(&self.gpu, buf, s, block.memory)?;
        }
        for (buf, &ch) in self.membranes.iter_mut().zip(&self.neuron_channels) {
            zero_slot(&self.gpu, buf, s, ch)?;
        }
        Ok(GpuLmuSession {
            slot,
            filled: [1; 5],
            held: false,
            output_sum: vec![0.0; self.config.num_classes],
            frames_out: 0,
            ended: false,
        })
    }

    /// Feeds every stream its new frames and, where `ends[i]`, ends it (see
    /// `LmuFormer::forward`); returns each stream's newly complete per-frame outputs.
    pub fn forward(
        &mut self,
        sessions: &mut [&mut GpuLmuSession],
        input: &Frames,
        ends: &[bool],
    ) -> Result<Frames, GpuModelError> {
        let ended: Vec<bool> = sessions.iter().map(|s| s.ended).collect();
        check_frames(&self.config, &ended, input, ends)?;
        let c = &self.config;
        let k = c.num_classes;
        if sessions.is_empty() {
            return Ok(Frames {
                data: Vec::new(),
                width: k,
                counts: Vec::new(),
            });
        }
        let slots: Vec<i32> = sessions.iter().map(|s| s.slot.slot as i32).collect();
        let ends_i: Vec<i32> = ends.iter().map(|&e| e as i32).collect();
        let (slots, ends_dev) = (ints(&self.gpu, &slots)?, ints(&self.gpu, &ends_i)?);
        let x = DevFrames {
            buf: self.gpu.upload(&input.data)?,
            width: c.in_channels,
            counts: input.counts.clone(),
        };
        let out = self.embed(x, sessions, ends, &slots, &ends_dev)?;
        let mut x = out;
        for j in 0..self.blocks.len() {
            self.block(j, &mut x, &slots)?;
        }
        if let Some((bn, lif)) = &self.head_gate {
            bn.apply(&self.gpu, &x)?;
            self.fire(lif, &x, &slots)?;
        }
        let rows = x.rows();
        let logits = self.gpu.zeros(rows * k)?;
        self.head.forward(
            &self.gpu,
            DevMat::dense(&self.gpu, &x.buf, rows, x.width),
            self.gpu.ptr(&logits),
            &mut self.scratch,
        )?;
        let data = self.gpu.download(&logits, rows * k)?;
        let mut at = 0;
        for ((session, &n), &end) in sessions.iter_mut().zip(&x.counts).zip(ends) {
            for row in data[at * k..(at + n) * k].chunks_exact(k) {
                for (s, &v) in session.output_sum.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            at += n;
            session.frames_out += n;
            session.ended |= end;
        }
        Ok(Frames {
            data,
            width: k,
            counts: x.counts,
        })
    }

    fn embed(
        &mut self,
        input: DevFrames,
        sessions: &mut [&mut GpuLmuSession],
        ends: &[bool],
        slots: &Ints,
        ends_dev: &Ints,
    ) -> Result<DevFrames, GpuModelError> {
        let spiking = !self.embed_lifs.is_empty();
        let mut x = input;
        for i in 0..4 {
            x = self.frame_conv(i, &x, sessions, ends, slots, ends_dev)?;
            if !spiking {
                // Tokenizer: Conv → ReLU → BN.
                activate_relu(&self.gpu, &x)?;
                self.embed_norms[i].apply(&self.gpu, &x)?;
            } else if i < 3 {
                // Conv1d4EBMs: BN → LIF after the first three convs.
                self.embed_norms[i].apply(&self.gpu, &x)?;
                self.fire(&self.embed_lifs[i], &x, slots)?;
            }
        }
        // The rpe branch reads x itself (Tokenizer) or LIF(BN(x)) (Conv1d4EBMs).
        let mut out = if spiking {
            let branch = self.copy(&x)?;
            self.embed_norms[3].apply(&self.gpu, &branch)?;
            self.fire(&self.embed_lifs[3], &branch, slots)?;
            self.frame_conv(4, &branch, sessions, ends, slots, ends_dev)?
        } else {
            self.frame_conv(4, &x, sessions, ends, slots, ends_dev)?
        };
        let residual = self.delay(&x, sessions, ends, slots, ends_dev)?;
        debug_assert_eq!(residual.counts, out.counts);
        self.add(&mut out, &residual)?;
        Ok(out)
    }

    /// The non-causal k = 3 conv `i` over streams (see `FrameConv::forward`).
    fn frame_conv(
        &mut self,
        i: usize,
        x: &DevFrames,
        sessions: &mut [&mut GpuLmuSession],
        ends: &[bool],
        slots: &Ints,
        ends_dev: &Ints,
    ) -> Result<DevFrames, GpuModelError> {
        let gpu = &self.gpu;
        let c = self.convs[i].1;
        let mut counts = Vec::with_capacity(sessions.len());
        let mut filled = Vec::with_capacity(sessions.len());
        for ((session, &n), &end) in sessions.iter_mut().zip(&x.counts).zip(ends) {
            let before = session.filled[i];
            filled.push(before as i32);
            let mut emitted = match (n, before) {
                (0, _) => 0,
                (n, 2) => n,
                (n, _) => n - 1,
            };
            let after = if n > 0 { 2 } else { before };
            session.filled[i] = after;
            if end && after == 2 {
                emitted += 1;
                session.filled[i] = 0;
            }
            counts.push(emitted);
        }
        let m: usize = counts.iter().sum();
        let unrolled = FrameWindow {
            kernel: "frame_unroll",
            state: gpu.ptr(&self.windows[i]),
            flags: &filled,
            out_counts: &counts,
            out_width: 3 * c,
        }
        .run(gpu, x, slots, ends_dev)?;
        let taps = &self.convs[i].0;
        let out = gpu.zeros(m * taps.out_features)?;
        if m > 0 {
            taps.forward(
                gpu,
                DevMat::dense(gpu, &unrolled, m, 3 * c),
                gpu.ptr(&out),
                &mut self.scratch,
            )?;
        }
        Ok(DevFrames {
            buf: out,
            width: taps.out_features,
            counts,
        })
    }

    /// The one-frame residual delay (see `delay_one_frame`).
    fn delay(
        &self,
        x: &DevFrames,
        sessions: &mut [&mut GpuLmuSession],
        ends: &[bool],
        slots: &Ints,
        ends_dev: &Ints,
    ) -> Result<DevFrames, GpuModelError> {
        let gpu = &self.gpu;
        let c = x.width;
        let mut counts = Vec::with_capacity(sessions.len());
        let mut held = Vec::with_capacity(sessions.len());
        for ((session, &n), &end) in sessions.iter_mut().zip(&x.counts).zip(ends) {
            held.push(session.held as i32);
            let mut emitted = match (n, session.held) {
                (0, _) => 0,
                (n, true) => n,
                (n, false) => n - 1,
            };
            let after = n > 0 || session.held;
            if end && after {
                emitted += 1;
            }
            session.held = after && !end;
            counts.push(emitted);
        }
        let out = FrameWindow {
            kernel: "delay_frame",
            state: gpu.ptr(&self.residual),
            flags: &held,
            out_counts: &counts,
            out_width: c,
        }
        .run(gpu, x, slots, ends_dev)?;
        Ok(DevFrames {
            buf: out,
            width: c,
            counts,
        })
    }

    /// Block `j`: x += LMU(x); x += FFN(x).
    fn block(&mut self, j: usize, x: &mut DevFrames, slots: &Ints) -> Result<(), GpuModelError> {
        let block = &self.blocks[j];
        let spikes = match &block.prev {
            Some((bn, lif)) => {
                let input = self.copy(x)?;
                bn.apply(&self.gpu, &input)?;
                self.fire(lif, &input, slots)?;
                Some(input)
            }
            None => None,
        };
        let h = self.cell(j, spikes.as_ref().unwrap_or(x), slots)?;
        let block = &self.blocks[j];
        let y = self.linear(&block.proj, &h)?;
        block.proj_bn.apply(&self.gpu, &y)?;
        self.add(x, &y)?;
        let block = &self.blocks[j];
        let y = match &block.ffn {
            Ffn::Plain {
                fc1,
                fc1_bn,
                fc2,
                fc2_bn,
            } => {
                let a = self.linear(fc1, x)?;
                fc1_bn.apply(&self.gpu, &a)?;
                let n = (a.rows() * a.width) as i64;
                self.gpu.launch_elementwise(
                    "gelu",
                    n as usize,
                    &[Arg::Ptr(self.gpu.ptr(&a.buf)), Arg::I64(n)],
                )?;
                let b = self.linear(fc2, &a)?;
                fc2_bn.apply(&self.gpu, &b)?;
                activate_relu(&self.gpu, &b)?;
                b
            }
            Ffn::Spiking {
                fc1_bn,
                fc1_lif,
                fc1,
                fc2_bn,
                fc2_lif,
                fc2,
            } => {
                let a = self.copy(x)?;
                fc1_bn.apply(&self.gpu, &a)?;
                self.fire(fc1_lif, &a, slots)?;
                let b = self.linear(fc1, &a)?;
                fc2_bn.apply(&self.gpu, &b)?;
                self.fire(fc2_lif, &b, slots)?;
                self.linear(fc2, &b)?
            }
        };
        self.add(x, &y)?;
        Ok(())
    }

    /// The LMU cell of block `j` (see `LmuCell::forward`), recurrent form.
    fn cell(&self, j: usize, x: &DevFrames, slots: &Ints) -> Result<DevFrames, GpuModelError> {
        let gpu = &self.gpu;
        let block = &self.blocks[j];
        let d = block.memory;
        let u = self.linear(&block.w_u, x)?;
        match &block.gates {
            Some([(bn, lif), _, _]) => {
                bn.apply(gpu, &u)?;
                self.fire(lif, &u, slots)?;
            }
            None => activate_relu(gpu, &u)?,
        }
        let rows = x.rows();
        let m = DevFrames {
            buf: gpu.zeros(rows * d)?,
            width: d,
            counts: x.counts.clone(),
        };
        let (seg_start, seg_len) = self.segments(&x.counts)?;
        gpu.launch_grid(
            "lmu_memory",
            (x.counts.len() as u32, 1),
            (d.div_ceil(32) * 32) as u32,
            &[
                Arg::Ptr(gpu.ptr(&block.a)),
                Arg::Ptr(gpu.ptr(&block.b)),
                Arg::Ptr(gpu.ptr(&u.buf)),
                Arg::I32(d as i32),
                Arg::Ptr(gpu.ptr(&self.memories[j])),
                Arg::Ptr(seg_start),
                Arg::Ptr(seg_len),
                Arg::Ptr(slots.ptr),
                Arg::Ptr(gpu.ptr(&m.buf)),
            ],
        )?;
        if let Some([_, (bn, lif), _]) = &block.gates {
            bn.apply(gpu, &m)?;
            self.fire(lif, &m, slots)?;
        }
        let joined = DevFrames {
            buf: gpu.zeros(rows * (d + x.width))?,
            width: d + x.width,
            counts: x.counts.clone(),
        };
        gpu.launch_elementwise(
            "concat_rows",
            rows * joined.width,
            &[
                Arg::Ptr(gpu.ptr(&m.buf)),
                Arg::I32(d as i32),
                Arg::Ptr(gpu.ptr(&x.buf)),
                Arg::I32(x.width as i32),
                Arg::I64(rows as i64),
                Arg::Ptr(gpu.ptr(&joined.buf)),
            ],
        )?;
        let h = self.linear(&block.w_h, &joined)?;
        match &block.gates {
            Some([_, _, (bn, lif)]) => {
                bn.apply(gpu, &h)?;
                self.fire(lif, &h, slots)?;
            }
            None => activate_relu(gpu, &h)?,
        }
        Ok(h)
    }

    /// Device addresses of each stream's first row and row count for `counts`, uploaded once
    /// per distinct layout (every LIF and LMU memory of the blocks shares one per forward).
    fn segments(&self, counts: &[usize]) -> Result<(u64, u64), GpuError> {
        let mut cache = self.segment_cache.borrow_mut();
        if let Some((known, starts, lens)) = &*cache
            && known == counts
        {
            return Ok((starts.ptr, lens.ptr));
        }
        let lens: Vec<i32> = counts.iter().map(|&n| n as i32).collect();
        let (starts, lens) = (ints(&self.gpu, &starts(counts))?, ints(&self.gpu, &lens)?);
        let ptrs = (starts.ptr, lens.ptr);
        *cache = Some((counts.to_vec(), starts, lens));
        Ok(ptrs)
    }

    /// A per-row linear layer (a 1×1 conv).
    fn linear(&self, layer: &DeviceLinear, x: &DevFrames) -> Result<DevFrames, GpuError> {
        let rows = x.rows();
        let out = self.gpu.zeros(rows * layer.out_features)?;
        if rows > 0 {
            // A scratch of its own: `self` is shared here; f32 products do not use it.
            layer.forward(
                &self.gpu,
                DevMat::dense(&self.gpu, &x.buf, rows, x.width),
                self.gpu.ptr(&out),
                &mut Scratch::default(),
            )?;
        }
        Ok(DevFrames {
            buf: out,
            width: layer.out_features,
            counts: x.counts.clone(),
        })
    }

    /// Fires a LIF population over every stream's rows of `x` (overwritten with spikes).
    fn fire(&self, lif: &Lif, x: &DevFrames, slots: &Ints) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        let (seg_start, seg_len) = self.segments(&x.counts)?;
        gpu.launch_grid(
            "lif_fire",
            (x.width.div_ceil(128) as u32, x.counts.len() as u32),
            128,
            &[
                Arg::Ptr(gpu.ptr(&x.buf)),
                Arg::I32(x.width as i32),
                Arg::Ptr(gpu.ptr(&self.membranes[lif.slot])),
                Arg::Ptr(seg_start),
                Arg::Ptr(seg_len),
                Arg::Ptr(slots.ptr),
                Arg::I32(x.counts.len() as i32),
                Arg::F32(lif.tau),
                Arg::F32(lif.threshold),
            ],
        )
    }

    fn copy(&self, x: &DevFrames) -> Result<DevFrames, GpuError> {
        let n = x.rows() * x.width;
        let out = DevFrames {
            buf: self.gpu.zeros(n)?,
            width: x.width,
            counts: x.counts.clone(),
        };
        self.gpu
            .add_inplace(self.gpu.ptr(&out.buf), self.gpu.ptr(&x.buf), n)?;
        Ok(out)
    }

    fn add(&self, x: &mut DevFrames, y: &DevFrames) -> Result<(), GpuError> {
        debug_assert_eq!(x.counts, y.counts);
        let n = x.rows() * x.width;
        self.gpu
            .add_inplace(self.gpu.ptr(&x.buf), self.gpu.ptr(&y.buf), n)
    }
}

fn activate_relu(gpu: &Gpu, x: &DevFrames) -> Result<(), GpuError> {
    let n = x.rows() * x.width;
    gpu.launch_elementwise(
        "activate",
        n,
        &[Arg::Ptr(gpu.ptr(&x.buf)), Arg::I64(n as i64), Arg::I32(1)],
    )
}
