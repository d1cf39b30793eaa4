//! Traffic splits: a logical destination's requests shared among backends by weight, from an
//! SMI TrafficSplit on its service, else its ServiceProfile's `dstOverrides`. Each backend is a
//! logical destination of its own, with its own endpoints and balancer. Weights need not sum to
//! 100: a backend's share is weight / sum.
//!
//! `SplitLayer` picks the backend for each attempt (so a retry may land on another backend) and
//! hands it down in place of the destination; discovery keeps the `Backends` current.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use pylon_proxy_policy::ServiceRef;
use tower::{Layer, Service};

use crate::discovery::Logical;
use crate::http::ctx::WithCtx;
use crate::http::request_body::RequestBody;
use crate::http::{ProxyError, ProxyResponse};

/// What a backend list was built from, so discovery can tell when the config changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    /// A TrafficSplit backend: a service (on the apex's port).
    Service(ServiceRef),
    /// A `dstOverrides` authority (`web-v2.default.svc.cluster.local:80`).
    Authority(Arc<str>),
}

/// As the logs name it: the service (`default/web-v2`) or the authority.
impl std::fmt::Display for BackendTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service(service) => service.fmt(f),
            Self::Authority(authority) => f.write_str(authority),
        }
    }
}

/// The backends of one logical destination. Empty: everything goes to the destination itself.
#[derive(Default)]
pub struct Backends {
    spec: Vec<(BackendTarget, u64)>,
    /// `(backend, cumulative weight in thousandths)`; `None` is the destination itself.
    list: Vec<(Option<Arc<Logical>>, u64)>,
    total: u64,
}

impl Backends {
    /// `resolved` is parallel to `spec`; a backend that could not be resolved is `Err` and
    /// gets no share (its weight is left out of the sum).
    pub fn new(
        spec: Vec<(BackendTarget, u64)>,
        resolved: Vec<Result<Option<Arc<Logical>>, ()>>,
    ) -> Self {
        let mut total = 0u64;
        let mut list = Vec::with_capacity(spec.len());
        for ((_, weight), backend) in spec.iter().zip(resolved) {
            if let Ok(backend) = backend {
                if *weight > 0 {
                    total = total.saturating_add(*weight);
                    list.push((backend, total));
                }
            }
        }
        Self { spec, list, total }
    }

    pub fn spec(&self) -> &[(BackendTarget, u64)] {
        &self.spec
    }

    /// The backend for one attempt, by weight; `None` for the destination itself.
    pub fn pick(&self) -> Option<&Arc<Logical>> {
        if self.total == 0 {
            return None;
        }
        let r = rand::random_range(0..self.total);
        self.list
            .iter()
            .find(|(_, cumulative)| r < *cumulative)
            .and_then(|(backend, _)| backend.as_ref())
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SplitLayer;

impl<S> Layer<S> for SplitLayer {
    type Service = Split<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Split { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Split<S> {
    inner: S,
}

impl<S> Service<Request<RequestBody>> for Split<S>
where
    S: Service<Request<RequestBody>, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        // Only a split replaces the destination (most have none: no allocation then).
        let backend = req
            .ctx()
            .logical
            .as_ref()
            .and_then(|l| l.backends.load().pick().cloned());
        if let Some(backend) = backend {
            req.ctx_mut().logical = Some(backend);
        }
        self.inner.call(req)
    }
}
