//! Authorization objects that load but probably don't do what was meant: Servers on ports no
//! Service sends to, identities no mesh certificate carries, policies that let everyone in,
//! network exceptions that except nothing.
//!
//! References that lead nowhere (a policy's missing Server or authentication) are the Store's
//! own warnings ([`Snapshot::reference_warnings`]), reported with the rest of its warnings.

use pylon_proxy_policy::is_dns1123_subdomain;
use pylon_proxy_policy::{
    AuthorizationPolicy, MeshObject, MeshTlsAuthentication, NetworkAuthentication, Server,
    ServerPort, Snapshot, TargetPort,
};

use super::ObjectFindings;

/// A Server's port should be one some Service in its namespace sends to; otherwise only
/// clients dialing pod addresses directly ever reach it, which is usually a typo in the port.
pub(super) fn check_server(snapshot: &Snapshot, server: &Server, out: &mut ObjectFindings) {
    let ns = &*server.meta.namespace;
    let domain = snapshot.cluster_domain();
    let targeted = snapshot.objects().any(|o| {
        let MeshObject::Service(svc) = o else {
            return false;
        };
        if &*svc.meta.namespace != ns {
            return false;
        }
        let fqdn = svc.service_ref().fqdn(domain);
        svc.ports
            .iter()
            .any(|p| match (&server.port, &p.target_port) {
                (ServerPort::Number(n), TargetPort::Number(t)) => n == t,
                (ServerPort::Name(n), TargetPort::Name(t)) => n == t,
                // A named targetPort is a number once an EndpointSlice resolves it.
                (ServerPort::Number(n), TargetPort::Name(_)) => snapshot
                    .resolve_name(&fqdn, p.port)
                    .is_some_and(|r| r.endpoints.iter().any(|e| e.addr.port() == *n)),
                (ServerPort::Name(_), TargetPort::Number(_)) => false,
            })
    });
    if !targeted {
        out.warning(
            "spec.port",
            format!(
                "no Service in namespace {ns} has targetPort {}: only clients dialing pod \
                 addresses reach this Server",
                server.port
            ),
        );
    }
}

/// Every identity should look like one a mesh certificate carries:
/// `NAME.NAMESPACE.serviceaccount.identity.<control plane>.<trust domain>`, or a `*.` suffix
/// of a DNS name. Anything else is compared literally and matches no client.
pub(super) fn check_meshtls(authn: &MeshTlsAuthentication, out: &mut ObjectFindings) {
    for (i, id) in authn.identities.iter().enumerate() {
        if let Some(why) = not_identity_shaped(id) {
            out.warning(
                format!("spec.identities[{i}]"),
                format!("{id:?} {why}, so no client will match it"),
            );
        }
    }
}

fn not_identity_shaped(id: &str) -> Option<&'static str> {
    if id == "*" {
        return None;
    }
    if let Some(suffix) = id.strip_prefix("*.") {
        return (!is_dns1123_subdomain(suffix)).then_some("is not `*.` followed by a DNS name");
    }
    if !is_dns1123_subdomain(id) {
        return Some("is not a DNS name");
    }
    let labels: Vec<&str> = id.split('.').collect();
    let mesh_shaped = labels.len() >= 5 && labels[2] == "serviceaccount" && labels[3] == "identity";
    (!mesh_shaped)
        .then_some("is not a mesh identity (NAME.NAMESPACE.serviceaccount.identity.<domain>)")
}

/// A policy without required authentications authorizes every client, as in Linkerd; that is
/// rarely the point of writing one.
pub(super) fn check_policy(policy: &AuthorizationPolicy, out: &mut ObjectFindings) {
    if policy.required_authentications.is_empty() {
        out.warning(
            "spec.requiredAuthenticationRefs",
            "is empty, so this policy authorizes every client, meshed or not, from anywhere",
        );
    }
}

