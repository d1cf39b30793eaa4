//! Opaque TCP: connect to the endpoint and copy bytes both ways until either side closes.

use std::net::SocketAddr;
use std::time::Duration;

use pylon_proxy_metrics::TcpTarget;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::io::CountingIo;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
}

impl ConnectError {
    /// The errno-style name for `tcp_close_total{errno}`.
    pub fn errno(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "ETIMEDOUT",
            Self::Io(_, e) => errno_name(e),
        }
    }
}

/// A TCP connection to an endpoint within `timeout`, with Nagle off (the proxy writes whole
/// messages).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
        .map_err(|e| ConnectError::Io(addr, e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Proxies `client` to `endpoint`. The connection to the endpoint is counted in `dst` (the
/// `peer="dst"` series); the caller counts the client's side.
pub async fn forward<I>(
    mut client: I,
    endpoint: SocketAddr,
    connect_timeout: Duration,
    dst: &TcpTarget,
) -> Result<(), ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let conn = dst.open();
    let upstream = match connect(endpoint, connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            conn.close(Some(e.errno()));
            return Err(e);
        }
    };
    let mut upstream = CountingIo::new(upstream, conn);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(_) => {}
        Err(e) => tracing::debug!(%endpoint, error = %e, "tcp connection closed with error"),
    }
    Ok(())
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
