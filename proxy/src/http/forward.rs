//! The last hop of both directions: send a request to one chosen endpoint and turn the result into
//! the client's response (proxied, upgraded, or a proxy-made error), recording it either way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use pylon_proxy_metrics::HttpTarget;
use tokio_util::task::TaskTracker;

use super::body::{grpc_status, record_proxy_error, Recorder};
use super::client::{H2Connection, Http1Client};
use super::{headers, upgrade, ProxyError, ProxyResponse, ResponseBody};
use crate::access_log::AccessEntry;
use crate::balance::InFlight;

/// Everything needed to send one request to one endpoint.
pub struct Forward<'a> {
    pub direction: &'static str,
    pub destination: &'a str,
    pub endpoint: SocketAddr,
    pub endpoint_authority: &'a Authority,
    pub h1: &'a Http1Client,
    pub h2: &'a H2Connection,
    pub metrics: &'a HttpTarget,
    pub response_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub tasks: &'a TaskTracker,
    pub in_flight: Option<InFlight>,
    pub access: Option<Box<AccessEntry>>,
    pub start: Instant,
}

impl Forward<'_> {
    pub async fn send(mut self, mut req: Request<Incoming>) -> ProxyResponse {
        self.metrics.request();
        if let Some(a) = self.access.as_mut() {
            a.set_endpoint(self.endpoint);
        }
        if req.method() == http::Method::CONNECT {
            return self.connect(req).await;
        }

        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let is_h2 = req.version() == Version::HTTP_2;
        if !is_h2 {
            set_host(&mut req, self.destination);
        }

        let send = async {
            if is_h2 {
                self.h2.send(req).await
            } else {
                self.h1.send(self.endpoint_authority, req).await
            }
        };
        let result = match self.response_timeout {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .unwrap_or(Err(ProxyError::ResponseTimeout)),
            None => send.await,
        };
        if let Some(f) = self.in_flight.as_mut() {
            f.response_received();
        }

        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => return self.fail(e),
        };
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut rsp);
                upgrade::splice(self.tasks, client, upstream, self.endpoint);
            }
        } else {
            headers::strip_hop_by_hop(rsp.headers_mut(), false);
        }
        let (parts, body) = rsp.into_parts();
        let recorder = Recorder {
            metrics: self.metrics.clone(),
            start: self.start,
            status: parts.status.as_u16(),
            // A trailers-only gRPC response carries its status in the headers.
            grpc_status: grpc_status(&parts.headers),
            in_flight: self.in_flight.take(),
            access: self.access.take(),
        };
        Response::from_parts(parts, ResponseBody::proxied(body, recorder))
    }

    async fn connect(mut self, mut req: Request<Incoming>) -> ProxyResponse {
        let on_upgrade = hyper::upgrade::on(&mut req);
        match upgrade::connect(self.tasks, on_upgrade, self.endpoint, self.connect_timeout).await {
            Ok(rsp) => {
                let latency = self.start.elapsed();
                self.metrics.response(Some(200), None, None, latency);
                if let Some(a) = self.access.take() {
                    a.emit(200, None, None, latency);
                }
                rsp
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(mut self, err: ProxyError) -> ProxyResponse {
        tracing::warn!(
            direction = self.direction,
            destination = self.destination,
            endpoint = %self.endpoint,
            error = %err,
            "proxy error response {}",
            err.status().as_u16()
        );
        record_proxy_error(self.metrics, err, self.start, self.access.take());
        err.response()
    }
}

/// An absolute-form request's authority replaces its `Host` (RFC 9112 §3.2.2); a request with
/// neither (HTTP/1.0) gets the destination's, so the endpoint still learns it.
fn set_host<B>(req: &mut Request<B>, destination: &str) {
    let host = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None if !req.headers().contains_key(header::HOST) => {
            HeaderValue::from_str(destination).ok()
        }
        None => None,
    };
    if let Some(host) = host {
        req.headers_mut().insert(header::HOST, host);
    }
}

/// The authority a request names: absolute-form URI or `:authority`, else `Host`.
pub fn request_authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// A proxy-made response for a request that never reached an endpoint.
pub fn fail_before_endpoint(
    direction: &'static str,
    destination: &str,
    metrics: &HttpTarget,
    err: ProxyError,
    start: Instant,
    access: Option<Box<AccessEntry>>,
) -> ProxyResponse {
    tracing::warn!(direction, destination, error = %err, "proxy error response {}", err.status().as_u16());
    metrics.request();
    record_proxy_error(metrics, err, start, access);
    err.response()
}
