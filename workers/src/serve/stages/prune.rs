//! The `prune` stage: per session, which tokens or frames go on to the layers
//! (shared/SPEC-MODELS.md §6, the token pruner). No pruning policy is configured yet, so every
//! token goes on: this operator is the seam where the pruner's per-session state will live.
//!
//! ```ignore
//! let kept = envelopes.prune();
//! ```

use timely::dataflow::StreamVec;
use timely::dataflow::operators::vec::Map;

use super::Envelope;

/// The prune stage on a stream of envelopes (at each session's owner, after the front end).
pub trait Prune<'s> {
    /// Hands on the tokens or frames that the session's pruner keeps: all of them.
    fn prune(self) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Prune<'s> for StreamVec<'s, u64, Envelope> {
    fn prune(self) -> StreamVec<'s, u64, Envelope> {
        self.map(|envelope| envelope)
    }
}
