//! `EndpointClient`: the bottom of every HTTP stack, sending a request to the endpoint chosen
//! above it. HTTP/1 goes over the endpoint's pool of kept-alive connections (`Http1Pool`); HTTP/2
//! keeps one multiplexed connection per endpoint (`H2Connection`, driven with the `h2` crate).
//! Both belong to the endpoint, so the request's own `Host`/`:authority` travel unchanged.
//! Hop-by-hop headers stop here; `Upgrade` and `CONNECT` become tunnels.
//!
//! To a meshed endpoint (discovery named its identity) connections are mesh TLS, and HTTP/1
//! requests ride the endpoint's h2 connection (`orig_proto`); only upgrades keep HTTP/1.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{header, HeaderValue, Method, Request, StatusCode, Version};
use hyper::client::conn::TrySendError;
use hyper::upgrade::OnUpgrade;
use pylon_proxy_metrics::HttpTarget;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::ctx::WithCtx;
use super::errors::{Malformed, L5D_PROXY_ERROR_HEADER};
pub use super::h2_client::H2Connection;
use super::headers::HeaderFacts;
use super::pool::Http1Pool;
use super::request_body::{ClientBodyOutcome, RequestBody};
use super::{
    boxed_out_of_line, headers, orig_proto, upgrade, BoxFuture, ProxyError, ProxyResponse,
    ResponseBody,
};
use crate::connect::Connect;
use crate::names::EndpointNames;

/// Where a request goes, set by the layer that chose it (the balancer outbound, the workload's
/// port inbound). A handle: the endpoint's parts are shared (read through `Deref`), so a
/// request's copy costs one reference count, not one per part.
#[derive(Clone)]
pub struct EndpointTarget {
    endpoint: Arc<EndpointParts>,
    /// Where a request that could not be sent at all goes back to (outbound: the balancer's).
    pub unsent: Option<UnsentSlot>,
}

/// An endpoint as the client reaches it: its connections, and what its requests are recorded as.
pub struct EndpointParts {
    pub addr: SocketAddr,
    pub h1: Arc<Http1Pool>,
    pub h2: Arc<H2Connection>,
    /// The destination as the client named it: for logs and for a request without `Host`.
    pub destination: Arc<str>,
    /// Where the request's metrics are recorded (per endpoint outbound, per authority inbound).
    pub metrics: HttpTarget,
    /// Reached over mesh TLS: HTTP/1 requests go as h2 (decided once, with the connections).
    pub meshed: bool,
}

impl std::ops::Deref for EndpointTarget {
    type Target = EndpointParts;

    fn deref(&self) -> &EndpointParts {
        &self.endpoint
    }
}

impl EndpointTarget {
    /// A plaintext endpoint.
    pub fn new(
        addr: SocketAddr,
        destination: Arc<str>,
        metrics: HttpTarget,
        connect_timeout: Duration,
    ) -> Self {
        Self::with_connect(
            Arc::new(Connect::plain(addr, connect_timeout)),
            destination,
            metrics,
        )
    }

    /// An endpoint reached as `connect` says (over mesh TLS when it is meshed).
    pub fn with_connect(connect: Arc<Connect>, destination: Arc<str>, metrics: HttpTarget) -> Self {
        Self {
            endpoint: Arc::new(EndpointParts {
                addr: connect.addr(),
                meshed: connect.server_id().is_some(),
                h1: Arc::new(Http1Pool::new(connect.clone())),
                h2: Arc::new(H2Connection::new(connect)),
                destination,
                metrics,
            }),
            unsent: None,
        }
    }

    /// This target for one request, handing the request back to `slot` if it can't be sent.
    pub fn with_unsent(&self, slot: &UnsentSlot) -> Self {
        Self {
            unsent: Some(slot.clone()),
            ..self.clone()
        }
    }

