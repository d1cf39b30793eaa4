//! The inbound path: traffic to the workload, and this file is the whole journey.
//!
//! ```text
//! accept ─ target: 127.0.0.1:<original port> when iptables redirected it, else --inbound-forward
//!        ─ mesh TLS (with --identity-dir): a ClientHello naming this identity is terminated,
//!          the client's identity learnt; other TLS passes through as opaque
//!        ─ detect protocol (skipped for opaque ports and ALPN h2)
//!        ─ authorize the client on this port (the inbound policy)
//!        ├ opaque TCP ─ closed if denied, else copy bytes to the target
//!        └ HTTP/1 or h2 server connection, then per request:
//!            proxy errors → responses (gRPC errors for gRPC clients)
//!            ─ tap of the responses made above the app's (while tapped)
//!            ─ validate the request head ─ hop limit (loops through other proxies)
//!            ─ authorize (403 if denied; decided again after a policy change)
//!            ─ l5d-orig-proto: back to the HTTP/1 another proxy carried over h2
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
use pylon_proxy_metrics::{Direction, HttpTarget, Metrics, Peer, TargetLabels, TcpTarget, Tls};
use pylon_proxy_policy::{ProxyProtocol, Store};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use crate::args::ProxyArgs;
use crate::authz::{Client, ConnectionAuthz, InboundAuthz};
use crate::detect::{self, Protocol};
use crate::http::authorize::Authorize;
use crate::http::client::{EndpointClient, EndpointTarget};
use crate::http::ctx::WithCtx;
use crate::http::errors::RespondLayer;
use crate::http::headers::request_authority;
use crate::http::hops::HopLimit;
use crate::http::metrics::HttpMetricsLayer;
use crate::http::request_body::RequestBody;
use crate::http::route::RouteLayer;
use crate::http::tap::{TapLayer, TapRescueLayer, Telemetry};
use crate::http::timeout::ResponseTimeoutLayer;
use crate::http::validate::ValidateRequest;
use crate::http::{orig_proto, server, HttpStack, StackService};
use crate::io::{CountingIo, PrefixedIo};
use crate::mesh_tls::MeshTls;
use crate::names::AuthorityMap;
use crate::orig_dst::original_dst;
use crate::profiles::{DestinationRoutes, Profiles};
use crate::shutdown::Shutdown;
use crate::tcp;
use pylon_tap_server::Direction as TapDirection;

/// How long an opaque port waits for a meshed client's ClientHello (see `serve_connection`).
const OPAQUE_TLS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Bound on per-authority metric handles per port (authorities come from clients).
const MAX_AUTHORITIES: usize = 1_000;

pub struct Inbound {
    args: Arc<ProxyArgs>,
    forward: Option<SocketAddr>,
    store: Arc<Store>,
    profiles: Arc<Profiles>,
    metrics: Arc<Metrics>,
    client: EndpointClient,
    ports: Mutex<HashMap<(SocketAddr, Tls), Arc<AppPort>>>,
    telemetry: Telemetry,
    mesh_tls: Option<Arc<MeshTls>>,
    authz: Arc<InboundAuthz>,
    shutdown: Shutdown,
}

