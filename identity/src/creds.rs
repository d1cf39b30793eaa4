//! Loading an identity dir into checked credentials and the rustls configs built from them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::fsutil::{self, unix_secs};
use crate::{IdentityError, IdentityName, CA_CRT, TLS_CRT, TLS_KEY};

/// How [`Credentials::from_parts`] names its parts in errors.
const LEAF_SOURCE: &str = "certified leaf";
const KEY_SOURCE: &str = "local key";

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Distinct ALPN lists a proxy asks for are few (h2, http/1.1, none); past this many the
/// cache stops growing and extra lists get a fresh config each time.
const MAX_CACHED_ALPN_CONFIGS: usize = 8;

/// A client config and the ALPN list it offers.
type AlpnConfig = (Vec<Vec<u8>>, Arc<ClientConfig>);

/// This workload's checked identity credentials and the TLS configs made from them.
///
/// Built once per version of the identity dir; a rotation makes a new `Credentials` and new
/// configs, so connections already established (or handshaking) keep the ones they started
/// with.
pub struct Credentials {
    identity: IdentityName,
    not_before: i64,
    not_after: i64,
    serial: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// Copies of `client` with ALPN set, keyed by the ALPN list.
    alpn_clients: Mutex<Vec<AlpnConfig>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// ring, explicitly: configs never depend on a process-wide default provider (which panics
/// when none or several are compiled in).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The certificates a workload trusts, parsed and checked once; where they came from (a file,
/// or an environment variable) names them in errors.
#[derive(Clone)]
pub struct TrustAnchors {
    certs: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    source: PathBuf,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("source", &self.source)
            .field("count", &self.certs.len())
            .finish()
    }
}

impl TrustAnchors {
    /// Every `CERTIFICATE` block of the PEM file at `path` (at least one).
    pub fn load(path: &Path) -> Result<TrustAnchors, IdentityError> {
        Self::from_der(fsutil::read_certs(path)?, path)
    }

    /// Every `CERTIFICATE` block of `pem` (at least one); `source` names them in errors.
    pub fn from_pem(pem: &[u8], source: impl Into<PathBuf>) -> Result<TrustAnchors, IdentityError> {
        let source = source.into();
        let not_pem = |reason: String| IdentityError::NotPem {
            path: source.clone(),
            what: "certificate",
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| not_pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(not_pem("no CERTIFICATE block".into()));
        }
        Self::from_der(certs, source)
    }

    fn from_der(
        certs: Vec<CertificateDer<'static>>,
        source: impl Into<PathBuf>,
    ) -> Result<TrustAnchors, IdentityError> {
        let source = source.into();
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| IdentityError::BadCertificate {
                    path: source.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(TrustAnchors {
            certs,
            roots: Arc::new(roots),
            source,
        })
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Where the anchors came from (a path, or a label such as an environment variable).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// A client config for a workload that has no certificate yet (talking to the identity
    /// service): TLS 1.3, servers verified against these anchors, no client certificate,
    /// offering `alpn`.
    pub fn anonymous_client_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl Credentials {
    /// Loads `ca.crt`, `tls.crt` and `tls.key` from `dir` and checks them: PEM with the
    /// right blocks, the key matches the leaf, the leaf carries a Pylon identity DNS SAN, it
    /// is valid now, and the chain verifies against the trust anchor for both server and
    /// client use.
    pub fn load(dir: &Path) -> Result<Credentials, IdentityError> {
        Self::load_at(dir, SystemTime::now())
    }

    /// [`load`](Self::load) as if the time were `now` (tests load expired credentials this way
    /// to see that peers refuse them).
    pub(crate) fn load_at(dir: &Path, now: SystemTime) -> Result<Credentials, IdentityError> {
        let crt_path = dir.join(TLS_CRT);
        let key_path = dir.join(TLS_KEY);
        let anchors = TrustAnchors::load(&dir.join(CA_CRT))?;
        let chain = fsutil::read_certs(&crt_path)?;
        let key = fsutil::read_key(&key_path)?;
        Self::build(&anchors, chain, key, &crt_path, &key_path, now)
    }

    /// Credentials from parts held in memory (a key made here and a certificate an identity
    /// service signed for it), checked as [`load`](Self::load) checks an identity dir. Errors
    /// name the part: `certified leaf`, `local key`, or the anchors' source.
    pub fn from_parts(
        key: PrivateKeyDer<'static>,
        leaf: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        anchors: &TrustAnchors,
    ) -> Result<Credentials, IdentityError> {
        Self::from_parts_at(key, leaf, intermediates, anchors, SystemTime::now())
    }

    /// [`from_parts`](Self::from_parts) as if the time were `now`.
    pub(crate) fn from_parts_at(
        key: PrivateKeyDer<'static>,
        leaf: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        anchors: &TrustAnchors,
        now: SystemTime,
    ) -> Result<Credentials, IdentityError> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(leaf);
        chain.extend(intermediates);
        Self::build(
            anchors,
            chain,
            key,
            Path::new(LEAF_SOURCE),
            Path::new(KEY_SOURCE),
            now,
        )
    }

    /// The checks and configs shared by [`load`](Self::load) and
    /// [`from_parts`](Self::from_parts); `crt_path` and `key_path` name the sources in errors.
    fn build(
        anchors: &TrustAnchors,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        crt_path: &Path,
        key_path: &Path,
        now: SystemTime,
    ) -> Result<Credentials, IdentityError> {
        let ca_path = anchors.source.clone();
        let crt_path = crt_path.to_path_buf();
        let key_path = key_path.to_path_buf();
        let roots = anchors.roots.clone();

        let bad_cert = |reason: String| IdentityError::BadCertificate {
            path: crt_path.clone(),
            reason,
        };
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| bad_cert("no certificate".into()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad_cert(e.to_string()))?;
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        let serial = parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dns_names = dns_sans(&parsed).map_err(bad_cert)?;
        let identity = dns_names
            .iter()
            .find_map(|n| IdentityName::parse(n).ok())
            .ok_or_else(|| IdentityError::NoIdentity {
                path: crt_path.clone(),
                found: dns_names.clone(),
            })?;

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| IdentityError::BadKey {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            // Unknown: the key type cannot tell its public half; the handshake will.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(IdentityError::KeyMismatch {
                    key: key_path,
                    cert: crt_path,
                })
            }
            Err(e) => return Err(bad_cert(e.to_string())),
        }

