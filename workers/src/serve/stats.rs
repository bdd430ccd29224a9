//! What `Admin.Stats` and the metrics endpoint read: the cluster-wide live-session counts that
//! the control plane (differential dataflow, see `engine`) maintains, and this process's own
//! counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// (worker, model, state bytes per session, kind: 0 live, 1 expired).
pub type BoardKey = (u32, u32, u64, u8);

/// Upper bounds (seconds) of the epoch-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

pub struct StatsBoard {
    pub processes: usize,
    pub threads: usize,
    pub model_names: Vec<String>,
    /// Accumulated differences of `count()`'s output: ((key, count) → multiplicity).
    counts: Mutex<HashMap<(BoardKey, isize), isize>>,
    pub epochs: AtomicU64,
    pub epoch_requests: AtomicU64,
    pub tokens: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    /// Calls answered with an error, by (service, method, code name).
    grpc_errors: Mutex<BTreeMap<(String, String, String), u64>>,
    pub disconnects: AtomicU64,
    /// Bytes of session state this process's layers stages hold, by (model, stage).
    stage_state: Mutex<BTreeMap<(u32, u32), i64>>,
    /// Requests refused by a server limit, by limit.
    limits: Mutex<BTreeMap<&'static str, u64>>,
    /// Feature models' output frames, by (model, whether a frame gate skipped them).
    frames: Mutex<BTreeMap<(u32, bool), u64>>,
    /// Tokens of pruned prompts, by (model, pruned).
    prompt_tokens: Mutex<BTreeMap<(u32, bool), u64>>,
}

/// A consistent reading of the board.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// worker → (live sessions, state bytes)
    pub per_worker: Vec<(u32, u64, u64)>,
    /// model index → live sessions
    pub per_model: Vec<u64>,
    pub live: u64,
    pub expired: u64,
    pub state_bytes: u64,
}

impl StatsBoard {
    pub fn new(processes: usize, threads: usize, model_names: Vec<String>) -> Self {
        StatsBoard {
            processes,
            threads,
            model_names,
            counts: Mutex::default(),
            epochs: AtomicU64::new(0),
            epoch_requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            latency_buckets: Default::default(),
            latency_sum_ns: AtomicU64::new(0),
            grpc_errors: Mutex::default(),
            disconnects: AtomicU64::new(0),
            stage_state: Mutex::default(),
            limits: Mutex::default(),
            frames: Mutex::default(),
            prompt_tokens: Mutex::default(),
        }
    }

    /// Applies one update of the control plane's `count()`.
    pub fn apply(&self, key: BoardKey, count: isize, diff: isize) {
        let mut counts = self.counts.lock().unwrap();
        let entry = counts.entry((key, count)).or_insert(0);
        *entry += diff;
        if *entry == 0 {
            counts.remove(&(key, count));
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let counts = self.counts.lock().unwrap();
        let workers = self.processes * self.threads;
        let mut snap = Snapshot {
            per_worker: (0..workers as u32).map(|w| (w, 0, 0)).collect(),
            per_model: vec![0; self.model_names.len()],
            ..Snapshot::default()
        };
        for (&((worker, model, bytes, kind), count), &mult) in counts.iter() {
            if mult <= 0 || count <= 0 {
                continue;
            }
            let count = count as u64;
            if kind == 1 {
                snap.expired += count;
                continue;
            }
            snap.live += count;
            snap.state_bytes += count * bytes;
            if let Some(w) = snap.per_worker.get_mut(worker as usize) {
                w.1 += count;
                w.2 += count * bytes;
            }
            if let Some(m) = snap.per_model.get_mut(model as usize) {
                *m += count;
            }
        }
        snap
    }

    pub fn record_epoch(&self, requests: usize, elapsed: Duration, tokens: u64) {
        if requests == 0 {
            return;
        }
        self.epochs.fetch_add(1, Ordering::Relaxed);
        self.epoch_requests
            .fetch_add(requests as u64, Ordering::Relaxed);
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A layers stage of this process took (`delta` > 0) or freed session state of `model`.
    pub fn add_stage_state(&self, model: u32, stage: u32, delta: i64) {
        *self
            .stage_state
            .lock()
            .unwrap()
            .entry((model, stage))
            .or_insert(0) += delta;
    }

    /// Bytes of session state held by this process, by (model, stage).
    pub fn stage_state(&self) -> Vec<((u32, u32), i64)> {
        let held = self.stage_state.lock().unwrap();
        held.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// A request was refused by the server limit `limit`.
    pub fn count_limit(&self, limit: &'static str) {
        *self.limits.lock().unwrap().entry(limit).or_insert(0) += 1;
    }

    /// A feature model's output frames: `rows` in all, `skipped` of them skipped by its gate.
    pub fn count_frames(&self, model: u32, rows: u64, skipped: u64) {
        let mut frames = self.frames.lock().unwrap();
        *frames.entry((model, false)).or_insert(0) += rows - skipped;
        *frames.entry((model, true)).or_insert(0) += skipped;
    }

    /// Output frames so far, by (model, skipped).
    pub fn frames(&self) -> Vec<((u32, bool), u64)> {
        let frames = self.frames.lock().unwrap();
        frames.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// A prompt of `tokens` tokens was pruned to `kept` (by its model's `tideway_prune`).
    pub fn count_prompt_tokens(&self, model: u32, tokens: u64, kept: u64) {
        let mut counts = self.prompt_tokens.lock().unwrap();
        *counts.entry((model, false)).or_insert(0) += kept;
        *counts.entry((model, true)).or_insert(0) += tokens - kept;
    }

    /// Tokens of pruned prompts so far, by (model, pruned).
    pub fn prompt_tokens(&self) -> Vec<((u32, bool), u64)> {
        let counts = self.prompt_tokens.lock().unwrap();
        counts.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// Requests refused by each server limit so far.
    pub fn limit_refusals(&self) -> Vec<(&'static str, u64)> {
        let limits = self.limits.lock().unwrap();
        limits.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// A call of `service`/`method` ended with `code`.
    pub fn count_grpc_error(&self, service: &str, method: &str, code: tonic::Code) {
        let key = (service.to_string(), method.to_string(), format!("{code:?}"));
        *self.grpc_errors.lock().unwrap().entry(key).or_insert(0) += 1;
    }

    /// Calls answered with an error so far, by (service, method, code).
    pub fn grpc_errors(&self) -> Vec<((String, String, String), u64)> {
        let errors = self.grpc_errors.lock().unwrap();
        errors.iter().map(|(k, &v)| (k.clone(), v)).collect()
    }

    /// Cumulative histogram counts (Prometheus `le` buckets), then the sum in seconds.
    pub fn latency_histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let mut rows = Vec::new();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            rows.push((*bound, cumulative));
        }
        cumulative += self.latency_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let sum = self.latency_sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        (rows, cumulative, sum)
    }
}
