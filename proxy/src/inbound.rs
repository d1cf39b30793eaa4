//! The inbound path: traffic to the workload, and this file is the whole journey.
//!
//! ```text
//! accept ─ target: 127.0.0.1:<original port> when iptables redirected it, else --inbound-forward
//!        ─ detect protocol (skipped for opaque ports)
//!        ├ opaque TCP ─ copy bytes to the target
//!        └ HTTP/1 or h2 server connection, then per request:
//!            proxy errors → responses
//!            ─ target: the workload's port; metrics by the authority requested
//!            ─ route (the workload's own ServiceProfile): route metrics and classification
//!            ─ tap (while tapped)
//!            ─ metrics (recorded when the response body ends) ─ response timeout
//!            ─ the app, over a pooled h1 or multiplexed h2 client
//! ```

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use http::Request;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use pylon_proxy_metrics::{Direction, HttpTarget, Metrics, Peer, TargetLabels, TcpTarget, Tls};
use pylon_proxy_policy::Store;
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use crate::args::ProxyArgs;
use crate::authz::InboundAuthz;
use crate::detect::{self, Protocol};
use crate::http::client::{EndpointClient, EndpointTarget};
use crate::http::errors::RespondLayer;
use crate::http::headers::request_authority;
use crate::http::metrics::HttpMetricsLayer;
use crate::http::route::RouteLayer;
use crate::http::tap::{TapLayer, Telemetry};
use crate::http::timeout::ResponseTimeoutLayer;
use crate::http::{server, HttpStack};
use crate::io::CountingIo;
use crate::mesh_tls::MeshTls;
use crate::orig_dst::original_dst;
use crate::profiles::{DestinationRoutes, Profiles};
use crate::shutdown::Shutdown;
use crate::tcp;
use pylon_tap_server::Direction as TapDirection;

const NO_TLS: Tls = Tls::NoIdentity("no_tls_from_remote");
/// Bound on per-authority metric handles per port (authorities come from clients).
const MAX_AUTHORITIES: usize = 1_000;

pub struct Inbound {
    args: Arc<ProxyArgs>,
    forward: Option<SocketAddr>,
    store: Arc<Store>,
    profiles: Arc<Profiles>,
    metrics: Arc<Metrics>,
    client: EndpointClient,
    ports: Mutex<HashMap<SocketAddr, Arc<AppPort>>>,
    telemetry: Telemetry,
    mesh_tls: Option<Arc<MeshTls>>,
    authz: Arc<InboundAuthz>,
    shutdown: Shutdown,
}

/// One port of the workload: its connections and metric handles.
struct AppPort {
    target_label: Arc<str>,
    /// Connections accepted for this port (`peer="src"`).
    tcp: TcpTarget,
    /// Opaque connections to the app (`peer="dst"`), made on first use.
    tcp_to_app: OnceLock<TcpTarget>,
    /// Requests are recorded by the authority they name (as sent), each with a target that
    /// names it too.
    by_authority: ArcSwap<HashMap<Box<[u8]>, AuthorityTarget>>,
    /// For requests that name no authority.
    unnamed: AuthorityTarget,
}

/// Where requests naming one authority go, and their routes.
#[derive(Clone)]
struct AuthorityTarget {
    target: EndpointTarget,
    routes: Arc<DestinationRoutes>,
}

impl Inbound {
    pub fn new(
        args: Arc<ProxyArgs>,
        forward: Option<SocketAddr>,
        store: Arc<Store>,
        profiles: Arc<Profiles>,
        metrics: Arc<Metrics>,
        telemetry: Telemetry,
        mesh_tls: Option<Arc<MeshTls>>,
        authz: Arc<InboundAuthz>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let client = EndpointClient::new(args.connect_timeout, shutdown.tracker().clone());
        Arc::new(Self {
            args,
            forward,
            store,
            profiles,
            metrics,
            client,
            ports: Mutex::new(HashMap::new()),
            telemetry,
            mesh_tls,
            authz,
            shutdown,
        })
    }

    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
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
        let port = self.app_port(addr);

        // 2. What the client speaks.
        let opaque = self.args.is_opaque_port(addr.port());
        let Some((protocol, io)) =
            detect::accept(stream, opaque, self.args.detect_timeout, peer).await
        else {
            return;
        };

