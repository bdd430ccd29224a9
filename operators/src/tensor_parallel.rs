//! Tensor parallelism and the Ladder Residual wiring (`shared/SPEC-MODELS.md` §5).
//!
//! A tensor-parallel rank holds a slice of every block (Megatron-style: column-parallel input
//! projections, per-channel / per-head parameters local, row-parallel output projections, see
//! [`crate::checkpoint::Split`]); each sub-block's output on a rank is a partial sum that the
//! group all-reduces. A model runs as a sequence of sub-blocks (Mamba: one mixer per layer;
//! fla: attention then MLP per layer), each `out_j = f_j(norm_j(r))` added to the residual
//! stream `r`. [`ResidualStream`] decides when each output is added:
//!
//! - standard (pre-norm) wiring: `out_j` is added before sub-block `j+1` reads the stream, so
//!   its all-reduce is waited at once;
//! - ladder wiring (`ladder_layers`): sub-block `j` reads the stream without `out_{j−1}`, which
//!   is added after `out_j` is computed, so `out_{j−1}`'s all-reduce runs during sub-block `j`
//!   (Zhang et al., ICML 2025, `gpt_ladder_TP.py`). In a partly laddered model the first
//!   ladder layer's attention also reads the stream without the previous standard layer's MLP
//!   output (`modeling_llama_ladder.py`: its `prev_attn_output` is the post-attention stream),
//!   which is what "every sub-block of a ladder layer misses its predecessor" gives.
//!
//! After the last sub-block every output is added, then the final norm.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use tideway_kernels::collective::{Collective, CollectiveError, PendingReduce, Ready, Solo};

use crate::error::{ForwardError, InputError, LoadError};
use crate::models::config::ConfigJson;

/// Which layers are ladder-wired, from `config.json`'s `ladder_layers` (absent: none). An
/// integer `N` means the last `N` layers (`configuration_llama_ladder.py`); a list names layers.
pub fn ladder_layers(config: &ConfigJson, num_layers: usize) -> Result<Vec<bool>, LoadError> {
    let mut ladder = vec![false; num_layers];
    let Some(value) = config.raw("ladder_layers") else {
        return Ok(ladder);
    };
    let bad = || {
        config.malformed(format!(
            "ladder_layers must be a count of final layers (0..={num_layers}) or a list of layer indices below {num_layers}, found {value}"
        ))
    };
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::Number(n) => {
            let count = n
                .as_u64()
                .filter(|&c| c as usize <= num_layers)
                .ok_or_else(bad)?;
            ladder[num_layers - count as usize..].fill(true);
        }
        serde_json::Value::Array(items) => {
            for item in items {
                let i = item
                    .as_u64()
                    .filter(|&i| (i as usize) < num_layers)
                    .ok_or_else(bad)?;
                ladder[i as usize] = true;
            }
        }
        _ => return Err(bad()),
    }
    Ok(ladder)
}

/// A rank's collective for one forward, timing how long the rank blocks on reductions.
pub struct Group<'a> {
    collective: &'a mut dyn Collective,
    /// Time spent inside `wait` (the communication the computation did not hide).
    pub waited: Duration,
    /// Reductions started, and the floats they carried.
    pub reductions: usize,
    pub reduced_floats: usize,
}

