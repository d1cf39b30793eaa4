use std::io;
use std::path::{Path, PathBuf};

use crate::name::NameError;

/// Everything that can go wrong making, loading or watching identity files. Errors about a
/// file name it, so an operator knows which one to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("{}: file is missing", .path.display())]
    Missing { path: PathBuf },

    #[error("{}: cannot read: {source}", .path.display())]
    Unreadable { path: PathBuf, source: io::Error },

    /// Not PEM, or PEM without the block we need (`CERTIFICATE`, `PRIVATE KEY`).
    #[error("{}: not a PEM {what}: {reason}", .path.display())]
    NotPem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },

    /// PEM that holds something other than a usable X.509 certificate.
    #[error("{}: bad certificate: {reason}", .path.display())]
    BadCertificate { path: PathBuf, reason: String },

    /// PEM that holds something other than a usable private key.
    #[error("{}: bad private key: {reason}", .path.display())]
    BadKey { path: PathBuf, reason: String },

    #[error("{}: private key does not match the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    #[error(
        "{}: certificate chain does not verify against the trust anchor in {}: {reason}",
        .path.display(),
        .anchor.display()
    )]
    ChainInvalid {
        path: PathBuf,
        anchor: PathBuf,
        reason: String,
    },

    /// `not_after` is in unix seconds.
    #[error("{}: certificate expired at {}", .path.display(), crate::fsutil::fmt_unix(*.not_after))]
    Expired { path: PathBuf, not_after: i64 },

    /// `not_before` is in unix seconds.
    #[error("{}: certificate is not valid before {}", .path.display(), crate::fsutil::fmt_unix(*.not_before))]
    NotYetValid { path: PathBuf, not_before: i64 },

    #[error(
        "{}: certificate has no Pylon identity DNS SAN (NAME.NS.serviceaccount.identity.pylon.DOMAIN, or Linkerd's ...identity.linkerd.DOMAIN); DNS SANs found: {found:?}",
        .path.display()
    )]
    NoIdentity { path: PathBuf, found: Vec<String> },

    #[error("{}: {source}", .path.display())]
    BadTrustDomain { path: PathBuf, source: NameError },

    #[error(transparent)]
    Name(#[from] NameError),

    #[error("invalid validity window: {0}")]
    Validity(String),

    #[error("{}: cannot write: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },

    #[error("generating {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },

    #[error("building the TLS config: {0}")]
    Tls(String),

    #[error("watching identity files needs a tokio runtime")]
    NoRuntime,

    /// Not a DER certificate signing request, or one using what we cannot sign (an unknown
    /// key algorithm or extension).
    #[error("bad certificate signing request: {reason}")]
    CsrInvalid { reason: String },

    /// The CSR's signature does not verify with the public key it carries.
    #[error("certificate signing request signature does not verify")]
    CsrSignature,

    /// The CSR asks for names other than the identity the caller is entitled to.
    #[error("certificate signing request is not for {expected}: it asks for {requested:?}")]
    CsrIdentityMismatch {
        expected: String,
        requested: Vec<String>,
    },

    /// A certificate signed for another identity than the one asked for.
    #[error("certificate is for {found}, not {expected}")]
    UnexpectedIdentity { expected: String, found: String },

    /// A CA signs identities of its own trust domain only.
    #[error("{identity} is not in this CA's trust domain ({trust_domain})")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },

    /// The issuer has expired (`not_after` in unix seconds): it would only sign what no peer
    /// accepts.
    #[error("the issuer expired at {}", crate::fsutil::fmt_unix(*.not_after))]
    IssuerExpired { not_after: i64 },
}

impl IdentityError {
    /// The file the error is about, when there is one (for structured logs).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Missing { path }
            | Self::Unreadable { path, .. }
            | Self::NotPem { path, .. }
            | Self::BadCertificate { path, .. }
            | Self::BadKey { path, .. }
            | Self::ChainInvalid { path, .. }
            | Self::Expired { path, .. }
            | Self::NotYetValid { path, .. }
            | Self::NoIdentity { path, .. }
            | Self::BadTrustDomain { path, .. }
            | Self::Write { path, .. } => Some(path),
            Self::KeyMismatch { key, .. } => Some(key),
            Self::Name(_)
            | Self::Validity(_)
            | Self::Generate { .. }
            | Self::Tls(_)
            | Self::NoRuntime
            | Self::CsrInvalid { .. }
            | Self::CsrSignature
            | Self::CsrIdentityMismatch { .. }
            | Self::ForeignTrustDomain { .. }
            | Self::UnexpectedIdentity { .. }
            | Self::IssuerExpired { .. } => None,
        }
    }
}
