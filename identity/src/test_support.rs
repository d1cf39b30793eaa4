//! Shared by the unit tests: CAs, identity dirs, and handshakes over in-memory pipes.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::ca::{Ca, IssuedCert, ValidityWindow};
use crate::creds::provider;

pub(crate) fn day() -> ValidityWindow {
    ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap()
}

pub(crate) fn test_ca(trust_domain: &str) -> Ca {
    Ca::generate(trust_domain, day()).unwrap()
}

pub(crate) fn identity_dir(ca: &Ca, sa: &str, ns: &str) -> (tempfile::TempDir, IssuedCert) {
    let dir = tempfile::tempdir().unwrap();
    let issued = ca.issue(sa, ns, day()).unwrap();
    issued.write(dir.path()).unwrap();
    (dir, issued)
}

/// A TLS 1.3 client that trusts `ca` but presents no certificate.
pub(crate) fn anonymous_client(ca: &Ca) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.anchor_pem().as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub(crate) type Accepted = std::io::Result<server::TlsStream<tokio::io::DuplexStream>>;
pub(crate) type Connected = std::io::Result<client::TlsStream<tokio::io::DuplexStream>>;

/// Both ends of one handshake over an in-memory pipe, each side's outcome; bounded in time.
pub(crate) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (Accepted, Connected) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let accept = TlsAcceptor::from(server).accept(a);
    let connect = TlsConnector::from(client).connect(name, b);
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("handshake timed out")
}
