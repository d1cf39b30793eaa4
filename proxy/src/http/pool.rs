//! `Http1Pool`: kept-alive HTTP/1.1 connections to one endpoint.
//!
//! A connection goes back to the pool when the response body it carried has ended cleanly (the
//! `ResponseBody` hands it back), so reuse never waits behind a slow reader, and no task is spawned
//! per request to watch for it. The pool belongs to the endpoint: when discovery drops the
//! endpoint, its idle connections close with it.
//!
//! To a meshed endpoint, only requests that can't ride the h2 connection come here (protocol
//! upgrades such as WebSocket), over mesh TLS announcing `http/1.1`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;

use super::request_body::RequestBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::client::SendError;
use super::ProxyError;
use crate::connect::Connect;
use crate::mesh_tls::Alpn;
use crate::names::EndpointNames;

/// Idle connections kept per endpoint; more are closed when they come back.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed instead of reused (servers time out idle
/// keep-alive connections, and a request on one they just closed would fail).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Http1Pool {
    connect: Arc<Connect>,
    idle: ArrayQueue<Idle>,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// A connection lent to one request; returned to its pool when the response has ended.
pub struct PooledConn {
    pool: Arc<Http1Pool>,
    sender: http1::SendRequest<RequestBody>,
}

impl PooledConn {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        // A full pool closes the connection (dropping the sender).
        let _ = self.pool.idle.push(Idle {
            sender: self.sender,
            since: Instant::now(),
        });
    }
}

impl Http1Pool {
    pub fn new(connect: Arc<Connect>) -> Self {
        Self {
            connect,
            idle: ArrayQueue::new(MAX_IDLE),
        }
    }

    /// Sends `req` in origin form, keeping its headers. On success, the connection comes back as
    /// `PooledConn` for the response body to release when it ends. A request no connection
    /// could be had for comes back unsent with the error.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, PooledConn), SendError> {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);

        // A pooled connection the server closed just as we sent gives the request back unsent:
        // then it goes once more, on a fresh connection.
        let (mut sender, reused) = match self.checkout().await {
            Ok(checked_out) => checked_out,
            Err(error) => return Err(SendError::unsent(error, req)),
        };
        let rsp = match sender.try_send_request(req).await {
            Ok(rsp) => rsp,
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    sender = match Box::pin(self.connect()).await {
                        Ok(sender) => sender,
                        Err(error) => return Err(SendError::unsent(error, req)),
                    };
                    sender.send_request(req).await.map_err(|e| {
                        SendError::sent(ProxyError::from_endpoint(&e, &self.connect))
                    })?
                }
                Some(req) => {
                    let error = ProxyError::from_endpoint(e.error(), &self.connect);
                    return Err(SendError::unsent(error, req));
                }
                None => {
                    let error = ProxyError::from_endpoint(e.error(), &self.connect);
                    return Err(SendError::sent(error));
                }
            },
        };
        let conn = PooledConn {
            pool: self.clone(),
            sender,
        };
        Ok((rsp, conn))
    }

    /// Discovery's names for its endpoint, for the logs.
    pub fn names(&self) -> &Arc<EndpointNames> {
        self.connect.names()
    }

    /// Whether a connection is idle, ready for a request.
    pub fn has_idle(&self) -> bool {
        !self.idle.is_empty()
    }

    /// Opens a connection and parks it idle, unless one is idle already.
    pub async fn ensure_idle(&self) -> Result<(), ProxyError> {
        if self.has_idle() {
            return Ok(());
        }
        let sender = Box::pin(self.connect()).await?;
        // A full pool closes it (dropping the sender); someone returned one meanwhile.
        let _ = self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        Ok(())
    }

    async fn checkout(&self) -> Result<(http1::SendRequest<RequestBody>, bool), ProxyError> {
        while let Some(Idle { mut sender, since }) = self.idle.pop() {
            if sender.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Normally ready at once: the previous response was read to its end.
            if sender.ready().await.is_ok() {
                return Ok((sender, true));
            }
        }
        Ok((Box::pin(self.connect()).await?, false))
    }

    /// Opens a connection. Boxed where it is awaited: a connect (a TLS handshake, when meshed)
    /// holds far more state than a request on an open connection, and unboxed it would size
    /// every request's future.
    async fn connect(&self) -> Result<http1::SendRequest<RequestBody>, ProxyError> {
        let stream = self
            .connect
            .connect(Alpn::Http1)
            .await
            .map_err(|e| ProxyError::from_connect(&e))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::from_endpoint(&e, &self.connect))?;
        let addr = self.connect.addr();
        let names = self.connect.names().clone();
        tokio::spawn(async move {
            // `with_upgrades` so a 101 hands the connection to the tunnel.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, endpoint_pod = names.pod(), endpoint_workload = names.workload(), error = %e, "http/1 endpoint connection closed");
            }
        });
        Ok(sender)
    }
}