impl<'a> Group<'a> {
    pub fn new(collective: &'a mut dyn Collective) -> Self {
        Group {
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

    pub fn start(&mut self, data: Vec<f32>) -> Box<dyn PendingReduce> {
        self.reductions += 1;
        self.reduced_floats += data.len();
        self.collective.all_reduce_sum(data)
    }

    pub fn wait(&mut self, pending: Box<dyn PendingReduce>) -> Result<Vec<f32>, CollectiveError> {
        let t0 = Instant::now();
        let result = pending.wait();
        self.waited += t0.elapsed();
        result
    }

    /// Sums `data` across the group now (a group of one returns it unchanged).
    pub fn all_reduce_sum(&mut self, data: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        if self.size() == 1 {
            return Ok(data);
        }
        let pending = self.start(data);
        self.wait(pending)
    }
}

/// A residual stream between two pieces of a model (pipeline stages): its values, and the last
/// sub-block's output not yet added to them (a ladder sub-block adds its predecessor's output
/// only after it computes, so the next stage must receive that output apart).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Residual {
    pub values: Vec<f32>,
    pub pending: Option<Vec<f32>>,
}

/// The residual stream of one forward, with the sub-block output whose all-reduce is still in
/// flight (see the module docs for when it is added).
pub struct ResidualStream {
    values: Vec<f32>,
    pending: Option<Box<dyn PendingReduce>>,
    /// The last output once added, for the next sub-block to write into
    /// ([`Self::output_buffer`]).
    spare: Vec<f32>,
}

impl ResidualStream {
    pub fn new(values: Vec<f32>) -> Self {
        ResidualStream {
            values,
            pending: None,
            spare: Vec::new(),
        }
    }

    /// Continues a stream that an earlier piece of the model handed over.
    pub fn resume(residual: Residual) -> Self {
        ResidualStream {
            values: residual.values,
            pending: residual
                .pending
                .map(|p| Box::new(Ready(p)) as Box<dyn PendingReduce>),
            spare: Vec::new(),
        }
    }

    /// Hands the stream to the next piece of the model as it stands: the pending output's
    /// reduction is waited for but not added (the next sub-block decides when, by its wiring).
    pub fn suspend(mut self, group: &mut Group<'_>) -> Result<Residual, CollectiveError> {
        let pending = match self.pending.take() {
            Some(p) => Some(group.wait(p)?),
            None => None,
        };
        Ok(Residual {
            values: self.values,
            pending,
        })
    }

    /// The stream as the next sub-block reads it: a standard sub-block first adds the previous
    /// output; a ladder one (`ladder`) reads without it.
    pub fn read(&mut self, ladder: bool, group: &mut Group<'_>) -> Result<&[f32], CollectiveError> {
        if !ladder {
            self.settle(group)?;
        }
        Ok(&self.values)
    }

    /// A buffer of `len` values for a sub-block's output, which the sub-block overwrites
    /// whole: the memory of the last output once it was added (its values, zeros where it
    /// grows), so that a forward's sub-blocks do not each allocate their output. A fresh
    /// `vec![0.0; len]` is zeroed by `calloc` when glibc reuses freed memory: a prefill
    /// chunk's 1.5 MB (512 rows of mamba-130m) in every layer.
    pub fn output_buffer(&mut self, len: usize) -> Vec<f32> {
        let mut buffer = std::mem::take(&mut self.spare);
        buffer.resize(len, 0.0);
        if cfg!(debug_assertions) {
            // The tests (debug builds) see NaN wherever a sub-block leaves a value unwritten,
            // instead of the last output's values passing unnoticed.
            buffer.fill(f32::NAN);
        }
        buffer
    }

    /// Hands over a sub-block's (partial) output: a ladder sub-block's predecessor is added
    /// now (its reduction overlapped this sub-block), then this output's reduction starts.
    pub fn push(
        &mut self,
        output: Vec<f32>,
        ladder: bool,
        group: &mut Group<'_>,
    ) -> Result<(), CollectiveError> {
        if ladder {
            self.settle(group)?;
        }
        debug_assert!(self.pending.is_none());
        self.pending = Some(group.start(output));
        Ok(())
    }

    /// Every output added: the stream the final norm reads.
    pub fn finish(mut self, group: &mut Group<'_>) -> Result<Vec<f32>, CollectiveError> {
        self.settle(group)?;
        Ok(self.values)
    }