        let now_secs = unix_secs(now);
        if now_secs < not_before {
            return Err(IdentityError::NotYetValid {
                path: crt_path,
                not_before,
            });
        }
        if now_secs > not_after {
            return Err(IdentityError::Expired {
                path: crt_path,
                not_after,
            });
        }

        let tls_err = |e: &dyn std::fmt::Display| IdentityError::Tls(e.to_string());
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                // mTLS is optional for inbound: a client without a certificate has no identity,
                // and policy (not TLS) decides whether that is allowed.
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_err(&e))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| tls_err(&e))?;

        // The same checks a peer will make, now, so a bad chain is reported with its file at
        // load time rather than as handshake failures later.
        let chain_err = |e: rustls::Error| IdentityError::ChainInvalid {
            path: crt_path.clone(),
            anchor: ca_path.clone(),
            reason: e.to_string(),
        };
        let unix_now =
            UnixTime::since_unix_epoch(Duration::from_secs(now_secs.max(0).unsigned_abs()));
        client_verifier
            .verify_client_cert(leaf, intermediates, unix_now)
            .map_err(chain_err)?;
        server_verifier
            .verify_server_cert(leaf, intermediates, &identity.server_name(), &[], unix_now)
            .map_err(chain_err)?;

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_err(&e))?;
        // Server preference: h2 when the client offers it.
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];

        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err(&e))?;

        Ok(Credentials {
            identity,
            not_before,
            not_after,
            serial,
            server: Arc::new(server),
            client: Arc::new(client),
            alpn_clients: Mutex::new(Vec::new()),
        })
    }

    /// This workload's identity (the leaf's DNS SAN).
    pub fn identity(&self) -> &IdentityName {
        &self.identity
    }

    /// Start of the leaf's validity, unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// End of the leaf's validity, unix seconds (what an expiry gauge shows).
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The leaf's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// For inbound mesh TLS: TLS 1.3, this workload's certificate, ALPN `h2` then `http/1.1`,
    /// and client certificates requested, verified against the trust anchor when presented,
    /// but optional. Read the client's identity with [`peer_identity`].
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// For outbound mesh TLS, without ALPN: TLS 1.3, presents this workload's certificate,
    /// verifies the server's chain against the trust anchor. Connect with the expected
    /// server's [`IdentityName::server_name`]; rustls refuses a server whose certificate is
    /// not for that name.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// [`client_config`](Self::client_config) offering `protocols` by ALPN, in that order.
    /// Cached per list, so calling it per connection does not rebuild configs (and
    /// connections to the same server share session resumption).
    pub fn client_config_with_alpn(&self, protocols: &[&[u8]]) -> Arc<ClientConfig> {
        if protocols.is_empty() {
            return self.client.clone();
        }
        let mut cache = self
            .alpn_clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let same = |key: &[Vec<u8>]| {
            key.len() == protocols.len() && key.iter().zip(protocols).all(|(a, b)| a == b)
        };
        if let Some((_, config)) = cache.iter().find(|(key, _)| same(key)) {
            return config.clone();
        }
        let mut config = ClientConfig::clone(&self.client);
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        if cache.len() < MAX_CACHED_ALPN_CONFIGS {
            cache.push((config.alpn_protocols.clone(), config.clone()));
        }
        config
    }
}

