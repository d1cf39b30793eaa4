//! The mesh CA: a self-signed trust anchor, an intermediate issuer signed by it, and the
//! workload certificates the issuer signs. All keys are ECDSA P-256.
//!
//! A CA dir holds [`CA_CRT`], [`CA_KEY`] (the root; only needed to sign a new issuer),
//! [`ISSUER_CRT`], [`ISSUER_KEY`] and [`TRUST_DOMAIN_FILE`]. An identity dir, what the proxy
//! loads, holds [`CA_CRT`] (a copy of the trust anchor), [`TLS_CRT`] (leaf, then issuer) and
//! [`TLS_KEY`] (PKCS#8, 0600). Every file is written atomically (temp file + rename), so a
//! proxy watching the dir never reads half of one.
//!
//! [`init_ca`] and [`issue`] are what `pylon identity init-ca` and `issue` run; [`Ca`] is the
//! same in memory, with explicit validity windows, for tests that need an expired, a
//! not-yet-valid, or another CA's certificate.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::fsutil::{self, unix_secs};
use crate::name::check_trust_domain;
use crate::{
    IdentityError, IdentityName, CA_CRT, CA_KEY, ISSUER_CRT, ISSUER_KEY, TLS_CRT, TLS_KEY,
    TRUST_DOMAIN_FILE,
};

const MODE_PUBLIC: u32 = 0o644;
const MODE_SECRET: u32 = 0o600;

/// How far back `not_before` is set by the convenience functions, so a peer whose clock is a
/// little behind does not see a fresh certificate as not yet valid.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// A certificate's validity, both ends inclusive (as X.509 has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityWindow {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl ValidityWindow {
    /// From [`CLOCK_SKEW_ALLOWANCE`] ago until `valid_for` from now.
    pub fn starting_now(valid_for: Duration) -> Result<Self, IdentityError> {
        let now = SystemTime::now();
        let not_after = now
            .checked_add(valid_for)
            .ok_or_else(|| IdentityError::Validity(format!("{valid_for:?} is too long")))?;
        Ok(ValidityWindow {
            not_before: now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
            not_after,
        })
    }

    /// `(not_before, not_after)` in unix seconds, checked to be a non-empty window X.509 can
    /// encode.
    fn unix(&self) -> Result<(i64, i64), IdentityError> {
        let (nb, na) = (unix_secs(self.not_before), unix_secs(self.not_after));
        if na <= nb {
            return Err(IdentityError::Validity(format!(
                "not_after ({}) must be after not_before ({})",
                fsutil::fmt_unix(na),
                fsutil::fmt_unix(nb)
            )));
        }
        Ok((nb, na))
    }
}

/// What [`init_ca`] wrote.
#[derive(Debug, Clone)]
pub struct CaSummary {
    pub trust_domain: String,
    /// Unix seconds; the issuer's and the anchor's.
    pub not_after: i64,
    pub files: Vec<PathBuf>,
}