    fn settle(&mut self, group: &mut Group<'_>) -> Result<(), CollectiveError> {
        if let Some(pending) = self.pending.take() {
            let summed = group.wait(pending)?;
            let add = |(r, x): (&mut [f32], &[f32])| r.iter_mut().zip(x).for_each(|(r, x)| *r += x);
            // A prefill chunk's rows over the pool (each value on its own: the same bits),
            // a decode step's on this thread.
            if self.values.len() >= PARALLEL_ADD_MIN {
                self.values
                    .par_chunks_mut(PARALLEL_ADD_MIN / 4)
                    .zip(summed.par_chunks(PARALLEL_ADD_MIN / 4))
                    .for_each(add);
            } else {
                add((&mut self.values, &summed));
            }
            self.spare = summed;
        }
        Ok(())
    }
}

/// Values of the residual stream from which a sub-block's output is added to it over the
/// pool: about 85 rows of a 768-wide stream, a prefill chunk's and not a decode step's.
const PARALLEL_ADD_MIN: usize = 1 << 16;

/// Runs `forward` as a group of one (the single-worker model): collectives return their
/// input, so the only errors are the input's.
pub fn single<T>(
    forward: impl FnOnce(&mut Group<'_>) -> Result<T, ForwardError>,
) -> Result<T, InputError> {
    let mut solo = Solo;
    match forward(&mut Group::new(&mut solo)) {
        Ok(value) => Ok(value),
        Err(ForwardError::Input(e)) => Err(e),
        Err(ForwardError::Group(e)) => unreachable!("a group of one has no peers to lose: {e}"),
        Err(ForwardError::Device(e)) => unreachable!("the CPU models have no device to fail: {e}"),
    }
}

/// `what` (a head or channel count) split over `size` ranks, or why it cannot be.
pub fn split_count(
    config: &ConfigJson,
    what: &str,
    count: usize,
    size: usize,
) -> Result<usize, LoadError> {
    if size == 0 || !count.is_multiple_of(size) {
        return Err(config.unsupported(format!(
            "{what} = {count} does not divide into {size} tensor-parallel shards; use a tensor-parallel size that divides it"
        )));
    }
    Ok(count / size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(text: &str) -> ConfigJson {
        ConfigJson::parse(PathBuf::from("config.json"), text).unwrap()
    }

    #[test]
    fn ladder_layers_reads_a_count_of_final_layers_or_a_list() {
        assert_eq!(ladder_layers(&config("{}"), 3).unwrap(), [false; 3]);
        assert_eq!(
            ladder_layers(&config(r#"{"ladder_layers": 2}"#), 3).unwrap(),
            [false, true, true]
        );
        assert_eq!(
            ladder_layers(&config(r#"{"ladder_layers": [0, 2]}"#), 3).unwrap(),
            [true, false, true]
        );
        for bad in [
            r#"{"ladder_layers": 4}"#,
            r#"{"ladder_layers": [3]}"#,
            r#"{"ladder_layers": "all"}"#,
        ] {
            let err = ladder_layers(&config(bad), 3).unwrap_err().to_string();
            assert!(err.contains("ladder_layers must be"), "{err}");
        }
    }

    /// Sub-blocks that output `j + 1` and record the stream they read: standard wiring sees
    /// every earlier output; ladder wiring misses exactly the previous one.
    #[test]
    fn ladder_sub_blocks_read_the_stream_without_their_predecessor() {
        for ladder in [[false; 4], [true; 4], [false, false, true, true]] {
            let mut solo = Solo;
            let mut group = Group::new(&mut solo);
            let mut stream = ResidualStream::new(vec![100.0]);
            let mut seen = Vec::new();
            for (j, &l) in ladder.iter().enumerate() {
                seen.push(stream.read(l, &mut group).unwrap()[0]);
                stream.push(vec![(j + 1) as f32], l, &mut group).unwrap();
            }
            let end = stream.finish(&mut group).unwrap()[0];
            assert_eq!(end, 100.0 + 1.0 + 2.0 + 3.0 + 4.0);
            let want: Vec<f32> = (0..4)
                .map(|j| {
                    let before: f32 = (1..=j).map(|x| x as f32).sum();
                    // A ladder sub-block misses its predecessor's output (j).
                    100.0 + before - if ladder[j] { j as f32 } else { 0.0 }
                })
                .collect();
            assert_eq!(seen, want, "{ladder:?}");
        }
    }
}
