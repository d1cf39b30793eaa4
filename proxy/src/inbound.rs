//! The inbound path: traffic to the workload, and this file is the whole journey.
//!
//! ```text
//! accept ─ target: 127.0.0.1:<original port> when iptables redirected it, else --inbound-forward
//!        ─ detect protocol (skipped for opaque ports)
//!        ├ opaque TCP ─ copy bytes to the target
//!        └ HTTP/1 or h2 server connection, then per request:
//!            inbound metrics (by authority) ─ the app, over a pooled h1 or multiplexed h2 client
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::Authority;
use http::Request;
use hyper::body::Incoming;
use pylon_proxy_metrics::{Direction, HttpTarget, Metrics, TargetLabels, TcpTarget, Tls};
use tokio::net::TcpStream;

use crate::access_log::AccessEntry;
use crate::args::ProxyArgs;
use crate::detect::{self, Protocol};
use crate::http::client::{H2Connection, Http1Client};
use crate::http::forward::{request_authority, Forward};
use crate::http::{server, ProxyResponse};
use crate::io::{CountingIo, PrefixedIo};
use crate::orig_dst::original_dst;
use crate::shutdown::Shutdown;
use crate::tcp;

const NO_TLS: Tls = Tls::NoIdentity("no_tls_from_remote");
/// Bound on per-authority metric handles per target (authorities come from clients).
const MAX_AUTHORITIES: usize = 1_000;

pub struct Inbound {
    args: Arc<ProxyArgs>,
    forward: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    h1: Http1Client,
    targets: Mutex<HashMap<SocketAddr, Arc<AppTarget>>>,
    access_log: bool,
    shutdown: Shutdown,
}

/// One port of the workload, with its connection and metric handles.
struct AppTarget {
    addr: SocketAddr,
    authority: Authority,
    target_label: Arc<str>,
    h2: H2Connection,
    tcp: TcpTarget,
    by_authority: ArcSwap<HashMap<Authority, HttpTarget>>,
}

impl Inbound {
    pub fn new(
        args: Arc<ProxyArgs>,
        forward: Option<SocketAddr>,
        metrics: Arc<Metrics>,
        access_log: bool,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let h1 = Http1Client::new(args.connect_timeout);
        Arc::new(Self {
            args,
            forward,
            metrics,
            h1,
            targets: Mutex::new(HashMap::new()),
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
        // 1. Which port of the workload this is for.
        let addr = match (original_dst(&stream, local), self.forward) {
            (Some(orig), _) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), orig.port()),
            (None, Some(fwd)) => fwd,
            (None, None) => {
                tracing::warn!(client = %peer, "inbound connection was not redirected and --inbound-forward is not set; closing");
                return;
            }
        };
        let target = self.target(addr);

        // 2. What the client speaks.
        let (protocol, prefix) = if self.args.is_opaque_port(addr.port()) {
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
            Protocol::Tcp => {
                if let Err(e) = tcp::forward(io, addr, self.args.connect_timeout, &target.tcp).await
                {
                    tracing::warn!(client = %peer, target = %addr, error = %e, "inbound opaque connection failed");
                }
            }
            Protocol::Http1 | Protocol::H2 => {
                let io = CountingIo::new(io, target.tcp.open());
                let svc = InboundHttp {
                    inbound: self.clone(),
                    target,
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

    fn target(&self, addr: SocketAddr) -> Arc<AppTarget> {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets
            .entry(addr)
            .or_insert_with(|| {
                let target_label: Arc<str> = addr.to_string().into();
                let tcp = self
                    .metrics
                    .tcp_target(self.labels("".into(), &target_label));
                Arc::new(AppTarget {
                    addr,
                    authority: Authority::try_from(addr.to_string().as_str())
                        .unwrap_or_else(|_| Authority::from_static("localhost")),
                    target_label,
                    h2: H2Connection::new(addr, self.args.connect_timeout),
                    tcp,
                    by_authority: ArcSwap::from_pointee(HashMap::new()),
                })
            })
            .clone()
    }

    fn labels(&self, authority: Arc<str>, target: &Arc<str>) -> TargetLabels {
        TargetLabels {
            direction: Direction::Inbound,
            authority,
            target_addr: target.clone(),
            tls: NO_TLS,
            dst_service: None,
            dst_namespace: None,
            srv_port: None,
        }
    }

    /// The metric handle for `authority` on `target`, resolved once per authority.
    fn http_metrics(&self, target: &AppTarget, authority: Option<&Authority>) -> HttpTarget {
        let key = authority
            .cloned()
            .unwrap_or_else(|| target.authority.clone());
        if let Some(h) = target.by_authority.load().get(&key) {
            return h.clone();
        }
        let handle = self
            .metrics
            .http_target(self.labels(key.as_str().into(), &target.target_label));
        target.by_authority.rcu(|map| {
            let mut map = if map.len() >= MAX_AUTHORITIES {
                HashMap::new()
            } else {
                HashMap::clone(map)
            };
            map.insert(key.clone(), handle.clone());
            map
        });
        handle
    }

    async fn proxy(&self, target: &AppTarget, req: Request<Incoming>) -> ProxyResponse {
        let start = Instant::now();
        let authority = request_authority(&req);
        let metrics = self.http_metrics(target, authority.as_ref());
        let destination = authority
            .as_ref()
            .map(|a| a.as_str())
            .unwrap_or(target.authority.as_str());
        let access = self
            .access_log
            .then(|| AccessEntry::new("inbound", &req, destination));
        Forward {
            direction: "inbound",
            destination,
            endpoint: target.addr,
            endpoint_authority: &target.authority,
            h1: &self.h1,
            h2: &target.h2,
            metrics: &metrics,
            response_timeout: self.args.response_timeout,
            connect_timeout: self.args.connect_timeout,
            tasks: self.shutdown.tracker(),
            in_flight: None,
            access,
            start,
        }
        .send(req)
        .await
    }
}

#[derive(Clone)]
struct InboundHttp {
    inbound: Arc<Inbound>,
    target: Arc<AppTarget>,
}

impl hyper::service::Service<Request<Incoming>> for InboundHttp {
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.inbound.proxy(&this.target, req).await) })
    }
}
