//! Collectives for tensor-parallel groups, with start/wait handles so that a caller can
//! compute while a reduction is in flight (what Ladder Residual overlaps,
//! `shared/SPEC-MODELS.md` §5).
//!
//! [`ThreadGroup`]: the ranks are threads of one process sharing memory. `all_reduce_sum`
//! is a reduce-scatter then an all-gather over the ranks' posted (read-only) buffers: rank r
//! sums slice r of every buffer and posts it, then every rank concatenates the summed slices,
//! so no rank does the whole sum and no data sits behind a lock.
//!
//! [`TcpRank`]: ranks connected by TCP in a ring (processes on one machine or several).
//!
//! Length: ~440 lines of code (the one `Collective` seam and its three implementations: one
//! rank, threads sharing memory, the TCP ring) and ~170 of tests that run each implementation
//! against the same reductions; they stay together so the seam and its contract read as one.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

/// A collective that could not complete: a peer went away or the transport failed. The
/// group is unusable afterwards (its ranks disagree on how far they got).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("all-reduce across the tensor-parallel group failed at rank {rank}: {reason}")]
pub struct CollectiveError {
    pub rank: usize,
    pub reason: String,
}

/// An all-reduce that has been started: `wait` returns the summed buffer.
pub trait PendingReduce: Send {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError>;
}

/// A tensor-parallel group member's view of its collectives.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Starts summing `data` across the group. Every rank must start the same sequence of
    /// reductions with buffers of equal length; several may be in flight at once (the ladder
    /// schedule keeps a block's output reducing while the next block reduces its own small
    /// intermediate) and they may be waited in any order.
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce>;
}

/// A group of one: every reduction is the buffer itself. The single-worker forward runs the
/// same code as a tensor-parallel rank with this.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

/// A reduction that is already complete (a group of one, or a sum carried from elsewhere).
pub struct Ready(pub Vec<f32>);

impl PendingReduce for Ready {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        Ok(self.0)
    }
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        Box::new(Ready(data))
    }
}

/// One reduction of a [`ThreadGroup`], shared by its ranks until all have gathered it.
struct Round {
    /// Posted buffers by rank (read-only once posted).
    posted: Vec<Option<Arc<Vec<f32>>>>,
    /// Each rank's summed slice, once it has reduced it.
    reduced: Vec<Option<Arc<Vec<f32>>>>,
    /// Ranks that have copied the result out.
    gathered: usize,
}

struct Shared {
    size: usize,
    rounds: Mutex<Rounds>,
    changed: Condvar,
}

struct Rounds {
    /// Reductions in flight, by sequence number (each rank counts its own starts).
    by_seq: HashMap<u64, Round>,
    /// A rank whose handle was dropped (its thread ended or panicked): reductions that still
    /// need it fail instead of waiting forever.
    departed: Option<usize>,
}

/// A group of `size` ranks in one process; `members` hands out one handle per rank.
pub struct ThreadGroup {
    shared: Arc<Shared>,
}

