//! Workload identity names: `NAME.NS.serviceaccount.identity.pylon.<trust domain>` (Linkerd's
//! `NAME.NS.serviceaccount.identity.linkerd.<domain>` parses too), and the SPIFFE form.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::{DnsName, ServerName};

/// Between the namespace and the trust domain.
const MARKER: &str = ".serviceaccount.identity.pylon.";
/// Linkerd's: `identity.<control plane namespace>`, which is `linkerd` in every Linkerd
/// install. Parsed so Linkerd proxies' names (`LINKERD2_PROXY_IDENTITY_LOCAL_NAME`) work.
const LINKERD_MARKER: &str = ".serviceaccount.identity.linkerd.";
const SPIFFE_SCHEME: &str = "spiffe://";
const MAX_DNS_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid identity name {input:?}: {reason}")]
pub struct NameError {
    input: String,
    reason: String,
}

impl NameError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        NameError {
            input: input.to_string(),
            reason: reason.into(),
        }
    }
}

/// A validated workload identity: a service account in a namespace of a trust domain.
///
/// The DNS form is what certificates carry as their DNS SAN and what clients connect to
/// (rustls checks the server's certificate against it); [`spiffe_id`](Self::spiffe_id) is
/// carried as the URI SAN for SPIFFE-aware peers. Names are lowercase; parsing lowercases.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityName {
    dns: String,
    sa: String,
    namespace: String,
    trust_domain: String,
    /// Parsed from Linkerd's form.
    linkerd: bool,
}

impl IdentityName {
    /// The identity of service account `sa` in namespace `namespace` of `trust_domain`.
    pub fn new(sa: &str, namespace: &str, trust_domain: &str) -> Result<Self, NameError> {
        Self::build(sa, namespace, trust_domain, MARKER)
    }

    /// The same service account in Linkerd's form,
    /// `NAME.NS.serviceaccount.identity.linkerd.<trust domain>`.
    pub fn new_linkerd(sa: &str, namespace: &str, trust_domain: &str) -> Result<Self, NameError> {
        Self::build(sa, namespace, trust_domain, LINKERD_MARKER)
    }

    fn build(
        sa: &str,
        namespace: &str,
        trust_domain: &str,
        marker: &str,
    ) -> Result<Self, NameError> {
        let dns = format!("{sa}.{namespace}{marker}{trust_domain}").to_ascii_lowercase();
        let name = Self::parse(&dns)?;
        // A service account name with `.serviceaccount.identity.pylon.` inside it would parse
        // back as something else; refuse what cannot round-trip.
        if name.sa != sa.to_ascii_lowercase()
            || name.namespace != namespace.to_ascii_lowercase()
            || name.trust_domain != trust_domain.to_ascii_lowercase()
            || name.linkerd != (marker == LINKERD_MARKER)
        {
            return Err(NameError::new(&dns, "ambiguous: parses back differently"));
        }
        Ok(name)
    }

    /// Parses the DNS form, `NAME.NS.serviceaccount.identity.pylon.<trust domain>`, or
    /// Linkerd's `NAME.NS.serviceaccount.identity.linkerd.<trust domain>` (kept as given: the
    /// two are different names, as certificates carry them).
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let err = |reason: &str| NameError::new(input, reason);
        let dns = input.to_ascii_lowercase();
        if dns.len() > MAX_DNS_NAME {
            return Err(err("longer than 253 characters"));
        }
        // The first marker of either form: a name holding both is refused below (its service
        // account or trust domain would hold a marker) rather than read two ways.
        let (linkerd, sa_ns, trust_domain) = [MARKER, LINKERD_MARKER]
            .into_iter()
            .filter_map(|marker| {
                let at = dns.find(marker)?;
                Some((at, marker, &dns[..at], &dns[at + marker.len()..]))
            })
            .min_by_key(|(at, ..)| *at)
            .map(|(_, marker, sa_ns, td)| (marker == LINKERD_MARKER, sa_ns, td))
            .ok_or_else(|| err("expected NAME.NS.serviceaccount.identity.pylon.TRUST_DOMAIN"))?;
        // Namespaces are single DNS labels; service account names may contain dots.
        let (sa, namespace) = sa_ns
            .rsplit_once('.')
            .ok_or_else(|| err("expected NAME.NS before .serviceaccount"))?;
        check_subdomain(sa).map_err(|r| err(&format!("service account: {r}")))?;
        check_label(namespace).map_err(|r| err(&format!("namespace: {r}")))?;
        check_subdomain(trust_domain).map_err(|r| err(&format!("trust domain: {r}")))?;
        Ok(IdentityName {
            sa: sa.to_string(),
            namespace: namespace.to_string(),
            trust_domain: trust_domain.to_string(),
            linkerd,
            dns,
        })
    }

    /// Parses the SPIFFE form, `spiffe://<trust domain>/ns/NS/sa/NAME`.
    pub fn from_spiffe(input: &str) -> Result<Self, NameError> {
        let err = |reason: &str| NameError::new(input, reason);
        let rest = input
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| err("expected spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| err("expected spiffe://TRUST_DOMAIN/ns/NS/sa/NAME"))?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::new(sa, ns, trust_domain).map_err(|e| err(&e.reason))
            }
            _ => Err(err("expected spiffe://TRUST_DOMAIN/ns/NS/sa/NAME")),
        }
    }

    /// The service account name.
    pub fn sa(&self) -> &str {
        &self.sa
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether this is Linkerd's form (`...serviceaccount.identity.linkerd.<trust domain>`).
    pub fn is_linkerd_form(&self) -> bool {
        self.linkerd
    }

    /// Whether `other` is the same service account of the same trust domain, in either form.
    pub fn same_account(&self, other: &IdentityName) -> bool {
        self.sa == other.sa
            && self.namespace == other.namespace
            && self.trust_domain == other.trust_domain
    }

    /// The DNS form, as in certificates' DNS SAN.
    pub fn as_str(&self) -> &str {
        &self.dns
    }

    /// `spiffe://<trust domain>/ns/NS/sa/NAME`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.sa
        )
    }

    /// The name to connect to when this identity is the expected server.
    pub fn server_name(&self) -> ServerName<'static> {
        match DnsName::try_from(self.dns.clone()) {
            Ok(name) => ServerName::DnsName(name),
            // Unreachable: every label was checked to be LDH. Kept total rather than panicking;
            // an IP-shaped name can never match a certificate's identity, so it fails closed.
            Err(_) => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        }
    }
}

