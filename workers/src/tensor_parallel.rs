//! A language model split over a tensor-parallel group (`--tensor-parallel N`).
//!
//! Rank 0, the leader, lives where requests arrive; it sends every packed batch to the other
//! ranks (followers), then all ranks run the same forward on their shards, joined by
//! all-reduces (`shared/SPEC-MODELS.md` §5; ladder-wired models overlap them). Followers keep
//! their slices of every session's state, keyed by a number the leader hands out; a dropped
//! [`ParallelSession`] is forgotten by the followers with the next batch.
//!
//! Ranks are threads of this process (`threads`: the in-process all-reduce over shared
//! memory) or processes (`processes`: `tideway tp-rank` children on loopback, or ranks
//! started by hand on other hosts, joined by the TCP ring). A rank that dies or a transport
//! that fails ends the forward with an error, and every later one: the group is gone, the
//! server answers UNAVAILABLE instead of hanging.
//!
//! Length: ~750 lines, one file for the leader, the followers and both transports' setup
//! (threads, `tp-rank` processes), which share the batch and shard messages; split the
//! process launcher out when it grows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use tideway_kernels::Tensor;
use tideway_kernels::collective::{Collective, TcpRank, ThreadGroup};
use tideway_kernels::matmul::LinearFormat;
use tideway_operators::models::{Model, SessionState, load_model_as, load_model_rank};
use tideway_operators::tensor_parallel::Group;
use tideway_operators::{ForwardError, LoadError, LogitRows};

/// How the ranks of a tensor-parallel group run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Threads of this process, all-reducing over shared memory.
    Threads,
    /// `tideway tp-rank` processes on this machine, all-reducing over a TCP ring on loopback.
    Processes,
    /// Ranks started by hand (`tideway tp-rank --leader ADDR`, on this or other hosts) that
    /// join this process at `--tp-control`; a TCP ring between the hosts.
    External,
}

/// The residual wiring a model runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Wiring {
    /// As its config.json says (`ladder_layers`, default none).
    Config,
    /// Every layer standard (pre-norm residual).
    Standard,
    /// Every layer ladder-wired (SPEC-MODELS.md §5.1).
    Ladder,
}

impl Wiring {
    /// The ladder flags to set in place of a model's `current` ones (None: keep them).
    pub(crate) fn ladder_for(self, current: &[bool]) -> Option<Vec<bool>> {
        match self {
            Wiring::Config => None,
            Wiring::Standard => Some(vec![false; current.len()]),
            Wiring::Ladder => Some(vec![true; current.len()]),
        }
    }

    fn apply(self, model: &mut Model) {
        if let Some(ladder) = self.ladder_for(model.ladder_layers()) {
            model.set_ladder_layers(ladder);
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Wiring::Config => "config",
            Wiring::Standard => "standard",
            Wiring::Ladder => "ladder",
        }
    }
}

/// Loads rank `rank` of `size` with `wiring`, its linear layers' weights in `format`.
pub(crate) fn load_rank(
    dir: &Path,
    rank: usize,
    size: usize,
    wiring: Wiring,
    format: LinearFormat,
) -> Result<Model, LoadError> {
    let mut model = match (rank, size) {
        (0, 1) => load_model_as(dir, format)?,
        _ => load_model_rank(dir, rank, size)?,
    };
    wiring.apply(&mut model);
    Ok(model)
}

/// The `--tensor-parallel` options shared by `run`, `bench` and `serve`.
#[derive(Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Split language models over this many tensor-parallel ranks (heads and channels of
    /// every block; 1: no split).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Where the ranks run.
    #[arg(long, value_enum, default_value = "threads")]
    pub tp_transport: Transport,
    /// With `--tp-transport external`: the address ranks 1.. join at (port 0: any free port,
    /// printed). Loopback by default; the group's transport has no TLS or authentication, so
    /// give it an address on a private network only.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub tp_control: SocketAddr,
}

impl ParallelArgs {
    /// Ranks that run as separate processes on this machine (their compute threads share
    /// its cores).
    pub fn local_processes(&self) -> usize {
        match self.tp_transport {
            Transport::Processes => self.tensor_parallel.max(1),
            Transport::Threads | Transport::External => 1,
        }
    }
}

