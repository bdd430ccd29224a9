//! Safetensors checkpoints: `config.json` beside one or many `*.safetensors` files, or shards
//! listed by `model.safetensors.index.json` (HF `save_pretrained` with `max_shard_size`).
//!
//! Files are memory-mapped; f32 tensors are used in place, bf16/f16 are widened to f32 once.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, TensorInfo};
use tideway_kernels::Weight;
use tideway_kernels::matmul::{Linear, LinearFormat};
use tideway_kernels::tensor::SharedBytes;

use crate::error::LoadError;

const INDEX_FILE: &str = "model.safetensors.index.json";

struct Entry {
    file: usize,
    info: TensorInfo,
}

/// The tensors of a checkpoint directory, by name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, SharedBytes, usize)>,
    /// The same maps as `files`, typed, for `release`.
    maps: Vec<Arc<Mmap>>,
    tensors: HashMap<String, Entry>,
    /// Set for a tensor-parallel rank: `load` then returns the rank's slice of each split
    /// tensor (see [`TensorShard`]).
    shard: Option<TensorShard>,
    /// How [`load_linear`](Self::load_linear) keeps the weights.
    linear_format: LinearFormat,
}

/// How a tensor is divided among tensor-parallel ranks (Megatron-style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Along the first dimension, in `segments` equal parts that are each divided among the
    /// ranks: a column-parallel weight `[out, in]` (and its bias), or per-channel / per-head
    /// parameters. `segments` > 1 for fused tensors (Mamba's `in_proj` holds x then z).
    Rows { segments: usize },
    /// Along the last dimension of a 2-D weight: a row-parallel `[out, in]` weight, whose
    /// products are partial sums to be all-reduced.
    Columns,
    /// A row-parallel layer's bias: added once, so rank 0 holds it and the others zeros.
    FirstRank,
}

/// Rank `rank` of `size`, and which tensors are split how (`None`: every rank holds the
/// whole tensor).
#[derive(Debug, Clone, Copy)]
pub struct TensorShard {
    pub rank: usize,
    pub size: usize,
    pub split: fn(&Checkpoint, &str) -> Option<Split>,
}