    /// How a request of this shape reaches this endpoint.
    fn transport(&self, shape: RequestShape) -> Transport {
        if shape.connect {
            Transport::Tunnel
        } else if shape.version == Version::HTTP_2
            || (self.meshed && !shape.upgrade && orig_proto::can_upgrade(shape.version))
        {
            // HTTP/1 between meshed proxies rides the endpoint's h2 connection.
            Transport::H2
        } else {
            Transport::H1
        }
    }

    /// Whether a connection that can carry a request of this shape is open (an idle pooled
    /// one, or the h2 connection), so the request can be sent at once.
    pub fn is_connected(&self, shape: RequestShape) -> bool {
        match self.transport(shape) {
            Transport::Tunnel => true,
            Transport::H2 => self.h2.is_open(),
            Transport::H1 => self.h1.has_idle(),
        }
    }

    /// Makes sure a connection that can carry a request of this shape is open, opening one
    /// when none is (an idle pooled one, or the h2 connection, does). The balancer calls this
    /// before it hands the request down: a request whose endpoint refuses to connect has not
    /// left the proxy, so it can go to another endpoint. (Tunnels connect when they're sent.)
    pub async fn connect_for(&self, shape: RequestShape) -> Result<(), ProxyError> {
        match self.transport(shape) {
            Transport::Tunnel => Ok(()),
            Transport::H2 => self.h2.ready().await,
            Transport::H1 => self.h1.ensure_idle().await,
        }
    }

    /// Discovery's names for the endpoint (its pod and workload), for the logs: kept with its
    /// connections, so a target cloned per request carries nothing more.
    pub fn names(&self) -> &Arc<EndpointNames> {
        self.h1.names()
    }

    /// The same endpoint and connections, named (and recorded) as another destination.
    pub fn named(&self, destination: Arc<str>, metrics: HttpTarget) -> Self {
        let endpoint = &self.endpoint;
        Self {
            endpoint: Arc::new(EndpointParts {
                addr: endpoint.addr,
                h1: endpoint.h1.clone(),
                h2: endpoint.h2.clone(),
                destination,
                metrics,
                meshed: endpoint.meshed,
            }),
            unsent: self.unsent.clone(),
        }
    }
}

/// A request that failed at its endpoint, and the request itself when none of it left the
/// proxy (no connection could be had, or the one it got closed before sending).
pub struct SendError {
    pub error: ProxyError,
    pub unsent: Option<Request<RequestBody>>,
}

impl SendError {
    pub fn sent(error: ProxyError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }

    pub fn unsent(error: ProxyError, req: Request<RequestBody>) -> Self {
        Self {
            error,
            unsent: Some(req),
        }
    }

    /// hyper could not send a request on a connection to the endpoint `connect` reaches: the
    /// error, classified (and logged when the endpoint broke HTTP), and the request when none
    /// of it was sent.
    pub fn from_try_send(mut e: TrySendError<Request<RequestBody>>, connect: &Connect) -> Self {
        let unsent = e.take_message();
        Self {
            error: ProxyError::from_endpoint(e.error(), connect),
            unsent,
        }
    }
}

