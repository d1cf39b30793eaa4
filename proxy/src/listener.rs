//! Binding listeners and accepting connections until shutdown.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {name} on {addr}: {source}")]
pub struct BindError {
    name: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` (port 0 picks a free port) and logs the address actually chosen.
pub async fn bind(
    name: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError { name, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
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
                tracing::warn!(listener = %local, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    tracing::debug!(listener = %local, "stopped accepting");
}
