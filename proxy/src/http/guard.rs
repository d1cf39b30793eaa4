//! `GuardLayer`: the shape shared by the stages that only let a request on or refuse it (a
//! malformed head, a request past the hop limit, a client the policy denies). A guard checks
//! (and may stamp) the request; a refusal is a `ProxyError`, answered by `RespondLayer` above.
//! Each guard lives in its own module with its reasons: `validate`, `hops`, `authorize`.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::{PassThrough, ProxyError, ProxyResponse};

/// One check a request must pass.
pub trait RequestGuard: Clone {
    /// `Err` refuses the request (the guard logs why); `Ok` lets it on, perhaps stamped.
    fn check<B>(&self, req: &mut Request<B>) -> Result<(), ProxyError>;
}

/// Several guards in one layer, checked in order: one stage fewer for every request (and its
/// response) to pass through.
impl<A: RequestGuard, B: RequestGuard> RequestGuard for (A, B) {
    fn check<R>(&self, req: &mut Request<R>) -> Result<(), ProxyError> {
        self.0.check(req)?;
        self.1.check(req)
    }
}

#[derive(Clone, Debug)]
pub struct GuardLayer<G> {
    guard: G,
}

impl<G> GuardLayer<G> {
    pub fn new(guard: G) -> Self {
        Self { guard }
    }

    /// This layer's guard, then `next`'s.
    pub fn and<N>(self, next: GuardLayer<N>) -> GuardLayer<(G, N)> {
        GuardLayer::new((self.guard, next.guard))
    }
}

impl<S, G: Clone> Layer<S> for GuardLayer<G> {
    type Service = Guarded<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            guard: self.guard.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Guarded<S, G> {
    inner: S,
    guard: G,
}

impl<S, G, B> Service<Request<B>> for Guarded<S, G>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Unpin,
    G: RequestGuard,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.guard.check(&mut req) {
            Ok(()) => PassThrough::Inner(self.inner.call(req)),
            Err(err) => PassThrough::Own(Box::pin(std::future::ready(Err(err)))),
        }
    }
}
