//! This workload's certificate from an identity service (Linkerd's
//! `io.linkerd.proxy.identity.Identity/Certify`), as Linkerd's proxy gets it: a key made once
//! in the process, a CSR for `--identity-name` sent with the ServiceAccount token (re-read for
//! every request: projected tokens rotate), the certificate installed for mesh TLS, renewed at
//! 70% of its remaining lifetime. A failure is retried with jittered exponential backoff while
//! the current certificate stays in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body::Body;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use pylon_identity::rustls::pki_types::{CertificateDer, ServerName};
use pylon_identity::tokio_rustls::TlsConnector;
use pylon_identity::{
    format_unix_time, Credentials, CredentialsPublisher, IdentityError, IdentityKey, IdentityName,
    TrustAnchors, ALPN_H2,
};
use pylon_proxy_metrics::Metrics;

use crate::args::ProxyArgs;

/// Where Linkerd's proxy injector mounts the token (audience `identity.l5d.io`).
pub const LINKERD_TOKEN_FILE: &str = "/var/run/secrets/tokens/linkerd-identity-token";
/// The pod's own ServiceAccount token, when there is no Linkerd-style one.
pub const SERVICE_ACCOUNT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Linkerd's names for the inputs, read when the flag (and its `PYLON_*` twin) is not set.
const ENV_SVC_ADDR: &str = "LINKERD2_PROXY_IDENTITY_SVC_ADDR";
const ENV_LOCAL_NAME: &str = "LINKERD2_PROXY_IDENTITY_LOCAL_NAME";
const ENV_TOKEN_FILE: &str = "LINKERD2_PROXY_IDENTITY_TOKEN_FILE";
const ENV_TRUST_ANCHORS: &str = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS";
const ENV_SVC_NAME: &str = "LINKERD2_PROXY_IDENTITY_SVC_NAME";

/// Renew when this share of the remaining lifetime has passed (Linkerd's 70%)...
const REFRESH_PERCENT: u32 = 70;
/// ...but not sooner than this (a very short-lived certificate must not make a busy loop)...
const MIN_REFRESH: Duration = Duration::from_secs(10);
/// ...nor later than this (Linkerd's default maximum).
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Retries after a failure: from about this...
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// ...doubling up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One Certify call, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What is wrong with the identity service settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--identity-addr and --identity-dir exclude each other: the certificate comes from the identity service or from a directory")]
    Conflict,
    #[error("--identity-name (or {ENV_LOCAL_NAME}) is required with --identity-addr")]
    MissingName,
    #[error("--identity-name: {0}")]
    Name(#[from] pylon_identity::NameError),
    #[error("--identity-trust-anchors (or {ENV_TRUST_ANCHORS}) is required with --identity-addr")]
    MissingAnchors,
    #[error("trust anchors: {0}")]
    Anchors(IdentityError),
    #[error("--identity-svc-name {name:?}: not a DNS name")]
    SvcName { name: String },
    #[error("--identity-addr {addr:?}: {reason}")]
    Addr { addr: String, reason: String },
    #[error("generating this workload's key: {0}")]
    Key(IdentityError),
}

/// Why one Certify attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("token {}: {source}", .path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token {}: file is empty", .path.display())]
    EmptyToken { path: PathBuf },
    #[error("identity service: {code}: {message}", code = .0.code(), message = .0.message())]
    Rpc(tonic::Status),
    #[error("identity service did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("identity service response: {0}")]
    Response(&'static str),
    #[error("certificate from the identity service: {0}")]
    Credentials(#[from] IdentityError),
}

/// Where the ServiceAccount token is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    /// [`LINKERD_TOKEN_FILE`] if it exists, else [`SERVICE_ACCOUNT_TOKEN_FILE`] (looked at on
    /// every read: either may be mounted).
    Default,
}

impl TokenSource {
    async fn load(&self) -> Result<Vec<u8>, CertifyError> {
        let path = match self {
            TokenSource::File(path) => path.as_path(),
            TokenSource::Default if Path::new(LINKERD_TOKEN_FILE).exists() => {
                Path::new(LINKERD_TOKEN_FILE)
            }
            TokenSource::Default => Path::new(SERVICE_ACCOUNT_TOKEN_FILE),
        };
        let token = tokio::fs::read(path)
            .await
            .map_err(|source| CertifyError::Token {
                path: path.to_path_buf(),
                source,
            })?;
        if token.iter().all(u8::is_ascii_whitespace) {
            return Err(CertifyError::EmptyToken {
                path: path.to_path_buf(),
            });
        }
        Ok(token)
    }
}

