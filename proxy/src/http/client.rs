//! `EndpointClient`: the bottom of every HTTP stack, sending a request to the endpoint chosen
//! above it. HTTP/1 goes over the endpoint's pool of kept-alive connections (`Http1Pool`); HTTP/2
//! keeps one multiplexed connection per endpoint. Both belong to the endpoint, so the request's
//! own `Host`/`:authority` travel unchanged. Hop-by-hop headers stop here; `Upgrade` and
//! `CONNECT` become tunnels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::{PathAndQuery, Scheme};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pylon_proxy_metrics::HttpTarget;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::pool::Http1Pool;
use super::request_body::RequestBody;
use super::{headers, upgrade, BoxFuture, ProxyError, ProxyResponse, ResponseBody};
use crate::tcp;

/// Where a request goes, set by the layer that chose it (the balancer outbound, the workload's
/// port inbound).
#[derive(Clone)]
pub struct EndpointTarget {
    pub addr: SocketAddr,
    pub h1: Arc<Http1Pool>,
    pub h2: Arc<H2Connection>,
    /// The destination as the client named it: for logs and for a request without `Host`.
    pub destination: Arc<str>,
    /// Where the request's metrics are recorded (per endpoint outbound, per authority inbound).
    pub metrics: HttpTarget,
}

impl EndpointTarget {
    pub fn new(
        addr: SocketAddr,
        destination: Arc<str>,
        metrics: HttpTarget,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            addr,
            h1: Arc::new(Http1Pool::new(addr, connect_timeout)),
            h2: Arc::new(H2Connection::new(addr, connect_timeout)),
            destination,
            metrics,
        }
    }

    /// The same endpoint and connections, named (and recorded) as another destination.
    pub fn named(&self, destination: Arc<str>, metrics: HttpTarget) -> Self {
        Self {
            destination,
            metrics,
            ..self.clone()
        }
    }
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
    async fn send(
        &self,
        target: EndpointTarget,
        mut req: Request<RequestBody>,
    ) -> Result<ProxyResponse, ProxyError> {
        if req.method() == Method::CONNECT {
            let on_upgrade = hyper::upgrade::on(&mut req);
            return upgrade::connect(&self.tunnels, on_upgrade, target.addr, self.connect_timeout)
                .await;
        }

        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut rsp, pooled) = if req.version() == Version::HTTP_2 {
            (target.h2.send(req).await?, None)
        } else {
            set_host(&mut req, &target.destination);
            let (rsp, conn) = target.h1.send(req).await?;
            (rsp, Some(conn))
        };

        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the tunnel, never back to the pool.
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut rsp);
                upgrade::splice(&self.tunnels, client, upstream, target.addr);
            }
            return Ok(rsp.map(ResponseBody::proxied));
        }
        headers::strip_hop_by_hop(rsp.headers_mut(), false);
        let mut rsp = rsp.map(ResponseBody::proxied);
        if let Some(conn) = pooled {
            rsp.body_mut().reuse_on_end(conn);
        }
        Ok(rsp)
    }
}

impl<B: Into<RequestBody> + Send + 'static> Service<Request<B>> for EndpointClient {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.inner.clone();
        let req = req.map(Into::into);
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

/// One multiplexed HTTP/2 connection to an endpoint, (re)established on demand.
pub struct H2Connection {
    addr: SocketAddr,
    connect_timeout: Duration,
    sender: ArcSwapOption<http2::SendRequest<RequestBody>>,
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

    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
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

    async fn ready_sender(&self) -> Result<http2::SendRequest<RequestBody>, ProxyError> {
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
        let stream = tcp::connect(self.addr, self.connect_timeout)
            .await
            .map_err(|e| ProxyError::from_connect(&e))?;
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
