//! The tensor-parallel all-reduce over NCCL (cudarc's `nccl` feature; libnccl is loaded at
//! run time like libcuda, so this builds on machines without either).
//!
//! [`NcclRank`] reduces on its own stream, apart from the compute stream, so a ladder-wired
//! model overlaps the reduction with its next sub-block. It implements
//! [`DeviceCollective`] for the GPU models (device buffers in place, ordered against the
//! compute stream by events, see [`crate::gpu::collective`]) and [`Collective`] for host
//! buffers (`all_reduce_sum` enqueues the copy to the device and the all-reduce and returns at
//! once; `wait` copies the sum back).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::collective::{Collective, CollectiveError, PendingReduce};
use crate::gpu::collective::{DeviceCollective, DeviceReduce};
use crate::gpu::{DeviceBuffer, Gpu};

/// The bytes of an NCCL unique id: rank 0 makes one ([`NcclRank::new_id`]) and hands it to the
/// other ranks over the group's control channel.
pub type NcclId = [std::ffi::c_char; 128];

/// One rank of an NCCL communicator on one GPU.
pub struct NcclRank {
    comm: SendComm,
    stream: Arc<CudaStream>,
    ordinal: usize,
    rank: usize,
    size: usize,
}

/// The communicator, owned by exactly one rank and used from one thread at a time.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclRank` owns it exclusively and its methods take `&mut self`.
unsafe impl Send for SendComm {}

fn failed(rank: usize, what: &str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError {
        rank,
        reason: format!("NCCL {what} failed: {e:?}"),
    }
}

impl NcclRank {
    /// Whether libcuda and libnccl can be loaded here.
    pub fn available() -> bool {
        // SAFETY: these only probe whether the shared libraries can be loaded.
        unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
    }

    /// A fresh unique id (on rank 0).
    pub fn new_id() -> Result<NcclId, CollectiveError> {
        if !Self::available() {
            return Err(unavailable(0));
        }
        Ok(*Id::new()
            .map_err(|e| failed(0, "ncclGetUniqueId", e))?
            .internal())
    }

    /// Joins the communicator `id` as `rank` of `size`, on GPU `ordinal`.
    pub fn join(
        ordinal: usize,
        rank: usize,
        size: usize,
        id: NcclId,
    ) -> Result<Self, CollectiveError> {
        if !Self::available() {
            return Err(unavailable(rank));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| failed(rank, "cuInit", e))?;
        // Its own stream, so that reductions overlap compute on the default stream.
        let stream = ctx
            .new_stream()
            .map_err(|e| failed(rank, "stream creation", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(id))
            .map_err(|e| failed(rank, "ncclCommInitRank", e))?;
        Ok(NcclRank {
            comm: SendComm(comm),
            stream,
            ordinal,
            rank,
            size,
        })
    }
}

fn unavailable(rank: usize) -> CollectiveError {
    CollectiveError {
        rank,
        reason: "NCCL needs libcuda and libnccl, which cannot be loaded on this machine".into(),
    }
}

enum NcclPending {
    Started {
        rank: usize,
        stream: Arc<CudaStream>,
        buffer: CudaSlice<f32>,
    },
    Failed(CollectiveError),
}

impl PendingReduce for NcclPending {
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CollectiveError> {
        match *self {
            NcclPending::Started {
                rank,
                stream,
                buffer,
            } => stream
                .clone_dtoh(&buffer)
                .map_err(|e| failed(rank, "copy to the host", e)),
            NcclPending::Failed(e) => Err(e),
        }
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        let rank = self.rank;
        let started = (|| {
            let mut buffer = self
                .stream
                .clone_htod(&data)
                .map_err(|e| failed(rank, "copy to the device", e))?;
            self.comm
                .0
                .all_reduce_in_place(&mut buffer, &ReduceOp::Sum)
                .map_err(|e| failed(rank, "ncclAllReduce", e))?;
            Ok(buffer)
        })();
        Box::new(match started {
            Ok(buffer) => NcclPending::Started {
                rank,
                stream: self.stream.clone(),
                buffer,
            },
            Err(e) => NcclPending::Failed(e),
        })
    }
}

impl DeviceCollective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    /// In place on the rank's stream, after the compute stream's work so far (a group of one
    /// runs it too: that is how one GPU exercises NCCL).
    fn all_reduce_sum(
        &mut self,
        gpu: &Gpu,
        mut data: DeviceBuffer<f32>,
    ) -> Result<DeviceReduce, CollectiveError> {
        let rank = self.rank;
        let compute = gpu.cuda_stream().ok_or_else(|| CollectiveError {
            rank,
            reason: "NCCL reduces CUDA buffers, and this GPU is the emulator".into(),
        })?;
        if gpu.ordinal() != self.ordinal {
            return Err(CollectiveError {
                rank,
                reason: format!(
                    "the communicator is on GPU {} and the buffer on GPU {}",
                    self.ordinal,
                    gpu.ordinal()
                ),
            });
        }
        self.stream
            .join(compute)
            .map_err(|e| failed(rank, "ordering after the compute stream", e))?;
        let slice = data
            .cuda_slice_mut()
            .expect("a CUDA GPU's buffers are CUDA allocations");
        self.comm
            .0
            .all_reduce_in_place(slice, &ReduceOp::Sum)
            .map_err(|e| failed(rank, "ncclAllReduce", e))?;
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| failed(rank, "recording the reduction's end", e))?;
        Ok(DeviceReduce::on_stream(rank, data, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everywhere: no panic. On a GPU machine with NCCL: a one-rank communicator's
    /// all-reduce returns its input (what `tools/gpu_check.sh` also runs).
    #[test]
    fn a_single_rank_communicator_returns_its_input_or_reports_why_not() {
        match NcclRank::new_id().and_then(|id| NcclRank::join(0, 0, 1, id)) {
            Ok(mut rank) => {
                let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
                let got = Collective::all_reduce_sum(&mut rank, data.clone())
                    .wait()
                    .unwrap();
                assert_eq!(got, data);
                // The device path: in place on the rank's stream, waited by the compute stream.
                if let Ok(gpu) = Gpu::open(0) {
                    let reduce = DeviceCollective::all_reduce_sum(
                        &mut rank,
                        &gpu,
                        gpu.upload(&data).unwrap(),
                    )
                    .unwrap();
                    let summed = reduce.wait(&gpu).unwrap();
                    assert_eq!(gpu.download(&summed, data.len()).unwrap(), data);
                }
            }
            Err(e) => assert!(!e.reason.is_empty(), "{e}"),
        }
    }
}
