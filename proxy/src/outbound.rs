//! The outbound path: the workload calls out, and this file is the whole journey.
//!
//! ```text
//! accept ─ original destination (SO_ORIGINAL_DST) when iptables redirected the connection
//!        ─ detect protocol (skipped for opaque ports)
//!        ├ opaque TCP ─ logical destination of the dialled address ─ balancer
//!        │            ─ connect (mesh TLS to a meshed endpoint) ─ copy bytes
//!        └ HTTP/1 or h2 server connection, then per request the stack in `http_stack`:
//!            proxy errors → responses (gRPC errors for gRPC clients)
//!            ─ tap of the responses made above the attempts (while tapped)
//!            ─ validate the request head ─ hop limit (loops through other proxies)
//!            ─ logical destination (dialled address, else Host / :authority / absolute URI)
//!            ─ route (the destination's ServiceProfile): route metrics and classification
//!            ─ route timeout (retries included) ─ retries within the retry budget
//!            ─ traffic split: each attempt's backend by weight ─ per-attempt route metrics
//!            ─ tap (while tapped) ─ balancer: P2C over PeakEWMA across the live endpoints
//!            ─ metrics (recorded when the response body ends) ─ response timeout
//!            ─ endpoint client (pooled h1 or multiplexed h2; to a meshed endpoint, mesh TLS
//!              and h2, HTTP/1 requests upgraded to h2 with `l5d-orig-proto`)
//! ```
//!
//! An endpoint is meshed when discovery names its identity (the EndpointSlice's
//! `pylon.io/identity`) and this proxy has one (`--identity-dir`); discovery decides that once
//! per endpoint, and its connections, TLS included, belong to it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use pylon_proxy_metrics::{Direction, Metrics, Peer, TargetLabels, TcpConnMetrics, Tls};
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use crate::args::ProxyArgs;
use crate::balance::{connect_with_failover, BalanceLayer, Connected};
use crate::detect::{self, Protocol};
use crate::discovery::{Discovery, Logical, LogicalLayer};
use crate::http::client::EndpointClient;
use crate::http::errors::RespondLayer;
use crate::http::hops::HopLimit;
use crate::http::metrics::HttpMetricsLayer;
use crate::http::request_body::RequestBody;
use crate::http::retry::RetryLayer;
use crate::http::route::{RouteActualLayer, RouteLayer};
use crate::http::tap::{TapLayer, TapRescueLayer, Telemetry};
use crate::http::timeout::{ResponseTimeoutLayer, RouteTimeoutLayer};
use crate::http::validate::ValidateRequest;
use crate::http::{server, HttpStack, ProxyError, StackService};
use crate::io::CountingIo;
use crate::mesh_tls::Alpn;
use crate::orig_dst::original_dst;
use crate::shutdown::Shutdown;
use crate::split::SplitLayer;
use crate::tcp;
use pylon_tap_server::Direction as TapDirection;

pub struct Outbound {
    args: Arc<ProxyArgs>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    client: EndpointClient,
    telemetry: Telemetry,
    shutdown: Shutdown,
}

impl Outbound {
    pub fn new(
        args: Arc<ProxyArgs>,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        telemetry: Telemetry,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let client = EndpointClient::new(args.connect_timeout, shutdown.tracker().clone());
        Arc::new(Self {
            args,
            discovery,
            metrics,
            client,
            telemetry,
            shutdown,
        })
    }

    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        // 1. Where the workload meant to go, if iptables sent it here.
        let orig_dst = original_dst(&stream, local);
        let dialled = match orig_dst {
            Some(addr) => Some(self.discovery.resolve_addr(addr).await),
            None => None,
        };

        // 2. What it speaks (nothing to detect on an opaque port, or where the control plane
        // says the destination is opaque).
        let opaque = orig_dst.is_some_and(|d| self.args.is_opaque_port(d.port()))
            || dialled
                .as_ref()
                .is_some_and(|l| l.opaque.load(std::sync::atomic::Ordering::Relaxed));
        let Some((protocol, io)) =
            detect::accept(stream, opaque, self.args.detect_timeout, peer).await
        else {
            return;
        };