/// An `except` outside its `cidr` excludes nothing.
pub(super) fn check_network(authn: &NetworkAuthentication, out: &mut ObjectFindings) {
    for (i, net) in authn.networks.iter().enumerate() {
        for (j, except) in net.except.iter().enumerate() {
            if !net.cidr.contains(except) {
                out.warning(
                    format!("spec.networks[{i}].except[{j}]"),
                    format!(
                        "{except} is not inside {}, so it excludes nothing",
                        net.cidr
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Severity;

    fn server(port: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {{name: web-http}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  port: {port}\n"
        )
    }

    fn policy(refs: &str) -> String {
        format!(
            "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: web-policy}}\nspec:\n  \
             targetRef: {{group: policy.linkerd.io, kind: Server, name: web-http}}\n  \
             requiredAuthenticationRefs: {refs}\n"
        )
    }

    #[test]
    fn server_ports_must_be_some_services_target() {
        // `service()` sends port 80 to targetPort 8080.
        for port in ["8080", "9090", "http"] {
            let findings = audit_files(&[
                ("svc.yaml", &service("web", Some(true))),
                ("srv.yaml", &server(port)),
            ]);
            let on_port = on_field(&findings, "spec.port");
            if port == "8080" {
                assert!(on_port.is_empty(), "{findings:#?}");
            } else {
                assert_eq!(on_port.len(), 1, "{port}: {findings:#?}");
                assert_eq!(on_port[0].0, Severity::Warning);
                assert!(
                    on_port[0].1.contains(&format!("has targetPort {port}")),
                    "{on_port:?}"
                );
            }
        }
        // Named targetPorts: by name, or by the number a slice gives them.
        let named = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                     spec: {ports: [{name: http, port: 80, targetPort: web-http}]}\n---\n\
                     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}\n\
                     addressType: IPv4\nports: [{name: http, port: 8080}]\n\
                     endpoints: [{addresses: [10.0.0.1]}]\n";
        for port in ["web-http", "8080"] {
            let findings = audit_files(&[("svc.yaml", named), ("srv.yaml", &server(port))]);
            assert!(
                on_field(&findings, "spec.port").is_empty(),
                "{port}: {findings:#?}"
            );
        }
    }

    #[test]
    fn identities_that_no_certificate_carries_are_flagged() {
        let authn = "apiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\n\
                     metadata: {name: callers}\nspec:\n  identities:\n  - '*'\n  \
                     - web.shop.serviceaccount.identity.linkerd.cluster.local\n  \
                     - '*.shop.serviceaccount.identity.pylon.cluster.local'\n  \
                     - web.shop\n  - web_app.shop.serviceaccount.identity.pylon.cluster.local\n  \
                     - '*.-bad'\n";
        let findings = audit_files(&[("authn.yaml", authn)]);
        let flagged: Vec<&str> = findings
            .iter()
            .filter(|f| f.object == "MeshTLSAuthentication default/callers")
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(
            flagged,
            [
                "spec.identities[3]",
                "spec.identities[4]",
                "spec.identities[5]"
            ],
            "{findings:#?}"
        );
        let web_shop = on_field(&findings, "spec.identities[3]");
        assert_eq!(web_shop[0].0, Severity::Warning);
        assert!(
            web_shop[0].1.contains("not a mesh identity"),
            "{web_shop:?}"
        );
    }

    #[test]
    fn missing_servers_and_authentications_are_reported_as_warnings() {
        let findings = audit_files(&[(
            "policy.yaml",
            &policy("[{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: nobody}]"),
        )]);
        let target = on_field(&findings, "spec.targetRef.name");
        assert_eq!(target.len(), 1, "{findings:#?}");
        assert_eq!(target[0].0, Severity::Warning);
        assert!(target[0].1.contains("no Server default/web-http"));
        let authn = on_field(&findings, "spec.requiredAuthenticationRefs[0].name");
        assert_eq!(authn.len(), 1, "{findings:#?}");
        assert!(authn[0].1.contains("authorizes no client"), "{authn:?}");
        assert!(findings.iter().all(|f| f.file.ends_with("policy.yaml")));
    }

    #[test]
    fn invalid_authorization_objects_are_errors_naming_the_field() {
        let findings = audit_files(&[
            (
                "srv.yaml",
                &server("8080").replace("port: 8080", "port: 8080\n  proxyProtocol: HTTP/3"),
            ),
            (
                "net.yaml",
                "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n\
                 metadata: {name: office}\nspec:\n  networks: [{cidr: 10.0.0.0/40}]\n",
            ),
        ]);
        let fields: Vec<(&str, &str, Severity)> = findings
            .iter()
            .map(|f| (f.object.as_str(), f.field.as_str(), f.severity))
            .collect();
        assert_eq!(
            fields,
            [
                (
                    "NetworkAuthentication default/office",
                    "spec.networks[0].cidr",
                    Severity::Error
                ),
                (
                    "Server default/web-http",
                    "spec.proxyProtocol",
                    Severity::Error
                ),
            ]
        );
    }

    #[test]
    fn open_policies_and_empty_exceptions_are_flagged() {
        let net = "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n\
                   metadata: {name: office}\nspec:\n  networks:\n  \
                   - {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 192.168.0.0/16]}\n";
        let findings = audit_files(&[
            ("svc.yaml", &service("web", Some(true))),
            ("srv.yaml", &server("8080")),
            ("policy.yaml", &policy("[]")),
            ("net.yaml", net),
        ]);
        let open = on_field(&findings, "spec.requiredAuthenticationRefs");
        assert_eq!(open.len(), 1, "{findings:#?}");
        assert!(open[0].1.contains("authorizes every client"));
        let except = on_field(&findings, "spec.networks[0].except[1]");
        assert_eq!(except.len(), 1, "{findings:#?}");
        assert!(except[0].1.contains("excludes nothing"));
        assert!(on_field(&findings, "spec.networks[0].except[0]").is_empty());
        assert_eq!(findings.len(), 2, "{findings:#?}");
    }
}