impl ThreadGroup {
    pub fn new(size: usize) -> Self {
        assert!(size > 0);
        ThreadGroup {
            shared: Arc::new(Shared {
                size,
                rounds: Mutex::new(Rounds {
                    by_seq: HashMap::new(),
                    departed: None,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    pub fn members(&self) -> Vec<ThreadRank> {
        (0..self.shared.size)
            .map(|rank| ThreadRank {
                rank,
                shared: self.shared.clone(),
                next_seq: 0,
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    next_seq: u64,
}

struct ThreadPending {
    rank: usize,
    seq: u64,
    shared: Arc<Shared>,
    len: usize,
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        // Poisoned only if another rank panicked inside the lock; nothing to tell then.
        if let Ok(mut rounds) = self.shared.rounds.lock() {
            rounds.departed.get_or_insert(self.rank);
            self.shared.changed.notify_all();
        }
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let (len, seq, size) = (data.len(), self.next_seq, self.shared.size);
        self.next_seq += 1;
        let mut rounds = self.shared.rounds.lock().expect("collective lock");
        let round = rounds.by_seq.entry(seq).or_insert_with(|| Round {
            posted: vec![None; size],
            reduced: vec![None; size],
            gathered: 0,
        });
        round.posted[self.rank] = Some(Arc::new(data));
        self.shared.changed.notify_all();
        Box::new(ThreadPending {
            rank: self.rank,
            seq,
            shared: self.shared.clone(),
            len,
        })
    }
}

impl PendingReduce for ThreadPending {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        let (size, len, seq) = (self.shared.size, self.len, self.seq);
        let slice = |r: usize| (r * len / size)..((r + 1) * len / size);
        let departed = |rounds: &Rounds| {
            rounds.departed.map(|r| CollectiveError {
                rank: self.rank,
                reason: format!("rank {r} of the group has stopped"),
            })
        };
        let mut rounds = self.shared.rounds.lock().expect("collective lock");
        while rounds.by_seq[&seq].posted.iter().any(Option::is_none) {
            if let Some(e) = departed(&rounds) {
                return Err(e);
            }
            rounds = self.shared.changed.wait(rounds).expect("collective lock");
        }
        let buffers: Vec<Arc<Vec<f32>>> = rounds.by_seq[&seq]
            .posted
            .iter()
            .map(|b| b.clone().expect("all posted"))
            .collect();
        drop(rounds);
        // Reduce-scatter: this rank sums its slice of every (read-only) buffer.
        let mine = slice(self.rank);
        let mut sum = vec![0.0f32; mine.len()];
        let mut mismatch = None;
        for b in &buffers {
            if b.len() != len {
                mismatch = Some(b.len());
                break;
            }
            for (s, v) in sum.iter_mut().zip(&b[mine.clone()]) {
                *s += v;
            }
        }
        drop(buffers);
        let mut rounds = self.shared.rounds.lock().expect("collective lock");
        rounds
            .by_seq
            .get_mut(&seq)
            .expect("round in flight")
            .reduced[self.rank] = Some(Arc::new(sum));
        self.shared.changed.notify_all();
        while rounds.by_seq[&seq].reduced.iter().any(Option::is_none) {
            if let Some(e) = departed(&rounds) {
                return Err(e);
            }
            rounds = self.shared.changed.wait(rounds).expect("collective lock");
        }
        let round = rounds.by_seq.get_mut(&seq).expect("round in flight");
        let slices: Vec<Arc<Vec<f32>>> = round
            .reduced
            .iter()
            .map(|s| s.clone().expect("all reduced"))
            .collect();
        round.gathered += 1;
        if round.gathered == size {
            rounds.by_seq.remove(&seq);
        }
        drop(rounds);
        if let Some(other) = mismatch {
            return Err(CollectiveError {
                rank: self.rank,
                reason: format!("ranks reduced buffers of {other} and {len} values"),
            });
        }
        // All-gather: the summed slices, concatenated.
        let mut result = Vec::with_capacity(len);
        for s in &slices {
            result.extend_from_slice(s);
        }
        Ok(result)
    }
}

/// A rank of a group whose members are processes (or threads) connected by TCP in a ring:
/// each rank listens for its predecessor and connects to its successor. `all_reduce_sum` is
/// the ring algorithm (reduce-scatter, then all-gather, n−1 steps each, every link busy in
/// both directions), run on a helper thread so that the caller computes meanwhile.
pub struct TcpRank {
    rank: usize,
    size: usize,
    /// Reductions for the helper thread, in start order (every rank starts them in the same
    /// order, so the ring carries them in the same order); None for a group of one.
    jobs: Option<mpsc::Sender<TcpJob>>,
}

/// One reduction queued for the helper thread, and where its result goes.
struct TcpJob {
    data: Vec<f32>,
    reply: mpsc::Sender<Result<Vec<f32>, String>>,
}

impl TcpRank {
    /// Joins the group: `listener` is this rank's (bound at `peers[rank]`); `peers` lists every
    /// rank's address. Blocks until both neighbours are connected.
    pub fn connect(
        rank: usize,
        listener: std::net::TcpListener,
        peers: &[std::net::SocketAddr],
    ) -> std::io::Result<Self> {
        let size = peers.len();
        assert!(rank < size);
        if size == 1 {
            return Ok(TcpRank {
                rank,
                size,
                jobs: None,
            });
        }
        let next_addr = peers[(rank + 1) % size];
        let connector = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match std::net::TcpStream::connect(next_addr) {
                    Ok(s) => return Ok(s),
                    Err(e) if std::time::Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        let (prev, _) = listener.accept()?;
        let next = connector.join().expect("connector thread")?;
        for s in [&prev, &next] {
            s.set_nodelay(true)?;
        }
        // A peer that is alive but stuck must not hang the group forever either.
        prev.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        let (jobs, queue) = mpsc::channel::<TcpJob>();
        std::thread::Builder::new()
            .name(format!("tp-ring-{rank}"))
            .spawn(move || {
                let (mut next, mut prev) = (next, prev);
                // After a transport error the ring is broken: every later reduction fails too.
                let mut broken: Option<String> = None;
                for job in queue {
                    let result = match &broken {
                        Some(reason) => Err(reason.clone()),
                        None => ring_all_reduce(rank, size, &mut next, &mut prev, job.data)
                            .map_err(|e| {
                                let reason = match e.kind() {
                                    std::io::ErrorKind::UnexpectedEof
                                    | std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::BrokenPipe => format!(
                                        "transport error: a neighbouring rank closed its connection (it stopped or was killed): {e}"
                                    ),
                                    _ => format!("transport error: {e}"),
                                };
                                broken = Some(reason.clone());
                                // Wake the neighbours instead of letting them time out.
                                let _ = next.shutdown(std::net::Shutdown::Both);
                                let _ = prev.shutdown(std::net::Shutdown::Both);
                                reason
                            }),
                    };
                    let _ = job.reply.send(result);
                }
            })?;
        Ok(TcpRank {
            rank,
            size,
            jobs: Some(jobs),
        })
    }
}

fn write_f32s(stream: &mut std::net::TcpStream, values: &[f32]) -> std::io::Result<()> {
    use std::io::Write;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    stream.write_all(&bytes)
}

fn read_f32s(stream: &mut std::net::TcpStream, count: usize) -> std::io::Result<Vec<f32>> {
    use std::io::Read;
    let mut bytes = vec![0u8; count * 4];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The ring all-reduce over one rank's links (`next` to send, `prev` to receive).
fn ring_all_reduce(
    rank: usize,
    size: usize,
    next: &mut std::net::TcpStream,
    prev: &mut std::net::TcpStream,
    mut data: Vec<f32>,
) -> std::io::Result<Vec<f32>> {
    let len = data.len();
    let chunk = |c: usize| (c * len / size)..((c + 1) * len / size);
    let step = |data: &mut Vec<f32>,
                next: &mut std::net::TcpStream,
                prev: &mut std::net::TcpStream,
                send: usize,
                recv: usize,
                add: bool|
     -> std::io::Result<()> {
        let outgoing = data[chunk(send)].to_vec();
        let incoming = std::thread::scope(|scope| {
            let sender = scope.spawn(|| write_f32s(next, &outgoing));
            let received = read_f32s(prev, chunk(recv).len());
            sender.join().expect("sender thread")?;
            received
        })?;
        for (d, v) in data[chunk(recv)].iter_mut().zip(incoming) {
            *d = if add { *d + v } else { v };
        }
        Ok(())
    };
    for s in 0..size - 1 {
        let send = (rank + size - s) % size;
        let recv = (rank + size - s - 1) % size;
        step(&mut data, next, prev, send, recv, true)?;
    }
    for s in 0..size - 1 {
        let send = (rank + 1 + size - s) % size;
        let recv = (rank + size - s) % size;
        step(&mut data, next, prev, send, recv, false)?;
    }
    Ok(data)
}

struct TcpPending {
    rank: usize,
    reply: mpsc::Receiver<Result<Vec<f32>, String>>,
}

impl Collective for TcpRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let Some(jobs) = &self.jobs else {
            return Box::new(Ready(data));
        };
        let (reply, result) = mpsc::channel();
        // A send fails only if the helper thread is gone; the wait then reports it.
        let _ = jobs.send(TcpJob { data, reply });
        Box::new(TcpPending {
            rank: self.rank,
            reply: result,
        })
    }
}

impl PendingReduce for TcpPending {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        let rank = self.rank;
        match self.reply.recv() {
            Ok(result) => result.map_err(|reason| CollectiveError { rank, reason }),
            Err(_) => Err(CollectiveError {
                rank,
                reason: "the reduction thread has stopped".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_threads_for_several_sizes_and_rounds() {
        for size in [1usize, 2, 3, 4] {
            let group = ThreadGroup::new(size);
            let handles: Vec<_> = group
                .members()
                .into_iter()
                .map(|mut member| {
                    std::thread::spawn(move || {
                        let mut results = Vec::new();
                        for (round, len) in [5usize, 1, 64, 1000, 3].into_iter().enumerate() {
                            let r = member.rank();
                            let data: Vec<f32> =
                                (0..len).map(|i| (r * 1000 + i + round) as f32).collect();
                            // Start, "compute", then wait: the overlap pattern.
                            let pending = member.all_reduce_sum(data);
                            let busy: f32 = (0..100).map(|i| i as f32).sum();
                            assert!(busy > 0.0);
                            results.push(pending.wait().unwrap());
                        }
                        results
                    })
                })
                .collect();
            for handle in handles {
                let results = handle.join().unwrap();
                for (round, (len, got)) in [5usize, 1, 64, 1000, 3].iter().zip(&results).enumerate()
                {
                    assert_eq!(got.len(), *len);
                    for (i, v) in got.iter().enumerate() {
                        let want: usize = (0..size).map(|r| r * 1000 + i + round).sum();
                        assert_eq!(*v, want as f32, "size {size} round {round} index {i}");
                    }
                }
            }
        }
    }

    fn tcp_group(size: usize) -> Vec<std::thread::JoinHandle<TcpRank>> {
        let listeners: Vec<std::net::TcpListener> = (0..size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<std::net::SocketAddr> =
            listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                std::thread::spawn(move || TcpRank::connect(rank, listener, &peers).unwrap())
            })
            .collect()
    }

    #[test]
    fn tcp_ring_sums_like_the_thread_group() {
        for size in [1usize, 2, 3, 4] {
            let ranks: Vec<TcpRank> = tcp_group(size)
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|mut member| {
                    std::thread::spawn(move || {
                        let mut out = Vec::new();
                        // Lengths below, at and above the group size, and a large one.
                        for len in [1usize, 3, 5, 100_003] {
                            let r = member.rank();
                            let data: Vec<f32> =
                                (0..len).map(|i| ((r + 1) * (i % 97)) as f32).collect();
                            out.push(member.all_reduce_sum(data).wait().unwrap());
                        }
                        out
                    })
                })
                .collect();
            let total: usize = (1..=size).sum();
            for h in handles {
                for (got, len) in h.join().unwrap().iter().zip([1usize, 3, 5, 100_003]) {
                    assert_eq!(got.len(), len);
                    for (i, v) in got.iter().enumerate() {
                        assert_eq!(
                            *v,
                            (total * (i % 97)) as f32,
                            "size {size} len {len} at {i}"
                        );
                    }
                }
            }
        }
    }

    /// The ladder pattern: a block's reduction stays in flight while the next one starts and
    /// finishes a reduction of its own; results come back to the right handles.
    #[test]
    fn reductions_in_flight_together_resolve_to_their_own_sums() {
        for tcp in [false, true] {
            let size = 3;
            let members: Vec<Box<dyn Collective>> = if tcp {
                tcp_group(size)
                    .into_iter()
                    .map(|h| Box::new(h.join().unwrap()) as Box<dyn Collective>)
                    .collect()
            } else {
                ThreadGroup::new(size)
                    .members()
                    .into_iter()
                    .map(|m| Box::new(m) as Box<dyn Collective>)
                    .collect()
            };
            let handles: Vec<_> = members
                .into_iter()
                .map(|mut member| {
                    std::thread::spawn(move || {
                        let r = member.rank() as f32;
                        let mut outer = member.all_reduce_sum(vec![r; 10]);
                        let mut got = Vec::new();
                        for round in 0..4 {
                            let inner = member.all_reduce_sum(vec![r * 10.0 + round as f32; 3]);
                            got.push(inner.wait().unwrap());
                            got.push(outer.wait().unwrap());
                            outer = member.all_reduce_sum(vec![r + round as f32; 10]);
                        }
                        got.push(outer.wait().unwrap());
                        got
                    })
                })
                .collect();
            for h in handles {
                let got = h.join().unwrap();
                // Sums over ranks 0, 1, 2.
                assert_eq!(got[0], vec![30.0 + 0.0; 3], "tcp {tcp}");
                assert_eq!(got[1], vec![3.0; 10]);
                for round in 1..4 {
                    assert_eq!(got[2 * round], vec![30.0 + 3.0 * round as f32; 3]);
                    assert_eq!(got[2 * round + 1], vec![3.0 + 3.0 * (round - 1) as f32; 10]);
                }
                assert_eq!(got[8], vec![3.0 + 9.0; 10]);
            }
        }
    }

    #[test]
    fn a_thread_rank_that_stops_fails_the_reduction_instead_of_hanging() {
        let mut members = ThreadGroup::new(3).members();
        let gone = members.pop().unwrap();
        std::thread::spawn(move || drop(gone)).join().unwrap();
        for mut member in members {
            let err = member.all_reduce_sum(vec![1.0; 10]).wait().unwrap_err();
            assert!(
                err.to_string().contains("rank 2 of the group has stopped"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_rank_that_goes_away_fails_the_reduction_instead_of_hanging() {
        let mut ranks: Vec<TcpRank> = tcp_group(3)
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        drop(ranks.pop());
        for mut member in ranks {
            let err = member.all_reduce_sum(vec![1.0; 1000]).wait().unwrap_err();
            assert!(err.to_string().contains("transport error"), "{err}");
        }
    }
}
