//! Mesh-wide settings the controller answers with: whose identity an endpoint has, and which
//! ports carry opaque TCP, from Linkerd's annotations.

use std::collections::BTreeMap;

use pylon_proxy_policy::{Pod, ServiceRef, Snapshot};

/// Linkerd's annotation listing a workload's or service's opaque ports (`25,3306,8000-8100`).
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.linkerd.io/opaque-ports";
/// Linkerd's defaults: protocols where the server speaks first, which detection cannot see.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// The trust domain of workload identities (`cluster.local`).
    pub trust_domain: String,
    /// The identity names' issuer part: `pylon` gives
    /// `SA.NS.serviceaccount.identity.pylon.<trust domain>`; a cluster moving from Linkerd can
    /// say `linkerd` to keep its proxies' names.
    pub identity_issuer: String,
    /// Meshed pods' proxy inbound port, for opaque transport (Linkerd's 4143).
    pub inbound_port: u16,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            identity_issuer: "pylon".into(),
            inbound_port: 4143,
        }
    }
}

impl MeshConfig {
    /// The TLS identity of a meshed pod running as `sa` in `namespace`.
    pub fn identity_of(&self, sa: &str, namespace: &str) -> String {
        format!(
            "{sa}.{namespace}.serviceaccount.identity.{}.{}",
            self.identity_issuer, self.trust_domain
        )
    }

    /// Whether a service port (or, for `pod`, a container port) is opaque: listed in the
    /// object's annotation, else its namespace's, else one of Linkerd's defaults.
    pub fn is_opaque(
        &self,
        snapshot: &Snapshot,
        service: Option<&ServiceRef>,
        pod: Option<&Pod>,
        port: u16,
    ) -> bool {
        let (namespace, annotations) = match (service, pod) {
            (Some(svc), _) => (
                &*svc.namespace,
                snapshot.service(svc).map(|s| &s.meta.annotations),
            ),
            (None, Some(pod)) => (&*pod.meta.namespace, Some(&pod.meta.annotations)),
            (None, None) => return DEFAULT_OPAQUE_PORTS.contains(&port),
        };
        let listed = |a: Option<&BTreeMap<String, String>>| {
            a.and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION))
                .map(|list| port_list_contains(list, port))
        };
        listed(annotations)
            .or_else(|| listed(snapshot.namespace(namespace).map(|n| &n.meta.annotations)))
            .unwrap_or_else(|| DEFAULT_OPAQUE_PORTS.contains(&port))
    }

    pub fn pod_port_is_opaque(&self, pod: &Pod, port: u16) -> bool {
        match pod.meta.annotations.get(OPAQUE_PORTS_ANNOTATION) {
            Some(list) => port_list_contains(list, port),
            None => DEFAULT_OPAQUE_PORTS.contains(&port),
        }
    }
}

/// Whether `25,443,8000-8100` includes `port`. Entries that are not numbers or ranges (a named
/// port) are skipped: they name container ports the controller resolves elsewhere.
pub fn port_list_contains(list: &str, port: u16) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|entry| match entry.split_once('-') {
            Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
                _ => false,
            },
            None => entry.parse::<u16>() == Ok(port),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        assert!(port_list_contains("25, 443,8000-8100", 8050));
        assert!(port_list_contains("25,443", 443));
        assert!(!port_list_contains("25,443,http", 80));
        assert!(!port_list_contains("", 80));
    }

    #[test]
    fn identities() {
        let mesh = MeshConfig::default();
        assert_eq!(
            mesh.identity_of("web", "shop"),
            "web.shop.serviceaccount.identity.pylon.cluster.local"
        );
    }
}
