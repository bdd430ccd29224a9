//! Tensor parallelism of the GPU models: the device-buffer twins of
//! [`crate::tensor_parallel::Group`] and [`crate::tensor_parallel::ResidualStream`], with the
//! same wiring rules (`shared/SPEC-MODELS.md` §5; see that module's docs). A rank's sub-block
//! output is a partial sum in its own device buffer; its all-reduce runs on the collective's
//! stream (NCCL) or on the host (host-staged), and a ladder sub-block is queued before the
//! previous output's reduction is waited.

use std::time::{Duration, Instant};

use tideway_kernels::collective::{CollectiveError, Solo};
use tideway_kernels::gpu::collective::{DeviceCollective, DeviceReduce, HostStaged};
use tideway_kernels::gpu::{DeviceBuffer, Gpu};

use crate::gpu::GpuModelError;

/// A GPU rank's collective for one forward, timing how long the host blocks on reductions.
pub struct DeviceGroup<'a> {
    collective: &'a mut dyn DeviceCollective,
    /// Host time inside `wait` (host-staged reductions; NCCL waits are queued, not blocked).
    pub waited: Duration,
    pub reductions: usize,
    pub reduced_floats: usize,
}

impl<'a> DeviceGroup<'a> {
    pub fn new(collective: &'a mut dyn DeviceCollective) -> Self {
        DeviceGroup {
            collective,
            waited: Duration::ZERO,
            reductions: 0,
            reduced_floats: 0,
        }
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn size(&self) -> usize {
        self.collective.size()
    }

    pub fn start(
        &mut self,
        gpu: &Gpu,
        data: DeviceBuffer<f32>,
    ) -> Result<DeviceReduce, CollectiveError> {
        self.reductions += 1;
        self.reduced_floats += data.len();
        self.collective.all_reduce_sum(gpu, data)
    }

    pub fn wait(
        &mut self,
        gpu: &Gpu,
        pending: DeviceReduce,
    ) -> Result<DeviceBuffer<f32>, CollectiveError> {
        let t0 = Instant::now();
        let summed = pending.wait(gpu);
        self.waited += t0.elapsed();
        summed
    }

    /// Sums `data` across the group before later work on `gpu` reads it.
    pub fn all_reduce_sum(
        &mut self,
        gpu: &Gpu,
        data: DeviceBuffer<f32>,
    ) -> Result<DeviceBuffer<f32>, CollectiveError> {
        let pending = self.start(gpu, data)?;
        self.wait(gpu, pending)
    }
}

/// Runs `forward` as a group of one (the single-GPU model): no copies, no peers to lose.
pub fn single_gpu<T>(
    forward: impl FnOnce(&mut DeviceGroup<'_>) -> Result<T, GpuModelError>,
) -> Result<T, GpuModelError> {
    let mut solo = HostStaged(Box::new(Solo));
    forward(&mut DeviceGroup::new(&mut solo))
}

/// The residual stream on the device (`[m, d]`), and the sub-block output whose reduction is
/// in flight; the rules of [`crate::tensor_parallel::ResidualStream`].
pub struct DeviceResidualStream {
    values: DeviceBuffer<f32>,
    pending: Option<DeviceReduce>,
    /// A settled output's buffer, handed out again by [`output`](Self::output): a forward
    /// allocates its sub-block outputs once, not once per sub-block.
    spare: Option<DeviceBuffer<f32>>,
}

impl DeviceResidualStream {
    pub fn new(values: DeviceBuffer<f32>) -> Self {
        DeviceResidualStream {
            values,
            pending: None,
            spare: None,
        }
    }

    /// A buffer the stream's size for the next sub-block's output, which overwrites it.
    pub fn output(&mut self, gpu: &Gpu) -> Result<DeviceBuffer<f32>, GpuModelError> {
        match self.spare.take() {
            Some(buffer) => Ok(buffer),
            None => Ok(gpu.zeros(self.values.len())?),
        }
    }

    /// The stream as the next sub-block reads it: a standard sub-block first adds the
    /// previous output; a ladder one reads without it.
    pub fn read(
        &mut self,
        ladder: bool,
        gpu: &Gpu,
        group: &mut DeviceGroup<'_>,
    ) -> Result<&DeviceBuffer<f32>, GpuModelError> {
        if !ladder {
            self.settle(gpu, group)?;
        }
        Ok(&self.values)
    }

    /// Hands over a sub-block's partial output: a ladder sub-block's predecessor is added now
    /// (its reduction ran while this sub-block was queued), then this output's starts.
    pub fn push(
        &mut self,
        output: DeviceBuffer<f32>,
        ladder: bool,
        gpu: &Gpu,
        group: &mut DeviceGroup<'_>,
    ) -> Result<(), GpuModelError> {
        if ladder {
            self.settle(gpu, group)?;
        }
        debug_assert!(self.pending.is_none());
        self.pending = Some(group.start(gpu, output)?);
        Ok(())
    }

    /// Every output added: the stream the final norm reads.
    pub fn finish(
        mut self,
        gpu: &Gpu,
        group: &mut DeviceGroup<'_>,
    ) -> Result<DeviceBuffer<f32>, GpuModelError> {
        self.settle(gpu, group)?;
        Ok(self.values)
    }

    fn settle(&mut self, gpu: &Gpu, group: &mut DeviceGroup<'_>) -> Result<(), GpuModelError> {
        if let Some(pending) = self.pending.take() {
            let summed = group.wait(gpu, pending)?;
            gpu.add_inplace(gpu.ptr(&self.values), gpu.ptr(&summed), self.values.len())?;
            self.spare = Some(summed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the CPU stream's test: a ladder sub-block misses exactly its predecessor's output.
    #[test]
    fn ladder_sub_blocks_read_the_stream_without_their_predecessor() {
        let gpu = Gpu::emulated();
        for ladder in [[false; 4], [true; 4], [false, false, true, true]] {
            let mut seen = Vec::new();
            let end = single_gpu(|group| {
                let mut stream = DeviceResidualStream::new(gpu.upload(&[100.0])?);
                for (j, &l) in ladder.iter().enumerate() {
                    let read = stream.read(l, &gpu, group)?;
                    seen.push(gpu.download(read, 1)?[0]);
                    stream.push(gpu.upload(&[(j + 1) as f32])?, l, &gpu, group)?;
                }
                Ok(gpu.download(&stream.finish(&gpu, group)?, 1)?[0])
            })
            .unwrap();
            assert_eq!(end, 110.0);
            let want: Vec<f32> = (0..4)
                .map(|j| {
                    let before: f32 = (1..=j).map(|x| x as f32).sum();
                    100.0 + before - if ladder[j] { j as f32 } else { 0.0 }
                })
                .collect();
            assert_eq!(seen, want, "{ladder:?}");
        }
    }
}
