//! Session state across servers: `Streams.ExportState` answers a live session's whole state
//! as a blob ([`super::state_blob`]); a stream's `start` with `state` starts a new session
//! from one, after checking it against the model (format, checksum, fingerprint, and each
//! stage's tensors against its own sizes on the way in).

use std::sync::Arc;

use tonic::{Code, Request, Status};

use tideway_proto::tideway::v1 as pb;

use super::auth::Identity;
use super::engine::Engine;
use super::messages::{Op, SessionKey, owned_session_key};
use super::requests::answer;
use super::served::ServedModel;
use super::state_blob::{SessionSnapshot, check_model, decode, encode};
use super::status::{op_status, submit_status};

/// The snapshot in a client's `state` bytes, made the start of session `name` of `owner`.
pub fn imported_state(
    served: &ServedModel,
    state: &[u8],
    key: SessionKey,
    name: &str,
    owner: &str,
) -> Result<Box<SessionSnapshot>, Status> {
    let refused = |e: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("the start's state is refused: {e}"))
    };
    let mut snapshot = decode(state).map_err(|e| refused(&e))?;
    check_model(&snapshot, &served.name, &served.fingerprint).map_err(|e| refused(&e))?;
    snapshot.key = key;
    snapshot.name = name.to_string();
    snapshot.owner = owner.to_string();
    snapshot.model = served.name.clone();
    // A fresh session's idle clock starts now.
    snapshot.last_used_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Ok(Box::new(snapshot))
}

/// `Streams.ExportState`: the caller's own live session, as a blob.
pub async fn export_state(
    engine: &Arc<Engine>,
    request: Request<pb::ExportStateRequest>,
) -> Result<pb::ExportStateResponse, Status> {
    let owner = Identity::of(&request);
    let request = request.into_inner();
    let model = engine
        .model_index(&request.model)
        .ok_or_else(|| Status::not_found(format!("unknown model {:?}", request.model)))?;
    let key = owned_session_key(model, &owner.name, &request.session_id);
    let op = Op::Export {
        model,
        name: request.session_id.clone(),
    };
    let rx = engine
        .submit(engine.pick_worker(), key, op, true)
        .map_err(submit_status)?;
    let reply = answer(rx)
        .await?
        .map_err(|e| op_status(&e, Code::NotFound))?;
    let snapshot = reply
        .state
        .ok_or_else(|| Status::internal("the export answered no state"))?;
    Ok(pb::ExportStateResponse {
        state: encode(&snapshot),
        position: snapshot.position,
        chunks: snapshot.chunks,
    })
}
