//! A pool of session states for one CPU language model's stage (`serve --reserve-sessions N`):
//! made before the server listens, taken by new sessions, given back (zeroed) when they end.
//!
//! A fresh state's memory costs the OS a page fault per 4 KiB the first time it is written
//! (zeroing the page; on a virtual machine the host backs it too). On this project's 2-core VM
//! that is 2.3 s per GB: 1000 fresh sessions of the 130M Mamba (2.9 MB each) cost ~6.7 s of a
//! core, and a first burst of them stalled every stream served beside them (BENCHMARKS.md,
//! "Serving at 100 and 1000 streams"). Made at start, that cost moves before the first request;
//! given back rather than freed, a state's memory stays written (the allocator would hand a
//! freed state's memory to the thread that freed it only, and it may return it to the OS).

use std::sync::Mutex;
use std::time::Instant;

use tideway_operators::models::{Model, SessionState};

/// Up to `capacity` idle states of one model's part; none when nothing was reserved.
#[derive(Default)]
pub struct StatePool {
    idle: Mutex<Vec<SessionState>>,
    capacity: usize,
}

impl StatePool {
    /// A pool of `count` fresh states of `model`'s part, their memory written; logs what it
    /// made and how long it took.
    pub fn reserve(model: &Model, count: usize, name: &str) -> Self {
        if count == 0 {
            return Self::default();
        }
        let started = Instant::now();
        tracing::info!(
            model = name,
            sessions = count,
            mib = count * model.state_bytes() / (1 << 20),
            "reserving session states"
        );
        let idle: Vec<SessionState> = (0..count).map(|_| model.new_state()).collect();
        tracing::info!(
            model = name,
            sessions = count,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "reserved session states"
        );
        StatePool {
            idle: Mutex::new(idle),
            capacity: count,
        }
    }

    /// An idle state (fresh: zeros, position 0), if the pool holds one.
    pub fn take(&self) -> Option<SessionState> {
        self.idle.lock().ok()?.pop()
    }

    /// Keeps an ended session's state, zeroed, for the next session (dropped if the pool is
    /// full).
    pub fn give_back(&self, mut state: SessionState) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() < self.capacity {
            state.reset();
            idle.push(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_operators::models::load_model;
    use tideway_operators::state_tensors::StateTensors;

    fn exported(model: &Model, state: &SessionState) -> StateTensors {
        let mut out = StateTensors::default();
        model.export_state(state, &mut out);
        out
    }

    #[test]
    fn a_given_back_state_comes_out_fresh_and_the_pool_keeps_at_most_its_reserve() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mamba/hf_k4_sharded");
        let model = load_model(&dir).unwrap();
        let fresh = exported(&model, &model.new_state());
        let pool = StatePool::reserve(&model, 1, "hf_k4");
        let mut state = pool.take().expect("the reserved state");
        assert!(pool.take().is_none(), "one reserved, one taken");
        model.step(&[5], &mut [&mut state]).unwrap();
        model.step(&[7], &mut [&mut state]).unwrap();
        assert_eq!(state.position(), 2);
        assert_ne!(exported(&model, &state), fresh);

        pool.give_back(state);
        pool.give_back(model.new_state()); // over the reserve: dropped
        let again = pool.take().expect("the given-back state");
        assert_eq!(exported(&model, &again), fresh);
        assert!(pool.take().is_none());
        assert!(StatePool::reserve(&model, 0, "hf_k4").take().is_none());
    }
}
