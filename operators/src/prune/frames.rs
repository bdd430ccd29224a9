//! Frame pruning for feeds: the S-stage idea applied to a stream (SPEC-MODELS §6.3, last
//! paragraph). A frame too similar to the last kept one (cosine ≥ `similarity`), or too quiet
//! (its mean value below `quiet_below`: the mean log-mel energy of an fbank frame), is skipped;
//! the model then advances as for a zero input. The gate's per-stream state (the last kept
//! frame and the counts) is part of the session's state.
//!
//! ```
//! use tideway_operators::prune::frames::{FrameGate, FrameGateState};
//! let gate = FrameGate { similarity: 0.99, quiet_below: None };
//! let mut state = FrameGateState::default();
//! let frames = [1.0, 0.0, 1.0, 0.001, 0.0, 1.0f32];
//! assert_eq!(gate.mask(&mut state, &frames, 2), vec![true, false, true]);
//! ```

use serde_json::Value;

use super::cosine;
use crate::error::LoadError;
use crate::models::config::ConfigJson;

use crate::state_tensors::{StateError, StateTensors, StateValue};

/// When a frame is skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameGate {
    /// Skip a frame whose cosine with the last kept frame is at least this (in (0, 1]).
    pub similarity: f32,
    /// Skip a frame whose mean value is below this (None: no floor).
    pub quiet_below: Option<f32>,
}

/// A stream's gate: the last frame it kept, and how many it has seen and kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FrameGateState {
    last_kept: Option<Vec<f32>>,
    pub seen: u64,
    pub kept: u64,
}

/// Why a gate's settings are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameGateError {
    #[error("frame pruning similarity {0} must lie in (0, 1] (1 skips only repeated frames)")]
    Similarity(f32),
    #[error("frame pruning quiet floor {0} must be a finite number")]
    QuietFloor(f32),
}

impl FrameGate {
    /// The gate, or why its settings are refused.
    pub fn new(similarity: f32, quiet_below: Option<f32>) -> Result<Self, FrameGateError> {
        if !(similarity > 0.0 && similarity <= 1.0) {
            return Err(FrameGateError::Similarity(similarity));
        }
        if let Some(floor) = quiet_below.filter(|f| !f.is_finite()) {
            return Err(FrameGateError::QuietFloor(floor));
        }
        Ok(FrameGate {
            similarity,
            quiet_below,
        })
    }

    /// Whether `frame` goes on; updates the stream's state. The first frame that is not quiet
    /// is always kept.
    pub fn keep(&self, state: &mut FrameGateState, frame: &[f32]) -> bool {
        state.seen += 1;
        let mean = frame.iter().map(|&v| v as f64).sum::<f64>() / frame.len().max(1) as f64;
        if self.quiet_below.is_some_and(|floor| mean < floor as f64) {
            return false;
        }
        if let Some(last) = &state.last_kept
            && cosine(frame, last) >= self.similarity as f64
        {
            return false;
        }
        state.last_kept = Some(frame.to_vec());
        state.kept += 1;
        true
    }

    /// [`keep`](Self::keep) for each of the `[rows, width]` frames, in order.
    pub fn mask(&self, state: &mut FrameGateState, frames: &[f32], width: usize) -> Vec<bool> {
        frames
            .chunks_exact(width)
            .map(|f| self.keep(state, f))
            .collect()
    }
}

impl FrameGate {
    /// The `tideway_frame_gate` object of a feature model's config.json:
    /// `{"similarity": 0.95, "quiet_below": -1.5}` (`quiet_below` optional); absent (or null):
    /// every frame goes on.
    pub fn from_config(config: &ConfigJson) -> Result<Option<FrameGate>, LoadError> {
        const BLOCK: &str = "tideway_frame_gate";
        if config.raw(BLOCK).is_none_or(|v| v.is_null()) {
            return Ok(None);
        }
        let section = config.section(BLOCK)?;
        let similarity = section
            .f64_opt("similarity")?
            .ok_or_else(|| config.malformed(format!("key \"{BLOCK}.similarity\" is required")))?;
        let quiet_below = section.f64_opt("quiet_below")?.map(|q| q as f32);
        if let Some(Value::Object(map)) = config.raw(BLOCK)
            && let Some(key) = map
                .keys()
                .find(|k| !["similarity", "quiet_below"].contains(&k.as_str()))
        {
            return Err(config.malformed(format!(
                "unknown key \"{BLOCK}.{key}\"; the keys are similarity, quiet_below"
            )));
        }
        FrameGate::new(similarity as f32, quiet_below)
            .map(Some)
            .map_err(|e| config.malformed(format!("key \"{BLOCK}\": {e}")))
    }
}

/// `frames: similarity S[, quiet below Q]`, as ModelInfo reports it.
impl std::fmt::Display for FrameGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frames: similarity {}", self.similarity)?;
        if let Some(q) = self.quiet_below {
            write!(f, ", quiet below {q}")?;
        }
        Ok(())
    }
}

impl FrameGateState {
    /// Writes the state as named tensors (`prune.frames.*`).
    pub fn export(&self, out: &mut StateTensors) {
        out.put(
            "prune.frames.counts",
            StateValue::U64(vec![self.seen, self.kept]),
        );
        if let Some(last) = &self.last_kept {
            out.put_f32("prune.frames.last_kept", last);
        }
    }

    /// The state [`export`](Self::export) wrote.
    pub fn import(from: &StateTensors) -> Result<Self, StateError> {
        let counts = match from.0.get("prune.frames.counts") {
            Some(StateValue::U64(c)) if c.len() == 2 => [c[0], c[1]],
            _ => {
                return Err(StateError::Missing {
                    name: "prune.frames.counts".into(),
                });
            }
        };
        let last_kept = match from.contains("prune.frames.last_kept") {
            true => Some(from.f32s("prune.frames.last_kept")?.to_vec()),
            false => None,
        };
        Ok(FrameGateState {
            last_kept,
            seen: counts[0],
            kept: counts[1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_and_quiet_frames_are_skipped_against_the_last_kept_one() {
        let gate = FrameGate::new(0.9, Some(-1.0)).unwrap();
        let mut state = FrameGateState::default();
        // [1,0] kept; [1,0.1] cos 0.995 skipped; [0,1] kept; [-5,-5] quiet (mean −5);
        // [0.1,1] cos 0.995 with [0,1] skipped; [1,1] cos 0.707 kept.
        let frames = [1.0, 0.0, 1.0, 0.1, 0.0, 1.0, -5.0, -5.0, 0.1, 1.0, 1.0, 1.0];
        let mask = gate.mask(&mut state, &frames, 2);
        assert_eq!(mask, vec![true, false, true, false, false, true]);
        assert_eq!((state.seen, state.kept), (6, 3));
        // The state carries over (a snapshot, a move) and decides the same way.
        let mut tensors = StateTensors::default();
        state.export(&mut tensors);
        let mut back = FrameGateState::import(&tensors).unwrap();
        assert_eq!(back, state);
        assert!(!gate.keep(&mut back, &[1.0, 1.05]));
        assert!(gate.keep(&mut state, &[1.0, -1.0]));
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        assert_eq!(
            FrameGate::new(0.0, None).unwrap_err().to_string(),
            "frame pruning similarity 0 must lie in (0, 1] (1 skips only repeated frames)"
        );
        assert!(FrameGate::new(1.5, None).is_err());
        assert!(matches!(
            FrameGate::new(0.9, Some(f32::NAN)),
            Err(FrameGateError::QuietFloor(_))
        ));
    }
}
