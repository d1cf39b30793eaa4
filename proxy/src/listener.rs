//! Binding listeners and accepting connections until shutdown.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {name} on {addr}: {source}")]
pub struct BindError {
    name: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Pending connections the kernel queues for us. A burst of new clients (or of our own outbound
/// proxy opening pooled connections to a peer's inbound) must not overflow it: a dropped SYN is
/// retried only after a second, past the usual connect timeout. The kernel caps it at somaxconn.
const BACKLOG: u32 = 4096;

/// Binds `addr` (port 0 picks a free port) and logs the address actually chosen.
pub async fn bind(
    name: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError { name, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(BACKLOG).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    tracing::info!(listener = name, addr = %local, "listening");
    Ok((listener, local))
}

/// Accepts until shutdown begins; each connection runs as a tracked task so shutdown can wait for
/// it to drain.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    local: SocketAddr,
    shutdown: Shutdown,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.signaled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                shutdown.tracker().spawn(handle(stream, peer, local));
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                crate::warn_limited!("accept_failed", listener = %local, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    tracing::debug!(listener = %local, "stopped accepting");
}