impl Default for ParallelArgs {
    fn default() -> Self {
        ParallelArgs {
            tensor_parallel: 1,
            tp_transport: Transport::Threads,
            tp_control: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// Communication of a group's forwards so far (what `tideway bench` reports).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommStats {
    pub forwards: u64,
    /// Time rank 0 spent blocked in all-reduce waits.
    pub waited: Duration,
    pub reductions: u64,
    pub reduced_floats: u64,
}

impl CommStats {
    /// Adds rank 0's share of one forward.
    pub(crate) fn record(&mut self, waited: Duration, reductions: usize, reduced_floats: usize) {
        self.forwards += 1;
        self.waited += waited;
        self.reductions += reductions as u64;
        self.reduced_floats += reduced_floats as u64;
    }
}

/// A forward refused because its group cannot compute (the server answers UNAVAILABLE).
pub(crate) fn unavailable(reason: String) -> ForwardError {
    ForwardError::Group(tideway_kernels::collective::CollectiveError { rank: 0, reason })
}

/// What every later forward of a group of `size` ranks is told once `cause` broke it.
pub(crate) fn broken_group(cause: &str, size: usize) -> String {
    format!("{cause}; the group of {size} ranks cannot compute again: restart the server")
}

/// A batch for the followers.
#[derive(Debug, Clone, PartialEq)]
enum Command {
    Forward {
        tokens: Vec<u32>,
        lens: Vec<u32>,
        keys: Vec<u64>,
        /// Sessions to forget first.
        released: Vec<u64>,
    },
    Shutdown,
}

impl Command {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Command::Forward {
                tokens,
                lens,
                keys,
                released,
            } => {
                out.push(1);
                put_u32s(&mut out, tokens);
                put_u32s(&mut out, lens);
                put_u64s(&mut out, keys);
                put_u64s(&mut out, released);
            }
            Command::Shutdown => out.push(2),
        }
        out
    }

    fn read(stream: &mut impl Read) -> std::io::Result<Command> {
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag)?;
        match tag[0] {
            1 => Ok(Command::Forward {
                tokens: get_u32s(stream)?,
                lens: get_u32s(stream)?,
                keys: get_u64s(stream)?,
                released: get_u64s(stream)?,
            }),
            2 => Ok(Command::Shutdown),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown command {other} from the leader"),
            )),
        }
    }
}

fn put_u32s(out: &mut Vec<u8>, values: &[u32]) {
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    values
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    values
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

fn get_len(stream: &mut impl Read) -> std::io::Result<usize> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b) as usize)
}

