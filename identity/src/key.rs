//! The workload side of an identity service: a private key made in the process, and the
//! certificate signing request that asks for this workload's identity with it.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Credentials, IdentityError, IdentityName, TrustAnchors};

/// An ECDSA P-256 key that never leaves the process, and a CSR for `identity` signed with it.
///
/// Made once per process: every renewal re-sends the same CSR (as Linkerd's proxy does), so a
/// renewal needs no new key, and a peer never sees this workload's key change under one
/// certificate.
pub struct IdentityKey {
    identity: IdentityName,
    key: PrivatePkcs8KeyDer<'static>,
    csr: Vec<u8>,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IdentityKey")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    /// A fresh key and a CSR whose subject CN and only DNS SAN are `identity` (no URI SAN:
    /// Linkerd's identity service refuses CSRs with one; the issuer adds the SPIFFE id).
    pub fn generate(identity: &IdentityName) -> Result<IdentityKey, IdentityError> {
        let generate = |what| move |source| IdentityError::Generate { what, source };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("the workload key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.as_str());
        params.distinguished_name = dn;
        let dns = identity
            .as_str()
            .try_into()
            .map_err(generate("a subject alternative name"))?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        let csr = params
            .serialize_request(&key)
            .map_err(generate("the certificate signing request"))?;
        Ok(IdentityKey {
            identity: identity.clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            csr: csr.der().to_vec(),
        })
    }

    pub fn identity(&self) -> &IdentityName {
        &self.identity
    }

    /// The CSR, DER (what `CertifyRequest.certificate_signing_request` carries).
    pub fn csr_der(&self) -> &[u8] {
        &self.csr
    }

    /// The private key, PKCS#8 DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Credentials from a certificate signed for this key, checked as an identity dir is
    /// (key matches, chain verifies against `anchors`, valid now), and for this identity.
    pub fn credentials(
        &self,
        leaf: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        anchors: &TrustAnchors,
    ) -> Result<Credentials, IdentityError> {
        let creds = Credentials::from_parts(self.key_der(), leaf, intermediates, anchors)?;
        if creds.identity() != &self.identity {
            return Err(IdentityError::UnexpectedIdentity {
                expected: self.identity.to_string(),
                found: creds.identity().to_string(),
            });
        }
        Ok(creds)
    }
}
