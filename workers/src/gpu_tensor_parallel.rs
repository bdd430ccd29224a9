//! A language model split over GPU ranks (`--device cuda:N --tensor-parallel K`, feature
//! `cuda`).
//!
//! Every rank, rank 0 included, is a thread of this process that owns one GPU model shard
//! (`load_gpu_model_rank`: the CPU ranks' slices) and its sessions' state slots, keyed by a
//! number the caller hands out. A batch goes to all ranks; rank 0 answers with the logits.
//! Rank `r` runs on `cuda:N+r` when the machine has that many devices, all-reducing over NCCL
//! on each device's communication stream (ladder-wired layers overlap it); otherwise every
//! rank shares `cuda:N` (or the emulator) and reduces host-staged over shared memory, which
//! checks a split on one GPU but is no faster than one rank.
//!
//! A rank whose forward fails (other than on the input, which every rank refuses alike) ends
//! the group: its reply says why, the server answers UNAVAILABLE from then on. A rank that
//! fails between NCCL reductions leaves its peers waiting inside NCCL; host-staged peers see
//! it leave and fail too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tideway_kernels::Tensor;
use tideway_kernels::collective::{Collective, ThreadGroup};
use tideway_kernels::gpu::collective::{DeviceCollective, HostStaged};
use tideway_kernels::gpu::{Gpu, WeightDtype};
use tideway_kernels::nccl::NcclRank;
use tideway_operators::ForwardError;
use tideway_operators::LogitRows;
use tideway_operators::gpu::tensor_parallel::DeviceGroup;
use tideway_operators::gpu::{GpuModel, GpuModelError, GpuSession, load_gpu_model_rank};

use crate::device::{Device, GpuModelInfo, SessionStartError};
use crate::tensor_parallel::{CommStats, Wiring, broken_group, unavailable};

/// A batch for every rank (shared, not copied per rank).
struct Batch {
    tokens: Vec<u32>,
    lens: Vec<usize>,
    /// Sessions whose last row alone rank 0's head computes (`None`: every row).
    last_only: Option<Vec<bool>>,
    keys: Vec<u64>,
    /// Sessions ended since the last batch: their slots are freed first.
    released: Vec<u64>,
}

enum RankCommand {
    /// Every rank has loaded: join the collective (NCCL's init waits for all ranks, so it
    /// starts only when none failed to load).
    Connect,
    Forward(Arc<Batch>),
    Shutdown,
}

/// What a rank reports while the group starts: its model loaded (with what is read of it),
/// then its collective joined.
enum Startup {
    Loaded(Result<GpuModelInfo, String>),
    Connected(Result<(), String>),
}

/// A rank's answer to one batch: rank 0's carries the logits.
struct Reply {
    rank: usize,
    result: Result<Option<Tensor>, ForwardError>,
    waited: Duration,
    reductions: usize,
    reduced_floats: usize,
}

struct RankThread {
    commands: mpsc::Sender<RankCommand>,
    handle: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    replies: mpsc::Receiver<Reply>,
    /// Set once a rank has failed: the group cannot compute again.
    broken: Option<String>,
    stats: CommStats,
}

/// How the ranks all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuTransport {
    /// NCCL between distinct devices.
    Nccl,
    /// Through host memory (ranks sharing one device, or the emulator).
    HostStaged,
}

/// A GPU language model split over tensor-parallel ranks, one thread per rank.
pub struct GpuParallelModel {
    size: usize,
    ranks: Vec<RankThread>,
    inner: Mutex<Inner>,
    /// Rank 0's model, as the command line and the server read it.
    pub(crate) info: GpuModelInfo,
    pub transport: GpuTransport,
    next_key: AtomicU64,
    released: Arc<Mutex<Vec<u64>>>,
    /// Sessions started and not yet dropped, against the smallest rank's pool.
    live: Arc<AtomicUsize>,
    capacity: usize,
}

/// Where rank `rank` runs: its own device if the machine has one for every rank.
fn rank_device(device: Device, rank: usize, spread: bool) -> Device {
    match (device, spread) {
        (Device::Cuda(first), true) => Device::Cuda(first + rank),
        _ => device,
    }
}

