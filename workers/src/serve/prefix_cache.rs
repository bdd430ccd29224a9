//! The prefix-state cache (`serve --prefix-cache-mb N`): a language model's whole session state
//! after a prompt's tokens, kept so that a later prompt that starts with exactly those tokens
//! starts from it and runs only the rest. A recurrent model's state after any prefix is a few
//! megabytes at most whatever the prefix's length, so one entry stands for a whole system
//! prompt or conversation so far. Entries are evicted least recently used, bounded in bytes.
//!
//! The front end plans each generation's prompt (its `admit`, with [`PrefixCache::lookup`]):
//! on a hit, a restore of the cached state and a step of the rest; on a miss, the prompt but
//! its last token, a capture of the state there (filled in by the stages like a snapshot, and
//! inserted at the snapshot stage), then the last token. Keeping the last token out of the
//! entry lets an identical prompt hit too (its last row of logits must be computed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::state_blob::SessionSnapshot;

/// Hash of (model, tokens): FNV-1a over the model and each token, extended one token at a
/// time while a prompt is scanned.
#[derive(Clone, Copy)]
struct Rolling(u64);

impl Rolling {
    fn new(model: u32) -> Self {
        let mut r = Rolling(0xcbf2_9ce4_8422_2325);
        r.push(model);
        r
    }