/// An endpoint connection's task ended with an error (the endpoint closed or broke it).
pub(super) fn log_connection_closed(
    connect: &Connect,
    protocol: &str,
    error: &(dyn std::error::Error + 'static),
) {
    let names = connect.names();
    tracing::debug!(endpoint = %connect.addr(), endpoint_pod = names.pod(), endpoint_workload = names.workload(), %error, "{protocol} endpoint connection closed");
}

/// Where the endpoint client leaves a request it could not send at all, so the balancer
/// above can send it to another endpoint: a refusing endpoint costs the client nothing. Set
/// by the balancer on the request's `EndpointTarget`.
#[derive(Clone, Default)]
pub struct UnsentSlot(Arc<std::sync::Mutex<Option<Request<RequestBody>>>>);

impl UnsentSlot {
    /// A slot for the next request: `spare` again when nothing else holds it (the last
    /// request's clones are gone, the usual case on a connection's stack), else a new one that
    /// becomes the spare. Saves an allocation per request.
    pub fn reuse(spare: &mut UnsentSlot) -> UnsentSlot {
        match Arc::get_mut(&mut spare.0) {
            // A request left there by one whose future was dropped is dropped now.
            Some(slot) => *slot.get_mut().unwrap_or_else(|p| p.into_inner()) = None,
            None => *spare = UnsentSlot::default(),
        }
        spare.clone()
    }

    /// The request, if it came back unsent.
    pub fn take(&self) -> Option<Request<RequestBody>> {
        self.lock().take()
    }

    pub fn is_filled(&self) -> bool {
        self.lock().is_some()
    }

    /// Hands `req` back (the endpoint client, when none of it was sent).
    pub fn put(&self, req: Request<RequestBody>) {
        *self.lock() = Some(req);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Request<RequestBody>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What of a request decides the connection it needs (and what the client does to its head).
#[derive(Clone, Copy, Debug)]
pub struct RequestShape {
    version: Version,
    /// An HTTP/1.1 protocol upgrade (WebSocket).
    upgrade: bool,
    /// `CONNECT`: a tunnel to the endpoint.
    connect: bool,
    headers: HeaderFacts,
}

impl RequestShape {
    pub fn of<B>(req: &Request<B>) -> Self {
        let headers = HeaderFacts::of(req.headers());
        Self {
            version: req.version(),
            upgrade: req.version() == Version::HTTP_11 && headers.upgrade,
            connect: req.method() == Method::CONNECT,
            headers,
        }
    }
}

/// How a request travels to its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// The endpoint's pool of HTTP/1 connections.
    H1,
    /// The endpoint's multiplexed h2 connection.
    H2,
    /// A TCP tunnel of its own (`CONNECT`).
    Tunnel,
}

#[derive(Clone)]
pub struct EndpointClient {
    // The stack is cloned for every request: one reference count, not the pool's insides.
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connect_timeout: Duration,
    tunnels: TaskTracker,
}

impl EndpointClient {
    /// `tunnels` tracks upgraded and CONNECT connections so shutdown can wait for them.
    pub fn new(connect_timeout: Duration, tunnels: TaskTracker) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                connect_timeout,
                tunnels,
            }),
        }
    }
}