impl GpuParallelModel {
    /// Loads the `size` shards of `dir` and starts their threads.
    pub fn start(
        dir: &std::path::Path,
        device: Device,
        dtype: WeightDtype,
        max_sessions: usize,
        size: usize,
        wiring: Wiring,
    ) -> Result<Self> {
        let spread = match device {
            Device::Cuda(first) => {
                Gpu::device_count().is_ok_and(|count| first + size <= count)
                    && NcclRank::available()
            }
            _ => false,
        };
        let transport = match spread {
            true => GpuTransport::Nccl,
            false => GpuTransport::HostStaged,
        };
        let nccl_id = match transport {
            GpuTransport::Nccl => Some(NcclRank::new_id().context("cannot start NCCL")?),
            GpuTransport::HostStaged => None,
        };
        let members = ThreadGroup::new(size).members();
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Startup)>();
        let mut ranks = Vec::new();
        for (rank, member) in members.into_iter().enumerate() {
            let (commands, queue) = mpsc::channel::<RankCommand>();
            let (dir, replies, ready) = (dir.to_path_buf(), reply_tx.clone(), ready_tx.clone());
            let rank_device = rank_device(device, rank, spread);
            let handle = std::thread::Builder::new()
                .name(format!("gpu-tp-rank-{rank}"))
                .spawn(move || {
                    let loaded = (|| -> Result<GpuModel> {
                        let gpu = crate::gpu::open_device(rank_device)?;
                        let mut model =
                            load_gpu_model_rank(&dir, gpu, dtype, max_sessions, rank, size)
                                .with_context(|| {
                                    format!("rank {rank} of {size} on {rank_device}")
                                })?;
                        if let Some(ladder) = wiring.ladder_for(model.ladder_layers()) {
                            model.set_ladder_layers(ladder);
                        }
                        Ok(model)
                    })();
                    let mut model = match loaded {
                        Ok(model) => {
                            let info = GpuModelInfo::of(&model);
                            let _ = ready.send((rank, Startup::Loaded(Ok(info))));
                            model
                        }
                        Err(e) => {
                            let _ = ready.send((rank, Startup::Loaded(Err(format!("{e:#}")))));
                            return;
                        }
                    };
                    // The group is dropped instead (Shutdown) when another rank failed.
                    if !matches!(queue.recv(), Ok(RankCommand::Connect)) {
                        return;
                    }
                    let mut collective: Box<dyn DeviceCollective> = match (nccl_id, rank_device) {
                        (Some(id), Device::Cuda(ordinal)) => {
                            match NcclRank::join(ordinal, rank, size, id) {
                                Ok(nccl) => Box::new(nccl),
                                Err(e) => {
                                    let _ =
                                        ready.send((rank, Startup::Connected(Err(e.to_string()))));
                                    return;
                                }
                            }
                        }
                        _ => Box::new(HostStaged(Box::new(member) as Box<dyn Collective>)),
                    };
                    let _ = ready.send((rank, Startup::Connected(Ok(()))));
                    drop(ready);
                    serve_rank(rank, &mut model, collective.as_mut(), queue, replies);
                })
                .context("cannot start a GPU tensor-parallel rank thread")?;
            ranks.push(RankThread {
                commands,
                handle: Some(handle),
            });
        }
        drop(ready_tx);
        let mut group = GpuParallelModel {
            size,
            ranks,
            inner: Mutex::new(Inner {
                replies,
                broken: None,
                stats: CommStats::default(),
            }),
            info: GpuModelInfo::default(),
            transport,
            next_key: AtomicU64::new(0),
            released: Arc::new(Mutex::new(Vec::new())),
            live: Arc::new(AtomicUsize::new(0)),
            capacity: 0,
        };
        // Phase 1: every rank loads its shard. Any failure drops the group, whose Drop
        // stops the ranks that did load.
        let mut infos: Vec<Option<GpuModelInfo>> = (0..size).map(|_| None).collect();
        let mut failures = Vec::new();
        for _ in 0..size {
            match ready_rx.recv() {
                Ok((rank, Startup::Loaded(Ok(info)))) => infos[rank] = Some(info),
                Ok((rank, Startup::Loaded(Err(e)))) => {
                    failures.push(format!("tensor-parallel rank {rank}: {e}"))
                }
                Ok((rank, Startup::Connected(_))) => {
                    unreachable!("rank {rank} connected before it was told to")
                }
                Err(_) => {
                    failures.push("a tensor-parallel rank thread stopped while loading".into())
                }
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
        // Phase 2: every rank joins the collective. NCCL's init waits for every rank, and one
        // that failed before joining leaves the others waiting: bounded here.
        for thread in &group.ranks {
            let _ = thread.commands.send(RankCommand::Connect);
        }
        for _ in 0..size {
            match ready_rx.recv_timeout(JOIN_TIMEOUT) {
                Ok((_, Startup::Connected(Ok(())))) => {}
                Ok((rank, Startup::Connected(Err(e)))) => failures.push(format!(
                    "tensor-parallel rank {rank} cannot join the group: {e}"
                )),
                Ok((rank, Startup::Loaded(_))) => unreachable!("rank {rank} loaded twice"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    failures.push(format!(
                        "the tensor-parallel ranks did not all join within {} s",
                        JOIN_TIMEOUT.as_secs()
                    ));
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    failures.push("a tensor-parallel rank thread stopped while joining".into())
                }
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
        let infos: Vec<GpuModelInfo> = infos
            .into_iter()
            .map(|i| i.expect("every rank loaded"))
            .collect();
        group.capacity = infos.iter().map(|i| i.capacity).min().unwrap_or(0);
        group.info = infos.into_iter().next().expect("rank 0");
        Ok(group)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Sessions the smallest rank's state pool holds.
    pub fn session_capacity(&self) -> usize {
        self.capacity
    }

    pub fn comm_stats(&self) -> CommStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }

    /// A fresh session (its slots are taken on every rank with its first batch), or why none
    /// can start.
    pub(crate) fn new_state(&self) -> Result<GpuParallelSession, SessionStartError> {
        let live = self.live.fetch_add(1, Ordering::SeqCst);
        if live >= self.capacity {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return Err(SessionStartError::PoolFull {
                slots: self.capacity,
            });
        }
        Ok(GpuParallelSession {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            position: 0,
            released: self.released.clone(),
            live: self.live.clone(),
        })
    }

    /// The packed batch on every rank; rank 0's logits of `rows`.
    pub(crate) fn forward_packed(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut GpuParallelSession],
        rows: LogitRows<'_>,
    ) -> Result<Tensor, ForwardError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| unavailable("the GPU tensor-parallel group's lock is poisoned".into()))?;
        if let Some(reason) = &inner.broken {
            return Err(unavailable(reason.clone()));
        }
        let keys: Vec<u64> = states.iter().map(|s| s.key).collect();
        let last_only = match rows {
            LogitRows::LastOf(flags) => Some(flags.to_vec()),
            LogitRows::All | LogitRows::None => None,
        };
        let batch = Arc::new(Batch {
            tokens: tokens.to_vec(),
            lens: lens.to_vec(),
            last_only,
            keys,
            released: std::mem::take(&mut *self.released.lock().expect("released keys")),
        });
        for (rank, thread) in self.ranks.iter().enumerate() {
            if thread
                .commands
                .send(RankCommand::Forward(batch.clone()))
                .is_err()
            {
                let reason = format!("GPU tensor-parallel rank {rank} has stopped");
                inner.broken = Some(reason.clone());
                return Err(unavailable(reason));
            }
        }
        let mut logits = None;
        let mut failure: Option<ForwardError> = None;
        for _ in 0..self.size {
            let Ok(reply) = inner.replies.recv() else {
                failure.get_or_insert(unavailable(
                    "the GPU tensor-parallel ranks have stopped".into(),
                ));
                break;
            };
            match reply.result {
                Ok(Some(rows)) => logits = Some(rows),
                Ok(None) => {}
                // Every rank refuses a bad input alike; rank 0 speaks for them.
                Err(ForwardError::Input(e)) if reply.rank == 0 => {
                    failure.get_or_insert(ForwardError::Input(e));
                }
                Err(ForwardError::Input(_)) => {}
                Err(e) => {
                    failure = Some(e);
                }
            }
            if reply.rank == 0 {
                (inner.stats).record(reply.waited, reply.reductions, reply.reduced_floats);
            }
        }
        match (failure, logits) {
            (Some(ForwardError::Input(e)), _) => Err(ForwardError::Input(e)),
            (Some(e), _) => {
                let cause = match e {
                    ForwardError::Group(g) => g.reason,
                    other => other.to_string(),
                };
                let reason = broken_group(&cause, self.size);
                inner.broken = Some(reason.clone());
                Err(unavailable(reason))
            }
            (None, Some(rows)) => {
                for (state, len) in states.iter_mut().zip(lens) {
                    state.position += len;
                }
                Ok(rows)
            }
            (None, None) => unreachable!("rank 0 answers every batch with logits or an error"),
        }
    }
}

