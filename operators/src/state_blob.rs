//! A session's whole state as one blob: a safetensors file whose tensors are the state's named
//! tensors and whose metadata says what it is — format and version, the model's name and
//! fingerprint, the session's name, owner, chunks taken and position — with a CRC-32 of the
//! tensors. Snapshots in the store and `ExportState` answers are these blobs, so any
//! safetensors reader can open one.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::state_tensors::{StateTensors, StateValue};

/// The blob's `format` metadata.
pub const FORMAT: &str = "tideway.session-state";
/// The blob layout this server writes and reads.
pub const VERSION: u32 = 1;

/// A session's state and what it belongs to, as the stages fill it in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// The session's placement key on the server that holds it.
    pub key: u64,
    pub name: String,
    /// The served model's name and fingerprint (the server's `model_fingerprint`).
    pub model: String,
    pub fingerprint: String,
    /// The identity that owns the session.
    pub owner: String,
    /// Requests with input the session has taken: a resuming client resends from here.
    pub chunks: u64,
    /// Tokens consumed (language models) or frames emitted (feature models).
    pub position: u64,
    /// When the session was last used (seconds since the Unix epoch): it expires from the
    /// store as it would have live.
    pub last_used_unix: f64,
    pub tensors: StateTensors,
    /// Why a stage could not write its part (such a snapshot is not kept).
    pub refused: Option<String>,
    /// For the prefix-state cache: the tokens this state is the state after (not written
    /// into blobs).
    pub prefix: Option<Vec<u32>>,
}

/// Why bytes are not a session state this server can take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlobError {
    #[error("not a session state (not a safetensors file: {reason})")]
    NotSafetensors { reason: String },
    #[error(
        "not a Tideway session state (metadata \"format\" is {found:?}; a state has {FORMAT:?})"
    )]
    Foreign { found: Option<String> },
    #[error("session state of format version {found}; this server reads version {VERSION}")]
    Version { found: String },
    #[error("session state metadata {key:?} is missing or malformed")]
    Metadata { key: &'static str },
    #[error(
        "session state is corrupt: its tensors' CRC-32 is {found:08x}, the blob records {expected:08x}"
    )]
    Checksum { found: u32, expected: u32 },
    #[error("state tensor {name:?} has dtype {dtype}; states hold F32, F64, U64 and U8")]
    Dtype { name: String, dtype: String },
    #[error(
        "the state is of model {blob_model:?} (fingerprint {blob_fingerprint}); model {model:?} has fingerprint {fingerprint}: a state continues only on the model that made it"
    )]
    WrongModel {
        blob_model: String,
        blob_fingerprint: String,
        model: String,
        fingerprint: String,
    },
}

fn dtype_of(value: &StateValue) -> Dtype {
    match value {
        StateValue::F32(_) => Dtype::F32,
        StateValue::F64(_) => Dtype::F64,
        StateValue::U64(_) => Dtype::U64,
        StateValue::U8(_) => Dtype::U8,
    }
}

fn le_bytes(value: &StateValue) -> Vec<u8> {
    match value {
        StateValue::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        StateValue::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        StateValue::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        StateValue::U8(v) => v.clone(),
    }
}

/// CRC-32 over every tensor's name, dtype and bytes, in name order.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, Dtype, &'a [u8])>) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for (name, dtype, bytes) in tensors {
        crc.update(name.as_bytes());
        crc.update(format!("{dtype:?}").as_bytes());
        crc.update(bytes);
    }
    crc.finalize()
}

