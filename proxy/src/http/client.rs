//! Endpoint clients. HTTP/1 uses hyper-util's pooled client (keep-alive, upgrades). HTTP/2 keeps
//! one multiplexed connection per endpoint so the request's own `:authority` travels unchanged
//! (a pool keyed by authority would have to rewrite it to the endpoint's address).

use std::net::SocketAddr;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ProxyError;

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
