//! Tunnels: HTTP/1.1 `Upgrade` (WebSocket) after a 101, and `CONNECT` to an endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use super::{ProxyError, ResponseBody};

/// Splices the client's and the endpoint's upgraded connections once both sides have switched.
pub fn splice(tasks: &TaskTracker, client: OnUpgrade, upstream: OnUpgrade, endpoint: SocketAddr) {
    tasks.spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%endpoint, error = %e, "upgraded connection closed with error");
        }
    });
}

/// Answers a `CONNECT` by opening a TCP connection to `target` and, once the client has switched,
/// copying bytes both ways.
pub async fn connect(
    tasks: &TaskTracker,
    on_upgrade: OnUpgrade,
    target: SocketAddr,
    connect_timeout: Duration,
) -> Result<Response<ResponseBody>, ProxyError> {
    let upstream = crate::tcp::connect(target, connect_timeout)
        .await
        .map_err(|e| ProxyError::from_connect(&e))?;
    tasks.spawn(async move {
        let client = match on_upgrade.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(endpoint = %target, error = %e, "CONNECT client did not switch");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = upstream;
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(endpoint = %target, error = %e, "CONNECT tunnel closed with error");
        }
    });
    let mut rsp = Response::new(ResponseBody::empty());
    *rsp.status_mut() = StatusCode::OK;
    Ok(rsp)
}