fn get_u32s(stream: &mut impl Read) -> std::io::Result<Vec<u32>> {
    let n = get_len(stream)?;
    let mut bytes = vec![0u8; n * 4];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

fn get_u64s(stream: &mut impl Read) -> std::io::Result<Vec<u64>> {
    let n = get_len(stream)?;
    let mut bytes = vec![0u8; n * 8];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_str(stream: &mut impl Read) -> std::io::Result<String> {
    let n = get_len(stream)?;
    let mut bytes = vec![0u8; n];
    stream.read_exact(&mut bytes)?;
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// How the leader reaches one follower.
enum Follower {
    Thread {
        commands: mpsc::Sender<Command>,
        handle: Option<std::thread::JoinHandle<()>>,
    },
    Process {
        control: TcpStream,
        child: Option<std::process::Child>,
        rank: usize,
    },
}

impl Follower {
    fn send(&mut self, command: &Command) -> Result<(), String> {
        match self {
            Follower::Thread { commands, .. } => commands
                .send(command.clone())
                .map_err(|_| "a tensor-parallel rank thread has stopped".to_string()),
            Follower::Process { control, rank, .. } => control
                .write_all(&command.encode())
                .map_err(|e| format!("tensor-parallel rank {rank} is unreachable: {e}")),
        }
    }
}

struct Inner {
    collective: Box<dyn Collective>,
    followers: Vec<Follower>,
    /// Set once a rank or the transport has failed: the group cannot compute again.
    broken: Option<String>,
    stats: CommStats,
}

/// A model split over a tensor-parallel group, driven from rank 0.
pub struct ParallelModel {
    leader: Model,
    size: usize,
    inner: Mutex<Inner>,
    next_key: std::sync::atomic::AtomicU64,
    released: Arc<Mutex<Vec<u64>>>,
}

impl ParallelModel {
    pub fn start(dir: &Path, size: usize, parallel: &ParallelArgs, wiring: Wiring) -> Result<Self> {
        // Check the split before starting anything (clear errors from rank 0's loader).
        let leader = load_rank(dir, 0, size, wiring, LinearFormat::F32)?;
        let (collective, followers) = match parallel.tp_transport {
            Transport::Threads => start_threads(dir, size, wiring)?,
            Transport::Processes => spawn_processes(dir, size, wiring)?,
            Transport::External => {
                let control = TcpListener::bind(parallel.tp_control).with_context(|| {
                    format!(
                        "cannot listen for tensor-parallel ranks on {}",
                        parallel.tp_control
                    )
                })?;
                eprintln!(
                    "tideway tensor-parallel leader waiting for ranks 1..{size} at {}: start `tideway tp-rank --leader HOST:{} --rank R --size {size} --model {} --wiring {}` for each",
                    control.local_addr()?,
                    control.local_addr()?.port(),
                    dir.display(),
                    wiring.name()
                );
                lead_group(control, size, &mut [])?
            }
        };
        Ok(ParallelModel {
            leader,
            size,
            inner: Mutex::new(Inner {
                collective,
                followers,
                broken: None,
                stats: CommStats::default(),
            }),
            next_key: std::sync::atomic::AtomicU64::new(0),
            released: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn leader(&self) -> &Model {
        &self.leader
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn comm_stats(&self) -> CommStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }

    pub(crate) fn new_state(&self) -> ParallelSession {
        ParallelSession {
            state: self.leader.new_state(),
            key: self
                .next_key
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            released: self.released.clone(),
        }
    }

    /// The packed batch over the group; rank 0 runs the head over `rows` alone (the other
    /// ranks never run it).
    pub(crate) fn forward_packed(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut ParallelSession],
        rows: LogitRows<'_>,
    ) -> Result<Tensor, ForwardError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| unavailable("the tensor-parallel group's lock is poisoned".into()))?;
        if let Some(reason) = &inner.broken {
            return Err(unavailable(reason.clone()));
        }
        let keys: Vec<u64> = states.iter().map(|s| s.key).collect();
        let released = std::mem::take(&mut *self.released.lock().expect("released keys"));
        let command = Command::Forward {
            tokens: tokens.to_vec(),
            lens: lens.iter().map(|&l| l as u32).collect(),
            keys,
            released,
        };
        for follower in inner.followers.iter_mut() {
            if let Err(reason) = follower.send(&command) {
                inner.broken = Some(reason.clone());
                return Err(unavailable(reason));
            }
        }
        let mut local: Vec<&mut SessionState> = states.iter_mut().map(|s| &mut s.state).collect();
        let Inner {
            collective, stats, ..
        } = &mut *inner;
        let mut group = Group::new(collective.as_mut());
        let result = self
            .leader
            .forward_in_group(tokens, lens, &mut local, &mut group, rows);
        stats.record(group.waited, group.reductions, group.reduced_floats);
        match result {
            Ok(logits) => {
                Ok(logits.unwrap_or_else(|| Tensor::zeros(&[0, self.leader.output_width()])))
            }
            Err(ForwardError::Group(e)) => {
                let reason = broken_group(&e.reason, self.size);
                inner.broken = Some(reason.clone());
                Err(unavailable(reason))
            }
            Err(e) => Err(e),
        }
    }
}

/// A session of a tensor-parallel group: rank 0's slices of its state here; the other
/// ranks hold theirs under `key`, and forget them with the next batch after this is dropped.
pub struct ParallelSession {
    pub(crate) state: SessionState,
    key: u64,
    released: Arc<Mutex<Vec<u64>>>,
}

impl Drop for ParallelSession {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.released.lock() {
            keys.push(self.key);
        }
    }
}

impl Drop for ParallelModel {
    fn drop(&mut self) {
        let Ok(inner) = self.inner.get_mut() else {
            return;
        };
        for follower in inner.followers.iter_mut() {
            let _ = follower.send(&Command::Shutdown);
        }
        for follower in inner.followers.iter_mut() {
            match follower {
                Follower::Thread { handle, .. } => {
                    if let Some(h) = handle.take() {
                        let _ = h.join();
                    }
                }
                Follower::Process { child, .. } => {
                    if let Some(mut c) = child.take() {
                        // A rank that does not stop within a few seconds is killed.
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while Instant::now() < deadline {
                            if let Ok(Some(_)) = c.try_wait() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
            }
        }
    }
}

/// A follower's loop: mirror every batch of the leader on this rank's shard.
fn follow(
    model: &Model,
    collective: &mut dyn Collective,
    mut next: impl FnMut() -> Option<Command>,
) -> Result<(), String> {
    let mut states: std::collections::HashMap<u64, SessionState> = Default::default();
    while let Some(command) = next() {
        match command {
            Command::Shutdown => break,
            Command::Forward {
                tokens,
                lens,
                keys,
                released,
            } => {
                for key in released {
                    states.remove(&key);
                }
                for key in &keys {
                    states.entry(*key).or_insert_with(|| model.new_state());
                }
                // Keys of one batch are distinct; take the states out to borrow them together.
                let mut taken: Vec<SessionState> = keys
                    .iter()
                    .map(|k| states.remove(k).expect("inserted above"))
                    .collect();
                let mut refs: Vec<&mut SessionState> = taken.iter_mut().collect();
                let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
                let mut group = Group::new(collective);
                let result =
                    model.forward_in_group(&tokens, &lens, &mut refs, &mut group, LogitRows::None);
                for (key, state) in keys.into_iter().zip(taken) {
                    states.insert(key, state);
                }
                match result {
                    Ok(_) | Err(ForwardError::Input(_)) => {}
                    // The leader sees the same failure; this rank has nothing left to do.
                    Err(ForwardError::Group(e)) => return Err(e.to_string()),
                    Err(ForwardError::Device(e)) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn start_threads(
    dir: &Path,
    size: usize,
    wiring: Wiring,
) -> Result<(Box<dyn Collective>, Vec<Follower>)> {
    let mut members = ThreadGroup::new(size).members().into_iter();
    let leader = Box::new(members.next().expect("rank 0")) as Box<dyn Collective>;
    let mut followers = Vec::new();
    let mut loaded = Vec::new();
    for mut member in members {
        let rank = member.rank();
        let (commands, queue) = mpsc::channel::<Command>();
        let (ready, ready_rx) = mpsc::channel::<Result<(), String>>();
        let dir = dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name(format!("tp-rank-{rank}"))
            .spawn(move || {
                let model = match load_rank(&dir, rank, size, wiring, LinearFormat::F32) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                if let Err(e) = follow(&model, &mut member, || queue.recv().ok()) {
                    tracing::error!(rank, "tensor-parallel rank stopped: {e}");
                }
            })
            .context("cannot start a tensor-parallel rank thread")?;
        loaded.push((rank, ready_rx));
        followers.push(Follower::Thread {
            commands,
            handle: Some(handle),
        });
    }
    for (rank, ready) in loaded {
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("tensor-parallel rank {rank}: {e}"),
            Err(_) => bail!("tensor-parallel rank {rank} stopped while loading"),
        }
    }
    Ok((leader, followers))
}

/// Starts ranks 1.. as `tideway tp-rank` processes of this executable and joins them.
fn spawn_processes(
    dir: &Path,
    size: usize,
    wiring: Wiring,
) -> Result<(Box<dyn Collective>, Vec<Follower>)> {
    let control = TcpListener::bind("127.0.0.1:0").context("cannot open the control port")?;
    let control_addr = control.local_addr()?;
    let exe = std::env::current_exe().context("cannot find the tideway executable")?;
    let threads_per_rank = rayon::current_num_threads().max(1);
    let mut children = Vec::new();
    for rank in 1..size {
        let child = std::process::Command::new(&exe)
            .arg("--threads")
            .arg(threads_per_rank.to_string())
            .arg("tp-rank")
            .arg("--model")
            .arg(dir)
            .arg("--leader")
            .arg(control_addr.to_string())
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--size")
            .arg(size.to_string())
            .arg("--wiring")
            .arg(wiring.name())
            .arg("--bind")
            .arg("127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start tensor-parallel rank {rank}"))?;
        children.push(child);
    }
    let (collective, followers) = lead_group(control, size, &mut children)?;
    let followers = followers
        .into_iter()
        .zip(children)
        .map(|(f, child)| match f {
            Follower::Process { control, rank, .. } => Follower::Process {
                control,
                child: Some(child),
                rank,
            },
            other => other,
        })
        .collect();
    Ok((collective, followers))
}

/// Rank 0's side of joining a process group: each rank connects to `control` and says where
/// its ring port is; rank 0 answers with every rank's ring address; the ring is connected.
/// `children` (if any) are watched so that a rank that fails to start is reported at once.
fn lead_group(
    control: TcpListener,
    size: usize,
    children: &mut [std::process::Child],
) -> Result<(Box<dyn Collective>, Vec<Follower>)> {
    let ring = TcpListener::bind(SocketAddr::new(control.local_addr()?.ip(), 0))?;
    let mut peers: Vec<Option<SocketAddr>> = vec![None; size];
    // Bound to every interface: peers reach it at the address they reached the control port.
    let advertised = |ring: &TcpListener, via: &TcpStream| -> std::io::Result<SocketAddr> {
        let mut addr = ring.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(via.local_addr()?.ip());
        }
        Ok(addr)
    };
    let mut links: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    control.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while links.iter().skip(1).any(Option::is_none) {
        match control.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                let rank = get_len(&mut stream)?;
                let addr: SocketAddr = get_str(&mut stream)?
                    .parse()
                    .context("a rank sent a malformed ring address")?;
                if rank == 0 || rank >= size || links[rank].is_some() {
                    bail!(
                        "a process joined as rank {rank}, which is not free in a group of {size}"
                    );
                }
                peers[rank] = Some(addr);
                if peers[0].is_none() {
                    peers[0] = Some(advertised(&ring, &stream)?);
                }
                links[rank] = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                for (i, child) in children.iter_mut().enumerate() {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "tensor-parallel rank {} exited ({status}) before joining the group; its error is above",
                            i + 1
                        );
                    }
                }
                if Instant::now() > deadline {
                    bail!("tensor-parallel ranks did not join within 300 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let peers: Vec<SocketAddr> = peers.into_iter().map(|p| p.expect("joined")).collect();
    let mut hello = Vec::new();
    hello.extend_from_slice(&(size as u32).to_le_bytes());
    for p in &peers {
        put_str(&mut hello, &p.to_string());
    }
    let mut followers = Vec::new();
    for (rank, link) in links.into_iter().enumerate().skip(1) {
        let mut control = link.expect("joined");
        control.write_all(&hello)?;
        followers.push(Follower::Process {
            control,
            child: None,
            rank,
        });
    }
    let collective = TcpRank::connect(0, ring, &peers).context("cannot connect the ring")?;
    Ok((Box::new(collective), followers))
}

/// `tideway tp-rank`: one follower rank of a tensor-parallel group led by another process.
#[derive(Args)]
pub struct RankArgs {
    /// Checkpoint directory (the same model as the leader's).
    #[arg(long)]
    model: PathBuf,
    /// The leader's control address (printed by the leader, or given by the parent process).
    #[arg(long)]
    leader: SocketAddr,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    size: usize,
    /// Address to accept the ring connection on (port 0: any free port; an unspecified
    /// address is advertised as the one that reaches the leader).
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// The residual wiring (the leader's).
    #[arg(long, value_enum, default_value = "config")]
    wiring: Wiring,
}

pub fn run_rank(args: RankArgs) -> Result<()> {
    if args.rank == 0 || args.rank >= args.size {
        bail!(
            "--rank must be 1..{} (rank 0 is the leader)",
            args.size.saturating_sub(1)
        );
    }
    let model = load_rank(
        &args.model,
        args.rank,
        args.size,
        args.wiring,
        LinearFormat::F32,
    )
    .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let ring = TcpListener::bind(args.bind).context("cannot open the ring port")?;
    // The leader may not listen yet (ranks started before it): retry for a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut control = loop {
        match TcpStream::connect(args.leader) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => {
                return Err(e)
                    .with_context(|| format!("cannot reach the leader at {}", args.leader));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    control.set_nodelay(true)?;
    let mut ring_addr = ring.local_addr()?;
    if ring_addr.ip().is_unspecified() {
        ring_addr.set_ip(control.local_addr()?.ip());
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&(args.rank as u32).to_le_bytes());
    put_str(&mut hello, &ring_addr.to_string());
    control.write_all(&hello)?;
    let n = get_len(&mut control)?;
    let peers: Vec<SocketAddr> = (0..n)
        .map(|_| {
            get_str(&mut control)?
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}")))
        })
        .collect::<std::io::Result<_>>()?;
    let mut collective =
        TcpRank::connect(args.rank, ring, &peers).context("cannot connect the ring")?;
    let mut reader = std::io::BufReader::new(control);
    follow(&model, &mut collective, || Command::read(&mut reader).ok())
        .map_err(|e| anyhow::anyhow!("rank {}: {e}", args.rank))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_survive_their_encoding() {
        for command in [
            Command::Forward {
                tokens: vec![1, 2, 70000],
                lens: vec![2, 1],
                keys: vec![5, u64::MAX],
                released: vec![],
            },
            Command::Shutdown,
        ] {
            let bytes = command.encode();
            assert_eq!(Command::read(&mut &bytes[..]).unwrap(), command);
        }
    }
}
