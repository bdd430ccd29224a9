//! Who a call comes from: `--auth FILE` maps bearer tokens to identities and roles, and every
//! gRPC call of the Tideway and inference services passes [`Authenticate`]. Sessions and jobs
//! belong to the identity that made them (their keys are scoped by it, so another identity's
//! name finds nothing), and Admin calls need the admin role.
//!
//! The file holds one token per line, `TOKEN IDENTITY ROLE` (role `client` or `admin`), with
//! `#` comments; tokens are at least 16 characters. Clients send `authorization: Bearer TOKEN`
//! (tritonclient: `headers={"authorization": "Bearer TOKEN"}`). Without `--auth` every call is
//! the identity `anonymous`, with the admin role only from a loopback address.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tonic::{Request, Status};

/// A caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub admin: bool,
}

impl Identity {
    /// The caller of a request that passed [`Authenticate`] (tests and in-process calls that
    /// did not: anonymous, no admin role).
    pub fn of<T>(request: &Request<T>) -> Identity {
        request
            .extensions()
            .get::<Identity>()
            .cloned()
            .unwrap_or_else(|| Identity {
                name: ANONYMOUS.into(),
                admin: false,
            })
    }

    /// Refuses a caller without the admin role.
    pub fn require_admin(&self, call: &str) -> Result<(), Status> {
        match self.admin {
            true => Ok(()),
            false => Err(Status::permission_denied(format!(
                "{call} needs the admin role; identity {:?} has the client role (--auth FILE gives identities roles; without --auth, admin calls come from loopback only)",
                self.name
            ))),
        }
    }
}

const ANONYMOUS: &str = "anonymous";

/// The tokens of `--auth FILE`.
#[derive(Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Identity>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --auth {}", path.display()))?;
        let mut by_token = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [token, name, role] = fields[..] else {
                bail!("{}: expected `TOKEN IDENTITY ROLE`, found {line:?}", at());
            };
            if token.len() < 16 {
                bail!(
                    "{}: a token must be at least 16 characters (this one has {})",
                    at(),
                    token.len()
                );
            }
            let admin = match role {
                "admin" => true,
                "client" => false,
                other => bail!("{}: role {other:?}; allowed: client, admin", at()),
            };
            let identity = Identity {
                name: name.to_string(),
                admin,
            };
            if by_token.insert(token.to_string(), identity).is_some() {
                bail!("{}: the token appears twice", at());
            }
        }
        if by_token.is_empty() {
            bail!("--auth {}: no tokens", path.display());
        }
        Ok(Tokens { by_token })
    }
}

/// The interceptor every authenticated service passes: with tokens, a call must carry a known
/// bearer token (UNAUTHENTICATED otherwise); its identity goes into the request's extensions.
#[derive(Clone, Default)]
pub struct Authenticate {
    tokens: Option<Arc<Tokens>>,
}

impl Authenticate {
    pub fn new(tokens: Option<Tokens>) -> Self {
        Authenticate {
            tokens: tokens.map(Arc::new),
        }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = match &self.tokens {
            None => Identity {
                name: ANONYMOUS.into(),
                admin: request.remote_addr().is_some_and(|a| a.ip().is_loopback()),
            },
            Some(tokens) => {
                let header = request
                    .metadata()
                    .get("authorization")
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "this server needs a bearer token: send the header `authorization: Bearer TOKEN`",
                        )
                    })?
                    .to_str()
                    .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
                let token = header.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer TOKEN`")
                })?;
                tokens
                    .by_token
                    .get(token.trim())
                    .cloned()
                    .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?
            }
        };
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// An unguessable id (128 bits from the operating system's CSPRNG), as hex.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
