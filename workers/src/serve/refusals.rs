//! A budget of refusals per caller. A client whose calls keep being refused for its own limits
//! (a message over `--max-request-bytes`, a gzip bomb, too many tokens, its session limit) has
//! its next call held, unread, until its budget refills (`--refusals-per-s`,
//! `--refusal-burst`), then refused. Each refusal costs the server real work (a gzip bomb
//! decompresses up to the limit), and refusing at once only lets a client loop faster: held,
//! a client that loops over refused calls is slowed to the refill rate, and its message waits
//! in HTTP/2 flow control instead of being decompressed.
//!
//! The caller is its bearer token where it sends one, else its connection's address. The same
//! layer answers tonic's own size refusal of a unary call (OUT_OF_RANGE) as every limit is
//! answered, RESOURCE_EXHAUSTED naming the flag (`status::inbound_error`).
//! Refusals that are the server's state, not the caller's doing (a full queue, the server-wide
//! session limit, a full GPU pool), are not charged.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tower_layer::Layer;
use tower_service::Service;

/// The longest a call is held before its refusal.
const MAX_HOLD: Duration = Duration::from_secs(2);
/// Callers tracked before idle ones (full budget) are forgotten.
const TRACKED_CALLERS: usize = 10_000;

/// Refusals each caller may earn: `burst` at once, refilled at `per_s` a second.
pub struct RefusalBudget {
    per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    left: f64,
    at: Instant,
}

impl RefusalBudget {
    /// A budget; `per_s` 0 turns it off.
    pub fn new(per_s: f64, burst: u32) -> Arc<Self> {
        Arc::new(RefusalBudget {
            per_s,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn enabled(&self) -> bool {
        self.per_s > 0.0
    }

    /// How long `caller` must wait before it is heard again (`None`: heard now).
    fn wait(&self, caller: &str, now: Instant) -> Option<Duration> {
        let mut buckets = self.buckets.lock().unwrap();
        let bucket = buckets.get_mut(caller)?;
        self.refill(bucket, now);
        (bucket.left < 1.0).then(|| Duration::from_secs_f64((1.0 - bucket.left) / self.per_s))
    }

    /// Charges one refusal to `caller`.
    fn charge(&self, caller: &str, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= TRACKED_CALLERS && !buckets.contains_key(caller) {
            buckets.retain(|_, b| {
                b.left + now.duration_since(b.at).as_secs_f64() * self.per_s < self.burst
            });
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            left: self.burst,
            at: now,
        });
        self.refill(bucket, now);
        bucket.left -= 1.0;
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let earned = now.duration_since(bucket.at).as_secs_f64() * self.per_s;
        bucket.left = (bucket.left + earned).min(self.burst);
        bucket.at = now;
    }
}

/// The tower layer that applies a [`RefusalBudget`] to every call of the gRPC server.
#[derive(Clone)]
pub struct RefusalLayer(pub Arc<RefusalBudget>);

impl<S> Layer<S> for RefusalLayer {
    type Service = RefusalLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefusalLimited {
            inner,
            budget: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RefusalLimited<S> {
    inner: S,
    budget: Arc<RefusalBudget>,
}

/// Who is calling: the bearer token's value where one is sent, else the connection.
fn caller<B>(request: &http::Request<B>) -> String {
    if let Some(token) = request.headers().get("authorization") {
        return format!("token {}", String::from_utf8_lossy(token.as_bytes()));
    }
    match request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|c| c.remote_addr())
    {
        Some(addr) => format!("peer {addr}"),
        None => "anonymous".into(),
    }
}

/// Whether a trailers-only answer refuses the caller for its own limits.
fn refused_for_own_limit(headers: &http::HeaderMap) -> bool {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32);
    if !matches!(
        code,
        Some(tonic::Code::ResourceExhausted | tonic::Code::OutOfRange)
    ) {
        return false;
    }
    let message = headers
        .get("grpc-message")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    // The server's own state (status.rs: a full queue, --max-sessions, the GPU pool).
    ![
        "--queue-capacity",
        "(--max-sessions)",
        "session slots on the GPU",
    ]
    .iter()
    .any(|server_state| message.contains(server_state))
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody> Service<http::Request<ReqBody>> for RefusalLimited<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if !self.budget.enabled() {
            let answer = self.inner.call(request);
            return Box::pin(async move {
                let mut response = answer.await?;
                as_limit_refusal(response.headers_mut());
                Ok(response)
            });
        }
        let who = caller(&request);
        if let Some(wait) = self.budget.wait(&who, Instant::now()) {
            let hold = wait.min(MAX_HOLD);
            let status = tonic::Status::resource_exhausted(format!(
                "this client's calls were refused for its limits more than {} times at {}/s (--refusal-burst, --refusals-per-s): held {} ms, unread, and refused; send what the limits allow",
                self.budget.burst,
                self.budget.per_s,
                hold.as_millis()
            ));
            return Box::pin(async move {
                tokio::time::sleep(hold).await;
                Ok(status.into_http())
            });
        }
        let budget = self.budget.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if refused_for_own_limit(response.headers()) {
                budget.charge(&who, Instant::now());
            }
            as_limit_refusal(response.headers_mut());
            Ok(response)
        })
    }
}

/// Rewrites tonic's OUT_OF_RANGE for a message over the size limit (a unary call's,
/// answered before any handler runs) into the server's limit refusal.
fn as_limit_refusal(headers: &mut http::HeaderMap) {
    if let Some(status) = tonic::Status::from_header_map(headers)
        && status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
        && let Some(refusal) = super::status::inbound_error(&status)
    {
        let _ = refusal.add_header(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_heard_again_once_its_budget_refills() {
        let budget = RefusalBudget::new(10.0, 3);
        let t0 = Instant::now();
        assert_eq!(budget.wait("a", t0), None);
        for _ in 0..3 {
            budget.charge("a", t0);
        }
        // Three refusals spent the burst: 100 ms to earn the next hearing.
        let wait = budget.wait("a", t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert_eq!(budget.wait("b", t0), None, "other callers are not affected");
        assert_eq!(budget.wait("a", t0 + Duration::from_millis(100)), None);
    }

    #[test]
    fn only_the_callers_own_limits_are_charged() {
        let answer = |code: i32, message: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", code.to_string().parse().unwrap());
            h.insert("grpc-message", message.parse().unwrap());
            h
        };
        assert!(refused_for_own_limit(&answer(
            8,
            "over --max-request-tokens"
        )));
        assert!(refused_for_own_limit(&answer(
            11,
            "decoded message length too large"
        )));
        assert!(!refused_for_own_limit(&answer(8, "raise --queue-capacity")));
        assert!(!refused_for_own_limit(&answer(
            8,
            "live sessions (--max-sessions); end"
        )));
        assert!(!refused_for_own_limit(&answer(3, "bad shape")));
    }
}