    fn push(&mut self, value: u32) {
        for b in value.to_le_bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

struct Entry {
    model: u32,
    tokens: Vec<u32>,
    snapshot: SessionSnapshot,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    /// Prefix lengths held, by model (how many entries of each length).
    lengths: BTreeMap<(u32, usize), usize>,
    bytes: usize,
    clock: u64,
}

/// What the cache has done, for metrics.
#[derive(Debug, Default)]
pub struct PrefixStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Prompt tokens a hit did not have to run.
    pub tokens_saved: AtomicU64,
    pub inserts: AtomicU64,
    pub evictions: AtomicU64,
}

/// A process's prefix-state cache, shared by its workers.
pub struct PrefixCache {
    inner: Mutex<Inner>,
    capacity: usize,
    pub stats: PrefixStats,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl PrefixCache {
    /// A cache of at most `capacity` bytes of state.
    pub fn new(capacity: usize) -> Self {
        PrefixCache {
            inner: Mutex::default(),
            capacity,
            stats: PrefixStats::default(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }

    pub fn entries(&self) -> usize {
        self.inner.lock().unwrap().entries.len()
    }

    /// The longest cached prefix of `tokens` (of model `model`) no longer than `max_len`:
    /// its length and state. Counts a hit or a miss.
    pub fn lookup(
        &self,
        model: u32,
        tokens: &[u32],
        max_len: usize,
    ) -> Option<(usize, SessionSnapshot)> {
        let mut inner = self.inner.lock().unwrap();
        let lengths: Vec<usize> = inner
            .lengths
            .range((model, 1)..=(model, max_len.min(tokens.len())))
            .map(|((_, len), _)| *len)
            .collect();
        let mut hash = Rolling::new(model);
        let mut found = None;
        let mut at = 0;
        for len in lengths {
            for &t in &tokens[at..len] {
                hash.push(t);
            }
            at = len;
            if let Some(e) = inner.entries.get(&hash.0)
                && e.model == model
                && e.tokens == tokens[..len]
            {
                found = Some(hash.0);
            }
        }
        let Some(key) = found else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        inner.clock += 1;
        let clock = inner.clock;
        let entry = inner.entries.get_mut(&key).expect("found above");
        entry.last_used = clock;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .tokens_saved
            .fetch_add(entry.tokens.len() as u64, Ordering::Relaxed);
        Some((entry.tokens.len(), entry.snapshot.clone()))
    }

    /// Keeps `snapshot`, the state of model `model` after exactly `tokens`, evicting the least
    /// recently used entries beyond the capacity (an entry larger than it is not kept).
    pub fn insert(&self, model: u32, tokens: Vec<u32>, snapshot: SessionSnapshot) {
        let bytes = snapshot.tensors.size_bytes() + 4 * tokens.len();
        if bytes > self.capacity || tokens.is_empty() {
            return;
        }
        let mut hash = Rolling::new(model);
        tokens.iter().for_each(|&t| hash.push(t));
        let mut inner = self.inner.lock().unwrap();
        inner.clock += 1;
        let entry = Entry {
            model,
            snapshot,
            bytes,
            last_used: inner.clock,
            tokens,
        };
        let length = (model, entry.tokens.len());
        if let Some(old) = inner.entries.insert(hash.0, entry) {
            inner.bytes -= old.bytes;
            Self::forget_length(&mut inner, (old.model, old.tokens.len()));
        }
        inner.bytes += bytes;
        *inner.lengths.entry(length).or_insert(0) += 1;
        self.stats.inserts.fetch_add(1, Ordering::Relaxed);
        while inner.bytes > self.capacity {
            let Some((&oldest, _)) = inner.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            let old = inner.entries.remove(&oldest).expect("listed");
            inner.bytes -= old.bytes;
            Self::forget_length(&mut inner, (old.model, old.tokens.len()));
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn forget_length(inner: &mut Inner, length: (u32, usize)) {
        if let Some(n) = inner.lengths.get_mut(&length) {
            *n -= 1;
            if *n == 0 {
                inner.lengths.remove(&length);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_operators::state_tensors::StateTensors;

    fn state(bytes: usize, mark: f32) -> SessionSnapshot {
        let mut tensors = StateTensors::default();
        tensors.put_f32("layers.0.ssm", &vec![mark; bytes / 4]);
        SessionSnapshot {
            key: 0,
            name: String::new(),
            model: "m".into(),
            fingerprint: String::new(),
            owner: String::new(),
            chunks: 0,
            position: 0,
            last_used_unix: 0.0,
            tensors,
            refused: None,
            prefix: None,
        }
    }

    fn mark(s: &SessionSnapshot) -> f32 {
        s.tensors.f32s("layers.0.ssm").unwrap()[0]
    }

    #[test]
    fn the_longest_exact_prefix_hits_and_others_miss() {
        let cache = PrefixCache::new(1 << 20);
        cache.insert(0, vec![1, 2], state(400, 2.0));
        cache.insert(0, vec![1, 2, 3, 4], state(400, 4.0));
        cache.insert(1, vec![1, 2, 3], state(400, 3.0));
        let (len, s) = cache.lookup(0, &[1, 2, 3, 4, 5], 4).unwrap();
        assert_eq!((len, mark(&s)), (4, 4.0));
        // Bounded by max_len, and by the tokens actually matching.
        let (len, s) = cache.lookup(0, &[1, 2, 3, 4], 3).unwrap();
        assert_eq!((len, mark(&s)), (2, 2.0));
        let (len, _) = cache.lookup(0, &[1, 2, 9, 4, 5], 4).unwrap();
        assert_eq!(len, 2);
        assert!(cache.lookup(0, &[2, 1, 3], 2).is_none());
        // Another model's entry of the same tokens is not this model's.
        assert!(cache.lookup(2, &[1, 2, 3, 4], 3).is_none());
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 3);
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn least_recently_used_entries_go_first_and_bytes_stay_bounded() {
        let cache = PrefixCache::new(1000);
        cache.insert(0, vec![1], state(400, 1.0));
        cache.insert(0, vec![2], state(400, 2.0));
        assert!(cache.lookup(0, &[1, 0], 1).is_some());
        // A third entry: the least recently used ([2]) goes.
        cache.insert(0, vec![3], state(400, 3.0));
        assert!(cache.bytes() <= 1000);
        assert!(cache.lookup(0, &[2, 0], 1).is_none());
        assert!(cache.lookup(0, &[1, 0], 1).is_some());
        assert!(cache.lookup(0, &[3, 0], 1).is_some());
        assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 1);
        // Larger than the whole cache: not kept.
        cache.insert(0, vec![4], state(2000, 4.0));
        assert!(cache.lookup(0, &[4, 0], 1).is_none());
    }
}