/// The identity service settings, from flags (and their `PYLON_*` twins) or Linkerd's
/// `LINKERD2_PROXY_IDENTITY_*` variables.
#[derive(Clone, Debug)]
pub struct Config {
    /// `HOST:PORT` (or a URI).
    pub addr: String,
    pub name: IdentityName,
    pub token: TokenSource,
    pub anchors: TrustAnchors,
    /// The service's identity: TLS to it when set, plaintext gRPC otherwise.
    pub svc_name: Option<String>,
}

impl Config {
    /// `None` without an identity service address. `env` reads Linkerd's variables (the
    /// process environment in the proxy; a map in tests).
    pub fn from_args(
        args: &ProxyArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Config>, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let addr = match (&args.identity_addr, &args.identity_dir) {
            (Some(_), Some(_)) => return Err(ConfigError::Conflict),
            (Some(addr), None) => addr.clone(),
            // Linkerd's variable only fills in for a missing flag: with --identity-dir, the
            // directory is what was asked for.
            (None, Some(_)) => return Ok(None),
            (None, None) => match env(ENV_SVC_ADDR) {
                Some(addr) => addr,
                None => return Ok(None),
            },
        };
        let name = args
            .identity_name
            .clone()
            .or_else(|| env(ENV_LOCAL_NAME))
            .ok_or(ConfigError::MissingName)?;
        let name = IdentityName::parse(name.trim())?;
        let token = match args
            .identity_token_file
            .clone()
            .or_else(|| env(ENV_TOKEN_FILE).map(PathBuf::from))
        {
            Some(path) => TokenSource::File(path),
            None => TokenSource::Default,
        };
        let anchors = match (&args.identity_trust_anchors, env(ENV_TRUST_ANCHORS)) {
            (Some(value), _) if value.trim_start().starts_with("-----BEGIN") => {
                TrustAnchors::from_pem(value.as_bytes(), "--identity-trust-anchors")
            }
            (Some(path), _) => TrustAnchors::load(Path::new(path)),
            (None, Some(pem)) => TrustAnchors::from_pem(pem.as_bytes(), ENV_TRUST_ANCHORS),
            (None, None) => return Err(ConfigError::MissingAnchors),
        }
        .map_err(ConfigError::Anchors)?;
        let svc_name = args.identity_svc_name.clone().or_else(|| env(ENV_SVC_NAME));
        if let Some(svc) = &svc_name {
            if ServerName::try_from(svc.clone()).is_err() {
                return Err(ConfigError::SvcName { name: svc.clone() });
            }
        }
        Ok(Some(Config {
            addr,
            name,
            token,
            anchors,
            svc_name,
        }))
    }

