//! All-reduce of device buffers: the tensor-parallel groups of the GPU models.
//!
//! A reduction starts after the work already queued on the [`Gpu`]'s compute stream and is
//! waited by the compute stream, not by the host, where the transport allows it:
//!
//! - NCCL ([`crate::nccl::NcclRank`]) reduces in place on its own stream: `all_reduce_sum`
//!   makes that stream wait for the compute stream, enqueues `ncclAllReduce` and records an
//!   event; [`DeviceReduce::wait`] makes the compute stream wait for the event. Neither call
//!   blocks the host, so a ladder-wired model queues its next sub-block while the reduction
//!   runs (`shared/SPEC-MODELS.md` §5.1).
//! - [`HostStaged`] carries any host [`Collective`] (threads, the TCP ring): the buffer is
//!   copied to the host, reduced there while the host queues more work, and copied back on
//!   `wait`. It serves ranks that share one GPU, hosts without NCCL, and the emulator.
//!
//! A group of one returns the buffer unchanged, with no copy.

use cudarc::driver::CudaEvent;

use super::{DeviceBuffer, Gpu};
use crate::collective::{Collective, CollectiveError, PendingReduce};

/// A tensor-parallel rank's all-reduce of device buffers.
pub trait DeviceCollective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Starts summing `data` across the group, after the work queued on `gpu` so far. Every
    /// rank starts the same sequence of reductions with buffers of equal length; several may
    /// be in flight.
    fn all_reduce_sum(
        &mut self,
        gpu: &Gpu,
        data: DeviceBuffer<f32>,
    ) -> Result<DeviceReduce, CollectiveError>;
}

/// A started reduction; [`wait`](Self::wait) hands back the summed buffer.
pub struct DeviceReduce {
    rank: usize,
    state: Reducing,
}

enum Reducing {
    /// Nothing to reduce (a group of one).
    Ready(DeviceBuffer<f32>),
    /// On the host: the buffer's length, and the host reduction.
    Staged(usize, Box<dyn PendingReduce>),
    /// On a communication stream: done when `done` fires.
    OnStream {
        buffer: DeviceBuffer<f32>,
        done: CudaEvent,
    },
}

impl DeviceReduce {
    pub fn ready(rank: usize, buffer: DeviceBuffer<f32>) -> Self {
        DeviceReduce {
            rank,
            state: Reducing::Ready(buffer),
        }
    }

    pub(crate) fn on_stream(rank: usize, buffer: DeviceBuffer<f32>, done: CudaEvent) -> Self {
        DeviceReduce {
            rank,
            state: Reducing::OnStream { buffer, done },
        }
    }

    /// The summed buffer, ordered before any later work on `gpu`'s compute stream. Only the
    /// host-staged form blocks the host (for the host reduction).
    pub fn wait(self, gpu: &Gpu) -> Result<DeviceBuffer<f32>, CollectiveError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| CollectiveError {
            rank: self.rank,
            reason: format!("{what}: {e}"),
        };
        match self.state {
            Reducing::Ready(buffer) => Ok(buffer),
            Reducing::Staged(len, pending) => {
                let summed = pending.wait()?;
                debug_assert_eq!(summed.len(), len);
                gpu.upload(&summed)
                    .map_err(|e| failed("copying the sum back to the GPU", &e))
            }
            Reducing::OnStream { buffer, done } => {
                let stream = gpu
                    .cuda_stream()
                    .ok_or_else(|| failed("waiting for NCCL", &"the GPU is the emulator"))?;
                stream
                    .wait(&done)
                    .map_err(|e| failed("ordering the compute stream after NCCL", &e))?;
                Ok(buffer)
            }
        }
    }
}

/// Any host [`Collective`] as a device one: copies to the host and back (see the module docs).
pub struct HostStaged(pub Box<dyn Collective>);

impl DeviceCollective for HostStaged {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn all_reduce_sum(
        &mut self,
        gpu: &Gpu,
        data: DeviceBuffer<f32>,
    ) -> Result<DeviceReduce, CollectiveError> {
        let rank = self.rank();
        if self.size() == 1 {
            return Ok(DeviceReduce::ready(rank, data));
        }
        let len = data.len();
        let host = gpu.download(&data, len).map_err(|e| CollectiveError {
            rank,
            reason: format!("copying a partial sum to the host: {e}"),
        })?;
        Ok(DeviceReduce {
            rank,
            state: Reducing::Staged(len, self.0.all_reduce_sum(host)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{Solo, ThreadGroup};

    #[test]
    fn host_staged_ranks_sum_device_buffers() {
        let handles: Vec<_> = ThreadGroup::new(3)
            .members()
            .into_iter()
            .enumerate()
            .map(|(rank, member)| {
                let collective: Box<dyn Collective> = Box::new(member);
                std::thread::spawn(move || {
                    let gpu = Gpu::emulated();
                    let mut staged = HostStaged(collective);
                    let data: Vec<f32> = (0..5).map(|i| (i * 10 + rank) as f32).collect();
                    let first = staged
                        .all_reduce_sum(&gpu, gpu.upload(&data).unwrap())
                        .unwrap();
                    let second = staged
                        .all_reduce_sum(&gpu, gpu.upload(&[rank as f32 + 1.0]).unwrap())
                        .unwrap();
                    // Waited out of order: both were in flight.
                    let second = gpu.download(&second.wait(&gpu).unwrap(), 1).unwrap();
                    let first = gpu.download(&first.wait(&gpu).unwrap(), 5).unwrap();
                    (first, second)
                })
            })
            .collect();
        for h in handles {
            let (first, second) = h.join().unwrap();
            assert_eq!(first, [3.0, 33.0, 63.0, 93.0, 123.0]);
            assert_eq!(second, [6.0]);
        }
    }

    #[test]
    fn a_group_of_one_hands_back_its_buffer() {
        let gpu = Gpu::emulated();
        let mut solo = HostStaged(Box::new(Solo));
        let reduce = solo
            .all_reduce_sum(&gpu, gpu.upload(&[1.5, 2.5]).unwrap())
            .unwrap();
        assert_eq!(
            gpu.download(&reduce.wait(&gpu).unwrap(), 2).unwrap(),
            [1.5, 2.5]
        );
    }
}