/// A workload certificate and its key, in memory (PEM).
#[derive(Clone)]
pub struct IssuedCert {
    pub identity: IdentityName,
    /// Leaf then issuer.
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
    /// The trust anchor, for the identity dir's `ca.crt`.
    pub ca_pem: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lowercase hex.
    pub serial: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (created if missing), each
    /// atomically. The key goes first and the chain last: a watcher that reloads between two
    /// renames sees a key/cert mismatch and keeps its last good credentials until the chain
    /// lands.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, IdentityError> {
        fsutil::create_dir(dir)?;
        let files = [
            (TLS_KEY, &self.key_pem, MODE_SECRET),
            (CA_CRT, &self.ca_pem, MODE_PUBLIC),
            (TLS_CRT, &self.chain_pem, MODE_PUBLIC),
        ];
        let mut written = Vec::with_capacity(files.len());
        for (name, contents, mode) in files {
            let path = dir.join(name);
            fsutil::write_atomic(&path, contents.as_bytes(), mode)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// A leaf signed for someone else's key ([`Ca::certify_csr`]): what an identity service sends
/// back. DER throughout, as Linkerd's `CertifyResponse` carries it.
#[derive(Clone, Debug)]
pub struct CertifiedLeaf {
    pub identity: IdentityName,
    pub leaf_der: CertificateDer<'static>,
    /// The issuer (and any certificates above it short of the trust anchor), in order.
    pub intermediates_der: Vec<CertificateDer<'static>>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds; what `valid_until` says.
    pub not_after: i64,
    /// Lowercase hex.
    pub serial: String,
}

/// A CA able to issue: its trust anchor and its intermediate issuer (with key).
pub struct Ca {
    trust_domain: String,
    anchor_pem: String,
    /// Only when generated here; a loaded CA does not need (or read) the root key.
    anchor_key_pem: Option<String>,
    issuer_pem: String,
    /// `issuer_pem`'s certificates, DER, for the intermediates of a certified leaf.
    issuer_chain: Vec<CertificateDer<'static>>,
    issuer_key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A brand-new CA for `trust_domain`, unrelated to any other: a self-signed root and an
    /// intermediate it signs, both valid for `window`.
    pub fn generate(trust_domain: &str, window: ValidityWindow) -> Result<Ca, IdentityError> {
        let trust_domain = check_trust_domain(trust_domain)?;
        let (nb, na) = window.unix()?;

        let root_key = generate_key("the root CA key")?;
        let mut root = ca_params("Pylon root CA", &trust_domain, &root_key, nb, na)?;
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root
            .self_signed(&root_key)
            .map_err(|source| IdentityError::Generate {
                what: "the root CA certificate",
                source,
            })?;
        let root_issuer = Issuer::new(root, root_key);

        let issuer_key = generate_key("the issuer key")?;
        let mut issuer = ca_params("Pylon issuer", &trust_domain, &issuer_key, nb, na)?;
        // The issuer signs leaves only.
        issuer.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        issuer.use_authority_key_identifier_extension = true;
        let issuer_cert = issuer
            .signed_by(&issuer_key, &root_issuer)
            .map_err(|source| IdentityError::Generate {
                what: "the issuer certificate",
                source,
            })?;

        Ok(Ca {
            trust_domain,
            anchor_pem: root_cert.pem(),
            anchor_key_pem: Some(root_issuer.key().serialize_pem()),
            issuer_pem: issuer_cert.pem(),
            issuer_chain: vec![issuer_cert.der().clone()],
            issuer_key_pem: issuer_key.serialize_pem(),
            issuer: Issuer::new(issuer, issuer_key),
            not_after: na,
        })
    }

    /// Reads a CA dir written by [`Ca::write`]: the trust domain, the anchor, the issuer and
    /// its key (checked to match).
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let td_path = dir.join(TRUST_DOMAIN_FILE);
        let trust_domain =
            check_trust_domain(&fsutil::read_string(&td_path)?).map_err(|source| {
                IdentityError::BadTrustDomain {
                    path: td_path.clone(),
                    source,
                }
            })?;

        let anchor_path = dir.join(CA_CRT);
        fsutil::read_certs(&anchor_path)?;
        let anchor_pem = fsutil::read_string(&anchor_path)?;

        let issuer_path = dir.join(ISSUER_CRT);
        let issuer_chain = fsutil::read_certs(&issuer_path)?;
        let issuer_der = issuer_chain
            .first()
            .cloned()
            .ok_or_else(|| IdentityError::NotPem {
                path: issuer_path.clone(),
                what: "certificate",
                reason: "no CERTIFICATE block".into(),
            })?;
        let issuer_pem = fsutil::read_string(&issuer_path)?;
        let bad_issuer = |reason: String| IdentityError::BadCertificate {
            path: issuer_path.clone(),
            reason,
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&issuer_der)
            .map_err(|e| bad_issuer(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(bad_issuer("not a CA certificate".into()));
        }
        let not_after = parsed.validity().not_after.timestamp();

        let key_path = dir.join(ISSUER_KEY);
        let issuer_key_pem = fsutil::read_string(&key_path)?;
        let issuer_key = KeyPair::from_pem(&issuer_key_pem).map_err(|e| IdentityError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        if rcgen::PublicKeyData::subject_public_key_info(&issuer_key)
            != parsed.tbs_certificate.subject_pki.raw
        {
            return Err(IdentityError::KeyMismatch {
                key: key_path,
                cert: issuer_path,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_der, issuer_key)
            .map_err(|e| bad_issuer(e.to_string()))?;

        Ok(Ca {
            trust_domain,
            anchor_pem,
            anchor_key_pem: None,
            issuer_pem,
            issuer_chain,
            issuer_key_pem,
            issuer,
            not_after,
        })
    }

    /// Writes the CA dir (created if missing); keys 0600. Returns the files written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, IdentityError> {
        fsutil::create_dir(dir)?;
        let td = format!("{}\n", self.trust_domain);
        let mut files = vec![
            (CA_CRT, &self.anchor_pem, MODE_PUBLIC),
            (ISSUER_KEY, &self.issuer_key_pem, MODE_SECRET),
            (ISSUER_CRT, &self.issuer_pem, MODE_PUBLIC),
            (TRUST_DOMAIN_FILE, &td, MODE_PUBLIC),
        ];
        if let Some(key) = &self.anchor_key_pem {
            files.insert(1, (CA_KEY, key, MODE_SECRET));
        }
        let mut written = Vec::with_capacity(files.len());
        for (name, contents, mode) in files {
            let path = dir.join(name);
            fsutil::write_atomic(&path, contents.as_bytes(), mode)?;
            written.push(path);
        }
        Ok(written)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchor, PEM.
    pub fn anchor_pem(&self) -> &str {
        &self.anchor_pem
    }

    /// When the issuer (and so every certificate it signs) stops being valid, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// A workload certificate for `sa` in `namespace`, valid for exactly `window` (which may
    /// lie in the past or the future: tests use it for expired and not-yet-valid ones).
    ///
    /// The leaf: subject CN and DNS SAN = the identity name, URI SAN = its SPIFFE id, key
    /// usage digitalSignature, extended key usages serverAuth and clientAuth, a fresh P-256
    /// key (its serial is derived from that key, so every issue has a new serial).
    pub fn issue(
        &self,
        sa: &str,
        namespace: &str,
        window: ValidityWindow,
    ) -> Result<IssuedCert, IdentityError> {
        let identity = IdentityName::new(sa, namespace, &self.trust_domain)?;
        let dns = ia5(identity.as_str())?;
        let uri = ia5(&identity.spiffe_id())?;
        self.issue_with_sans(
            identity,
            vec![SanType::DnsName(dns), SanType::URI(uri)],
            window,
        )
    }

    /// [`issue`](Self::issue) with explicit SANs (tests make certificates without an identity).
    pub(crate) fn issue_with_sans(
        &self,
        identity: IdentityName,
        sans: Vec<SanType>,
        window: ValidityWindow,
    ) -> Result<IssuedCert, IdentityError> {
        let (nb, na) = window.unix()?;
        let params = leaf_params(&identity, sans, nb, na)?;
        let key = generate_key("the workload key")?;
        let cert =
            params
                .signed_by(&key, &self.issuer)
                .map_err(|source| IdentityError::Generate {
                    what: "the workload certificate",
                    source,
                })?;
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, c)| hex(c.raw_serial()))
            .unwrap_or_default();
        let mut chain_pem = cert.pem();
        if !chain_pem.ends_with('\n') {
            chain_pem.push('\n');
        }
        chain_pem.push_str(&self.issuer_pem);
        Ok(IssuedCert {
            identity,
            chain_pem,
            key_pem: key.serialize_pem(),
            ca_pem: self.anchor_pem.clone(),
            not_before: nb,
            not_after: na,
            serial,
        })
    }
}

impl Ca {
    /// Signs a workload's certificate signing request (DER, as Linkerd's `CertifyRequest`
    /// carries it) for `expected`, valid from [`CLOCK_SKEW_ALLOWANCE`] ago for `lifetime`, cut
    /// to the issuer's own expiry.
    ///
    /// The CSR's signature must verify (proof that the requester holds the key), and it must
    /// ask for `expected` and nothing else: every DNS SAN and the subject CN, when present, equal
    /// to it (at least one of them present), URI SANs only its SPIFFE id, no other names. Only
    /// the CSR's public key is used: the leaf has exactly the shape [`Ca::issue`] gives (CN and
    /// DNS SAN = the identity, URI SAN = its SPIFFE id, serverAuth + clientAuth, not a CA),
    /// whatever else the CSR asks for. Serials are random, since a workload keeps its key
    /// across renewals.
    ///
    /// Whether the requester is entitled to `expected` is the caller's business (the identity
    /// service checks its token).
    pub fn certify_csr(
        &self,
        csr_der: &[u8],
        expected: &IdentityName,
        lifetime: Duration,
    ) -> Result<CertifiedLeaf, IdentityError> {
        self.certify_csr_at(csr_der, expected, lifetime, SystemTime::now())
    }

    /// [`certify_csr`](Self::certify_csr) as if the time were `now`.
    pub fn certify_csr_at(
        &self,
        csr_der: &[u8],
        expected: &IdentityName,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<CertifiedLeaf, IdentityError> {
        if expected.trust_domain() != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                identity: expected.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let now_secs = unix_secs(now);
        if self.not_after <= now_secs {
            return Err(IdentityError::IssuerExpired {
                not_after: self.not_after,
            });
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| match e {
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        IdentityError::CsrSignature
                    }
                    rcgen::Error::CouldNotParseCertificationRequest => IdentityError::CsrInvalid {
                        reason: "not a DER PKCS#10 certificate signing request".into(),
                    },
                    other => IdentityError::CsrInvalid {
                        reason: other.to_string(),
                    },
                })?;
        check_csr_names(&csr.params, expected)?;

        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let nb = now_secs.saturating_sub(secs(CLOCK_SKEW_ALLOWANCE));
        // A leaf outliving its issuer would just fail verification at the issuer's expiry.
        let na = now_secs.saturating_add(secs(lifetime)).min(self.not_after);
        if na <= now_secs {
            return Err(IdentityError::Validity(format!(
                "a lifetime of {lifetime:?} ends before it starts"
            )));
        }
        let dns = ia5(expected.as_str())?;
        let uri = ia5(&expected.spiffe_id())?;
        let mut params = leaf_params(
            expected,
            vec![SanType::DnsName(dns), SanType::URI(uri)],
            nb,
            na,
        )?;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| IdentityError::Generate {
                what: "the workload certificate",
                source,
            })?;
        Ok(CertifiedLeaf {
            identity: expected.clone(),
            leaf_der: cert.der().clone(),
            intermediates_der: self.issuer_chain.clone(),
            not_before: nb,
            not_after: na,
            serial: hex(&serial),
        })
    }

    /// The trust anchor(s), DER.
    pub fn anchors_der(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.anchor_pem.as_bytes())
            .filter_map(Result::ok)
            .collect()
    }
}

/// Every name a CSR asks for must be `expected` (or its SPIFFE id, as a URI SAN).
fn check_csr_names(
    params: &CertificateParams,
    expected: &IdentityName,
) -> Result<(), IdentityError> {
    let mut requested = Vec::new();
    let mut wrong = false;
    let mut named = false;
    for (ty, value) in params.distinguished_name.iter() {
        if *ty != DnType::CommonName {
            continue;
        }
        let cn = match value {
            DnValue::Utf8String(s) => s.clone(),
            DnValue::PrintableString(s) => s.as_str().to_owned(),
            DnValue::Ia5String(s) => s.as_str().to_owned(),
            other => format!("{other:?}"),
        };
        if cn.is_empty() {
            continue;
        }
        wrong |= !cn.eq_ignore_ascii_case(expected.as_str());
        named = true;
        requested.push(format!("CN={cn}"));
    }
    for san in &params.subject_alt_names {
        let (shown, ok) = match san {
            SanType::DnsName(dns) => {
                named = true;
                (
                    dns.as_str().to_owned(),
                    dns.as_str().eq_ignore_ascii_case(expected.as_str()),
                )
            }
            SanType::URI(uri) => (
                format!("URI:{}", uri.as_str()),
                uri.as_str() == expected.spiffe_id(),
            ),
            SanType::IpAddress(ip) => (format!("IP:{ip}"), false),
            SanType::Rfc822Name(email) => (format!("email:{}", email.as_str()), false),
            other => (format!("{other:?}"), false),
        };
        wrong |= !ok;
        requested.push(shown);
    }
    if wrong || !named {
        return Err(IdentityError::CsrIdentityMismatch {
            expected: expected.to_string(),
            requested,
        });
    }
    Ok(())
}

/// The shape of every workload certificate: subject CN and DNS SAN = the identity, `sans` as
/// given, digitalSignature, serverAuth + clientAuth, not a CA.
fn leaf_params(
    identity: &IdentityName,
    sans: Vec<SanType>,
    nb: i64,
    na: i64,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.not_before = offset_time(nb)?;
    params.not_after = offset_time(na)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// 128 random bits, positive and of fixed length as a DER INTEGER (RFC 5280 allows 20 octets).
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

/// `pylon identity init-ca`: a new CA for `trust_domain`, valid from now for `valid_for`,
/// written to `out_dir`.
pub fn init_ca(
    trust_domain: &str,
    out_dir: &Path,
    valid_for: Duration,
) -> Result<CaSummary, IdentityError> {
    let ca = Ca::generate(trust_domain, ValidityWindow::starting_now(valid_for)?)?;
    let files = ca.write(out_dir)?;
    Ok(CaSummary {
        trust_domain: ca.trust_domain,
        not_after: ca.not_after,
        files,
    })
}

/// `pylon identity issue`: a certificate for `sa` in `namespace`, signed by the CA in
/// `ca_dir`, valid from now for `valid_for` (cut to the issuer's own expiry), written to
/// `out_dir` as an identity dir.
pub fn issue(
    ca_dir: &Path,
    sa: &str,
    namespace: &str,
    out_dir: &Path,
    valid_for: Duration,
) -> Result<(IssuedCert, Vec<PathBuf>), IdentityError> {
    let ca = Ca::load(ca_dir)?;
    if ca.not_after <= unix_secs(SystemTime::now()) {
        return Err(IdentityError::Expired {
            path: ca_dir.join(ISSUER_CRT),
            not_after: ca.not_after,
        });
    }
    let mut window = ValidityWindow::starting_now(valid_for)?;
    // A leaf outliving its issuer would just fail verification at the issuer's expiry.
    let issuer_end =
        SystemTime::UNIX_EPOCH + Duration::from_secs(ca.not_after.max(0).unsigned_abs());
    window.not_after = window.not_after.min(issuer_end);
    let issued = ca.issue(sa, namespace, window)?;
    let files = issued.write(out_dir)?;
    Ok((issued, files))
}

/// [`issue`] with an explicit validity window, exactly as given.
pub fn issue_with_validity(
    ca_dir: &Path,
    sa: &str,
    namespace: &str,
    out_dir: &Path,
    window: ValidityWindow,
) -> Result<(IssuedCert, Vec<PathBuf>), IdentityError> {
    let issued = Ca::load(ca_dir)?.issue(sa, namespace, window)?;
    let files = issued.write(out_dir)?;
    Ok((issued, files))
}

/// CA names carry a digest of their key: two CAs of one trust domain never share a name, so a
/// certificate from the other one fails as "unknown issuer" rather than "bad signature", and
/// operators can tell CAs apart.
fn ca_params(
    role: &str,
    trust_domain: &str,
    key: &KeyPair,
    nb: i64,
    na: i64,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.not_before = offset_time(nb)?;
    params.not_after = offset_time(na)?;
    let key_id = params.key_identifier(key);
    let short_id = hex(key_id.get(..4).unwrap_or(&key_id));
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{role} {trust_domain} {short_id}"),
    );
    dn.push(DnType::OrganizationName, "Pylon");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A self-signed serving certificate for `dns_names` (the first is its CN), valid for
/// `window`: `(certificate PEM, private key PEM)`. For servers the API server calls with a
/// pinned CA bundle, such as the injection webhook, where the certificate is its own CA.
pub fn self_signed_server_cert(
    dns_names: &[String],
    window: ValidityWindow,
) -> Result<(String, String), IdentityError> {
    let (nb, na) = window.unix()?;
    let mut params = CertificateParams::default();
    params.not_before = offset_time(nb)?;
    params.not_after = offset_time(na)?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = dns_names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    dn.push(DnType::OrganizationName, "Pylon");
    params.distinguished_name = dn;
    params.subject_alt_names = dns_names
        .iter()
        .map(|n| ia5(n).map(SanType::DnsName))
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let key = generate_key("the serving key")?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| IdentityError::Generate {
            what: "the serving certificate",
            source,
        })?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn generate_key(what: &'static str) -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| IdentityError::Generate { what, source })
}

fn offset_time(unix: i64) -> Result<OffsetDateTime, IdentityError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| IdentityError::Validity(format!("unix time {unix}: {e}")))
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, IdentityError> {
    rcgen::string::Ia5String::try_from(s).map_err(|source| IdentityError::Generate {
        what: "a subject alternative name",
        source,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_ca_then_issue_then_load() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let id_dir = tmp.path().join("web");
        let day = Duration::from_secs(86_400);

        let summary = init_ca("Cluster.Local", &ca_dir, 365 * day).unwrap();
        assert_eq!(summary.trust_domain, "cluster.local");
        let names: Vec<_> = summary
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [CA_CRT, CA_KEY, ISSUER_KEY, ISSUER_CRT, TRUST_DOMAIN_FILE]
        );
        assert_eq!(
            std::fs::read_to_string(ca_dir.join(TRUST_DOMAIN_FILE)).unwrap(),
            "cluster.local\n"
        );

        // Issuing needs neither the root key nor anything else outside the CA dir.
        std::fs::remove_file(ca_dir.join(CA_KEY)).unwrap();
        let (issued, files) = issue(&ca_dir, "web", "default", &id_dir, day).unwrap();
        assert_eq!(
            files,
            [
                id_dir.join(TLS_KEY),
                id_dir.join(CA_CRT),
                id_dir.join(TLS_CRT)
            ]
        );
        assert_eq!(
            issued.identity.as_str(),
            "web.default.serviceaccount.identity.pylon.cluster.local"
        );
        assert_eq!(issued.not_after - issued.not_before, 86_400 + 60);
        assert_eq!(
            std::fs::read(id_dir.join(CA_CRT)).unwrap(),
            std::fs::read(ca_dir.join(CA_CRT)).unwrap()
        );
        #[cfg(unix)]
        {
            assert_eq!(mode(&id_dir.join(TLS_KEY)), 0o600);
            assert_eq!(mode(&ca_dir.join(ISSUER_KEY)), 0o600);
            assert_eq!(mode(&id_dir.join(TLS_CRT)), 0o644);
        }
        let key = std::fs::read_to_string(id_dir.join(TLS_KEY)).unwrap();
        assert!(
            key.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8 expected"
        );
        // No temp files left behind.
        for dir in [&ca_dir, &id_dir] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let name = entry.unwrap().file_name();
                assert!(
                    !name.to_string_lossy().starts_with('.'),
                    "{name:?} left behind"
                );
            }
        }

