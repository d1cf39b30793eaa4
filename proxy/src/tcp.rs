//! Opaque TCP: connect to the endpoint (over mesh TLS when it is meshed) and copy bytes both
//! ways until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pylon_proxy_metrics::TcpTarget;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::connect::{Connect, TlsFailure};
use crate::mesh_tls::Alpn;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// The address is one of this proxy's own listeners.
    #[error("{0} is this proxy's own listener: loop detected")]
    Loop(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// The TCP connection opened, but mesh TLS with the endpoint failed.
    #[error("mesh TLS to {addr} expecting identity {server_id}: {error}")]
    Tls {
        addr: SocketAddr,
        server_id: Arc<str>,
        failure: TlsFailure,
        error: std::io::Error,
    },
}

impl ConnectError {
    /// The errno-style name for `tcp_close_total{errno}`.
    pub fn errno(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "ETIMEDOUT",
            Self::Loop(_) => "ELOOP",
            Self::Io(_, e) => errno_name(e),
            Self::Tls { failure, error, .. } => match failure {
                TlsFailure::TimedOut => "ETIMEDOUT",
                // A reset or EOF mid-handshake keeps its own name.
                TlsFailure::Other if error.get_ref().is_none() => errno_name(error),
                _ => "EPROTO",
            },
        }
    }
}

/// A TCP connection to an endpoint within `timeout`, with Nagle off (the proxy writes whole
/// messages).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    // Every connection the proxy makes comes here: none may reach the proxy itself.
    if crate::loops::is_own_listener(addr) {
        return Err(ConnectError::Loop(addr));
    }
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
        .map_err(|e| ConnectError::Io(addr, e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Proxies `client` to `endpoint` in plaintext. The connection to the endpoint is counted in
/// `dst` (the `peer="dst"` series); the caller counts the client's side.
pub async fn forward<I>(
    client: I,
    endpoint: SocketAddr,
    connect_timeout: Duration,
    dst: &TcpTarget,
) -> Result<(), ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    forward_to(
        client,
        &Connect::plain(endpoint, connect_timeout).counted(dst.clone()),
    )
    .await
}

/// Proxies `client` to the endpoint `connect` reaches: over mesh TLS (no ALPN: the bytes are
/// opaque) when the endpoint is meshed. Counted where `connect` counts its connections.
pub async fn forward_to<I>(client: I, connect: &Connect) -> Result<(), ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = connect.connect(Alpn::Opaque).await?;
    splice(client, upstream, connect.addr()).await;
    Ok(())
}

/// Copies bytes both ways between the client and a connected endpoint until either closes.
pub async fn splice<I, U>(mut client: I, mut upstream: U, endpoint: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%endpoint, error = %e, "tcp connection closed with error")
    }
}

pub fn errno_name(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "ECONNREFUSED",
        ConnectionReset => "ECONNRESET",
        ConnectionAborted => "ECONNABORTED",
        TimedOut => "ETIMEDOUT",
        BrokenPipe => "EPIPE",
        AddrNotAvailable => "EADDRNOTAVAIL",
        _ => "EIO",
    }
}
