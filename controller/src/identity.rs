//! Linkerd's identity API, `io.linkerd.proxy.identity.Identity/Certify`: a proxy sends its
//! ServiceAccount token and a CSR for its identity, and gets back a certificate signed by the
//! mesh CA's issuer.
//!
//! As Linkerd's identity controller does, a request is granted only when the token
//! authenticates (a Kubernetes TokenReview, behind [`TokenReviewer`]) as
//! `system:serviceaccount:NS:SA` and the requested identity is that ServiceAccount's name in
//! the CA's trust domain (`SA.NS.serviceaccount.identity.pylon.DOMAIN`, or Linkerd's
//! `...identity.linkerd.DOMAIN` form for Linkerd proxies). What the certificate says is the
//! CA's business ([`Ca::certify_csr`]): only the CSR's key is taken from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use pylon_identity::ca::{Ca, CertifiedLeaf};
use pylon_identity::rustls::pki_types::pem::PemObject;
use pylon_identity::rustls::pki_types::CertificateSigningRequestDer;
use pylon_identity::{format_unix_time, IdentityError, IdentityName};
use tonic::{Request, Response, Status};

/// How long issued certificates are valid by default (Linkerd's default too).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The audience of the token Linkerd's proxy injector mounts for the proxy
/// (`/var/run/secrets/tokens/linkerd-identity-token`).
pub const LINKERD_TOKEN_AUDIENCE: &str = "identity.l5d.io";

/// Why a token was not reviewed as a ServiceAccount's.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token does not authenticate (expired, wrong audience, unknown signer, deleted
    /// ServiceAccount): the caller is refused with `Unauthenticated`.
    #[error("token not authenticated: {0}")]
    NotAuthenticated(String),
    /// The review itself could not be done (the API server unreachable, forbidden to create
    /// TokenReviews): the caller gets `Unavailable` and retries.
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// Authenticates ServiceAccount tokens (in the cluster: a `TokenReview`).
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    /// The authenticated username for a ServiceAccount token, e.g.
    /// "system:serviceaccount:NS:SA"; Err when not authenticated.
    async fn review(&self, token: &str, audiences: &[String]) -> Result<String, ReviewError>;
}

/// Counts of Certify outcomes since start, for metrics.
#[derive(Debug, Default)]
pub struct CertifyStats {
    issued: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

impl CertifyStats {
    /// Certificates issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Requests refused for the caller's fault (`InvalidArgument`, `Unauthenticated`,
    /// `PermissionDenied`).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Requests that failed on this side (`Unavailable`, `Internal`): the token review could
    /// not be done, or the issuer could not sign.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The `Identity` gRPC service. Serve it with [`IdentityService::into_server`].
pub struct IdentityService {
    ca: Arc<Ca>,
    reviewer: Arc<dyn TokenReviewer>,
    lifetime: Duration,
    audiences: Vec<String>,
    stats: Arc<CertifyStats>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .field("lifetime", &self.lifetime)
            .field("audiences", &self.audiences)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    /// Issues certificates from `ca` (loaded from a CA dir with its issuer key: `Ca::load`)
    /// for [`DEFAULT_CERT_LIFETIME`] to whoever `reviewer` authenticates, reviewing tokens for
    /// the audience [`LINKERD_TOKEN_AUDIENCE`].
    pub fn new(ca: Arc<Ca>, reviewer: Arc<dyn TokenReviewer>) -> IdentityService {
        IdentityService {
            ca,
            reviewer,
            lifetime: DEFAULT_CERT_LIFETIME,
            audiences: vec![LINKERD_TOKEN_AUDIENCE.to_owned()],
            stats: Arc::default(),
        }
    }

    /// How long issued certificates are valid (cut to the issuer's own expiry).
    pub fn with_lifetime(mut self, lifetime: Duration) -> IdentityService {
        self.lifetime = lifetime;
        self
    }

    /// The audiences tokens are reviewed for; empty means the API server's own (what a
    /// pod's default ServiceAccount token is for).
    pub fn with_audiences(mut self, audiences: Vec<String>) -> IdentityService {
        self.audiences = audiences;
        self
    }

    /// Outcome counts, shared with the running service.
    pub fn stats(&self) -> Arc<CertifyStats> {
        self.stats.clone()
    }

    pub fn into_server(self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self)
    }

