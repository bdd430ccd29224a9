//! Collectives for tensor-parallel groups, with start/wait handles so that a caller can
//! compute while a reduction is in flight (what Ladder Residual overlaps,
//! `shared/SPEC-MODELS.md` §5).
//!
//! [`ThreadGroup`]: the ranks are threads of one process sharing memory. `all_reduce_sum`
//! is a reduce-scatter then an all-gather over the ranks' posted buffers: rank r sums slice r
//! of every buffer, then every rank copies every slice back, so each value is read once per
//! rank and no rank does the whole sum.

use std::sync::{Arc, Condvar, Mutex};

/// An all-reduce that has been started: `wait` returns the summed buffer.
pub trait PendingReduce: Send {
    fn wait(self: Box<Self>) -> Vec<f32>;
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
    /// Posted buffers by rank, for the round in progress.
    posted: Vec<Option<Arc<Mutex<Vec<f32>>>>>,
    /// Ranks that have reduced their slice this round.
    reduced: usize,
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
                    reduced: 0,
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
    buffer: Arc<Mutex<Vec<f32>>>,
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let buffer = Arc::new(Mutex::new(data));
        let mut round = self.shared.round.lock().expect("collective lock");
        // A rank may start the next reduction while others still gather the previous one.
        while round.posted[self.rank].is_some() {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        round.posted[self.rank] = Some(buffer.clone());
        self.shared.changed.notify_all();
        Box::new(ThreadPending {
            rank: self.rank,
            shared: self.shared.clone(),
            buffer,
        })
    }
}

impl PendingReduce for ThreadPending {
    fn wait(self: Box<Self>) -> Vec<f32> {
        let size = self.shared.size;
        let mut round = self.shared.round.lock().expect("collective lock");
        while round.posted.iter().any(Option::is_none) {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        let generation = round.generation;
        let buffers: Vec<Arc<Mutex<Vec<f32>>>> = round
            .posted
            .iter()
            .map(|b| b.clone().expect("all posted"))
            .collect();
        drop(round);
        // Reduce-scatter: this rank sums its slice of every buffer into its own buffer.
        let len = self.buffer.lock().expect("buffer").len();
        let slice = |r: usize| (r * len / size)..((r + 1) * len / size);
        let mine = slice(self.rank);
        let mut sum = vec![0.0f32; mine.len()];
        for b in &buffers {
            let b = b.lock().expect("buffer");
            assert_eq!(b.len(), len, "ranks reduced buffers of different lengths");
            for (s, v) in sum.iter_mut().zip(&b[mine.clone()]) {
                *s += v;
            }
        }
        // Write the summed slice into every rank's buffer (the all-gather, pushed).
        for b in &buffers {
            b.lock().expect("buffer")[mine.clone()].copy_from_slice(&sum);
        }
        let mut round = self.shared.round.lock().expect("collective lock");
        round.reduced += 1;
        self.shared.changed.notify_all();
        while round.generation == generation && round.reduced < size {
            round = self.shared.changed.wait(round).expect("collective lock");
        }
        let result = self.buffer.lock().expect("buffer").clone();
        if round.generation == generation {
            round.gathered += 1;
            if round.gathered == size {
                // Everyone has its result: open the next round.
                round.posted.iter_mut().for_each(|p| *p = None);
                round.reduced = 0;
                round.gathered = 0;
                round.generation += 1;
                self.shared.changed.notify_all();
            }
        }
        result
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
                            results.push(pending.wait());
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
}
