//! Opaque TCP: connect to the endpoint and copy bytes both ways until either side closes.

use std::net::SocketAddr;
use std::time::Duration;

use pylon_proxy_metrics::TcpTarget;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::io::CountingIo;

#[derive(Debug, thiserror::Error)]
pub enum TcpForwardError {
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
}

/// Proxies `client` to `endpoint`. The connection to the endpoint is counted in `dst` (the
/// `peer="dst"` series); the caller counts the client's side.
pub async fn forward<I>(
    mut client: I,
    endpoint: SocketAddr,
    connect_timeout: Duration,
    dst: &TcpTarget,
) -> Result<(), TcpForwardError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let conn = dst.open();
    let upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            conn.close(Some(errno_name(&e)));
            return Err(TcpForwardError::Connect(endpoint, e));
        }
        Err(_) => {
            conn.close(Some("ETIMEDOUT"));
            return Err(TcpForwardError::ConnectTimeout(endpoint));
        }
    };
    let _ = upstream.set_nodelay(true);
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
