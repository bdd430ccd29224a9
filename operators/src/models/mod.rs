//! Whole models, and [`load_model`], which reads a checkpoint directory's `config.json` and
//! loads the model it describes.

pub mod config;
pub mod mamba;

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use config::ConfigJson;

pub use mamba::{MambaConfig, MambaLm, MambaState};

/// A loaded model of any supported family.
pub enum Model {
    Mamba(MambaLm),
}

impl Model {
    /// Width of the output rows (`logits` columns).
    pub fn output_width(&self) -> usize {
        match self {
            Model::Mamba(m) => m.logits_width(),
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Model::Mamba(_) => "mamba",
        }
    }
}

/// Loads the model in `dir` (`config.json` + `*.safetensors`).
pub fn load_model(dir: &Path) -> Result<Model, LoadError> {
    let config = ConfigJson::read(dir)?;
    let family = match config.model_type()? {
        Some("mamba") => "mamba",
        Some(other) => {
            return Err(LoadError::UnknownModelType {
                path: config.path().to_path_buf(),
                model_type: other.to_string(),
            });
        }
        // The original state-spaces checkpoints carry a minimal config without model_type.
        None if config.has("d_model") && config.has("n_layer") => "mamba",
        None => {
            return Err(config.malformed(
                "no \"model_type\" key (and not a state-spaces Mamba config with \"d_model\" and \"n_layer\")",
            ));
        }
    };
    let checkpoint = Checkpoint::open(dir)?;
    match family {
        "mamba" => {
            let mamba_config = MambaConfig::from_config(&config, &checkpoint)?;
            Ok(Model::Mamba(MambaLm::load(mamba_config, &checkpoint)?))
        }
        _ => unreachable!("every family above is matched"),
    }
}
