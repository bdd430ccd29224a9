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
    /// Starts summing `data` across the group; every rank must start the same sequence of
    /// reductions with buffers of equal length, and wait for one before starting the next
    /// (one reduction in flight per rank, as the ladder schedule needs).
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce>;
}

struct Round {
    /// Posted buffers by rank, for the round in progress (read-only once posted).
    posted: Vec<Option<Arc<Vec<f32>>>>,
    /// Each rank's summed slice, once it has reduced it.
    reduced: Vec<Option<Arc<Vec<f32>>>>,
    /// Ranks that have copied the result out this round.
    gathered: usize,
    generation: u64,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    changed: Condvar,
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
                round: Mutex::new(Round {
                    posted: vec![None; size],
                    reduced: vec![None; size],
                    gathered: 0,
                    generation: 0,
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
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

struct ThreadPending {
    rank: usize,
    shared: Arc<Shared>,
    len: usize,
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let len = data.len();
        let mut round = self.shared.round.lock().expect("collective lock");
        // A rank may start the next reduction while others still gather the previous one.
        while round.posted[self.rank].is_some() {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        round.posted[self.rank] = Some(Arc::new(data));
        self.shared.changed.notify_all();
        Box::new(ThreadPending {
            rank: self.rank,
            shared: self.shared.clone(),
            len,
        })
    }
}

impl PendingReduce for ThreadPending {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        let (size, len) = (self.shared.size, self.len);
        let slice = |r: usize| (r * len / size)..((r + 1) * len / size);
        let mut round = self.shared.round.lock().expect("collective lock");
        while round.posted.iter().any(Option::is_none) {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        let generation = round.generation;
        let buffers: Vec<Arc<Vec<f32>>> = round
            .posted
            .iter()
            .map(|b| b.clone().expect("all posted"))
            .collect();
        drop(round);
        // Reduce-scatter: this rank sums its slice of every (read-only) buffer.
        let mine = slice(self.rank);
        let mut sum = vec![0.0f32; mine.len()];
        for b in &buffers {
            if b.len() != len {
                return Err(CollectiveError {
                    rank: self.rank,
                    reason: format!("ranks reduced buffers of {} and {len} values", b.len()),
                });
            }
            for (s, v) in sum.iter_mut().zip(&b[mine.clone()]) {
                *s += v;
            }
        }
        drop(buffers);
        let mut round = self.shared.round.lock().expect("collective lock");
        round.reduced[self.rank] = Some(Arc::new(sum));
        self.shared.changed.notify_all();
        while round.generation == generation && round.reduced.iter().any(Option::is_none) {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        let slices: Vec<Arc<Vec<f32>>> = round
            .reduced
            .iter()
            .map(|s| s.clone().expect("all reduced"))
            .collect();
        round.gathered += 1;
        if round.gathered == size {
            // Everyone has the slices: open the next round.
            round.posted.iter_mut().for_each(|p| *p = None);
            round.reduced.iter_mut().for_each(|p| *p = None);
            round.gathered = 0;
            round.generation += 1;
            self.shared.changed.notify_all();
        }
        drop(round);
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
    links: Option<std::sync::Arc<Mutex<(std::net::TcpStream, std::net::TcpStream)>>>,
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
                links: None,
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
        Ok(TcpRank {
            rank,
            size,
            links: Some(std::sync::Arc::new(Mutex::new((next, prev)))),
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
    job: Option<std::thread::JoinHandle<std::io::Result<Vec<f32>>>>,
    ready: Option<Vec<f32>>,
}

impl Collective for TcpRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let Some(links) = self.links.clone() else {
            return Box::new(TcpPending {
                rank: self.rank,
                job: None,
                ready: Some(data),
            });
        };
        let (rank, size) = (self.rank, self.size);
        let job = std::thread::spawn(move || {
            let mut links = links.lock().expect("links");
            let (next, prev) = &mut *links;
            ring_all_reduce(rank, size, next, prev, data)
        });
        Box::new(TcpPending {
            rank,
            job: Some(job),
            ready: None,
        })
    }
}

impl PendingReduce for TcpPending {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        if let Some(data) = self.ready {
            return Ok(data);
        }
        let job = self.job.expect("a job or a result");
        job.join()
            .map_err(|_| CollectiveError {
                rank: self.rank,
                reason: "the reduction thread panicked".into(),
            })?
            .map_err(|e| CollectiveError {
                rank: self.rank,
                reason: format!("transport error: {e}"),
            })
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