impl ClientInner {
    /// Sends the request to the endpoint over the connection its shape needs. An exchange that
    /// failed because the client's body did (a malformed chunk, a client gone mid-body) is the
    /// client's error, never the endpoint's.
    ///
    /// The request is prepared and handed to its transport here, synchronously, so that the
    /// future (boxed, so copied whole, for every request) holds the transport's send and what
    /// the response needs afterwards, and not the request itself as well.
    // The transports' errors carry an unsent request back by value (`SendError`), to go to
    // another endpoint; the closures below only pass them on.
    #[allow(clippy::result_large_err)]
    fn exchange(
        this: Arc<Self>,
        target: EndpointTarget,
        mut req: Request<RequestBody>,
    ) -> BoxFuture<Result<ProxyResponse, ProxyError>> {
        let client_body = req.body_mut().watch();
        let shape = RequestShape::of(&req);
        let transport = target.transport(shape);
        if transport == Transport::Tunnel {
            if target.meshed {
                // The tunnel carries whatever the client sends (often its own TLS); it goes
                // to the endpoint's address as asked, outside mesh TLS.
                tracing::debug!(endpoint = %target.addr, endpoint_pod = target.names().pod(), endpoint_workload = target.names().workload(), "CONNECT to a meshed endpoint is tunnelled without mesh TLS");
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            // Boxed: a rare path whose connect would otherwise size every request's future.
            return boxed_out_of_line(move || async move {
                upgrade::connect(&this.tunnels, on_upgrade, target.addr, this.connect_timeout).await
            });
        }

        let upgrade = shape.upgrade;
        if upgrade || shape.headers.hop_by_hop {
            headers::remove_hop_by_hop(req.headers_mut(), upgrade);
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if transport == Transport::H1 {
            set_host(&mut req, shape.headers.host, &target.destination);
            let sending = target.h1.send(req, upgrade).map(|sent| {
                sent.map(|(rsp, pooled)| {
                    let mut rsp = rsp.map(ResponseBody::proxied);
                    // After `101` the connection belongs to the tunnel, never to the pool.
                    if let Some(conn) = pooled {
                        if rsp.status() != StatusCode::SWITCHING_PROTOCOLS {
                            rsp.body_mut().reuse_on_end(conn);
                        }
                    }
                    rsp
                })
            });
            return Exchange::boxed(sending, this, target, client_upgrade, client_body);
        }
        if req.version() == Version::HTTP_2 {
            let sending = target
                .h2
                .send(req)
                .map(|sent| sent.map(|rsp| rsp.map(ResponseBody::proxied_h2)));
            return Exchange::boxed(sending, this, target, client_upgrade, client_body);
        }
        // HTTP/1 between meshed proxies rides the endpoint's h2 connection. Rewritten for the
        // hop, the request can't go to another endpoint as it is.
        let orig = match orig_proto::upgrade_request(&mut req, &target.destination) {
            Ok(orig) => orig,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let sending = target.h2.send(req).map(move |sent| match sent {
            Ok(mut rsp) => {
                orig_proto::downgrade_response(&mut rsp, orig);
                Ok(rsp.map(ResponseBody::proxied_h2))
            }
            Err(e) => Err(SendError::sent(e.error)),
        });
        Exchange::boxed(sending, this, target, client_upgrade, client_body)
    }
}

/// What a transport's send resolves to: the response (its body returns a pooled HTTP/1
/// connection to the pool when it ends).
type Sent = Result<ProxyResponse, SendError>;

pin_project_lite::pin_project! {
    /// A request on its way to the endpoint (`sending`, the transport's future), and what its
    /// response needs when it comes. A named future rather than an `async` block: a block
    /// would hold the transport's future twice (as captured, and as awaited).
    struct Exchange<F> {
        #[pin]
        sending: F,
        // Taken when the response comes.
        then: Option<AfterSend>,
    }
}

/// What the response (or the failure) of a sent request needs.
struct AfterSend {
    client: Arc<ClientInner>,
    target: EndpointTarget,
    /// The client's side of a protocol upgrade, spliced to the endpoint's on `101`.
    client_upgrade: Option<OnUpgrade>,
    /// How the client's request body went, when it has one.
    client_body: Option<ClientBodyOutcome>,
}

impl<F> Exchange<F>
where
    F: Future<Output = Sent> + Send + 'static,
{
    fn boxed(
        sending: F,
        client: Arc<ClientInner>,
        target: EndpointTarget,
        client_upgrade: Option<OnUpgrade>,
        client_body: Option<ClientBodyOutcome>,
    ) -> BoxFuture<Result<ProxyResponse, ProxyError>> {
        Box::pin(Exchange {
            sending,
            then: Some(AfterSend {
                client,
                target,
                client_upgrade,
                client_body,
            }),
        })
    }
}

impl<F: Future<Output = Sent>> Future for Exchange<F> {
    type Output = Result<ProxyResponse, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let sent = ready!(this.sending.poll(cx));
        let Some(then) = this.then.take() else {
            panic!("Exchange polled after it completed");
        };
        // `response` finishes the response by reference: passed through it by value, the
        // response (~180 bytes) would be copied in and out again.
        Poll::Ready(match sent {
            Ok(mut rsp) => {
                then.response(&mut rsp);
                Ok(rsp)
            }
            Err(e) => Err(then.blame(e)),
        })
    }
}

impl AfterSend {
    fn response(self, rsp: &mut ProxyResponse) {
        // One integer comparison per response; the header is looked for only on errors.
        if rsp.status().as_u16() >= 400 {
            if let Some(peer) = rsp.headers().get(L5D_PROXY_ERROR_HEADER) {
                log_peer_proxy_error(&self.target, rsp.status(), peer);
            }
        }
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the tunnel, never back to the pool.
            if let Some(client) = self.client_upgrade {
                let upstream = hyper::upgrade::on(&mut *rsp);
                upgrade::splice(&self.client.tunnels, client, upstream, self.target.addr);
            }
            return;
        }
        headers::strip_hop_by_hop(rsp.headers_mut(), false);
        if let Some(outcome) = self.client_body {
            rsp.body_mut().client_body(outcome);
        }
    }

    /// A request none of which was sent goes back to the balancer (when it left a slot) for
    /// another endpoint; otherwise a failure is the client's when its body failed first. (An
    /// upgrade's client side is taken out above: it can't go anywhere else.)
    fn blame(&self, err: SendError) -> ProxyError {
        let unsent_slot = self
            .target
            .unsent
            .as_ref()
            .filter(|_| self.client_upgrade.is_none());
        if let (Some(req), Some(slot)) = (err.unsent, unsent_slot) {
            slot.put(req);
            return err.error;
        }
        self.client_body
            .as_ref()
            .and_then(ClientBodyOutcome::failure)
            .unwrap_or(err.error)
    }
}

impl Service<Request<RequestBody>> for EndpointClient {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        // The layers above always choose a target; without one there is nowhere to go. (Taken:
        // nothing below the client reads it.)
        let Some(target) = req.ctx_mut().target.take() else {
            return Box::pin(std::future::ready(Err(ProxyError::NoEndpoints)));
        };
        ClientInner::exchange(self.inner.clone(), target, req)
    }
}

