//! One-shot HTTP/1 requests to a proxy's admin server (`/ready`, `/metrics`, `/shutdown`).
//! Each request opens its own connection and closes it, so no pooled connection keeps a proxy
//! from draining.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest admin response read (a busy proxy's `/metrics` is well below this).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Sends `method path` to `addr` and returns the status and body, all within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes)> {
    tokio::time::timeout(timeout, request_inner(addr, method.clone(), path))
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path} timed out after {timeout:?}"))?
        .with_context(|| format!("{method} http://{addr}{path}"))
}

async fn request_inner(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response body: {e}"))?
        .to_bytes();
    drop(sender);
    // The connection ends on its own after `Connection: close`; don't wait on it.
    connection.abort();
    Ok((status, body))
}

/// `GET /metrics` as text.
pub async fn metrics(addr: SocketAddr) -> Result<String> {
    let (status, body) = request(addr, Method::GET, "/metrics", Duration::from_secs(2)).await?;
    if !status.is_success() {
        return Err(anyhow!("GET http://{addr}/metrics answered {status}"));
    }
    String::from_utf8(body.to_vec())
        .with_context(|| format!("GET http://{addr}/metrics is not UTF-8"))
}
