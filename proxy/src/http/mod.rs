//! HTTP plumbing shared by both directions: serving client connections, the layers every HTTP
//! stack is built from (`RespondLayer`, `HttpMetricsLayer`, `ResponseTimeoutLayer`), the
//! `EndpointClient` at the bottom, response bodies that record when they end, hop-by-hop headers
//! and tunnels.

pub mod authorize;
pub mod body;
pub mod client;
pub mod ctx;
pub mod errors;
pub mod guard;
pub mod h2_client;
pub mod headers;
pub mod hibernate;
pub mod hops;
pub mod metrics;
pub mod orig_proto;
pub mod pool;
pub mod request_body;
pub mod retry;
pub mod route;
pub mod server;
pub mod tap;
#[cfg(test)]
pub mod test_support;
pub mod timeout;
pub mod upgrade;
pub mod validate;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use hyper::body::Incoming;

pub use body::ResponseBody;
pub use errors::ProxyError;

pub type ProxyResponse = http::Response<ResponseBody>;

/// Layers box their futures: one small allocation each keeps the stack's types readable.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Boxes the future that `make` builds, in a stack frame of its own: for a path that not every
/// request takes (a connect, a resend, a tunnel, a layer's own work such as a timeout). Built
/// inline, that future's full size would join the stack frame of the function that builds it or
/// awaits it, so every request, taking the path or not, would touch that much more stack (an
/// exchange's poll took 12.6 KiB).
#[inline(never)]
pub fn boxed_out_of_line<'a, T, F>(
    make: impl FnOnce() -> F,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>>
where
    F: Future<Output = T> + Send + 'a,
{
    Box::pin(make())
}

/// The future of a layer that usually passes the request straight through: the inner future
/// as it is (no allocation), or the layer's own boxed work when it has some.
pub enum PassThrough<F, T> {
    Inner(F),
    Own(BoxFuture<T>),
}

impl<F: Future<Output = T> + Unpin, T> Future for PassThrough<F, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.get_mut() {
            Self::Inner(f) => Pin::new(f).poll(cx),
            Self::Own(f) => f.as_mut().poll(cx),
        }
    }
}

/// A complete per-request stack, as each direction builds it: what the HTTP server calls.
pub trait HttpStack:
    tower::Service<
        http::Request<Incoming>,
        Response = ProxyResponse,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> HttpStack for S where
    S: tower::Service<
            http::Request<Incoming>,
            Response = ProxyResponse,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}