impl fmt::Display for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dns)
    }
}

impl fmt::Debug for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityName({})", self.dns)
    }
}

impl FromStr for IdentityName {
    type Err = NameError;

    /// Either form: `spiffe://...` or the DNS form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(SPIFFE_SCHEME) {
            Self::from_spiffe(s)
        } else {
            Self::parse(s)
        }
    }
}

/// A trust domain on its own (e.g. `cluster.local`), as the CA's `trust-domain` file holds.
pub(crate) fn check_trust_domain(td: &str) -> Result<String, NameError> {
    let lower = td.trim().to_ascii_lowercase();
    check_subdomain(&lower).map_err(|r| NameError::new(td, format!("trust domain: {r}")))?;
    Ok(lower)
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label".into());
    }
    if label.len() > 63 {
        return Err(format!("label {label:?} is longer than 63 characters"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!("label {label:?} may only hold a-z, 0-9 and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// RFC 1123 subdomain: dot-separated labels.
fn check_subdomain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    name.split('.').try_for_each(check_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_both_forms() {
        let id = IdentityName::new("web", "default", "cluster.local").unwrap();
        assert_eq!(
            id.as_str(),
            "web.default.serviceaccount.identity.pylon.cluster.local"
        );
        assert_eq!(id.spiffe_id(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            (id.sa(), id.namespace(), id.trust_domain()),
            ("web", "default", "cluster.local")
        );
        assert_eq!(IdentityName::parse(id.as_str()).unwrap(), id);
        assert_eq!(IdentityName::from_spiffe(&id.spiffe_id()).unwrap(), id);
        assert_eq!(id.to_string().parse::<IdentityName>().unwrap(), id);
        assert_eq!(id.spiffe_id().parse::<IdentityName>().unwrap(), id);
        assert!(matches!(id.server_name(), ServerName::DnsName(_)));
    }

    #[test]
    fn service_accounts_may_have_dots_namespaces_may_not() {
        let id = IdentityName::parse("a.b.ns.serviceaccount.identity.pylon.example.org").unwrap();
        assert_eq!((id.sa(), id.namespace()), ("a.b", "ns"));
        assert!(IdentityName::new("web", "a.b", "cluster.local").is_err());
    }

    #[test]
    fn linkerds_form_parses_and_stays_linkerds() {
        let linkerd =
            IdentityName::parse("web.default.serviceaccount.identity.linkerd.cluster.local")
                .unwrap();
        assert_eq!(
            (linkerd.sa(), linkerd.namespace(), linkerd.trust_domain()),
            ("web", "default", "cluster.local")
        );
        assert!(linkerd.is_linkerd_form());
        assert_eq!(
            linkerd.as_str(),
            "web.default.serviceaccount.identity.linkerd.cluster.local"
        );
        assert_eq!(
            IdentityName::new_linkerd("web", "default", "cluster.local").unwrap(),
            linkerd
        );
        let pylon = IdentityName::new("web", "default", "cluster.local").unwrap();
        assert!(!pylon.is_linkerd_form());
        assert_ne!(pylon, linkerd);
        assert!(pylon.same_account(&linkerd));
        assert_eq!(pylon.spiffe_id(), linkerd.spiffe_id());
        assert!(
            IdentityName::new_linkerd("x.serviceaccount.identity.pylon.y", "ns", "td").is_err()
        );
    }

    #[test]
    fn parsing_lowercases() {
        let id =
            IdentityName::parse("Web.Default.serviceaccount.identity.pylon.Cluster.Local").unwrap();
        assert_eq!(
            id.as_str(),
            "web.default.serviceaccount.identity.pylon.cluster.local"
        );
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "",
            "web.default.svc.cluster.local",
            "default.serviceaccount.identity.pylon.cluster.local",
            "web..serviceaccount.identity.pylon.cluster.local",
            "web.default.serviceaccount.identity.pylon.",
            "web_1.default.serviceaccount.identity.pylon.cluster.local",
            "-web.default.serviceaccount.identity.pylon.cluster.local",
            "web.default.serviceaccount.identity.pylon.cluster..local",
            "web.default.serviceaccount.identity.other.cluster.local",
            "a.serviceaccount.identity.linkerd.b.ns.serviceaccount.identity.pylon.td",
        ] {
            assert!(IdentityName::parse(bad).is_err(), "{bad:?} parsed");
        }
        let long = "a".repeat(64);
        assert!(IdentityName::new(&long, "default", "cluster.local").is_err());
        let very_long = vec!["a"; 130].join(".");
        assert!(IdentityName::new(&very_long, "default", "cluster.local").is_err());
        assert!(IdentityName::new("x.serviceaccount.identity.pylon.y", "ns", "td").is_err());
        for bad in [
            "spiffe://cluster.local/ns/default/sa",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/sa/web/ns/default",
            "http://cluster.local/ns/default/sa/web",
            "spiffe://",
        ] {
            assert!(IdentityName::from_spiffe(bad).is_err(), "{bad:?} parsed");
        }
    }
}