        let creds = Credentials::load(&id_dir).unwrap();
        assert_eq!(creds.identity(), &issued.identity);
        assert_eq!(creds.serial(), issued.serial);
    }

    #[test]
    fn leaves_do_not_outlive_their_issuer() {
        let tmp = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let summary = init_ca("cluster.local", &tmp.path().join("ca"), hour).unwrap();
        let (issued, _) = issue(
            &tmp.path().join("ca"),
            "web",
            "default",
            &tmp.path().join("web"),
            100 * hour,
        )
        .unwrap();
        assert_eq!(issued.not_after, summary.not_after);

        // An expired issuer says so, rather than issuing what no peer would accept.
        let now = SystemTime::now();
        let past = ValidityWindow {
            not_before: now - 2 * hour,
            not_after: now - hour,
        };
        let old = tmp.path().join("old");
        Ca::generate("cluster.local", past)
            .unwrap()
            .write(&old)
            .unwrap();
        match issue(&old, "web", "default", &tmp.path().join("x"), hour) {
            Err(IdentityError::Expired { path, .. }) => assert_eq!(path, old.join(ISSUER_CRT)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ca_dir_problems_have_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let out = tmp.path().join("out");
        let day = Duration::from_secs(86_400);
        match issue(&ca_dir, "web", "default", &out, day) {
            Err(IdentityError::Missing { path }) => {
                assert_eq!(path, ca_dir.join(TRUST_DOMAIN_FILE))
            }
            other => panic!("{other:?}"),
        }

        init_ca("cluster.local", &ca_dir, day).unwrap();
        let other = tmp.path().join("other");
        init_ca("cluster.local", &other, day).unwrap();
        std::fs::copy(other.join(ISSUER_KEY), ca_dir.join(ISSUER_KEY)).unwrap();
        match issue(&ca_dir, "web", "default", &out, day) {
            Err(IdentityError::KeyMismatch { key, cert }) => {
                assert_eq!(key, ca_dir.join(ISSUER_KEY));
                assert_eq!(cert, ca_dir.join(ISSUER_CRT));
            }
            other => panic!("{other:?}"),
        }

        std::fs::write(ca_dir.join(TRUST_DOMAIN_FILE), "not a domain!\n").unwrap();
        assert!(matches!(
            issue(&ca_dir, "web", "default", &out, day),
            Err(IdentityError::BadTrustDomain { .. })
        ));

        assert!(matches!(
            init_ca("bad_domain", &tmp.path().join("x"), day),
            Err(IdentityError::Name(_))
        ));
        assert!(matches!(
            issue(&other, "Bad_Name", "default", &out, day),
            Err(IdentityError::Name(_))
        ));
        assert!(!out.exists(), "nothing written on errors");
    }

    #[test]
    fn validity_windows_are_checked() {
        let now = SystemTime::now();
        let backwards = ValidityWindow {
            not_before: now,
            not_after: now - Duration::from_secs(1),
        };
        assert!(matches!(
            Ca::generate("cluster.local", backwards),
            Err(IdentityError::Validity(_))
        ));
        assert!(matches!(
            ValidityWindow::starting_now(Duration::MAX),
            Err(IdentityError::Validity(_))
        ));
        // Past what X.509 (and the time crate) can express.
        let far = ValidityWindow {
            not_before: now,
            not_after: now + Duration::from_secs(400_000 * 365 * 86_400),
        };
        assert!(matches!(
            Ca::generate("cluster.local", far),
            Err(IdentityError::Validity(_))
        ));
    }

    fn csr_with(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    #[test]
    fn certify_csr_signs_the_requested_identity_for_the_requesters_key() {
        let ca = Ca::generate(
            "cluster.local",
            ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap();
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        let key = crate::IdentityKey::generate(&id).unwrap();
        let hour = Duration::from_secs(3600);
        let leaf = ca.certify_csr(key.csr_der(), &id, hour).unwrap();
        assert_eq!(leaf.identity, id);
        assert_eq!(leaf.not_after - leaf.not_before, 3600 + 60);
        assert_eq!(leaf.intermediates_der, ca.issuer_chain);

        // The same shape `issue` gives, whatever the CSR said.
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.leaf_der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            id.as_str()
        );
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [format!("DNSName({id})"), format!("URI({})", id.spiffe_id())]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        assert_eq!(hex(cert.raw_serial()), leaf.serial);

        // It is for the requester's key: the key and the leaf make working credentials.
        let anchors = crate::TrustAnchors::from_pem(ca.anchor_pem().as_bytes(), "anchors").unwrap();
        let creds = key
            .credentials(
                leaf.leaf_der.clone(),
                leaf.intermediates_der.clone(),
                &anchors,
            )
            .unwrap();
        assert_eq!(creds.identity(), &id);
        assert_eq!(creds.not_after(), leaf.not_after);

        // A renewal re-sends the same CSR; serials differ anyway.
        let again = ca.certify_csr(key.csr_der(), &id, hour).unwrap();
        assert_ne!(again.serial, leaf.serial);

        // Linkerd's form is signed as asked.
        let linkerd = IdentityName::new_linkerd("web", "default", "cluster.local").unwrap();
        let linkerd_key = crate::IdentityKey::generate(&linkerd).unwrap();
        let leaf = ca
            .certify_csr(linkerd_key.csr_der(), &linkerd, hour)
            .unwrap();
        let creds = linkerd_key
            .credentials(leaf.leaf_der, leaf.intermediates_der, &anchors)
            .unwrap();
        assert_eq!(creds.identity(), &linkerd);
    }

    #[test]
    fn certify_csr_accepts_a_dns_san_or_a_cn_alone() {
        let ca = Ca::generate(
            "cluster.local",
            ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap();
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        let hour = Duration::from_secs(3600);
        // Linkerd's proxy: no subject, one DNS SAN.
        ca.certify_csr(&csr_with(None, vec![dns(id.as_str())]), &id, hour)
            .unwrap();
        ca.certify_csr(&csr_with(Some(id.as_str()), vec![]), &id, hour)
            .unwrap();
        let spiffe = SanType::URI(id.spiffe_id().as_str().try_into().unwrap());
        ca.certify_csr(&csr_with(None, vec![dns(id.as_str()), spiffe]), &id, hour)
            .unwrap();
    }

    #[test]
    fn certify_csr_refuses_csrs_for_other_names() {
        let ca = Ca::generate(
            "cluster.local",
            ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap();
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        let other = IdentityName::new("api", "prod", "cluster.local").unwrap();
        let hour = Duration::from_secs(3600);

        let key = crate::IdentityKey::generate(&other).unwrap();
        match ca.certify_csr(key.csr_der(), &id, hour) {
            Err(e @ IdentityError::CsrIdentityMismatch { .. }) => {
                let IdentityError::CsrIdentityMismatch {
                    expected,
                    requested,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(expected, id.as_str());
                assert_eq!(requested, &[format!("CN={other}"), other.to_string()]);
                assert!(e.to_string().contains("api.prod"), "{e}");
            }
            other => panic!("{other:?}"),
        }

        let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
        let uri = SanType::URI("spiffe://cluster.local/ns/prod/sa/api".try_into().unwrap());
        for csr in [
            // The right name plus another.
            csr_with(
                None,
                vec![dns(id.as_str()), dns("web.default.svc.cluster.local")],
            ),
            csr_with(None, vec![dns(id.as_str()), ip]),
            csr_with(None, vec![dns(id.as_str()), uri]),
            // A right SAN, a wrong CN.
            csr_with(Some("admin"), vec![dns(id.as_str())]),
            // No name at all.
            csr_with(None, vec![]),
            // Linkerd's form of the same account is another name.
            csr_with(
                None,
                vec![dns(
                    "web.default.serviceaccount.identity.linkerd.cluster.local",
                )],
            ),
        ] {
            assert!(
                matches!(
                    ca.certify_csr(&csr, &id, hour),
                    Err(IdentityError::CsrIdentityMismatch { .. })
                ),
                "accepted a CSR for other names"
            );
        }

        // Another trust domain's identity is not this CA's to sign.
        let foreign = IdentityName::new("web", "default", "example.org").unwrap();
        let key = crate::IdentityKey::generate(&foreign).unwrap();
        assert!(matches!(
            ca.certify_csr(key.csr_der(), &foreign, hour),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn certify_csr_refuses_tampered_and_garbage_csrs() {
        let ca = Ca::generate(
            "cluster.local",
            ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap();
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        let victim = IdentityName::new("wex", "default", "cluster.local").unwrap();
        let hour = Duration::from_secs(3600);
        let key = crate::IdentityKey::generate(&id).unwrap();

        // Someone else's CSR rewritten to name another identity: still well-formed DER, but
        // the signature no longer covers what it says.
        let mut tampered = key.csr_der().to_vec();
        let mut rewritten = 0;
        for at in 0..tampered.len().saturating_sub(4) {
            if &tampered[at..at + 4] == b"web." {
                tampered[at + 2] = b'x';
                rewritten += 1;
            }
        }
        assert_eq!(rewritten, 2, "CN and DNS SAN");
        assert!(matches!(
            ca.certify_csr(&tampered, &victim, hour),
            Err(IdentityError::CsrSignature)
        ));

        for garbage in [&b""[..], b"not a csr", &key.csr_der()[..20]] {
            match ca.certify_csr(garbage, &id, hour) {
                Err(e @ IdentityError::CsrInvalid { .. }) => {
                    assert!(e.to_string().contains("certificate signing request"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        }
        // A certificate is not a CSR.
        assert!(matches!(
            ca.certify_csr(&ca.issuer_chain[0], &id, hour),
            Err(IdentityError::CsrInvalid { .. })
        ));
    }

    #[test]
    fn certified_leaves_are_capped_by_the_issuer() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let ca =
            Ca::generate("cluster.local", ValidityWindow::starting_now(hour).unwrap()).unwrap();
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        let key = crate::IdentityKey::generate(&id).unwrap();
        let leaf = ca.certify_csr(key.csr_der(), &id, 24 * hour).unwrap();
        assert_eq!(leaf.not_after, ca.not_after());
        assert!(leaf.not_before <= unix_secs(now) - 60 + 1);

        // Past the issuer's end nothing is signed.
        let later = now + 2 * hour;
        match ca.certify_csr_at(key.csr_der(), &id, hour, later) {
            Err(IdentityError::IssuerExpired { not_after }) => {
                assert_eq!(not_after, ca.not_after())
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ca.certify_csr(key.csr_der(), &id, Duration::ZERO),
            Err(IdentityError::Validity(_))
        ));
    }

    #[test]
    fn separate_cas_have_separate_names() {
        let day = ValidityWindow::starting_now(Duration::from_secs(86_400)).unwrap();
        let a = Ca::generate("cluster.local", day).unwrap();
        let b = Ca::generate("cluster.local", day).unwrap();
        assert_ne!(a.anchor_pem(), b.anchor_pem());
        let subject = |pem: &str| {
            let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
            let der: rustls_pki_types::CertificateDer = der;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.subject().to_string()
        };
        assert_ne!(subject(a.anchor_pem()), subject(b.anchor_pem()));
        assert!(subject(a.anchor_pem()).contains("Pylon root CA cluster.local"));
    }
}
