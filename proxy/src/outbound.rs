//! The outbound path: the workload calls out, and this file is the whole journey.
//!
//! ```text
//! accept ─ original destination (SO_ORIGINAL_DST) when iptables redirected the connection
//!        ─ detect protocol (skipped for opaque ports)
//!        ├ opaque TCP ─ logical destination of the dialled address ─ balancer ─ copy bytes
//!        └ HTTP/1 or h2 server connection, then per request:
//!            logical destination (dialled address, else Host / :authority / absolute URI)
//!            ─ balancer: P2C over PeakEWMA across the live endpoints
//!            ─ endpoint client (pooled h1 or multiplexed h2), response timeout
//!            ─ response body records metrics and load when it ends
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use pylon_proxy_metrics::{Direction, Metrics, TargetLabels, Tls};
use tokio::net::TcpStream;

use crate::access_log::AccessEntry;
use crate::args::ProxyArgs;
use crate::detect::{self, Protocol};
use crate::discovery::{Discovery, Logical};
use crate::http::client::Http1Client;
use crate::http::forward::{fail_before_endpoint, request_authority, Forward};
use crate::http::{server, ProxyError, ProxyResponse};
use crate::io::{CountingIo, PrefixedIo};
use crate::orig_dst::original_dst;
use crate::shutdown::Shutdown;
use crate::tcp;

pub struct Outbound {
    args: Arc<ProxyArgs>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    h1: Http1Client,
    access_log: bool,
    shutdown: Shutdown,
}

impl Outbound {
    pub fn new(
        args: Arc<ProxyArgs>,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        access_log: bool,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let h1 = Http1Client::new(args.connect_timeout);
        Arc::new(Self {
            args,
            discovery,
            metrics,
            h1,
            access_log,
            shutdown,
        })
    }

    pub async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        // 1. Where the workload meant to go, if iptables sent it here.
        let orig_dst = original_dst(&stream, local);
        let dialled = match orig_dst {
            Some(addr) => Some(self.discovery.resolve_addr(addr).await),
            None => None,
        };

        // 2. What it speaks.
        let opaque = orig_dst.is_some_and(|d| self.args.is_opaque_port(d.port()));
        let (protocol, prefix) = if opaque {
            (Protocol::Tcp, Bytes::new())
        } else {
            match detect::detect(&mut stream, self.args.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(client = %peer, error = %e, "connection closed during detection");
                    return;
                }
            }
        };
        let io = PrefixedIo::new(prefix, stream);

        match protocol {
            // 3a. Opaque TCP: only the dialled address says where it goes.
            Protocol::Tcp => match dialled {
                Some(logical) => self.forward_tcp(io, &logical).await,
                None => tracing::warn!(
                    client = %peer,
                    "opaque connection to the outbound listener has no original destination; closing"
                ),
            },
            // 3b. HTTP: every request finds its own destination.
            Protocol::Http1 | Protocol::H2 => {
                let target = orig_dst.unwrap_or(local).to_string();
                let authority = dialled
                    .as_ref()
                    .map(|l| l.authority.clone())
                    .unwrap_or_else(|| "".into());
                let conn_metrics = self
                    .metrics
                    .tcp_target(TargetLabels {
                        direction: Direction::Outbound,
                        authority,
                        target_addr: target.into(),
                        tls: Tls::NoIdentity("not_provided_by_service_discovery"),
                        dst_service: None,
                        dst_namespace: None,
                        srv_port: None,
                    })
                    .open();
                let io = CountingIo::new(io, conn_metrics);
                let svc = OutboundHttp {
                    outbound: self.clone(),
                    dialled,
                };
                if protocol == Protocol::H2 {
                    server::serve_h2(io, svc, &self.shutdown).await
                } else {
                    server::serve_http1(io, svc, &self.shutdown).await
                }
            }
            Protocol::MalformedHttp1 => server::reject_malformed(io, peer).await,
        }
    }

    async fn forward_tcp(&self, io: PrefixedIo<TcpStream>, logical: &Logical) {
        let Some(endpoint) = logical.pick() else {
            tracing::warn!(destination = %logical.authority, error = %ProxyError::NoEndpoints, "closing opaque connection");
            return;
        };
        let _in_flight = endpoint.load_handle().start();
        if let Err(e) =
            tcp::forward(io, endpoint.addr, self.args.connect_timeout, endpoint.tcp()).await
        {
            tracing::warn!(destination = %logical.authority, endpoint = %endpoint.addr, error = %e, "opaque connection failed");
        }
    }

    /// One request, from the logical destination to the endpoint's response.
    async fn proxy(&self, dialled: Option<&Arc<Logical>>, req: Request<Incoming>) -> ProxyResponse {
        let start = Instant::now();

        // The logical destination: the address the app dialled, else the name it asked for.
        let logical = match dialled {
            Some(l) => l.clone(),
            None => {
                let Some(authority) = request_authority(&req) else {
                    let err = ProxyError::MissingAuthority;
                    tracing::warn!(error = %err, "request names no destination");
                    return err.response();
                };
                match self.discovery.resolve_authority(&authority).await {
                    Ok(l) => l,
                    Err(err) => {
                        tracing::warn!(destination = %authority, error = %err, "proxy error response {}", err.status().as_u16());
                        return err.response();
                    }
                }
            }
        };
        let access = self
            .access_log
            .then(|| AccessEntry::new("outbound", &req, &logical.authority));

        // The endpoint: P2C over PeakEWMA; none at all fails fast.
        let Some(endpoint) = logical.pick() else {
            return fail_before_endpoint(
                "outbound",
                &logical.authority,
                logical.no_endpoint_metrics(),
                ProxyError::NoEndpoints,
                start,
                access,
            );
        };

        Forward {
            direction: "outbound",
            destination: &logical.authority,
            endpoint: endpoint.addr,
            endpoint_authority: &endpoint.authority,
            h1: &self.h1,
            h2: &endpoint.h2,
            metrics: &endpoint.http,
            response_timeout: self.args.response_timeout,
            connect_timeout: self.args.connect_timeout,
            tasks: self.shutdown.tracker(),
            in_flight: Some(endpoint.load_handle().start()),
            access,
            start,
        }
        .send(req)
        .await
    }
}

/// The hyper service for one outbound client connection.
#[derive(Clone)]
struct OutboundHttp {
    outbound: Arc<Outbound>,
    dialled: Option<Arc<Logical>>,
}

impl hyper::service::Service<Request<Incoming>> for OutboundHttp {
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.outbound.proxy(this.dialled.as_ref(), req).await) })
    }
}