        match protocol {
            // 3a. Opaque TCP: only the dialled address says where it goes.
            Protocol::Tcp => match dialled {
                Some(logical) => {
                    let io = CountingIo::new(io, self.accepted(Some(&logical), orig_dst, local));
                    self.forward_tcp(io, &logical).await
                }
                None => crate::warn_limited!(
                    "no_destination",
                    client = %peer,
                    "opaque connection to the outbound listener has no original destination; closing"
                ),
            },
            // 3b. HTTP: each request goes down the stack below.
            Protocol::Http1 | Protocol::H2 => {
                let io = CountingIo::new(io, self.accepted(dialled.as_ref(), orig_dst, local));
                let svc = StackService::new(self.http_stack(dialled, peer));
                server::serve(protocol == Protocol::H2, io, svc, &self.shutdown)
            }
            Protocol::MalformedHttp1 => server::reject_malformed(io, peer).await,
        }
    }

    /// The path of one outbound HTTP request, top to bottom.
    fn http_stack(&self, dialled: Option<Arc<Logical>>, client: SocketAddr) -> impl HttpStack {
        ServiceBuilder::new()
            // The request's context (`RequestCtx`) rides in its body from here down.
            .map_request(|req: Request<Incoming>| req.map(RequestBody::streaming))
            // Proxy errors from any layer below become responses with `pylon-proxy-error`
            // (gRPC errors for gRPC clients).
            .layer(RespondLayer)
            // While tapped: the responses made above the attempts (a route timeout, a refusal
            // below) reach the tap too.
            .layer(TapRescueLayer::new(
                self.telemetry.taps.clone(),
                TapDirection::Outbound,
                client,
                None,
            ))
            // 400 for what hyper lets through but the RFCs call malformed (two Hosts, ...), 431
            // for a head over 64 KiB; then 508 for a request that has crossed too many proxies
            // (a chain forwarding in a loop).
            .layer(ValidateRequest::layer("outbound").and(HopLimit::layer("outbound")))
            // The logical destination: the dialled address, else the request's authority.
            .layer(LogicalLayer::new(self.discovery.clone(), dialled))
            // The route: first match in the destination's ServiceProfile, else [DEFAULT];
            // route_request_total & co. once per request.
            .layer(RouteLayer)
            // The route's timeout bounds the request and all its retries.
            .layer(RouteTimeoutLayer)
            // Failed attempts on retryable routes go again, within the retry budget.
            .layer(RetryLayer)
            // Each attempt's backend: by weight (TrafficSplit or dstOverrides), else itself.
            .layer(SplitLayer)
            // route_actual_request_total & co. once per attempt, by backend.
            .layer(RouteActualLayer)
            // The endpoint: P2C over PeakEWMA across the destination's live endpoints.
            // Tap events for this attempt, only while someone taps.
            .layer(TapLayer::new(
                self.telemetry.taps.clone(),
                TapDirection::Outbound,
                client,
            ))
            .layer(BalanceLayer::new(self.telemetry.access_log))
            // request_total, response_total, response_latency_ms and the access log.
            .layer(HttpMetricsLayer::new("outbound", self.telemetry.access_log))
            .layer(ResponseTimeoutLayer::new(self.args.response_timeout))
            // Pooled HTTP/1 or multiplexed h2 to the endpoint (mesh TLS and h2 to a meshed
            // one); upgrades and CONNECT tunnel.
            .service(self.client.clone())
    }

    /// `tcp_*` metrics of the client's connection (`peer="src"`).
    fn accepted(
        &self,
        dialled: Option<&Arc<Logical>>,
        orig_dst: Option<SocketAddr>,
        local: SocketAddr,
    ) -> TcpConnMetrics {
        self.metrics
            .tcp_target(TargetLabels {
                direction: Direction::Outbound,
                peer: Some(Peer::Src),
                authority: dialled
                    .map(|l| l.authority.clone())
                    .unwrap_or_else(|| "".into()),
                target_addr: orig_dst.unwrap_or(local).to_string().into(),
                tls: Tls::NoIdentity("not_provided_by_service_discovery"),
                dst_service: None,
                dst_namespace: None,
                dst_labels: None,
                srv_port: None,
            })
            .open()
    }

    async fn forward_tcp<I>(&self, io: I, logical: &Logical)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let first = match logical.pick() {
            Ok(e) => e,
            Err(e) => {
                let err = ProxyError::from(e);
                crate::warn_limited!("proxy_error", destination = %logical.authority, error = %err, "closing opaque connection");
                return;
            }
        };
        // Over mesh TLS when the endpoint is meshed (its handshake failure is a connect
        // failure). Nothing of the client's has been sent yet, so a refusing endpoint is
        // replaced by another.
        let connected = connect_with_failover(logical, first, &mut Vec::new(), |e| async move {
            e.connect
                .connect(Alpn::Opaque)
                .await
                .map_err(|err| ProxyError::from_connect(&err))
        })
        .await;
        match connected {
            Ok(Connected {
                endpoint,
                mut in_flight,
                conn,
            }) => {
                // Only the connect can fail here; what flows afterwards is the app's business.
                // The connect time is its latency; it stays pending (load) while it lasts.
                in_flight.response_received();
                in_flight.finished(true);
                tcp::splice(io, conn, endpoint.addr).await;
                drop(in_flight);
            }
            Err((err, endpoint)) => {
                let names = endpoint.target.names();
                crate::warn_limited!(
                    "tcp_connect_failed",
                    destination = %logical.authority,
                    endpoint = %endpoint.addr,
                    endpoint_pod = names.pod(),
                    endpoint_workload = names.workload(),
                    endpoint_namespace = names.namespace(),
                    error = %err,
                    "opaque connection failed"
                );
            }
        }
    }
}
