//! Mesh TLS for the proxy: this workload's identity (from `--identity-dir`, watched and
//! rotated by `pylon-identity`, or from the identity service at `--identity-addr`), the client
//! side of a hop to a meshed endpoint, and the server side of a hop from a meshed client.
//!
//! Every handshake reads the current credentials, so a rotation applies to new connections
//! and never touches established ones. Before the identity service's first certificate,
//! handshakes wait for it (within the handshake timeout), and `/ready` says not ready.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pylon_identity::rustls::pki_types::ServerName;
use pylon_identity::tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use pylon_identity::{
    peer_identity, IdentityError, IdentityName, IdentityWatchHandle, IdentityWatcher, ALPN_H2,
    ALPN_HTTP1,
};

use crate::identity_client::{self, AbortOnDrop};
use pylon_proxy_metrics::Metrics;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long a TLS handshake may take on either side (a client that never finishes its
/// ClientHello must not hold a connection task forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The inner protocol a client hop announces by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2 between proxies (HTTP/1.1 from the app travels this way too).
    H2,
    /// HTTP/1.1 kept as is: upgrades (WebSocket) can't ride an h2 stream.
    Http1,
    /// Opaque TCP: no ALPN; the inbound proxy detects what's inside.
    Opaque,
}

impl Alpn {
    fn protocols(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::H2 => &[ALPN_H2],
            Alpn::Http1 => &[ALPN_HTTP1],
            Alpn::Opaque => &[],
        }
    }
}

/// What the server side learnt from a client's handshake.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The client's identity; `None` for a TLS client without a (Pylon) certificate.
    pub client_id: Option<Arc<str>>,
    /// The client asked for h2 by ALPN.
    pub h2: bool,
}

pub struct MeshTls {
    watcher: IdentityWatcher,
    /// What keeps `watcher` current: the dir's watch, or the identity service's client.
    _source: Source,
    /// This workload's identity name (fixed: a rotation re-issues the same name).
    local: IdentityName,
}

enum Source {
    Dir(#[allow(dead_code)] IdentityWatchHandle),
    Service(#[allow(dead_code)] AbortOnDrop),
}

impl MeshTls {
    /// Loads and watches `dir`; a missing, unreadable or expired identity is an error, so a
    /// proxy never starts without the identity it was told to have. Keeps the
    /// `identity_cert_expiration_timestamp_seconds` gauge current.
    pub fn start(dir: &Path, metrics: Arc<Metrics>) -> Result<Arc<MeshTls>, IdentityError> {
        let (watcher, watch) = IdentityWatcher::spawn(dir)?;
        let local = match watcher.current() {
            Some(current) => current.identity().clone(),
            // Unreachable: a dir's first load must succeed for `spawn` to return.
            None => {
                return Err(IdentityError::Missing {
                    path: dir.to_path_buf(),
                })
            }
        };
        Ok(Self::with_watcher(
            watcher,
            Source::Dir(watch),
            local,
            metrics,
        ))
    }

    /// Gets this workload's certificate from the identity service and keeps it renewed; until
    /// the first arrives, [`is_ready`](Self::is_ready) is false and handshakes wait.
    pub fn start_certifying(
        config: identity_client::Config,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<MeshTls>, identity_client::ConfigError> {
        let (watcher, publisher) = IdentityWatcher::published();
        let local = config.name.clone();
        let client = identity_client::spawn(config, publisher, metrics.clone())?;
        Ok(Self::with_watcher(
            watcher,
            Source::Service(client),
            local,
            metrics,
        ))
    }

    /// Keeps the `identity_cert_expiration_timestamp_seconds` gauge current.
    fn with_watcher(
        watcher: IdentityWatcher,
        source: Source,
        local: IdentityName,
        metrics: Arc<Metrics>,
    ) -> Arc<MeshTls> {
        if let Some(current) = watcher.current() {
            metrics.set_identity_expiry(current.not_after());
        }
        let tls = Arc::new(MeshTls {
            watcher,
            _source: source,
            local,
        });
        let weak = Arc::downgrade(&tls);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(tls) = weak.upgrade() else { return };
                if let Some(current) = tls.watcher.current() {
                    metrics.set_identity_expiry(current.not_after());
                }
            }
        });
        tls
    }

    /// Whether this workload has a certificate (always, from a dir).
    pub fn is_ready(&self) -> bool {
        self.watcher.current().is_some()
    }

    /// Why the last attempt to get (or reload) the certificate failed, while it still
    /// matters.
    pub fn last_error(&self) -> Option<Arc<String>> {
        self.watcher.last_error()
    }

    pub fn local_identity(&self) -> &IdentityName {
        &self.local
    }

    /// TLS to a meshed endpoint that must prove `server_id`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        server_id: &str,
        alpn: Alpn,
    ) -> std::io::Result<client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_id.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("server identity {server_id:?}: {e}"),
            )
        })?;
        let connect = async {
            let config = self
                .watcher
                .wait_current()
                .await
                .client_config_with_alpn(alpn.protocols());
            TlsConnector::from(config).connect(name, tcp).await
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })?
    }

    /// Terminates a client's TLS (its ClientHello is at the start of `io`).
    pub async fn accept<I>(
        &self,
        io: I,
        peer: SocketAddr,
    ) -> std::io::Result<(server::TlsStream<I>, Accepted)>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let accept = async {
            let acceptor = TlsAcceptor::from(self.watcher.wait_current().await.server_config());
            acceptor.accept(io).await
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        let (_, session) = stream.get_ref();
        let accepted = Accepted {
            client_id: peer_identity(session).map(|id| Arc::from(id.as_str())),
            h2: session.alpn_protocol() == Some(ALPN_H2),
        };
        tracing::debug!(client = %peer, client_id = accepted.client_id.as_deref(), h2 = accepted.h2, "mesh TLS accepted");
        Ok((stream, accepted))
    }
}
