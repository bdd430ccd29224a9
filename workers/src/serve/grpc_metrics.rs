//! Every gRPC call that ends in an error, counted by service, method and status code, for
//! every API at once: a tower layer around the whole server reads the status where gRPC puts
//! it (the headers of a trailers-only answer, or the trailers after a stream), so refusals by
//! tonic itself (a message over the limit, an unknown token) count as the handlers' do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tower_layer::Layer;
use tower_service::Service;

use super::stats::StatsBoard;

/// The layer: `Server::builder().layer(ErrorMetricsLayer::new(board))`.
#[derive(Clone)]
pub struct ErrorMetricsLayer {
    board: Arc<StatsBoard>,
}

impl ErrorMetricsLayer {
    pub fn new(board: Arc<StatsBoard>) -> Self {
        ErrorMetricsLayer { board }
    }
}

impl<S> Layer<S> for ErrorMetricsLayer {
    type Service = ErrorMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorMetrics {
            inner,
            board: self.board.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ErrorMetrics<S> {
    inner: S,
    board: Arc<StatsBoard>,
}

/// `/package.Service/Method` as (service, method).
fn call_of(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("").to_string();
    let method = parts.next().unwrap_or("").to_string();
    (service, method)
}

/// The gRPC status code in a header map, if it holds one other than OK.
fn error_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let code = tonic::Code::from_i32(value);
    (code != tonic::Code::Ok).then_some(code)
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ErrorMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = call_of(request.uri().path());
        let board = self.board.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let (parts, body) = answer.await?.into_parts();
            // A trailers-only answer carries its status in the headers; otherwise it comes in
            // the trailers after the body.
            let pending = match error_code(&parts.headers) {
                Some(code) => {
                    board.count_grpc_error(&call.0, &call.1, code);
                    None
                }
                None => Some(call),
            };
            Ok(http::Response::from_parts(
                parts,
                CountedBody {
                    inner: body,
                    pending,
                    board,
                },
            ))
        })
    }
}

/// A response body that counts the error status in its trailers, if any.
pub struct CountedBody<B> {
    inner: B,
    /// The call, until its status has been read.
    pending: Option<(String, String)>,
    board: Arc<StatsBoard>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(trailers) = frame.trailers_ref()
            && let Some((service, method)) = this.pending.take()
            && let Some(code) = error_code(trailers)
        {
            this.board.count_grpc_error(&service, &method, code);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
