//! `RequestCtx`: what the stages above decided about one request, for the stages below.
//!
//! Each stage that decides something (the logical destination, the route, the attempt, the
//! endpoint) writes its field here, and the stages below read the field by name. It rides in
//! the request's body ([`RequestBody`], which every stack's top makes from hyper's): the
//! request's extensions are a type map, whose first entry costs three allocations (the map, its
//! table, the boxed value) and each read a hashed lookup, and a reader could not see in one
//! place what it may find there.
//!
//! Which stage writes each field is said beside it; a stage that finds a field empty was
//! built into a stack without the stage that writes it (a test, or the other direction).

use std::sync::Arc;

use http::Request;

use crate::discovery::Logical;
use crate::http::client::EndpointTarget;
use crate::http::request_body::RequestBody;
use crate::http::retry::Attempt;
use crate::http::tap::{EndpointSlot, Tapped};
use crate::profiles::{DestinationRoutes, RouteState};

/// The facts one request has gathered on its way down a stack. An attempt gets a copy of its
/// request's (so a split or the balancer changes its own attempt's, not the next one's).
#[derive(Clone, Default)]
pub struct RequestCtx {
    /// Outbound: the destination (`LogicalLayer`); for one attempt, the backend a split chose.
    pub logical: Option<Arc<Logical>>,
    /// Inbound: the workload's ServiceProfile routes for the authority requested.
    pub routes: Option<Arc<DestinationRoutes>>,
    /// The route the request matched (`RouteLayer`).
    pub route: Option<Arc<RouteState>>,
    /// Which attempt this is, on a retryable route (`RetryLayer`).
    pub attempt: Option<Attempt>,
    /// Where the request is sent: inbound the workload's port, outbound the endpoint the
    /// balancer picked.
    pub target: Option<EndpointTarget>,
    /// While tapped: the request's facts, as the rescue tap above the attempts took them.
    pub tapped: Option<Arc<Tapped>>,
    /// While tapped: where the balancer notes the endpoint it picked, for the tap above it.
    pub endpoint_slot: Option<EndpointSlot>,
}

/// `req.ctx()` and `req.ctx_mut()`.
pub trait WithCtx {
    fn ctx(&self) -> &RequestCtx;
    fn ctx_mut(&mut self) -> &mut RequestCtx;
}

impl WithCtx for Request<RequestBody> {
    fn ctx(&self) -> &RequestCtx {
        self.body().ctx()
    }

    fn ctx_mut(&mut self) -> &mut RequestCtx {
        self.body_mut().ctx_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_one_context_written_by_many_stages() {
        let mut req = Request::new(RequestBody::empty());
        assert!(req.ctx().attempt.is_none());
        req.ctx_mut().attempt = Some(Attempt(1));
        req.ctx_mut().attempt = Some(Attempt(2));
        assert_eq!(req.ctx().attempt, Some(Attempt(2)));
        // Nothing in the extensions: they cost allocations once anything is put there.
        assert!(req.extensions().is_empty());
    }
}
