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
        "{}: certificate has no Pylon identity DNS SAN (NAME.NS.serviceaccount.identity.pylon.DOMAIN); DNS SANs found: {found:?}",
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
            | Self::NoRuntime => None,
        }
    }
}