/// One port of the workload: its connections and metric handles.
struct AppPort {
    target_label: Arc<str>,
    /// The TLS status of the clients this state is for (`tls`, `client_id` labels).
    tls: Tls,
    /// Connections accepted for this port (`peer="src"`).
    tcp: TcpTarget,
    /// Opaque connections to the app (`peer="dst"`), made on first use.
    tcp_to_app: OnceLock<TcpTarget>,
    /// Requests are recorded by the authority they name (as sent), each with a target that
    /// names it too.
    by_authority: ArcSwap<AuthorityMap<AuthorityTarget>>,
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
    #[allow(clippy::too_many_arguments)] // one per collaborator, wired once in app.rs
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
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        // 1. Which port of the workload this is for.
        let addr = match (original_dst(&stream, local), self.forward) {
            (Some(orig), _) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), orig.port()),
            (None, Some(fwd)) => fwd,
            (None, None) => {
                crate::warn_limited!("no_destination", client = %peer, "inbound connection was not redirected and --inbound-forward is not set; closing");
                return;
            }
        };
        // Opaque by flag (Linkerd's server-speaks-first defaults) or by a Server's protocol.
        let opaque = self.args.is_opaque_port(addr.port())
            || self.authz.declared_protocol(addr.port()) == ProxyProtocol::Opaque;

        // 2. Mesh TLS from another proxy: terminate it and learn the client's identity.
        let Some(mesh_tls) = self.mesh_tls.clone() else {
            return self
                .detect_and_serve(addr, Client::plain(peer), opaque, stream)
                .await;
        };
        // A meshed client's proxy sends its ClientHello as soon as it connects; on opaque
        // (server-speaks-first) ports an unmeshed client says nothing, so it waits at most
        // OPAQUE_TLS_WAIT for the app's greeting instead of the whole detect timeout.
        let wait = if opaque {
            self.args.detect_timeout.min(OPAQUE_TLS_WAIT)
        } else {
            self.args.detect_timeout
        };
        let (tls, prefix) = match detect::detect_tls(&mut stream, wait).await {
            Ok(sniffed) => sniffed,
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "connection closed during detection");
                return;
            }
        };
        if !tls && prefix.is_empty() {
            // Silent until the wait ended: a server-speaks-first protocol, opaque from here.
            let io = PrefixedIo::new(prefix, stream);
            return self
                .serve_app(addr, Client::plain(peer), Protocol::Tcp, io)
                .await;
        }
        // Only a ClientHello naming this proxy's identity is mesh TLS to terminate (Linkerd
        // decides by SNI too); TLS for another name (or none) is the app's own, passed through
        // untouched as opaque TCP from an unauthenticated client.
        let sni = tls
            .then(|| pylon_identity::client_hello_sni(&prefix))
            .flatten();
        let ours =
            sni.is_some_and(|sni| sni.eq_ignore_ascii_case(mesh_tls.local_identity().as_str()));
        if tls && !ours {
            tracing::debug!(client = %peer, sni, "TLS not for this proxy's identity; passing it through");
        }
        let io = PrefixedIo::new(prefix, stream);
        if !ours {
            return self
                .detect_and_serve(addr, Client::plain(peer), opaque || tls, io)
                .await;
        }
        let (io, accepted) = match mesh_tls.accept(io, peer).await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::info!(client = %peer, error = %e, "mesh TLS handshake failed; closing");
                return;
            }
        };
        let client = Client {
            addr: peer,
            tls: true,
            id: accepted.client_id,
        };
        if accepted.h2 {
            // ALPN said h2: no detection needed.
            return self.serve_app(addr, client, Protocol::H2, io).await;
        }
        self.detect_and_serve(addr, client, opaque, io).await
    }

    async fn detect_and_serve<I>(
        self: Arc<Self>,
        addr: SocketAddr,
        client: Client,
        opaque: bool,
        io: I,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some((protocol, io)) =
            detect::accept(io, opaque, self.args.detect_timeout, client.addr).await
        else {
            return;
        };
        self.serve_app(addr, client, protocol, io).await
    }

    /// 3. Authorization, then the connection's protocol to the app.
    async fn serve_app<I>(
        self: Arc<Self>,
        addr: SocketAddr,
        client: Client,
        protocol: Protocol,
        io: I,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let port = self.app_port(addr, client.tls_label());
        let generation = self.authz.generation();
        let decide = || self.authz.decide(addr.port(), &client, &port.target_label);
        match protocol {
            Protocol::Tcp => {
                let decision = decide();
                decision.count_tcp();
                if !decision.allowed {
                    return;
                }
                let io = CountingIo::new(io, port.tcp.open());
                let to_app = port.tcp_to_app.get_or_init(|| {
                    self.metrics.tcp_target(
                        self.labels("".into(), &port.target_label, port.tls.clone())
                            .with_peer(Peer::Dst),
                    )
                });
                if let Err(e) = tcp::forward(io, addr, self.args.connect_timeout, to_app).await {
                    crate::warn_limited!("tcp_connect_failed", client = %client.addr, target = %addr, error = %e, "inbound opaque connection failed");
                }
            }
            Protocol::Http1 | Protocol::H2 => {
                let decision = decide();
                let io = CountingIo::new(io, port.tcp.open());
                // Denied clients are still served, so each request gets its 403 (and a policy
                // change can let the next one through).
                let authz = ConnectionAuthz::new(
                    self.authz.clone(),
                    generation,
                    addr.port(),
                    client.clone(),
                    port.target_label.clone(),
                    &decision,
                );
                let svc = StackService::new(self.http_stack(port, client.addr, authz));
                server::serve(protocol == Protocol::H2, io, svc, &self.shutdown)
            }
            Protocol::MalformedHttp1 => server::reject_malformed(io, client.addr).await,
        }
    }

    /// The path of one inbound HTTP request, top to bottom.
    fn http_stack(
        self: &Arc<Self>,
        port: Arc<AppPort>,
        client: SocketAddr,
        authz: Arc<ConnectionAuthz>,
    ) -> impl HttpStack {
        let this = self.clone();
        let client_tls = authz.client_tls();
        ServiceBuilder::new()
            // The request's context (`RequestCtx`) rides in its body from here down.
            .map_request(|req: Request<Incoming>| req.map(RequestBody::streaming))
            // Proxy errors from any layer below become responses with `pylon-proxy-error`
            // (gRPC errors for gRPC clients).
            .layer(RespondLayer)
            // While tapped: the responses made above the app's (a 403, a refusal) reach the
            // tap too.
            .layer(
                TapRescueLayer::new(
                    self.telemetry.taps.clone(),
                    TapDirection::Inbound,
                    client,
                    Some(port.unnamed.target.addr),
                )
                .client_tls(client_tls),
            )
            // 400 for what hyper lets through but the RFCs call malformed (two Hosts, ...), 431
            // for a head over 64 KiB; 508 for a request that has crossed too many proxies (a
            // chain forwarding in a loop); 403 for a client the inbound policy doesn't admit.
            .layer(
                ValidateRequest::layer("inbound")
                    .and(HopLimit::layer("inbound"))
                    .and(Authorize::layer(authz)),
            )
            // The workload's port is the target; metrics are kept by the authority requested.
            // A request another proxy carried over h2 goes to the app as the HTTP/1 it was.
            .map_request(move |mut req: Request<RequestBody>| {
                orig_proto::downgrade_request(&mut req);
                let AuthorityTarget { target, routes } =
                    this.target_for(&port, request_authority(&req));
                let ctx = req.ctx_mut();
                ctx.target = Some(target);
                ctx.routes = Some(routes);
                req
            })
            // route_request_total & co. by the workload's own ServiceProfile routes.
            .layer(RouteLayer)
            // Tap events, only while someone taps.
            .layer(
                TapLayer::new(self.telemetry.taps.clone(), TapDirection::Inbound, client)
                    .client_tls(client_tls),
            )
            // request_total, response_total, response_latency_ms and the access log.
            .layer(HttpMetricsLayer::new("inbound", self.telemetry.access_log))
            .layer(ResponseTimeoutLayer::new(self.args.response_timeout))
            // Pooled HTTP/1 or multiplexed h2 to the app; upgrades and CONNECT tunnel.
            .service(self.client.clone())
    }

    /// The port's state for clients with this TLS status (their traffic is labelled with it).
    /// Clients with different TLS statuses share the port's connections to the app and its
    /// routes; only their metric handles differ.
    fn app_port(&self, addr: SocketAddr, tls: Tls) -> Arc<AppPort> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(port) = ports.get(&(addr, tls.clone())) {
            return port.clone();
        }
        let shared = ports
            .iter()
            .find(|((a, _), _)| *a == addr)
            .map(|(_, port)| port.unnamed.clone());
        ports
            .entry((addr, tls.clone()))
            .or_insert_with(|| {
                let target_label: Arc<str> = addr.to_string().into();
                let tcp = self.metrics.tcp_target(
                    self.labels("".into(), &target_label, tls.clone())
                        .with_peer(Peer::Src),
                );
                let metrics = self.http_metrics(&target_label, &target_label, &tls);
                let unnamed = match shared {
                    Some(shared) => AuthorityTarget {
                        target: shared.target.named(target_label.clone(), metrics),
                        routes: shared.routes,
                    },
                    None => AuthorityTarget {
                        target: EndpointTarget::new(
                            addr,
                            target_label.clone(),
                            metrics,
                            self.args.connect_timeout,
                        ),
                        routes: self.profiles.destination(
                            Direction::Inbound,
                            target_label.clone(),
                            None,
                        ),
                    },
                };
                Arc::new(AppPort {
                    target_label,
                    tls,
                    tcp,
                    tcp_to_app: OnceLock::new(),
                    by_authority: ArcSwap::from_pointee(AuthorityMap::default()),
                    unnamed,
                })
            })
            .clone()
    }

    fn labels(&self, authority: Arc<str>, target: &Arc<str>, tls: Tls) -> TargetLabels {
        TargetLabels {
            direction: Direction::Inbound,
            peer: None,
            authority,
            target_addr: target.clone(),
            tls,
            dst_service: None,
            dst_namespace: None,
            dst_labels: None,
            srv_port: None,
        }
    }

    fn http_metrics(&self, authority: &Arc<str>, target_label: &Arc<str>, tls: &Tls) -> HttpTarget {
        self.metrics
            .http_target(self.labels(authority.clone(), target_label, tls.clone()))
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
        let metrics = self.http_metrics(&name, &port.target_label, &port.tls);
        let profile_name = self.profile_name(&name);
        let target = AuthorityTarget {
            target: port.unnamed.target.named(name.clone(), metrics),
            routes: self
                .profiles
                .destination(Direction::Inbound, name, profile_name),
        };
        port.by_authority.rcu(|map| {
            let mut map = if map.len() >= MAX_AUTHORITIES {
                AuthorityMap::default()
            } else {
                AuthorityMap::clone(map)
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