    fn uri(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// A gRPC channel to the service, connecting on first use and reconnecting as needed:
    /// TLS (server verified against the trust anchors as `svc_name`, no client certificate
    /// yet) when `svc_name` is set.
    fn channel(&self) -> Result<tonic::transport::Channel, ConfigError> {
        let addr_err = |reason: String| ConfigError::Addr {
            addr: self.addr.clone(),
            reason,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(self.uri())
            .map_err(|e| addr_err(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT);
        let Some(svc_name) = &self.svc_name else {
            return Ok(endpoint.connect_lazy());
        };
        let server_name =
            ServerName::try_from(svc_name.clone()).map_err(|_| ConfigError::SvcName {
                name: svc_name.clone(),
            })?;
        let tls = TlsConnector::from(
            self.anchors
                .anonymous_client_config(&[ALPN_H2])
                .map_err(ConfigError::Anchors)?,
        );
        let connect = tower::service_fn(move |uri: http::Uri| {
            let (tls, server_name) = (tls.clone(), server_name.clone());
            async move {
                let host = uri.host().unwrap_or_default();
                let port = uri.port_u16().unwrap_or(443);
                // `[::1]` in a URI is `::1` to the resolver.
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tls.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connect))
    }
}

/// Starts certifying in the background: the key is made now, the first request goes out at
/// once. Credentials go to `publisher`; the task stops when the returned handle is dropped.
pub fn spawn(
    config: Config,
    publisher: CredentialsPublisher,
    metrics: Arc<Metrics>,
) -> Result<AbortOnDrop, ConfigError> {
    let key = IdentityKey::generate(&config.name).map_err(ConfigError::Key)?;
    let client = IdentityClient::new(config.channel()?);
    match &config.svc_name {
        Some(svc) => {
            tracing::info!(addr = config.addr, identity = %config.name, server_identity = svc, "certifying with the identity service over TLS")
        }
        None => {
            tracing::warn!(addr = config.addr, identity = %config.name, "certifying with the identity service over plaintext gRPC (no --identity-svc-name): the token travels in clear")
        }
    }
    let certifier = Certifier {
        key,
        token: config.token,
        anchors: config.anchors,
        publisher,
        metrics,
    };
    Ok(AbortOnDrop(tokio::spawn(certifier.run(client))))
}

/// Aborts the task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Certifier {
    key: IdentityKey,
    token: TokenSource,
    anchors: TrustAnchors,
    publisher: CredentialsPublisher,
    metrics: Arc<Metrics>,
}

impl Certifier {
    /// Certifies forever: at 70% of each certificate's remaining lifetime, and after a failure
    /// with backoff (the current certificate, if any, stays in use).
    async fn run<T>(self, mut client: IdentityClient<T>)
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let failures = self.metrics.identity_certify_failures();
        let refreshes = self.metrics.identity_cert_refreshes();
        let mut failed_in_a_row = 0u32;
        let mut current_not_after: Option<i64> = None;
        loop {
            let wait = match self.certify(&mut client).await {
                Ok(creds) => {
                    let not_after = creds.not_after();
                    tracing::info!(
                        identity = %creds.identity(),
                        serial = creds.serial(),
                        not_after = %format_unix_time(not_after),
                        "identity certified"
                    );
                    self.metrics.set_identity_expiry(not_after);
                    refreshes.inc();
                    self.publisher.publish(creds);
                    failed_in_a_row = 0;
                    current_not_after = Some(not_after);
                    refresh_in(not_after, SystemTime::now())
                }
                Err(error) => {
                    failures.inc();
                    failed_in_a_row = failed_in_a_row.saturating_add(1);
                    let wait = backoff(failed_in_a_row, rand::random::<f64>());
                    self.publisher.publish_error(&error);
                    match current_not_after {
                        Some(not_after) => tracing::warn!(
                            %error,
                            attempt = failed_in_a_row,
                            retry_in_ms = wait.as_millis() as u64,
                            current_not_after = %format_unix_time(not_after),
                            "identity certification failed; keeping the current certificate"
                        ),
                        None => tracing::warn!(
                            %error,
                            attempt = failed_in_a_row,
                            retry_in_ms = wait.as_millis() as u64,
                            "identity certification failed; no certificate yet (not ready)"
                        ),
                    }
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One Certify request, its answer checked and turned into credentials.
    async fn certify<T>(&self, client: &mut IdentityClient<T>) -> Result<Credentials, CertifyError>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let request = CertifyRequest {
            identity: self.key.identity().to_string(),
            token: self.token.load().await?,
            certificate_signing_request: self.key.csr_der().to_vec(),
        };
        let CertifyResponse {
            leaf_certificate,
            intermediate_certificates,
            valid_until,
        } = tokio::time::timeout(REQUEST_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| CertifyError::Timeout)?
            .map_err(CertifyError::Rpc)?
            .into_inner();
        if valid_until.is_none() {
            return Err(CertifyError::Response("no valid_until"));
        }
        // The certificate's own notAfter is what peers check; valid_until only has to exist.
        Ok(self.key.credentials(
            CertificateDer::from(leaf_certificate),
            intermediate_certificates
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            &self.anchors,
        )?)
    }
}

/// When to renew a certificate that expires at `not_after` (unix seconds): after 70% of its
/// remaining lifetime, within [`MIN_REFRESH`, `MAX_REFRESH`].
fn refresh_in(not_after: i64, now: SystemTime) -> Duration {
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0).unsigned_abs());
    let remaining = expiry.duration_since(now).unwrap_or_default();
    (remaining * REFRESH_PERCENT / 100).clamp(MIN_REFRESH, MAX_REFRESH)
}

/// The wait before retry `attempt` (1 after the first failure): [`MIN_BACKOFF`] doubling per
/// attempt up to [`MAX_BACKOFF`], of which a random half (`jitter` in [0, 1)) is taken off so
/// proxies restarted together do not retry in step.
fn backoff(attempt: u32, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    let ceiling = MIN_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF);
    ceiling.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests;