/// The identity of the peer of an established TLS session: the first DNS SAN of its leaf
/// certificate that is a Pylon identity name. `None` when the peer sent no certificate, or
/// its certificate names no Pylon identity.
///
/// Only meaningful on sessions made with this crate's configs, which verify the peer's chain
/// against the trust anchor before the handshake completes.
pub fn peer_identity(conn: &CommonState) -> Option<IdentityName> {
    let leaf = conn.peer_certificates()?.first()?;
    identity_of(leaf)
}

pub(crate) fn identity_of(cert: &CertificateDer<'_>) -> Option<IdentityName> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    dns_sans(&parsed)
        .ok()?
        .iter()
        .find_map(|n| IdentityName::parse(n).ok())
}

fn dns_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| format!("subject alternative names: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, ValidityWindow};
    use crate::test_support::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn issue_and_load_round_trip() {
        let ca = test_ca("cluster.local");
        let (dir, issued) = identity_dir(&ca, "web", "default");
        let creds = Credentials::load(dir.path()).unwrap();
        assert_eq!(
            creds.identity().as_str(),
            "web.default.serviceaccount.identity.pylon.cluster.local"
        );
        assert_eq!(creds.identity(), &issued.identity);
        assert_eq!(creds.serial(), issued.serial);
        assert_eq!(creds.not_after(), issued.not_after);
        assert_eq!(creds.not_before(), issued.not_before);

        // The leaf carries the SPIFFE id too, and the chain is leaf then issuer.
        let chain = fsutil::read_certs(&dir.path().join(TLS_CRT)).unwrap();
        assert_eq!(chain.len(), 2);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let uris: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            uris,
            vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert!(!leaf.is_ca());
    }

    #[tokio::test]
    async fn mutual_tls_with_the_right_identities() {
        let ca = test_ca("cluster.local");
        let (server_dir, _) = identity_dir(&ca, "api", "prod");
        let (client_dir, _) = identity_dir(&ca, "web", "default");
        let server = Credentials::load(server_dir.path()).unwrap();
        let client = Credentials::load(client_dir.path()).unwrap();

        let (s, c) = handshake(
            server.server_config(),
            client.client_config_with_alpn(&[ALPN_H2, ALPN_HTTP1]),
            server.identity().server_name(),
        )
        .await;
        let (s, c) = (s.unwrap(), c.unwrap());
        let (_, server_conn) = s.get_ref();
        let (_, client_conn) = c.get_ref();
        assert_eq!(peer_identity(server_conn).as_ref(), Some(client.identity()));
        assert_eq!(peer_identity(client_conn).as_ref(), Some(server.identity()));
        assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(client_conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            server_conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );

        // A client that only speaks HTTP/1.1 gets it.
        let (s, c) = handshake(
            server.server_config(),
            client.client_config_with_alpn(&[ALPN_HTTP1]),
            server.identity().server_name(),
        )
        .await;
        assert_eq!(s.unwrap().get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
        assert_eq!(c.unwrap().get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_allowed_and_has_no_identity() {
        let ca = test_ca("cluster.local");
        let (server_dir, _) = identity_dir(&ca, "api", "prod");
        let server = Credentials::load(server_dir.path()).unwrap();
        let (s, c) = handshake(
            server.server_config(),
            anonymous_client(&ca),
            server.identity().server_name(),
        )
        .await;
        let (s, c) = (s.unwrap(), c.unwrap());
        assert_eq!(peer_identity(s.get_ref().1), None);
        assert_eq!(
            peer_identity(c.get_ref().1).as_ref(),
            Some(server.identity())
        );
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let ca = test_ca("cluster.local");
        let (server_dir, _) = identity_dir(&ca, "api", "prod");
        let (client_dir, _) = identity_dir(&ca, "web", "default");
        let server = Credentials::load(server_dir.path()).unwrap();
        let client = Credentials::load(client_dir.path()).unwrap();
        let expected = IdentityName::new("billing", "prod", "cluster.local").unwrap();
        let (_, c) = handshake(
            server.server_config(),
            client.client_config(),
            expected.server_name(),
        )
        .await;
        let err = c.unwrap_err().to_string();
        assert!(err.contains("not valid for name"), "{err}");
    }

    #[tokio::test]
    async fn another_cas_certificates_are_refused_both_ways() {
        let ours = test_ca("cluster.local");
        let theirs = test_ca("cluster.local");
        let (our_server_dir, _) = identity_dir(&ours, "api", "prod");
        let (our_client_dir, _) = identity_dir(&ours, "web", "default");
        let (their_server_dir, _) = identity_dir(&theirs, "api", "prod");
        let (their_client_dir, _) = identity_dir(&theirs, "web", "default");
        let our_server = Credentials::load(our_server_dir.path()).unwrap();
        let our_client = Credentials::load(our_client_dir.path()).unwrap();
        let their_server = Credentials::load(their_server_dir.path()).unwrap();

        // Our client, their server: the client refuses the server.
        let (_, c) = handshake(
            their_server.server_config(),
            our_client.client_config(),
            their_server.identity().server_name(),
        )
        .await;
        let err = c.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");

        // Our server, their client: the server refuses the client's certificate. The client
        // trusts both anchors, so it is the server that says no. (In TLS 1.3 the client may
        // finish its side before it hears so.)
        let bundle = format!("{}{}", ours.anchor_pem(), theirs.anchor_pem());
        std::fs::write(their_client_dir.path().join(CA_CRT), bundle).unwrap();
        let their_trusting_client = Credentials::load(their_client_dir.path()).unwrap();
        let (s, c) = handshake(
            our_server.server_config(),
            their_trusting_client.client_config(),
            our_server.identity().server_name(),
        )
        .await;
        let err = s.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
        // The client learns of it no later than its first read.
        if let Ok(mut c) = c {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            assert!(!matches!(c.read(&mut buf).await, Ok(1)));
        }
    }

    #[tokio::test]
    async fn an_expired_client_certificate_is_refused() {
        let now = SystemTime::now();
        let ca_window = ValidityWindow {
            not_before: now - Duration::from_secs(86_400),
            not_after: now + Duration::from_secs(86_400),
        };
        let ca = Ca::generate("cluster.local", ca_window).unwrap();
        let (server_dir, _) = identity_dir(&ca, "api", "prod");
        let server = Credentials::load(server_dir.path()).unwrap();

        let window = ValidityWindow {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        };
        let client_dir = tempfile::tempdir().unwrap();
        ca.issue("web", "default", window)
            .unwrap()
            .write(client_dir.path())
            .unwrap();
        // Loading now refuses it; loading as of its lifetime yields a client that presents it.
        assert!(matches!(
            Credentials::load(client_dir.path()),
            Err(IdentityError::Expired { .. })
        ));
        let client =
            Credentials::load_at(client_dir.path(), now - Duration::from_secs(5400)).unwrap();
        let (s, _) = handshake(
            server.server_config(),
            client.client_config(),
            server.identity().server_name(),
        )
        .await;
        let err = s.unwrap_err().to_string();
        assert!(err.to_lowercase().contains("expired"), "{err}");
    }

    #[test]
    fn missing_unreadable_and_garbage_files_have_typed_errors() {
        let ca = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        let path = |name: &str| dir.path().join(name);

        let key = std::fs::read(path(TLS_KEY)).unwrap();
        std::fs::remove_file(path(TLS_KEY)).unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::Missing { path: p }) => assert_eq!(p, path(TLS_KEY)),
            other => panic!("{other:?}"),
        }

        std::fs::write(path(TLS_KEY), "not a key").unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::NotPem { path: p, what, .. }) => {
                assert_eq!(p, path(TLS_KEY));
                assert_eq!(what, "private key");
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(path(TLS_KEY), key).unwrap();

        std::fs::write(path(CA_CRT), "garbage\n").unwrap();
        match Credentials::load(dir.path()) {
            Err(e @ IdentityError::NotPem { .. }) => {
                assert_eq!(e.path(), Some(path(CA_CRT).as_path()));
                assert!(e.to_string().contains("ca.crt"), "{e}");
            }
            other => panic!("{other:?}"),
        }

        // A PEM block whose body is not a certificate.
        std::fs::write(
            path(CA_CRT),
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        match Credentials::load(dir.path()) {
            Err(e @ IdentityError::BadCertificate { .. }) => {
                assert_eq!(e.path(), Some(path(CA_CRT).as_path()))
            }
            other => panic!("{other:?}"),
        }

        std::fs::remove_file(path(CA_CRT)).unwrap();
        std::fs::create_dir(path(CA_CRT)).unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::Unreadable { path: p, .. }) => assert_eq!(p, path(CA_CRT)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_that_is_not_the_leafs_is_detected() {
        let ca = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        let (other, _) = identity_dir(&ca, "web", "default");
        std::fs::copy(other.path().join(TLS_KEY), dir.path().join(TLS_KEY)).unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::KeyMismatch { key, cert }) => {
                assert_eq!(key, dir.path().join(TLS_KEY));
                assert_eq!(cert, dir.path().join(TLS_CRT));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_chain_from_another_ca_does_not_verify() {
        let ca = test_ca("cluster.local");
        let other = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        std::fs::write(dir.path().join(CA_CRT), other.anchor_pem()).unwrap();
        match Credentials::load(dir.path()) {
            Err(e @ IdentityError::ChainInvalid { .. }) => {
                assert!(e.to_string().contains("tls.crt"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_say_when() {
        let ca = test_ca("cluster.local");
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);

        let dir = tempfile::tempdir().unwrap();
        let past = ValidityWindow {
            not_before: now - 3 * hour,
            not_after: now - hour,
        };
        let issued = ca.issue("web", "default", past).unwrap();
        issued.write(dir.path()).unwrap();
        match Credentials::load(dir.path()) {
            Err(e @ IdentityError::Expired { .. }) => {
                let IdentityError::Expired { not_after, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*not_after, issued.not_after);
                assert!(
                    e.to_string().contains(&fsutil::fmt_unix(issued.not_after)),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }

        let future = ValidityWindow {
            not_before: now + hour,
            not_after: now + 3 * hour,
        };
        let issued = ca.issue("web", "default", future).unwrap();
        issued.write(dir.path()).unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::NotYetValid { not_before, .. }) => {
                assert_eq!(not_before, issued.not_before)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_leaf_without_an_identity_san_is_refused() {
        let ca = test_ca("cluster.local");
        let dir = tempfile::tempdir().unwrap();
        let identity = IdentityName::new("web", "default", "cluster.local").unwrap();
        let san = rcgen::SanType::DnsName("web.example.com".try_into().unwrap());
        ca.issue_with_sans(identity, vec![san], day())
            .unwrap()
            .write(dir.path())
            .unwrap();
        match Credentials::load(dir.path()) {
            Err(IdentityError::NoIdentity { found, .. }) => {
                assert_eq!(found, vec!["web.example.com".to_string()])
            }
            other => panic!("{other:?}"),
        }
    }

    /// The parts of an issued identity: key, leaf, intermediates, anchors.
    fn parts(
        issued: &crate::ca::IssuedCert,
    ) -> (
        PrivateKeyDer<'static>,
        CertificateDer<'static>,
        Vec<CertificateDer<'static>>,
        TrustAnchors,
    ) {
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let mut chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let leaf = chain.remove(0);
        let anchors = TrustAnchors::from_pem(issued.ca_pem.as_bytes(), "TEST_ANCHORS").unwrap();
        (key, leaf, chain, anchors)
    }

    #[tokio::test]
    async fn credentials_from_parts_are_the_same_as_from_a_dir() {
        let ca = test_ca("cluster.local");
        let (dir, issued) = identity_dir(&ca, "web", "default");
        let from_dir = Credentials::load(dir.path()).unwrap();
        let (key, leaf, intermediates, anchors) = parts(&issued);
        assert_eq!(anchors.certs().len(), 1);
        assert_eq!(anchors.source(), Path::new("TEST_ANCHORS"));
        let from_parts = Credentials::from_parts(key, leaf, intermediates, &anchors).unwrap();
        assert_eq!(from_parts.identity(), from_dir.identity());
        assert_eq!(from_parts.serial(), from_dir.serial());
        assert_eq!(from_parts.not_after(), from_dir.not_after());

        // They interoperate: a server from a dir, a client from parts.
        let (s, c) = handshake(
            from_dir.server_config(),
            from_parts.client_config(),
            from_dir.identity().server_name(),
        )
        .await;
        let (s, _) = (s.unwrap(), c.unwrap());
        assert_eq!(
            peer_identity(s.get_ref().1).as_ref(),
            Some(from_parts.identity())
        );

        // The anchors alone make a client with no certificate (for the identity service).
        let anonymous = anchors.anonymous_client_config(&[ALPN_H2]).unwrap();
        assert_eq!(anonymous.alpn_protocols, vec![ALPN_H2.to_vec()]);
        let (s, c) = handshake(
            from_dir.server_config(),
            anonymous,
            from_dir.identity().server_name(),
        )
        .await;
        assert_eq!(peer_identity(s.unwrap().get_ref().1), None);
        assert_eq!(
            c.unwrap().get_ref().1.alpn_protocol(),
            Some(ALPN_H2),
            "h2 negotiated"
        );
    }

    #[test]
    fn credentials_from_parts_are_checked_and_errors_name_the_part() {
        let ca = test_ca("cluster.local");
        let issued = ca.issue("web", "default", day()).unwrap();
        let other = ca.issue("web", "default", day()).unwrap();
        let (key, leaf, intermediates, anchors) = parts(&issued);
        let (other_key, ..) = parts(&other);

        match Credentials::from_parts(other_key, leaf.clone(), intermediates.clone(), &anchors) {
            Err(IdentityError::KeyMismatch { key, cert }) => {
                assert_eq!(key, Path::new(KEY_SOURCE));
                assert_eq!(cert, Path::new(LEAF_SOURCE));
            }
            other => panic!("{other:?}"),
        }

        // No intermediate: the leaf does not chain to the anchor.
        match Credentials::from_parts(key.clone_key(), leaf.clone(), vec![], &anchors) {
            Err(e @ IdentityError::ChainInvalid { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(LEAF_SOURCE) && msg.contains("TEST_ANCHORS"),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }

        // Another CA's anchors.
        let theirs = test_ca("cluster.local");
        let their_anchors =
            TrustAnchors::from_pem(theirs.anchor_pem().as_bytes(), "THEIRS").unwrap();
        assert!(matches!(
            Credentials::from_parts(
                key.clone_key(),
                leaf.clone(),
                intermediates.clone(),
                &their_anchors
            ),
            Err(IdentityError::ChainInvalid { .. })
        ));

        // Checked against the time as well.
        let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
        assert!(matches!(
            Credentials::from_parts_at(key, leaf, intermediates, &anchors, later),
            Err(IdentityError::Expired { .. })
        ));

        for garbage in [
            &b""[..],
            b"garbage",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        ] {
            match TrustAnchors::from_pem(garbage, "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS") {
                Err(e) => assert_eq!(
                    e.path(),
                    Some(Path::new("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")),
                    "{e}"
                ),
                Ok(a) => panic!("{a:?}"),
            }
        }
    }

    #[test]
    fn alpn_configs_are_cached() {
        let ca = test_ca("cluster.local");
        let (dir, _) = identity_dir(&ca, "web", "default");
        let creds = Credentials::load(dir.path()).unwrap();
        let a = creds.client_config_with_alpn(&[ALPN_H2]);
        let b = creds.client_config_with_alpn(&[ALPN_H2]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![ALPN_H2.to_vec()]);
        let c = creds.client_config_with_alpn(&[ALPN_HTTP1]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(
            &creds.client_config_with_alpn(&[]),
            &creds.client_config()
        ));
        // Bounded: many distinct lists do not grow the cache past its cap.
        let names: Vec<Vec<u8>> = (0..20).map(|i| format!("p{i}").into_bytes()).collect();
        for name in &names {
            let config = creds.client_config_with_alpn(&[name.as_slice()]);
            assert_eq!(config.alpn_protocols, vec![name.clone()]);
        }
        assert!(creds.alpn_clients.lock().unwrap().len() <= MAX_CACHED_ALPN_CONFIGS);
    }

    #[test]
    fn peer_identity_ignores_certificates_without_a_pylon_name() {
        let ca: Ca = test_ca("cluster.local");
        let identity = IdentityName::new("web", "default", "cluster.local").unwrap();
        let san = rcgen::SanType::DnsName("web.default.svc.cluster.local".try_into().unwrap());
        let issued = ca.issue_with_sans(identity, vec![san], day()).unwrap();
        let der = CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der), None);
        assert_eq!(identity_of(&CertificateDer::from(vec![0u8; 10])), None);
        let good = ca.issue("web", "default", day()).unwrap();
        let der = CertificateDer::from_pem_slice(good.chain_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der), Some(good.identity));
    }
}
