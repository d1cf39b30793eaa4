//! The admin server: `/metrics`, `/metrics/window?window=1m` (what the HTTP series counted over
//! a recent window, so `pylon stat` answers at once), `/ready`, `/live`,
//! `GET|PUT /proxy-log-level`, `POST /shutdown`, `GET /tap-addr` (where the tap port listens, so
//! tools name a proxy by its admin address).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use pylon_proxy_metrics::{Metrics, MAX_WINDOW};
use tokio::net::TcpListener;

use crate::authz::{Client, InboundAuthz};
use crate::logging::LogLevel;
use crate::mesh_tls::MeshTls;
use crate::shutdown::Shutdown;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// The tap listener's address.
    pub tap_addr: SocketAddr,
    pub log_level: LogLevel,
    pub shutdown: Shutdown,
    /// Inbound policy, which `/shutdown` obeys for the admin port.
    pub authz: Arc<InboundAuthz>,
    pub admin_addr: SocketAddr,
    /// `target_addr` of the admin port's authorization metrics.
    pub admin_label: Arc<str>,
    /// This workload's identity: `/ready` waits for its certificate.
    pub mesh_tls: Option<Arc<MeshTls>>,
}

type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    /// Serves until the process exits: the admin server keeps answering while the proxy drains,
    /// so `/ready` can report it and `/metrics` sees the last requests.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    crate::warn_limited!("accept_failed", error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection error");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> AdminResponse {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut body = String::with_capacity(64 * 1024);
                let encoded = self.metrics.encode(&mut body);
                openmetrics(encoded.map(|()| body))
            }
            (&Method::GET, "/metrics/window") => self.window(req.uri().query()),
            (&Method::GET, "/ready") => {
                if self.shutdown.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if let Some(tls) = self.mesh_tls.as_ref().filter(|t| !t.is_ready()) {
                    let why = tls
                        .last_error()
                        .map_or_else(String::new, |e| format!(": {e}"));
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("waiting for an identity certificate{why}\n"),
                    )
                } else if !self.authz.is_ready() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the inbound policy of --inbound-ports\n",
                    )
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/tap-addr") => text(StatusCode::OK, format!("{}\n", self.tap_addr)),
            (&Method::GET, "/proxy-log-level") => {
                text(StatusCode::OK, format!("{}\n", self.log_level.get()))
            }
            (&Method::PUT, "/proxy-log-level") => {
                // Like Linkerd: only from the pod itself. Anyone else could turn logging off
                // (hiding authorization denials) or up to trace.
                if !is_loopback(peer) {
                    tracing::info!(client = %peer, "log level change refused: not from localhost");
                    return text(
                        StatusCode::FORBIDDEN,
                        "changing the log level is only allowed from localhost\n",
                    );
                }
                let body = match Limited::new(req.into_body(), 4096).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad body: {e}\n")),
                };
                let Ok(filter) = std::str::from_utf8(&body) else {
                    return text(StatusCode::BAD_REQUEST, "log level must be UTF-8\n");
                };
                match self.log_level.set(filter) {
                    Ok(()) => {
                        tracing::info!(level = filter.trim(), "log level changed");
                        text(StatusCode::NO_CONTENT, "")
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (&Method::POST, "/shutdown") => {
                // Like Linkerd: only from the pod itself, and only if the admin port's
                // policy lets the client in.
                let decision = self.authz.decide(
                    self.admin_addr.port(),
                    &Client::plain(peer),
                    &self.admin_label,
                );
                decision.http_counter().inc();
                if !decision.allowed {
                    return text(
                        StatusCode::FORBIDDEN,
                        "shutdown refused by the admin port's authorization policy\n",
                    );
                }
                if !is_loopback(peer) {
                    return text(
                        StatusCode::FORBIDDEN,
                        "shutdown is only allowed from localhost\n",
                    );
                }
                tracing::info!("shutdown requested through the admin server");
                self.shutdown.begin();
                text(StatusCode::OK, "shutdown\n")
            }
            (
                _,
                "/metrics" | "/metrics/window" | "/ready" | "/live" | "/proxy-log-level"
                | "/shutdown" | "/tap-addr",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Admin {
    /// `GET /metrics/window?window=DURATION` (default `1m`, at most 15m).
    fn window(&self, query: Option<&str>) -> AdminResponse {
        let window = match window_param(query) {
            Ok(w) => w,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let mut body = String::with_capacity(16 * 1024);
        let now = tokio::time::Instant::now().into_std();
        let encoded = self.metrics.encode_window(&mut body, window, now);
        openmetrics(encoded.map(|()| body))
    }
}

/// An encoded exposition as a response (or the encoder's failure as a 500).
fn openmetrics(encoded: Result<String, std::fmt::Error>) -> AdminResponse {
    let body = match encoded {
        Ok(body) => body,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding failed: {e}\n"),
            )
        }
    };
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(Metrics::CONTENT_TYPE),
    );
    rsp
}

/// The `window` query parameter: a Go duration (`30s`, `1m30s`) or whole seconds.
fn window_param(query: Option<&str>) -> Result<Duration, String> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("window="));
    let Some(value) = value else {
        return Ok(Duration::from_secs(60));
    };
    let window = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => pylon_proxy_policy::duration::parse(value)
            .map_err(|e| format!("bad window {value:?}: {e}"))?,
    };
    if window.is_zero() || window > MAX_WINDOW {
        return Err(format!(
            "bad window {value:?}: this proxy keeps windows from 1s to {}m",
            MAX_WINDOW.as_secs() / 60
        ));
    }
    Ok(window)
}

/// A peer on this host's loopback, also when a dual-stack (`[::]`) listener shows an IPv4
/// client as `::ffff:127.0.0.1`.
fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_parameter() {
        assert_eq!(window_param(None), Ok(Duration::from_secs(60)));
        assert_eq!(
            window_param(Some("window=10s")),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            window_param(Some("x=1&window=1m30s")),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(window_param(Some("window=900")), Ok(MAX_WINDOW));
        for bad in ["window=16m", "window=0s", "window=soon"] {
            let e = window_param(Some(bad)).expect_err(bad);
            assert!(e.starts_with("bad window"), "{e}");
        }
    }

    #[test]
    fn loopback_peers_include_ipv4_mapped_ones() {
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert!(is_loopback(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "10.0.0.1:5000",
            "[::ffff:10.0.0.1]:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback(remote.parse().unwrap()), "{remote}");
        }
    }
}