/// A session of a GPU tensor-parallel group: every rank holds its slots under `key`, freed
/// with the next batch after this is dropped; `live` counts the group's sessions.
pub struct GpuParallelSession {
    key: u64,
    pub(crate) position: usize,
    released: Arc<std::sync::Mutex<Vec<u64>>>,
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for GpuParallelSession {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.released.lock() {
            keys.push(self.key);
        }
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long the ranks may take to join their collective.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

impl Drop for GpuParallelModel {
    fn drop(&mut self) {
        for rank in &self.ranks {
            let _ = rank.commands.send(RankCommand::Shutdown);
        }
        // A rank stuck inside NCCL (a peer failed mid-reduction or while joining) never
        // returns: it is left behind after a grace period rather than hanging the process.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for rank in &mut self.ranks {
            if let Some(handle) = rank.handle.take() {
                while !handle.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if handle.is_finished() {
                    let _ = handle.join();
                }
            }
        }
    }
}

/// A rank's loop: every batch on its shard, with its sessions' slots.
fn serve_rank(
    rank: usize,
    model: &mut GpuModel,
    collective: &mut dyn DeviceCollective,
    queue: mpsc::Receiver<RankCommand>,
    replies: mpsc::Sender<Reply>,
) {
    let mut sessions: HashMap<u64, GpuSession> = HashMap::new();
    while let Ok(RankCommand::Forward(batch)) = queue.recv() {
        for key in &batch.released {
            sessions.remove(key);
        }
        let mut group = DeviceGroup::new(collective);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forward_rank(rank, model, &mut sessions, &batch, &mut group)
        }))
        .unwrap_or_else(|_| {
            Err(ForwardError::Device(format!(
                "GPU tensor-parallel rank {rank} panicked"
            )))
        });
        let fatal = matches!(
            result,
            Err(ForwardError::Group(_) | ForwardError::Device(_))
        );
        let reply = Reply {
            rank,
            result,
            waited: group.waited,
            reductions: group.reductions,
            reduced_floats: group.reduced_floats,
        };
        if replies.send(reply).is_err() || fatal {
            // The group is gone (or this rank cannot go on): leaving drops the collective,
            // which host-staged peers see as a departed rank.
            break;
        }
    }
}