        match protocol {
            Protocol::Tcp => {
                let io = CountingIo::new(io, port.tcp.open());
                let to_app = port.tcp_to_app.get_or_init(|| {
                    self.metrics.tcp_target(
                        self.labels("".into(), &port.target_label)
                            .with_peer(Peer::Dst),
                    )
                });
                if let Err(e) = tcp::forward(io, addr, self.args.connect_timeout, to_app).await {
                    tracing::warn!(client = %peer, target = %addr, error = %e, "inbound opaque connection failed");
                }
            }
            Protocol::Http1 | Protocol::H2 => {
                let io = CountingIo::new(io, port.tcp.open());
                let svc = TowerToHyperService::new(self.http_stack(port, peer));
                server::serve(protocol == Protocol::H2, io, svc, &self.shutdown).await
            }
            Protocol::MalformedHttp1 => server::reject_malformed(io, peer).await,
        }
    }

    /// The path of one inbound HTTP request, top to bottom.
    fn http_stack(self: &Arc<Self>, port: Arc<AppPort>, client: SocketAddr) -> impl HttpStack {
        let this = self.clone();
        ServiceBuilder::new()
            // Proxy errors from any layer below become responses with `pylon-proxy-error`.
            .layer(RespondLayer)
            // The workload's port is the target; metrics are kept by the authority requested.
            .map_request(move |mut req: Request<Incoming>| {
                let AuthorityTarget { target, routes } =
                    this.target_for(&port, request_authority(&req));
                req.extensions_mut().insert(target);
                req.extensions_mut().insert(routes);
                req
            })
            // route_request_total & co. by the workload's own ServiceProfile routes.
            .layer(RouteLayer)
            // Tap events, only while someone taps.
            .layer(TapLayer::new(
                self.telemetry.taps.clone(),
                TapDirection::Inbound,
                client,
            ))
            // request_total, response_total, response_latency_ms and the access log.
            .layer(HttpMetricsLayer::new("inbound", self.telemetry.access_log))
            .layer(ResponseTimeoutLayer::new(self.args.response_timeout))
            // Pooled HTTP/1 or multiplexed h2 to the app; upgrades and CONNECT tunnel.
            .service(self.client.clone())
    }

    fn app_port(&self, addr: SocketAddr) -> Arc<AppPort> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .entry(addr)
            .or_insert_with(|| {
                let target_label: Arc<str> = addr.to_string().into();
                let tcp = self
                    .metrics
                    .tcp_target(self.labels("".into(), &target_label).with_peer(Peer::Src));
                let unnamed = AuthorityTarget {
                    target: EndpointTarget::new(
                        addr,
                        target_label.clone(),
                        self.http_metrics(&target_label, &target_label),
                        self.args.connect_timeout,
                    ),
                    routes: self.profiles.destination(
                        Direction::Inbound,
                        target_label.clone(),
                        None,
                    ),
                };
                Arc::new(AppPort {
                    target_label,
                    tcp,
                    tcp_to_app: OnceLock::new(),
                    by_authority: ArcSwap::from_pointee(HashMap::new()),
                    unnamed,
                })
            })
            .clone()
    }

    fn labels(&self, authority: Arc<str>, target: &Arc<str>) -> TargetLabels {
        TargetLabels {
            direction: Direction::Inbound,
            peer: None,
            authority,
            target_addr: target.clone(),
            tls: NO_TLS,
            dst_service: None,
            dst_namespace: None,
            srv_port: None,
        }
    }

    fn http_metrics(&self, authority: &Arc<str>, target_label: &Arc<str>) -> HttpTarget {
        self.metrics
            .http_target(self.labels(authority.clone(), target_label))
    }

    /// The metric handle, target and routes for `authority` on `port`, made once per
    /// authority. All authorities of a port share its connections.
    fn target_for(&self, port: &AppPort, authority: Option<&[u8]>) -> AuthorityTarget {
        let Some(authority) = authority else {
            return port.unnamed.clone();
        };
        if let Some(t) = port.by_authority.load().get(authority) {
            return t.clone();
        }
        let name: Arc<str> = String::from_utf8_lossy(authority).into();
        let metrics = self.http_metrics(&name, &port.target_label);
        let profile_name = self.profile_name(&name);
        let target = AuthorityTarget {
            target: port.unnamed.target.named(name.clone(), metrics),
            routes: self
                .profiles
                .destination(Direction::Inbound, name, profile_name),
        };
        port.by_authority.rcu(|map| {
            let mut map = if map.len() >= MAX_AUTHORITIES {
                HashMap::new()
            } else {
                HashMap::clone(map)
            };
            map.insert(authority.into(), target.clone());
            map
        });
        target
    }

    /// The ServiceProfile that describes requests for `authority`: the workload's own
    /// service's FQDN when the authority names a Service (`web`, `web.default:80`, ...), else
    /// the host as written.
    fn profile_name(&self, authority: &str) -> Option<String> {
        let parsed = http::uri::Authority::try_from(authority).ok()?;
        let host = parsed.host();
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            return None;
        }
        let port = parsed.port_u16().unwrap_or(80);
        let snapshot = self.store.snapshot();
        Some(match snapshot.resolve_name(host, port) {
            Some(resolved) => resolved.service.fqdn(&self.args.cluster_domain),
            None => host.to_ascii_lowercase(),
        })
    }
}
