//! Named tensors of a PyTorch `state_dict`, from safetensors files or a `torch.save` file
//! (`.pth` / `.pt`, read by candle's PyTorch pickle reader), with or without the `module.` prefix
//! that `torch.save(DataParallel(model).state_dict())` puts on every name.

use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_core::pickle::PthTensors;
use tideway_kernels::Weight;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

enum Source {
    Safetensors(Checkpoint),
    Torch { path: PathBuf, tensors: PthTensors },
}

/// The tensors of a checkpoint directory, looked up by their unprefixed names.
pub struct StateDict {
    dir: PathBuf,
    source: Source,
}

const DATA_PARALLEL_PREFIX: &str = "module.";

impl StateDict {
    /// The `*.safetensors` files of `dir`, or else its one `*.pth` / `*.pt` file.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let torch_files = torch_files(dir)?;
        let has_safetensors = std::fs::read_dir(dir)
            .map_err(|cause| LoadError::Io {
                path: dir.to_path_buf(),
                cause,
            })?
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
        if has_safetensors && !torch_files.is_empty() {
            return Err(LoadError::Unsupported {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds both *.safetensors files and a torch.save file ({}); keep the weights in one format",
                    torch_files[0].display()
                ),
            });
        }
        let source = if torch_files.is_empty() {
            Source::Safetensors(Checkpoint::open(dir).map_err(|e| match e {
                LoadError::NoWeights { dir } => LoadError::Unsupported {
                    path: dir,
                    reason: "no weights: expected *.safetensors files or one torch.save file (*.pth, *.pt)".into(),
                },
                other => other,
            })?)
        } else {
            if torch_files.len() > 1 {
                return Err(LoadError::Unsupported {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "{} torch.save files ({}); keep exactly one beside config.json",
                        torch_files.len(),
                        torch_files
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            let path = torch_files[0].clone();
            // Tensors of types the reader does not represent (the complex `fft_H` buffer of
            // LMUFormer checkpoints, derived and never needed) are skipped with a note on stderr.
            crate::pickle_lengths::check_pickle_lengths(&path).map_err(|reason| {
                LoadError::Unsupported {
                    path: path.clone(),
                    reason: format!("not a readable torch.save checkpoint: {reason}"),
                }
            })?;
            let tensors = PthTensors::new(&path, None).map_err(|e| LoadError::Unsupported {
                path: path.clone(),
                reason: format!("not a readable torch.save checkpoint: {e}"),
            })?;
            Source::Torch { path, tensors }
        };
        Ok(StateDict {
            dir: dir.to_path_buf(),
            source,
        })
    }

    fn has_raw(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(c) => c.contains(name),
            Source::Torch { tensors, .. } => tensors.tensor_infos().contains_key(name),
        }
    }

    /// The stored name of `name`: itself, or with the `module.` prefix.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.has_raw(name) {
            return Some(name.to_string());
        }
        let prefixed = format!("{DATA_PARALLEL_PREFIX}{name}");
        self.has_raw(&prefixed).then_some(prefixed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// The tensor `name` as f32, checked to have shape `expected`.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<Weight, LoadError> {
        let Some(full) = self.resolve(name) else {
            return Err(LoadError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        };
        match &self.source {
            Source::Safetensors(c) => c.load(&full, expected),
            Source::Torch { path, tensors } => {
                let unreadable = |e: candle_core::Error| LoadError::Unsupported {
                    path: path.clone(),
                    reason: format!("tensor {full:?}: {e}"),
                };
                let tensor = tensors
                    .get(&full)
                    .map_err(unreadable)?
                    .expect("resolved names exist");
                if tensor.dims() != expected {
                    return Err(LoadError::ShapeMismatch {
                        name: full,
                        expected: expected.to_vec(),
                        found: tensor.dims().to_vec(),
                    });
                }
                match tensor.dtype() {
                    DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {}
                    other => {
                        return Err(LoadError::UnsupportedDtype {
                            name: full,
                            dtype: format!("{other:?}"),
                        });
                    }
                }
                let values = tensor
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(unreadable)?;
                Ok(Weight::from_vec(values, expected).expect("shape checked"))
            }
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

fn torch_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|cause| LoadError::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pth" || x == "pt"))
        .collect();
    files.sort();
    Ok(files)
}