/// The blob of `snapshot`.
pub fn encode(snapshot: &SessionSnapshot) -> Vec<u8> {
    let bytes: Vec<(&str, Dtype, Vec<u8>)> = snapshot
        .tensors
        .0
        .iter()
        .map(|(name, value)| (name.as_str(), dtype_of(value), le_bytes(value)))
        .collect();
    let crc = checksum(bytes.iter().map(|(n, d, b)| (*n, *d, b.as_slice())));
    let views = bytes.iter().map(|(name, dtype, b)| {
        let width = dtype.bitsize() / 8;
        let view =
            TensorView::new(*dtype, vec![b.len() / width], b).expect("sized from its values");
        (name.to_string(), view)
    });
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", VERSION.to_string()),
        ("key", snapshot.key.to_string()),
        ("name", snapshot.name.clone()),
        ("model", snapshot.model.clone()),
        ("fingerprint", snapshot.fingerprint.clone()),
        ("owner", snapshot.owner.clone()),
        ("chunks", snapshot.chunks.to_string()),
        ("position", snapshot.position.to_string()),
        ("last_used_unix", snapshot.last_used_unix.to_string()),
        ("crc32", format!("{crc:08x}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize(views, Some(meta)).expect("views built from their own bytes")
}

/// The snapshot in `bytes`, checked (format, version, checksum); not yet against a model.
pub fn decode(bytes: &[u8]) -> Result<SessionSnapshot, BlobError> {
    let not = |e: safetensors::SafeTensorError| BlobError::NotSafetensors {
        reason: e.to_string(),
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(not)?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(BlobError::Foreign {
            found: meta.get("format").cloned(),
        });
    }
    let version = meta.get("version").cloned().unwrap_or_default();
    if version != VERSION.to_string() {
        return Err(BlobError::Version { found: version });
    }
    let text = |key: &'static str| meta.get(key).cloned().ok_or(BlobError::Metadata { key });
    let number = |key: &'static str| -> Result<u64, BlobError> {
        text(key)?.parse().map_err(|_| BlobError::Metadata { key })
    };
    let expected = u32::from_str_radix(&text("crc32")?, 16)
        .map_err(|_| BlobError::Metadata { key: "crc32" })?;
    let file = SafeTensors::deserialize(bytes).map_err(not)?;
    let mut views = file.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let found = checksum(
        views
            .iter()
            .map(|(name, view)| (name.as_str(), view.dtype(), view.data())),
    );
    if found != expected {
        return Err(BlobError::Checksum { found, expected });
    }
    let mut tensors = StateTensors::default();
    for (name, view) in views {
        let data = view.data();
        let value = match view.dtype() {
            Dtype::F32 => StateValue::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::F64 => StateValue::F64(
                data.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::U64 => StateValue::U64(
                data.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::U8 => StateValue::U8(data.to_vec()),
            other => {
                return Err(BlobError::Dtype {
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        tensors.put(name, value);
    }
    Ok(SessionSnapshot {
        key: number("key")?,
        name: text("name")?,
        model: text("model")?,
        fingerprint: text("fingerprint")?,
        owner: text("owner")?,
        chunks: number("chunks")?,
        position: number("position")?,
        last_used_unix: text("last_used_unix")?
            .parse()
            .map_err(|_| BlobError::Metadata {
                key: "last_used_unix",
            })?,
        tensors,
        refused: None,
        prefix: None,
    })
}

/// Whether `snapshot` was made by the model served as `model` with `fingerprint`.
pub fn check_model(
    snapshot: &SessionSnapshot,
    model: &str,
    fingerprint: &str,
) -> Result<(), BlobError> {
    if snapshot.fingerprint == fingerprint {
        return Ok(());
    }
    Err(BlobError::WrongModel {
        blob_model: snapshot.model.clone(),
        blob_fingerprint: snapshot.fingerprint.clone(),
        model: model.to_string(),
        fingerprint: fingerprint.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> SessionSnapshot {
        let mut tensors = StateTensors::default();
        tensors.put_f32("layers.0.ssm", &[1.5, -2.0, f32::MIN_POSITIVE]);
        tensors.put("head.output_sum", StateValue::F64(vec![0.1, 1e300]));
        tensors.put_u64("position", 42);
        tensors.put_bytes("frontend.text.text", "héllo".as_bytes());
        SessionSnapshot {
            key: u64::MAX - 3,
            name: "s-1".into(),
            model: "kws".into(),
            fingerprint: "00ff00ff-12345678".into(),
            owner: "alice".into(),
            chunks: 17,
            position: 42,
            last_used_unix: 1_764_600_000.25,
            tensors,
            refused: None,
            prefix: None,
        }
    }

    #[test]
    fn a_blob_round_trips_bit_for_bit() {
        let s = snapshot();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn corrupt_truncated_and_foreign_blobs_are_refused() {
        let blob = encode(&snapshot());
        // A flipped bit in the last tensor byte.
        let mut flipped = blob.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Err(BlobError::Checksum { .. })));
        let truncated = &blob[..blob.len() - 5];
        let e = decode(truncated).unwrap_err();
        assert!(matches!(e, BlobError::NotSafetensors { .. }), "{e}");
        assert!(matches!(
            decode(b"PK\x03\x04 a zip file"),
            Err(BlobError::NotSafetensors { .. })
        ));
        let foreign = safetensors::serialize(
            [(
                "weight",
                TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap(),
            )],
            None,
        )
        .unwrap();
        let e = decode(&foreign).unwrap_err();
        assert!(e.to_string().contains("not a Tideway session state"), "{e}");
    }

    #[test]
    fn another_models_state_is_refused_by_name() {
        let s = snapshot();
        check_model(&s, "kws-2", "00ff00ff-12345678").unwrap();
        let e = check_model(&s, "lm", "aaaa-bbbb").unwrap_err().to_string();
        assert!(e.contains("\"kws\"") && e.contains("\"lm\""), "{e}");
    }
}
