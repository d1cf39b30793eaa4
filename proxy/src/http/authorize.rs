//! `Authorize`: the inbound policy, per request. A request the connection's client may not
//! make gets 403 `pylon-proxy-error: unauthorized connection` and goes no further; the
//! decision is the connection's until the policy changes (see `authz::ConnectionAuthz`).

use std::sync::Arc;

use http::Request;

use super::guard::{GuardLayer, RequestGuard};
use super::ProxyError;
use crate::authz::ConnectionAuthz;

/// The connection's authorization, checked per request.
#[derive(Clone)]
pub struct Authorize {
    connection: Arc<ConnectionAuthz>,
}

impl Authorize {
    pub fn layer(connection: Arc<ConnectionAuthz>) -> GuardLayer<Self> {
        GuardLayer::new(Self { connection })
    }
}

impl RequestGuard for Authorize {
    fn check<B>(&self, _req: &mut Request<B>) -> Result<(), ProxyError> {
        if self.connection.check_request() {
            Ok(())
        } else {
            Err(ProxyError::Unauthorized)
        }
    }
}