/// The endpoint's own proxy made this response (a meshed endpoint's inbound proxy, for a
/// malformed answer from its app, a denial, a timeout), and says why in `l5d-proxy-error`:
/// logged here too, naming the endpoint by address and pod, so this side's log says what
/// the other side saw. At error for a protocol error (the app behind it is broken, as that
/// proxy logs it), else at warn; rate-limited, as a peer can repeat it on every request.
fn log_peer_proxy_error(target: &EndpointTarget, status: StatusCode, message: &HeaderValue) {
    // A peer's header: shown as text, and not at any length.
    const MAX: usize = 256;
    let bytes = message.as_bytes();
    let message = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let names = target.names();
    let status = status.as_u16();
    if message.starts_with(ProxyError::EndpointProtocol(Malformed::Other).reason()) {
        crate::error_limited!(
            "peer_endpoint_protocol_error",
            destination = %target.destination,
            endpoint = %target.addr,
            endpoint_pod = names.pod(),
            endpoint_workload = names.workload(),
            endpoint_namespace = names.namespace(),
            status,
            error = %message,
            "the endpoint's proxy answered {status}: {message}"
        );
    } else {
        crate::warn_limited!(
            "peer_proxy_error",
            destination = %target.destination,
            endpoint = %target.addr,
            endpoint_pod = names.pod(),
            endpoint_workload = names.workload(),
            endpoint_namespace = names.namespace(),
            status,
            error = %message,
            "the endpoint's proxy answered {status}: {message}"
        );
    }
}

/// An absolute-form request's authority replaces its `Host` (RFC 9112 §3.2.2); a request with
/// neither (HTTP/1.0) gets the destination's, so the endpoint still learns it.
fn set_host<B>(req: &mut Request<B>, has_host: bool, destination: &str) {
    let host = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None if !has_host => HeaderValue::from_str(destination).ok(),
        None => None,
    };
    if let Some(host) = host {
        req.headers_mut().insert(header::HOST, host);
    }
}

#[cfg(test)]
mod tests {
    //! The client side of mesh TLS against a stand-in for a meshed inbound proxy: mesh TLS
    //! terminated with `MeshTls::accept`, then an h2 server that records what arrived.

    use std::sync::Mutex;