    async fn certify_request(&self, req: &CertifyRequest) -> Result<CertifiedLeaf, Status> {
        if req.identity.is_empty() {
            return Err(Status::invalid_argument("missing identity"));
        }
        let requested = IdentityName::parse(&req.identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if requested.trust_domain() != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "{requested} is not in this identity service's trust domain ({})",
                self.ca.trust_domain()
            )));
        }
        let token = std::str::from_utf8(&req.token)
            .map_err(|_| Status::invalid_argument("token is not UTF-8"))?
            .trim();
        if token.is_empty() {
            return Err(Status::invalid_argument("missing token"));
        }
        if req.certificate_signing_request.is_empty() {
            return Err(Status::invalid_argument(
                "missing certificate_signing_request",
            ));
        }

        let username = self
            .reviewer
            .review(token, &self.audiences)
            .await
            .map_err(|e| match e {
                ReviewError::NotAuthenticated(_) => Status::unauthenticated(e.to_string()),
                ReviewError::Unavailable(_) => Status::unavailable(e.to_string()),
            })?;
        let (namespace, sa) = service_account(&username).ok_or_else(|| {
            Status::permission_denied(format!(
                "token authenticates {username:?}, not a ServiceAccount (system:serviceaccount:NS:SA)"
            ))
        })?;
        let entitled = IdentityName::new(sa, namespace, self.ca.trust_domain()).map_err(|e| {
            Status::permission_denied(format!("ServiceAccount {namespace}/{sa}: {e}"))
        })?;
        if !requested.same_account(&entitled) {
            return Err(Status::permission_denied(format!(
                "requested identity {requested} is not the token's ServiceAccount {namespace}/{sa} ({entitled})"
            )));
        }

        // The proto says PEM, Linkerd's proxy sends DER; take either.
        let csr = if req.certificate_signing_request.starts_with(b"-----BEGIN") {
            CertificateSigningRequestDer::from_pem_slice(&req.certificate_signing_request)
                .map_err(|e| Status::invalid_argument(format!("certificate signing request: {e}")))?
                .to_vec()
        } else {
            req.certificate_signing_request.clone()
        };
        self.ca
            .certify_csr(&csr, &requested, self.lifetime)
            .map_err(|e| match e {
                IdentityError::CsrInvalid { .. }
                | IdentityError::CsrSignature
                | IdentityError::CsrIdentityMismatch { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                // Retryable: the issuer may be rotated meanwhile.
                IdentityError::IssuerExpired { .. } => Status::unavailable(e.to_string()),
                other => Status::internal(other.to_string()),
            })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let client = request.remote_addr();
        let req = request.into_inner();
        match self.certify_request(&req).await {
            Ok(leaf) => {
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    identity = %leaf.identity,
                    serial = leaf.serial,
                    not_after = %format_unix_time(leaf.not_after),
                    client = ?client,
                    "certified"
                );
                Ok(Response::new(CertifyResponse {
                    leaf_certificate: leaf.leaf_der.to_vec(),
                    intermediate_certificates: leaf
                        .intermediates_der
                        .iter()
                        .map(|c| c.to_vec())
                        .collect(),
                    valid_until: Some(prost_types::Timestamp {
                        seconds: leaf.not_after,
                        nanos: 0,
                    }),
                }))
            }
            Err(status) => {
                let ours = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Internal
                );
                if ours {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(identity = req.identity, client = ?client, code = ?status.code(), error = status.message(), "certify failed");
                } else {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(identity = req.identity, client = ?client, code = ?status.code(), reason = status.message(), "certify refused");
                }
                Err(status)
            }
        }
    }
}

/// `(NS, SA)` of `system:serviceaccount:NS:SA`.
fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, sa) = rest.split_once(':')?;
    if namespace.is_empty() || sa.is_empty() || sa.contains(':') {
        return None;
    }
    Some((namespace, sa))
}

/// A [`TokenReviewer`] that knows a fixed set of tokens: for tests and demos without a
/// Kubernetes API.
#[derive(Debug, Default, Clone)]
pub struct StaticTokenReviewer {
    /// token → (username, audiences it is valid for; empty: any).
    tokens: std::collections::HashMap<String, (String, Vec<String>)>,
}

impl StaticTokenReviewer {
    /// `token` authenticates as ServiceAccount `namespace/sa`, for any audience.
    pub fn with_service_account(mut self, token: &str, namespace: &str, sa: &str) -> Self {
        self.tokens.insert(
            token.to_owned(),
            (
                format!("system:serviceaccount:{namespace}:{sa}"),
                Vec::new(),
            ),
        );
        self
    }

    /// `token` authenticates as `username`, only for `audiences` (any when empty).
    pub fn with_user(mut self, token: &str, username: &str, audiences: &[&str]) -> Self {
        self.tokens.insert(
            token.to_owned(),
            (
                username.to_owned(),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
        self
    }
}

#[tonic::async_trait]
impl TokenReviewer for StaticTokenReviewer {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<String, ReviewError> {
        let (username, valid_for) = self
            .tokens
            .get(token)
            .ok_or_else(|| ReviewError::NotAuthenticated("unknown token".into()))?;
        // As the API server does: the token must be valid for one of the audiences asked for.
        if !valid_for.is_empty()
            && !audiences.is_empty()
            && !audiences.iter().any(|a| valid_for.contains(a))
        {
            return Err(ReviewError::NotAuthenticated(format!(
                "token audiences {valid_for:?} do not include {audiences:?}"
            )));
        }
        Ok(username.clone())
    }
}

#[cfg(test)]
mod tests;
