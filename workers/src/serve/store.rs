//! The session store of `serve --store DIR`: every session's latest snapshot blob
//! ([`super::state_blob`]) in an embedded, crash-safe database, one file per process
//! (`DIR/process-{i}.redb`). A writer thread takes snapshots and deletions off the request
//! path and commits them in batches.
//!
//! Why redb: pure Rust with no dependencies, one file, ACID transactions over copy-on-write
//! B-trees with checksummed commits — a commit is wholly there or not, and a process killed
//! mid-commit leaves the previous one (RocksDB would bring a C++ build, fjall an LSM tree
//! whose compaction we do not need for one small value per session).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::messages::SessionKey;
use super::state_blob::{SessionSnapshot, encode};

/// Each live session's latest snapshot blob, by session key.
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
/// Blobs that could not be restored (corrupt, or of a model no longer served), with why:
/// kept, never silently lost.
const REFUSED: TableDefinition<u64, (&[u8], &str)> = TableDefinition::new("refused");

/// Commits the writer makes a batch of at most.
const MAX_BATCH: usize = 4096;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open session store {path}: {reason} (a file that is not a Tideway store is never overwritten: move it away or give another --store)"
    )]
    Open { path: String, reason: String },
    #[error(
        "session store {path} is open in another process: each process of a server needs its own store (its own --store, or its own --process index in one shared directory)"
    )]
    InUse { path: String },
    #[error("session store {path}: {reason}")]
    Io { path: String, reason: String },
}

/// What the writer does.
pub enum StoreOp {
    /// Keep this snapshot as the session's latest.
    Put(Box<SessionSnapshot>),
    /// The session ended or expired.
    Delete(SessionKey),
    /// Answer once everything sent before is committed.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What the writer has done, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub snapshots: AtomicU64,
    pub bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Snapshots not written because a stage could not export its part.
    pub skipped: AtomicU64,
}

/// The store of one process.
pub struct SessionStore {
    db: Arc<Database>,
    path: PathBuf,
    pub stats: Arc<StoreStats>,
}

impl SessionStore {
    /// Opens (or creates) process `process`'s store in `dir`.
    pub fn open(dir: &Path, process: usize) -> Result<Self, StoreError> {
        let path = dir.join(format!("process-{process}.redb"));
        let open = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.display().to_string(),
            },
            other => open(other.to_string()),
        })?;
        let store = SessionStore {
            db: Arc::new(db),
            path,
            stats: Arc::default(),
        };
        // Both tables exist from the start, so reads never meet a missing one.
        store.write(|txn| {
            txn.open_table(SESSIONS)?;
            txn.open_table(REFUSED)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        f(&txn).map_err(|e| self.io(e))?;
        txn.commit().map_err(|e| self.io(e))
    }

    /// The keys of every stored session.
    pub fn keys(&self) -> Result<Vec<SessionKey>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let table = txn.open_table(SESSIONS).map_err(|e| self.io(e))?;
        let mut keys = Vec::new();
        for entry in table.iter().map_err(|e| self.io(e))? {
            keys.push(entry.map_err(|e| self.io(e))?.0.value());
        }
        Ok(keys)
    }

    /// Session `key`'s latest blob, if it is stored.
    pub fn get(&self, key: SessionKey) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let table = txn.open_table(SESSIONS).map_err(|e| self.io(e))?;
        let value = table.get(key).map_err(|e| self.io(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Moves blobs that cannot be restored to the `refused` table, each with why.
    pub fn refuse(&self, refused: &[(SessionKey, Vec<u8>, String)]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut sessions = txn.open_table(SESSIONS)?;
            let mut kept = txn.open_table(REFUSED)?;
            for (key, blob, why) in refused {
                kept.insert(*key, (blob.as_slice(), why.as_str()))?;
                sessions.remove(*key)?;
            }
            Ok(())
        })
    }

    /// Deletes sessions (expired before a restore).
    pub fn delete(&self, keys: &[SessionKey]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut sessions = txn.open_table(SESSIONS)?;
            for key in keys {
                sessions.remove(*key)?;
            }
            Ok(())
        })
    }

    /// Starts the writer thread; it ends when every sender is dropped (and then closes the
    /// database once the store is dropped too: [`SessionStore::close`] waits for that).
    pub fn start_writer(&self) -> Sender<StoreOp> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let db = self.db.clone();
        let stats = self.stats.clone();
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("tideway-store".into())
            .spawn(move || write_loop(&db, &rx, &stats, &path))
            .expect("spawn the store writer");
        tx
    }

    /// Closes the store once its writer has finished (every sender dropped), waiting at most
    /// `limit`; false if the writer still runs.
    pub fn close(self, limit: std::time::Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Arc::strong_count(&self.db) > 1 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }
}

/// For the torn-snapshot test: `TIDEWAY_TEST_ABORT_MID_SNAPSHOT=N` aborts the process inside
/// the commit that writes the first snapshot of a session that has taken N or more chunks
/// (after writing it into the transaction, before the commit), as a `kill -9` of the writer
/// would. (By chunks, not by commit count: one flush may be committed in several batches.)
fn abort_at_chunks() -> Option<u64> {
    std::env::var("TIDEWAY_TEST_ABORT_MID_SNAPSHOT")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn write_loop(db: &Database, rx: &Receiver<StoreOp>, stats: &StoreStats, path: &Path) {
    let abort_at = abort_at_chunks();
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        ops.extend(rx.try_iter().take(MAX_BATCH - 1));
        let started = Instant::now();
        let mut flushes = Vec::new();
        let (mut written, mut bytes, mut deletes) = (0u64, 0u64, 0u64);
        let result = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SESSIONS)?;
                for op in ops {
                    match op {
                        StoreOp::Put(snapshot) => {
                            let blob = encode(&snapshot);
                            bytes += blob.len() as u64;
                            table.insert(snapshot.key, blob.as_slice())?;
                            written += 1;
                            if abort_at.is_some_and(|n| snapshot.chunks >= n) {
                                status_line!(
                                    "tideway: TIDEWAY_TEST_ABORT_MID_SNAPSHOT: aborting inside a snapshot commit"
                                );
                                std::process::abort();
                            }
                        }
                        StoreOp::Delete(key) => {
                            table.remove(key)?;
                            deletes += 1;
                        }
                        StoreOp::Flush(done) => flushes.push(done),
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                stats.snapshots.fetch_add(written, Ordering::Relaxed);
                stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                stats.deletes.fetch_add(deletes, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            // The previous commit stays; the next period writes these sessions again.
            Err(e) => {
                tracing::error!(store = %path.display(), error = %e, "a snapshot commit failed")
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}
