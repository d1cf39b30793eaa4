//! `AuthorizeLayer`: the inbound policy, per request. A request the connection's client may not
//! make gets 403 `pylon-proxy-error: unauthorized connection` and goes no further; the
//! decision is the connection's until the policy changes (see `authz::ConnectionAuthz`).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::{PassThrough, ProxyError, ProxyResponse};
use crate::authz::ConnectionAuthz;

#[derive(Clone)]
pub struct AuthorizeLayer {
    connection: Arc<ConnectionAuthz>,
}

impl AuthorizeLayer {
    pub fn new(connection: Arc<ConnectionAuthz>) -> Self {
        Self { connection }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            connection: self.connection.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    connection: Arc<ConnectionAuthz>,
}

impl<S, B> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Unpin,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = PassThrough<S::Future, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.connection.check_request() {
            PassThrough::Inner(self.inner.call(req))
        } else {
            PassThrough::Own(Box::pin(std::future::ready(Err(ProxyError::Unauthorized))))
        }
    }
}
