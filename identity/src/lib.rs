//! Pylon's workload identities and the mTLS credentials that prove them.
//!
//! This crate owns:
//!
//! - [`IdentityName`]: a workload's identity, `NAME.NS.serviceaccount.identity.pylon.<trust
//!   domain>` (the DNS SAN every mesh certificate carries, and the name a client expects when it
//!   connects) and its SPIFFE twin `spiffe://<trust domain>/ns/NS/sa/NAME`;
//! - [`ca`]: a small mesh CA (an ECDSA P-256 trust anchor and an intermediate issuer) and the
//!   issuing of workload certificates into an identity dir, written atomically;
//! - [`Credentials`]: loading an identity dir (`ca.crt`, `tls.crt`, `tls.key`), checking it
//!   (every problem is an [`IdentityError`] naming the file) and turning it into rustls
//!   configs for mesh TLS: TLS 1.3 only, client certificates verified against the trust anchor
//!   when presented, server identity checked through the name the client connects to;
//!   [`peer_identity`] reads the peer's identity off an established connection;
//! - [`IdentityWatcher`]: the identity dir watched and reloaded live (the last good credentials
//!   kept when new files are broken), published lock-free, with warnings as expiry nears; or
//!   fed by code through a [`CredentialsPublisher`] (an identity service client);
//! - [`Ca::certify_csr`](ca::Ca::certify_csr) (the identity service's side of Linkerd's
//!   `Certify`) and [`IdentityKey`] (the workload's side: a key and a CSR), with
//!   [`Credentials::from_parts`] turning what comes back into credentials;
//! - [`detect_client_hello`]: whether the first bytes of a connection are a TLS ClientHello.
//!
//! It must not know about listeners, HTTP or policy: it answers "who am I, whom do I trust, and
//! who is on the other end of this TLS session", and the proxy decides what to do about it.
//! Handshakes themselves run on the caller's sockets with the configs handed out here
//! ([`tokio_rustls`] is re-exported so both sides agree on the rustls version).

pub mod ca;
mod creds;
mod detect;
mod error;
mod fsutil;
mod key;
mod name;
#[cfg(test)]
mod test_support;
mod watch;

pub use crate::creds::{peer_identity, Credentials, TrustAnchors, ALPN_H2, ALPN_HTTP1};
pub use crate::detect::{client_hello_sni, detect_client_hello, Detect};
pub use crate::error::IdentityError;
pub use crate::key::IdentityKey;
pub use crate::name::{IdentityName, NameError};
pub use crate::watch::{CredentialsPublisher, IdentityWatchHandle, IdentityWatcher};

pub use rustls;
pub use tokio_rustls;

/// The trust anchor(s) a proxy trusts, PEM; in a CA dir, the self-signed root.
pub const CA_CRT: &str = "ca.crt";
/// The root's private key (CA dir only; never copied into identity dirs).
pub const CA_KEY: &str = "ca.key";
/// The intermediate that signs workload certificates (CA dir).
pub const ISSUER_CRT: &str = "issuer.crt";
/// The intermediate's private key (CA dir).
pub const ISSUER_KEY: &str = "issuer.key";
/// The CA's trust domain, one line (CA dir).
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";
/// The workload certificate chain, PEM: the leaf, then the intermediate (identity dir).
pub const TLS_CRT: &str = "tls.crt";
/// The workload's private key, PKCS#8 PEM, mode 0600 (identity dir).
pub const TLS_KEY: &str = "tls.key";

/// Unix seconds as RFC 3339 UTC (`2025-06-01T12:00:00Z`), as errors and logs show times.
pub fn format_unix_time(secs: i64) -> String {
    fsutil::fmt_unix(secs)
}
