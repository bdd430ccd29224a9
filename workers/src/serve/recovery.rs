//! Restoring sessions at start (`serve --store DIR`): every snapshot this process's store
//! holds goes back into the dataflow as a restore of its session, routed to its owner as a
//! start would be. A blob that cannot be restored (corrupt, foreign, of a model no longer
//! served or changed since) is set aside in the store with why, and the others go on; one
//! that expired while the server was down is deleted, as it would have been live.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::engine::Engine;
use super::messages::{Op, SessionKey};
use super::requests::answer;
use super::state_blob::{check_model, decode};
use super::store::{SessionStore, StoreError};

/// What a restore did.
#[derive(Debug, Default)]
pub struct Restored {
    pub sessions: usize,
    pub expired: usize,
    pub refused: Vec<(SessionKey, String)>,
    pub bytes: usize,
    pub millis: f64,
}

type SetAside = Vec<(SessionKey, Vec<u8>, String)>;

/// Counts a restore's answer, or sets its blob aside with why.
fn settle(
    restored: &mut Restored,
    set_aside: &mut SetAside,
    key: SessionKey,
    blob: Vec<u8>,
    answer: Result<Result<super::messages::Reply, super::messages::OpError>, tonic::Status>,
) {
    match answer {
        Ok(Ok(_)) => restored.sessions += 1,
        Ok(Err(e)) => set_aside.push((key, blob, format!("{e:?}"))),
        Err(status) => set_aside.push((key, blob, status.message().to_string())),
    }
}

/// Restores in flight at once: bounds the blobs held in memory (a 130m-shaped Mamba's is 3 MB).
const IN_FLIGHT: usize = 32;

/// Restores every session in `store` through `engine`, a few at a time.
pub async fn restore(engine: &Engine, store: &SessionStore) -> Result<Restored, StoreError> {
    let started = Instant::now();
    let keys = store.keys()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let idle_limit = engine.config.idle_limit.as_secs_f64();
    let mut restored = Restored::default();
    let mut set_aside: SetAside = Vec::new();
    let mut expired = Vec::new();
    let mut waiting = std::collections::VecDeque::new();
    for key in keys {
        let Some(blob) = store.get(key)? else {
            continue;
        };
        restored.bytes += blob.len();
        let snapshot = match decode(&blob) {
            Ok(s) => s,
            Err(e) => {
                set_aside.push((key, blob, e.to_string()));
                continue;
            }
        };
        let Some(model) = engine.model_index(&snapshot.model) else {
            let why = format!(
                "model {:?} is not served (this server serves {})",
                snapshot.model,
                engine
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            set_aside.push((key, blob, why));
            continue;
        };
        let served = &engine.models[model as usize];
        if let Err(e) = check_model(&snapshot, &served.name, &served.fingerprint) {
            set_aside.push((key, blob, e.to_string()));
            continue;
        }
        if now - snapshot.last_used_unix > idle_limit {
            expired.push(key);
            continue;
        }
        let op = Op::Restore {
            model,
            snapshot: Box::new(snapshot),
            stored: true,
        };
        // The blob is kept only until its restore is answered (set aside if refused).
        match engine.submit_background(engine.pick_worker(), key, op, true) {
            Ok(rx) => waiting.push_back((key, blob, rx)),
            Err(e) => set_aside.push((key, blob, format!("{e:?}"))),
        }
        while waiting.len() >= IN_FLIGHT {
            let (key, blob, rx) = waiting.pop_front().expect("not empty");
            settle(&mut restored, &mut set_aside, key, blob, answer(rx).await);
        }
    }
    while let Some((key, blob, rx)) = waiting.pop_front() {
        settle(&mut restored, &mut set_aside, key, blob, answer(rx).await);
    }
    store.delete(&expired)?;
    restored.expired = expired.len();
    restored.refused = set_aside
        .iter()
        .map(|(key, _, why)| (*key, why.clone()))
        .collect();
    store.refuse(&set_aside)?;
    restored.millis = started.elapsed().as_secs_f64() * 1e3;
    Ok(restored)
}
