//! `EndpointClient`: the bottom of every HTTP stack, sending a request to the endpoint chosen
//! above it. HTTP/1 uses hyper-util's pooled client (keep-alive, upgrades). HTTP/2 keeps one
//! multiplexed connection per endpoint so the request's own `:authority` travels unchanged (a
//! pool keyed by authority would have to rewrite it to the endpoint's address). Hop-by-hop
//! headers stop here; `Upgrade` and `CONNECT` become tunnels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::{headers, upgrade, BoxFuture, ProxyError, ProxyResponse, ResponseBody};

/// Where a request goes, set by the layer that chose it (the balancer outbound, the workload's
/// port inbound).
#[derive(Clone)]
pub struct EndpointTarget {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once for the HTTP/1 pool.
    pub authority: Authority,
    pub h2: Arc<H2Connection>,
    /// The destination as the client named it: for logs and for a request without `Host`.
    pub destination: Arc<str>,
}

impl EndpointTarget {
    pub fn new(addr: SocketAddr, destination: Arc<str>, connect_timeout: Duration) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid.endpoint"));
        Self {
            addr,
            authority,
            h2: Arc::new(H2Connection::new(addr, connect_timeout)),
            destination,
        }
    }
}

#[derive(Clone)]
pub struct EndpointClient {
    // The stack is cloned for every request: one reference count, not the pool's insides.
    inner: Arc<ClientInner>,
}

struct ClientInner {
    h1: Http1Client,
    connect_timeout: Duration,
    tunnels: TaskTracker,
}

impl EndpointClient {
    /// `tunnels` tracks upgraded and CONNECT connections so shutdown can wait for them.
    pub fn new(connect_timeout: Duration, tunnels: TaskTracker) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                h1: Http1Client::new(connect_timeout),
                connect_timeout,
                tunnels,
            }),
        }
    }
}

impl ClientInner {
    async fn send(
        &self,
        target: EndpointTarget,
        mut req: Request<Incoming>,
    ) -> Result<ProxyResponse, ProxyError> {
        if req.method() == Method::CONNECT {
            let on_upgrade = hyper::upgrade::on(&mut req);
            return upgrade::connect(&self.tunnels, on_upgrade, target.addr, self.connect_timeout)
                .await;
        }

        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let mut rsp = if req.version() == Version::HTTP_2 {
            target.h2.send(req).await?
        } else {
            set_host(&mut req, &target.destination);
            self.h1.send(&target.authority, req).await?
        };

        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut rsp);
                upgrade::splice(&self.tunnels, client, upstream, target.addr);
            }
        } else {
            headers::strip_hop_by_hop(rsp.headers_mut(), false);
        }
        Ok(rsp.map(ResponseBody::proxied))
    }
}

impl Service<Request<Incoming>> for EndpointClient {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.inner.clone();
        Box::pin(async move {
            // The layers above always choose a target; without one there is nowhere to go.
            let target = req
                .extensions()
                .get::<EndpointTarget>()
                .cloned()
                .ok_or(ProxyError::NoEndpoints)?;
            this.send(target, req).await
        })
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

#[derive(Clone)]
pub struct Http1Client {
    inner: Client<HttpConnector, Incoming>,
}

impl Http1Client {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let inner = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            // The app's Host header goes through untouched.
            .set_host(false)
            .build(connector);
        Self { inner }
    }

    /// Sends `req` to `endpoint`, keeping its path and headers.
    pub async fn send(
        &self,
        endpoint: &Authority,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(endpoint.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MalformedRequest)?;
        *req.uri_mut() = uri;
        self.inner
            .request(req)
            .await
            .map_err(|e| ProxyError::from_upstream(&e))
    }
}

/// One multiplexed HTTP/2 connection to an endpoint, (re)established on demand.
pub struct H2Connection {
    addr: SocketAddr,
    connect_timeout: Duration,
    sender: ArcSwapOption<http2::SendRequest<Incoming>>,
    connecting: tokio::sync::Mutex<()>,
}

impl H2Connection {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            sender: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        if req.uri().scheme().is_none() {
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::MissingAuthority)?;
        }
        let mut sender = self.ready_sender().await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ProxyError::from_upstream(&e))
    }

    async fn ready_sender(&self) -> Result<http2::SendRequest<Incoming>, ProxyError> {
        if let Some(s) = self.sender.load_full() {
            if !s.is_closed() {
                return Ok((*s).clone());
            }
        }
        // One connect at a time; the others wait and reuse it.
        let _guard = self.connecting.lock().await;
        if let Some(s) = self.sender.load_full() {
            if !s.is_closed() {
                return Ok((*s).clone());
            }
        }
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ProxyError::ConnectTimeout)?
            .map_err(|e| ProxyError::from_upstream(&e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::from_upstream(&e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "h2 endpoint connection closed");
            }
        });
        self.sender.store(Some(std::sync::Arc::new(sender.clone())));
        Ok(sender)
    }
}