impl Checkpoint {
    /// Maps every weight file of `dir`: the shards an index lists, or else every
    /// `*.safetensors` file in it.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let paths = weight_files(dir)?;
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            maps: Vec::new(),
            tensors: HashMap::new(),
            shard: None,
            linear_format: LinearFormat::F32,
        };
        for path in paths {
            let file = File::open(&path).map_err(|cause| LoadError::Io {
                path: path.clone(),
                cause,
            })?;
            // SAFETY: the map is read-only; like every mmap-based loader (candle, HF
            // safetensors) we rely on checkpoint files not being truncated while in use.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|cause| LoadError::Io {
                path: path.clone(),
                cause,
            })?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    LoadError::Safetensors {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?;
            let data_start = 8 + header_len;
            let index = checkpoint.files.len();
            for (name, info) in metadata.tensors() {
                checkpoint.tensors.insert(
                    name,
                    Entry {
                        file: index,
                        info: info.clone(),
                    },
                );
            }
            let map = Arc::new(map);
            checkpoint.maps.push(map.clone());
            checkpoint
                .files
                .push((path, map as SharedBytes, data_start));
        }
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.info.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The index entry of `name`, checked to have shape `expected`.
    fn entry(&self, name: &str, expected: &[usize]) -> Result<&Entry, LoadError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        if entry.info.shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.info.shape.clone(),
            });
        }
        Ok(entry)
    }

    /// The tensor `name`'s raw bytes and their element width, checked against its shape
    /// `expected` and its dtype (F32, BF16, F16).
    fn raw(&self, name: &str, expected: &[usize]) -> Result<(&Entry, &[u8], usize), LoadError> {
        let entry = self.entry(name, expected)?;
        let (path, bytes, data_start) = &self.files[entry.file];
        let (begin, end) = entry.info.data_offsets;
        let raw = &(**bytes).as_ref()[data_start + begin..data_start + end];
        let width = match entry.info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(LoadError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let elements: usize = expected.iter().product();
        if raw.len() != elements * width {
            return Err(LoadError::Safetensors {
                path: path.clone(),
                reason: format!(
                    "tensor {name:?} holds {} bytes, but shape {expected:?} in {:?} needs {}",
                    raw.len(),
                    entry.info.dtype,
                    elements * width
                ),
            });
        }
        Ok((entry, raw, width))
    }

    /// Makes `load` return rank `shard.rank`'s slices (pass None for whole tensors again).
    /// Keeps the weights of the linear layers loaded from now on in `format`.
    pub fn set_linear_format(&mut self, format: LinearFormat) {
        self.linear_format = format;
    }

    /// How the linear layers' weights are kept.
    pub fn linear_format(&self) -> LinearFormat {
        self.linear_format
    }

    pub fn set_shard(&mut self, shard: Option<TensorShard>) {
        self.shard = shard;
    }

    pub fn shard(&self) -> Option<TensorShard> {
        self.shard
    }

    /// The tensor `name` as f32, checked to have shape `expected`. On a tensor-parallel rank
    /// (see [`set_shard`](Self::set_shard)) `expected` is the shape of the rank's slice, and
    /// only that slice is read.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<Weight, LoadError> {
        if let Some(shard) = self.shard
            && shard.size > 1
            && let Some(split) = (shard.split)(self, name)
        {
            return self.load_slice(name, expected, split, shard);
        }
        let (entry, raw, _) = self.raw(name, expected)?;
        let (path, bytes, data_start) = &self.files[entry.file];
        let offset = data_start + entry.info.data_offsets.0;
        let bad = |reason: String| LoadError::Safetensors {
            path: path.clone(),
            reason,
        };
        let weight = match entry.info.dtype {
            Dtype::F32 => Weight::from_f32_bytes(bytes.clone(), offset, expected),
            Dtype::BF16 => Weight::from_bf16_bytes(raw, expected),
            _ => Weight::from_f16_bytes(raw, expected),
        };
        weight.map_err(|e| bad(format!("tensor {name:?}: {e}")))
    }

    /// Rank `shard.rank`'s slice (shape `expected`) of the tensor `name`, split as `split`,
    /// read straight from the mapped file: pages of other ranks' slices are never touched.
    fn load_slice(
        &self,
        name: &str,
        expected: &[usize],
        split: Split,
        shard: TensorShard,
    ) -> Result<Weight, LoadError> {
        let mut full = expected.to_vec();
        match split {
            Split::Rows { segments } if !full.is_empty() && full[0].is_multiple_of(segments) => {
                full[0] *= shard.size
            }
            Split::Columns if full.len() == 2 => full[1] *= shard.size,
            Split::FirstRank => {}
            _ => {
                return Err(LoadError::ShapeMismatch {
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    found: self.shape(name).map(<[usize]>::to_vec).unwrap_or_default(),
                });
            }
        }
        let (entry, all, width) = self.raw(name, &full)?;
        let elements: usize = expected.iter().product();
        // Byte ranges of the slice, in order.
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        match split {
            Split::Rows { segments } => {
                let row = full[1..].iter().product::<usize>() * width;
                let (segment, part) = (full[0] / segments, expected[0] / segments);
                for s in 0..segments {
                    let first = s * segment + shard.rank * part;
                    ranges.push(first * row..(first + part) * row);
                }
            }
            Split::Columns => {
                let (rows, cols) = (full[0], expected[1]);
                for r in 0..rows {
                    let start = (r * full[1] + shard.rank * cols) * width;
                    ranges.push(start..start + cols * width);
                }
            }
            Split::FirstRank if shard.rank == 0 => ranges.push(0..all.len()),
            Split::FirstRank => {
                return Ok(Weight::from_vec(vec![0.0; elements], expected).expect("sized"));
            }
        }
        let mut raw = Vec::with_capacity(elements * width);
        for range in ranges {
            raw.extend_from_slice(&all[range]);
        }
        let weight = match entry.info.dtype {
            Dtype::F32 => Weight::from_vec(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                expected,
            ),
            Dtype::BF16 => Weight::from_bf16_bytes(&raw, expected),
            _ => Weight::from_f16_bytes(&raw, expected),
        };
        Ok(weight.expect("slice sized above"))
    }

    /// A PyTorch `nn.Linear`: `weight` `[out, in]` and optionally `bias` `[out]`, its weight
    /// kept as [`linear_format`](Self::linear_format) says. The weight's file pages are
    /// released afterwards: the layer holds its own copy.
    pub fn load_linear(
        &self,
        weight: &str,
        bias: Option<&str>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear, LoadError> {
        let w = self.load(weight, &[out_features, in_features])?;
        let b = match bias {
            Some(name) => Some(self.load(name, &[out_features])?),
            None => None,
        };
        let layer = Linear::from_torch_as(&w, b, self.linear_format).map_err(|e| {
            LoadError::ShapeMismatch {
                name: weight.to_string(),
                expected: vec![out_features, in_features],
                found: e.shape,
            }
        })?;
        drop(w);
        self.release(weight);
        Ok(layer)
    }

    /// Drops a tensor's pages from this process's resident memory once it has been copied out
    /// (they stay in the OS page cache), so that loading does not hold the checkpoint twice.
    pub fn release(&self, name: &str) {
        let Some(entry) = self.tensors.get(name) else {
            return;
        };
        let (_, _, data_start) = &self.files[entry.file];
        let (begin, end) = entry.info.data_offsets;
        // SAFETY: the map is a private, read-only file mapping: MADV_DONTNEED only drops its
        // pages, and any later read (a weight still mapped in place nearby) faults them back in
        // from the unchanged file. The range is inside the map (the header said so).
        // Failure is harmless (the pages stay resident), so the result is ignored.
        #[cfg(unix)]
        unsafe {
            let _ = self.maps[entry.file].unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                data_start + begin,
                end - begin,
            );
        }
    }

    /// Like [`load`](Self::load) for a tensor that may be absent.
    pub fn load_optional(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<Weight>, LoadError> {
        if self.contains(name) {
            self.load(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|cause| LoadError::Io {
            path: index_path.clone(),
            cause,
        })?;
        let malformed = |reason: String| LoadError::Safetensors {
            path: index_path.clone(),
            reason,
        };
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| malformed("no \"weight_map\" object".into()))?;
        let mut files: Vec<String> = Vec::new();
        for file in map.values() {
            let file = file
                .as_str()
                .ok_or_else(|| malformed("weight_map values must be file names".into()))?;
            if file.contains('/') || file.contains('\\') {
                return Err(malformed(format!(
                    "shard {file:?} is not a file name in the checkpoint directory"
                )));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let entries = std::fs::read_dir(dir).map_err(|cause| LoadError::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|cause| LoadError::Io {
            path: dir.to_path_buf(),
            cause,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(LoadError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}