fn forward_rank(
    rank: usize,
    model: &mut GpuModel,
    sessions: &mut HashMap<u64, GpuSession>,
    batch: &Batch,
    group: &mut DeviceGroup<'_>,
) -> Result<Option<Tensor>, ForwardError> {
    let device = |e: GpuModelError| match e {
        GpuModelError::Input(e) => ForwardError::Input(e),
        GpuModelError::Group(e) => ForwardError::Group(e),
        other => ForwardError::Device(format!("rank {rank}: {other}")),
    };
    for key in &batch.keys {
        if !sessions.contains_key(key) {
            // The caller keeps live sessions within every rank's pool.
            sessions.insert(*key, model.new_session().map_err(device)?);
        }
    }
    // Keys of one batch are distinct; take the sessions out to borrow them together.
    let mut taken: Vec<GpuSession> = batch
        .keys
        .iter()
        .map(|k| sessions.remove(k).expect("inserted above"))
        .collect();
    let mut refs: Vec<&mut GpuSession> = taken.iter_mut().collect();
    // Rank 0 alone runs the head.
    let rows = match (rank, &batch.last_only) {
        (0, Some(flags)) => LogitRows::LastOf(flags),
        (0, None) => LogitRows::All,
        _ => LogitRows::None,
    };
    let result = model
        .forward_in_group(&batch.tokens, &batch.lens, &mut refs, group, rows)
        .map_err(device);
    for (key, session) in batch.keys.iter().zip(taken) {
        sessions.insert(*key, session);
    }
    result
}
