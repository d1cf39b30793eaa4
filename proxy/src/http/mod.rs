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
use std::task::{Context, Poll};

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

/// A direction's stack as a connection's hyper service. hyper calls a connection's service from
/// that connection's task, one request at a time, through `&self`: hyper-util's
/// `TowerToHyperService` meets that by cloning the whole stack for every request (each layer's
/// reference counts up, and down again when the request ends: ~480 instructions per request).
/// Here the connection keeps one stack and calls it in place, after a readiness check that
/// every layer answers at once. Should a stack not be ready at once (today's always are), a
/// clone of it waits for readiness.
pub struct StackService<S> {
    // Borrowed only inside `call` and `clone`, neither of which the stack can re-enter, on the
    // connection's task.
    stack: std::cell::RefCell<S>,
}

impl<S: HttpStack> StackService<S> {
    pub fn new(stack: S) -> Self {
        Self {
            stack: std::cell::RefCell::new(stack),
        }
    }
}

impl<S: HttpStack> Clone for StackService<S> {
    fn clone(&self) -> Self {
        Self::new(self.stack.borrow().clone())
    }
}

impl<S: HttpStack> hyper::service::Service<http::Request<Incoming>> for StackService<S> {
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = StackFuture<S>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let mut stack = self.stack.borrow_mut();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Ok(())) = tower::Service::poll_ready(&mut *stack, &mut cx) {
            return StackFuture::Called {
                future: tower::Service::call(&mut *stack, req),
            };
        }
        StackFuture::Waiting {
            oneshot: tower::ServiceExt::oneshot(stack.clone(), req),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`StackService`]'s response future.
    #[project = StackFutureProj]
    pub enum StackFuture<S: HttpStack> {
        Called { #[pin] future: S::Future },
        Waiting { #[pin] oneshot: tower::util::Oneshot<S, http::Request<Incoming>> },
    }
}

impl<S: HttpStack> Future for StackFuture<S> {
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StackFutureProj::Called { future } => future.poll(cx),
            StackFutureProj::Waiting { oneshot } => oneshot.poll(cx),
        }
    }
}