    use http::{HeaderMap, Response, Uri};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use pylon_proxy_metrics::{Direction, Metrics, TargetLabels, Tls};
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    use super::*;
    use crate::connect::test_support::{ca, identity, mesh_tls};
    use crate::connect::TlsFailure;
    use crate::mesh_tls::MeshTls;

    /// What the stand-in inbound saw of one request.
    #[derive(Debug)]
    struct Seen {
        client_id: Option<Arc<str>>,
        alpn_h2: bool,
        version: Version,
        uri: Uri,
        headers: HeaderMap,
    }

    /// Accepts mesh TLS connections with `server` and answers h2 requests as a meshed inbound
    /// proxy would: `l5d-orig-proto` on the response when the request had it.
    async fn meshed_server(server: Arc<MeshTls>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let server = server.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok((tls, accepted)) = server.accept(tcp, peer).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        log.lock().unwrap().push(Seen {
                            client_id: accepted.client_id.clone(),
                            alpn_h2: accepted.h2,
                            version: req.version(),
                            uri: req.uri().clone(),
                            headers: req.headers().clone(),
                        });
                        let mut rsp = Response::new(Full::new(bytes::Bytes::from_static(b"hi")));
                        if let Some(v) = req.headers().get(orig_proto::L5D_ORIG_PROTO) {
                            rsp.headers_mut()
                                .insert(orig_proto::L5D_ORIG_PROTO, v.clone());
                        }
                        async move { Ok::<_, std::convert::Infallible>(rsp) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    fn target(addr: SocketAddr, client: Arc<MeshTls>, server_id: Arc<str>) -> EndpointTarget {
        let metrics = Metrics::new(Default::default()).http_target(TargetLabels {
            direction: Direction::Outbound,
            peer: None,
            authority: "web.default.svc.cluster.local:80".into(),
            target_addr: addr.to_string().into(),
            tls: Tls::ServerId(server_id.clone()),
            dst_service: None,
            dst_namespace: None,
            dst_labels: None,
            srv_port: None,
        });
        let connect = Connect::meshed(addr, Duration::from_secs(5), client, server_id);
        EndpointTarget::with_connect(
            Arc::new(connect),
            "web.default.svc.cluster.local:80".into(),
            metrics,
        )
    }

    fn http11_get(target: &EndpointTarget, host: &str) -> Request<RequestBody> {
        let mut req = Request::builder()
            .uri("/hello?x=1")
            .version(Version::HTTP_11)
            .header(header::HOST, host)
            .header("X-Mixed-Case", "yes")
            .body(RequestBody::empty())
            .unwrap();
        req.ctx_mut().target = Some(target.clone());
        req
    }

    #[test]
    fn a_slot_is_reused_only_when_nothing_else_holds_it() {
        let mut spare = UnsentSlot::default();
        let first = UnsentSlot::reuse(&mut spare);
        first.put(Request::new(RequestBody::empty()));
        // Still held (a request in flight): the next request gets a slot of its own.
        let second = UnsentSlot::reuse(&mut spare);
        assert!(!Arc::ptr_eq(&first.0, &second.0));
        assert!(first.is_filled() && !second.is_filled());
        // Once its clones are gone the spare is lent again, emptied of anything left there.
        second.put(Request::new(RequestBody::empty()));
        let held = Arc::as_ptr(&second.0);
        drop((first, second));
        let third = UnsentSlot::reuse(&mut spare);
        assert_eq!(Arc::as_ptr(&third.0), held);
        assert!(!third.is_filled());
    }

    async fn send(req: Request<RequestBody>) -> Result<ProxyResponse, ProxyError> {
        let client = EndpointClient::new(Duration::from_secs(5), TaskTracker::new());
        tokio::time::timeout(Duration::from_secs(20), client.oneshot(req))
            .await
            .expect("bounded")
    }

    #[tokio::test]
    async fn http1_to_a_meshed_endpoint_rides_h2_over_mesh_tls() {
        let ca = ca();
        let (_c, client) = mesh_tls(&ca, "client");
        let (_s, server) = mesh_tls(&ca, "server");
        let (addr, seen) = meshed_server(server).await;
        let target = target(addr, client, identity("server"));
        assert!(target.meshed);

        for _ in 0..2 {
            let rsp = send(http11_get(&target, "Web.Default:80"))
                .await
                .expect("response");
            assert_eq!(rsp.status(), StatusCode::OK);
            // Back to the app's version, the hop's header gone.
            assert_eq!(rsp.version(), Version::HTTP_11);
            assert!(rsp.headers().get(orig_proto::L5D_ORIG_PROTO).is_none());
        }

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let first = &seen[0];
        assert!(first.alpn_h2, "h2 not negotiated by ALPN");
        assert_eq!(first.client_id, Some(identity("client")));
        assert_eq!(first.version, Version::HTTP_2);
        assert_eq!(first.uri.authority().unwrap().as_str(), "Web.Default:80");
        assert_eq!(first.uri.path_and_query().unwrap().as_str(), "/hello?x=1");
        assert_eq!(first.headers[orig_proto::L5D_ORIG_PROTO], "HTTP/1.1");
        assert!(first.headers.get(header::HOST).is_none());
        assert_eq!(first.headers["x-mixed-case"], "yes");
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let ca = ca();
        let (_c, client) = mesh_tls(&ca, "client");
        let (_s, server) = mesh_tls(&ca, "impostor");
        let (addr, seen) = meshed_server(server).await;
        let target = target(addr, client, identity("server"));
        let err = send(http11_get(&target, "web")).await.err();
        assert_eq!(
            err,
            Some(ProxyError::TlsHandshake(TlsFailure::WrongIdentity))
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_server_from_another_ca_is_refused() {
        let (_c, client) = mesh_tls(&ca(), "client");
        let (_s, server) = mesh_tls(&ca(), "server");
        let (addr, seen) = meshed_server(server).await;
        let target = target(addr, client, identity("server"));
        let err = send(http11_get(&target, "web")).await.err();
        assert_eq!(err, Some(ProxyError::TlsHandshake(TlsFailure::UnknownCa)));
        assert!(seen.lock().unwrap().is_empty());
    }

    fn plain_target(addr: SocketAddr) -> EndpointTarget {
        let metrics = Metrics::new(Default::default()).http_target(TargetLabels::new(
            Direction::Outbound,
            "web:80",
            addr.to_string(),
            Tls::NoIdentity("test"),
        ));
        EndpointTarget::new(addr, "web:80".into(), metrics, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn a_request_that_could_not_be_sent_is_handed_back() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let target = plain_target(dead);
        // HTTP/1 and h2 alike; the balancer left a slot.
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let slot = UnsentSlot::default();
            let mut req = http11_get(&target.with_unsent(&slot), "web");
            *req.version_mut() = version;
            if version == Version::HTTP_2 {
                *req.uri_mut() = Uri::from_static("http://web/hello?x=1");
            }
            assert_eq!(send(req).await.err(), Some(ProxyError::ConnectionRefused));
            let back = slot.take().expect("handed back");
            assert_eq!(back.uri().path(), "/hello");
            assert_eq!(back.headers()["x-mixed-case"], "yes");
        }
        // Without a slot (inbound: the app has no other endpoint) it is just the error.
        let err = send(http11_get(&target, "web")).await.err();
        assert_eq!(err, Some(ProxyError::ConnectionRefused));
    }

    #[tokio::test]
    async fn a_plaintext_server_is_not_tls() {
        // A meshed endpoint that answers in plaintext: never a fallback, a TLS failure.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let (_c, client) = mesh_tls(&ca(), "client");
        let target = target(addr, client, identity("server"));
        let err = send(http11_get(&target, "web")).await.err();
        assert_eq!(err, Some(ProxyError::TlsHandshake(TlsFailure::NotTls)));
    }
}
