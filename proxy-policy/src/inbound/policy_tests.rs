//! The evaluator end to end: YAML files in a real directory, loaded by the Store, compiled
//! for a workload, and asked about clients.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::inbound::{ClientInfo, DefaultPolicy, InboundConfig, InboundPolicy};
use crate::objects::ProxyProtocol;
use crate::test_support::{alloc_count, load, write};
use crate::{Store, StoreConfig};

const NS: &str = "shop";
const WEB_ID: &str = "web.shop.serviceaccount.identity.pylon.cluster.local";
const CHECKOUT_ID: &str = "checkout.shop.serviceaccount.identity.pylon.cluster.local";
const API_ID: &str = "api.shop.serviceaccount.identity.pylon.cluster.local";
const PROM_ID: &str = "prometheus.ops.serviceaccount.identity.pylon.cluster.local";

/// An address in the default cluster networks, and one outside them.
const INSIDE: &str = "10.1.2.3";
const OUTSIDE: &str = "203.0.113.9";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn web() -> BTreeMap<String, String> {
    labels(&[("app", "web"), ("tier", "front")])
}

fn plain(peer: &str) -> ClientInfo<'static> {
    ClientInfo {
        peer: peer.parse().expect("ip"),
        tls: false,
        identity: None,
    }
}

fn meshed<'a>(peer: &str, identity: &'a str) -> ClientInfo<'a> {
    ClientInfo {
        peer: peer.parse().expect("ip"),
        tls: true,
        identity: Some(identity),
    }
}

fn shop() -> StoreConfig {
    StoreConfig {
        default_namespace: NS.into(),
        ..StoreConfig::default()
    }
}

/// A Server in `shop` selecting `app: APP` on `port`; `extra` adds spec lines.
fn server(name: &str, app: &str, port: &str, extra: &str) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  podSelector:\n    matchLabels: {{app: {app}}}\n  port: {port}\n{extra}"
    )
}

/// An AuthorizationPolicy targeting `target` (`Server NAME` or `Namespace`) requiring `refs`
/// (`(kind, name)`).
fn policy(name: &str, target: &str, refs: &[(&str, &str)]) -> String {
    let target = match target.split_once(' ') {
        Some(("Server", server)) => {
            format!("{{group: policy.linkerd.io, kind: Server, name: {server}}}")
        }
        _ => "{kind: Namespace, name: shop}".to_string(),
    };
    let refs: Vec<String> = refs
        .iter()
        .map(|(kind, name)| match *kind {
            "ServiceAccount" => format!("  - {{kind: ServiceAccount, name: {name}}}\n"),
            kind => format!("  - {{group: policy.linkerd.io, kind: {kind}, name: {name}}}\n"),
        })
        .collect();
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {target}\n  \
         requiredAuthenticationRefs:{}\n{}",
        if refs.is_empty() { " []" } else { "" },
        refs.concat()
    )
}

fn meshtls(name: &str, identities: &[&str]) -> String {
    let ids: Vec<String> = identities.iter().map(|i| format!("'{i}'")).collect();
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n  identities: [{}]\n",
        ids.join(", ")
    )
}

fn network(name: &str, networks: &str) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n  networks:\n{networks}"
    )
}

/// Loads `files` and compiles the policy of the `web` workload.
fn compile(files: &[(&str, &str)], cfg: &InboundConfig) -> Arc<InboundPolicy> {
    let (_dir, store) = load(files, shop());
    let snap = store.snapshot();
    assert!(snap.errors().is_empty(), "{:?}", snap.errors());
    snap.inbound_policy(NS, &web(), cfg)
}

#[test]
fn default_policies_for_plain_tls_and_meshed_clients_inside_and_outside_the_cluster() {
    let no_id = ClientInfo {
        peer: INSIDE.parse().expect("ip"),
        tls: true,
        identity: None,
    };
    // An identity without TLS is not authentication.
    let claimed = ClientInfo {
        peer: INSIDE.parse().expect("ip"),
        tls: false,
        identity: Some(WEB_ID),
    };
    let clients = [
        plain(INSIDE),
        plain(OUTSIDE),
        meshed(INSIDE, WEB_ID),
        meshed(OUTSIDE, WEB_ID),
        no_id,
        claimed,
        // IPv4-mapped, IPv6 ULA and IPv6 global addresses.
        meshed("::ffff:10.1.2.3", WEB_ID),
        plain("fd00::1"),
        plain("2001:db8::1"),
    ];
    use DefaultPolicy::*;
    let expected: [(DefaultPolicy, [bool; 9]); 6] = [
        (AllUnauthenticated, [true; 9]),
        (
            AllAuthenticated,
            [false, false, true, true, false, false, true, false, false],
        ),
        (
            ClusterAuthenticated,
            [false, false, true, false, false, false, true, false, false],
        ),
        (
            ClusterUnauthenticated,
            [true, false, true, false, true, true, true, true, false],
        ),
        (Deny, [false; 9]),
        (Audit, [true; 9]),
    ];
    for (default, allowed) in expected {
        let cfg = InboundConfig {
            default_policy: default,
            ..InboundConfig::default()
        };
        let inbound = compile(&[], &cfg);
        let port = inbound.for_port(7000);
        assert_eq!(port.server_name(), None);
        for (client, want) in clients.iter().zip(allowed) {
            let a = port.authorize(client);
            assert_eq!(a.allowed, want, "{default} {client:?}");
            assert_eq!(
                (a.srv_group, a.srv_kind, a.srv_name, a.srv_port),
                ("", "default", default.as_str(), 7000)
            );
            assert_eq!(
                (a.route_group, a.route_kind, a.route_name),
                ("", "default", "default")
            );
            assert_eq!(a.protocol, ProxyProtocol::Unknown);
            let authz = (a.authz_group, a.authz_kind, a.authz_name);
            if want {
                assert_eq!(authz, ("", "default", default.as_str()));
            } else {
                assert_eq!(authz, ("", "", ""), "deny metrics carry no authz labels");
            }
            assert_eq!(a.is_audit(), default == Audit);
        }
    }
}

#[test]
fn cluster_networks_are_configurable() {
    let cfg = InboundConfig {
        default_policy: DefaultPolicy::ClusterUnauthenticated,
        cluster_networks: vec!["203.0.113.0/24".parse().expect("net")],
        ..InboundConfig::default()
    };
    let port = compile(&[], &cfg).for_port(80);
    assert!(port.authorize(&plain(OUTSIDE)).allowed);
    assert!(!port.authorize(&plain(INSIDE)).allowed);
}

#[test]
fn a_server_alone_denies_and_its_access_policy_decides_otherwise() {
    let http = server("web-http", "web", "8080", "  proxyProtocol: HTTP/1\n");
    let inbound = compile(&[("srv.yaml", &http)], &InboundConfig::default());
    let port = inbound.for_port(8080);
    assert_eq!(port.server_name(), Some("web-http"));
    assert_eq!(port.protocol(), ProxyProtocol::Http1);
    for client in [plain(INSIDE), meshed(INSIDE, WEB_ID)] {
        let a = port.authorize(&client);
        assert!(!a.allowed, "Linkerd: accessPolicy defaults to deny");
        assert_eq!(
            (a.srv_group, a.srv_kind, a.srv_name),
            ("policy.linkerd.io", "server", "web-http")
        );
        assert_eq!(a.protocol, ProxyProtocol::Http1);
    }
    // Other ports keep the default policy.
    assert!(inbound.for_port(8081).authorize(&plain(INSIDE)).allowed);
    assert_eq!(inbound.server_ports(), [(8080, "web-http")]);

    let open = server(
        "web-http",
        "web",
        "8080",
        "  accessPolicy: all-authenticated\n",
    );
    let port = compile(&[("srv.yaml", &open)], &InboundConfig::default()).for_port(8080);
    assert!(!port.authorize(&plain(INSIDE)).allowed);
    let a = port.authorize(&meshed(OUTSIDE, WEB_ID));
    assert!(a.allowed);
    assert_eq!(
        (a.authz_group, a.authz_kind, a.authz_name),
        ("", "default", "all-authenticated")
    );

    let audit = server("web-http", "web", "8080", "  accessPolicy: audit\n");
    let port = compile(&[("srv.yaml", &audit)], &InboundConfig::default()).for_port(8080);
    assert!(port.authorize(&plain(OUTSIDE)).is_audit());
}

#[test]
fn meshtls_star_refuses_plain_clients_and_allows_any_identity() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        ("authn.yaml", meshtls("any-meshed", &["*"])),
        (
            "policy.yaml",
            policy(
                "web-meshed",
                "Server web-http",
                &[("MeshTLSAuthentication", "any-meshed")],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::default()).for_port(8080);
    assert!(!port.authorize(&plain(INSIDE)).allowed);
    let tls_without_identity = ClientInfo {
        peer: INSIDE.parse().expect("ip"),
        tls: true,
        identity: None,
    };
    assert!(!port.authorize(&tls_without_identity).allowed);
    for id in [WEB_ID, API_ID, PROM_ID, "anything.at.all"] {
        let a = port.authorize(&meshed(OUTSIDE, id));
        assert!(a.allowed, "{id}");
        assert_eq!(
            (a.authz_group, a.authz_kind, a.authz_name),
            ("policy.linkerd.io", "authorizationpolicy", "web-meshed")
        );
    }
}

#[test]
fn identity_lists_suffix_wildcards_and_refs() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "authn.yaml",
            meshtls(
                "callers",
                &[
                    CHECKOUT_ID,
                    "*.ops.serviceaccount.identity.pylon.cluster.local",
                ],
            ) + "  identityRefs:\n  - {kind: ServiceAccount, name: cart}\n  \
                 - {kind: Namespace, name: batch}\n",
        ),
        (
            "policy.yaml",
            policy(
                "web-callers",
                "Server web-http",
                &[("MeshTLSAuthentication", "callers")],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::default()).for_port(8080);
    for (id, want) in [
        (CHECKOUT_ID, true),
        (PROM_ID, true),
        (
            "cart.shop.serviceaccount.identity.pylon.cluster.local",
            true,
        ),
        (
            "nightly.batch.serviceaccount.identity.pylon.cluster.local",
            true,
        ),
        (WEB_ID, false),
        (API_ID, false),
        ("ops.serviceaccount.identity.pylon.cluster.local", false),
        // Another mesh's identity for the same service account.
        (
            "checkout.shop.serviceaccount.identity.linkerd.cluster.local",
            false,
        ),
    ] {
        assert_eq!(port.authorize(&meshed(INSIDE, id)).allowed, want, "{id}");
    }
    assert!(!port.authorize(&plain(INSIDE)).allowed);

    // With Linkerd's identity suffix, refs resolve to Linkerd's names.
    let linkerd = InboundConfig {
        identity_suffix: "serviceaccount.identity.linkerd.cluster.local".into(),
        ..InboundConfig::default()
    };
    let port = compile(&files, &linkerd).for_port(8080);
    assert!(
        port.authorize(&meshed(
            INSIDE,
            "cart.shop.serviceaccount.identity.linkerd.cluster.local"
        ))
        .allowed
    );
    assert!(
        !port
            .authorize(&meshed(
                INSIDE,
                "cart.shop.serviceaccount.identity.pylon.cluster.local"
            ))
            .allowed
    );
}

#[test]
fn service_account_refs_require_that_identity() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "policy.yaml",
            policy(
                "from-checkout",
                "Server web-http",
                &[("ServiceAccount", "checkout")],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::with_trust_domain("cluster.local")).for_port(8080);
    assert!(port.authorize(&meshed(INSIDE, CHECKOUT_ID)).allowed);
    assert!(!port.authorize(&meshed(INSIDE, WEB_ID)).allowed);
}

#[test]
fn network_authentication_with_exceptions_admits_plain_clients_by_address() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "authn.yaml",
            network(
                "office",
                "  - {cidr: 10.0.0.0/8, except: [10.9.0.0/16, 10.1.2.3]}\n  - {cidr: 'fd12::/16'}\n",
            ),
        ),
        (
            "policy.yaml",
            policy(
                "from-office",
                "Server web-http",
                &[("NetworkAuthentication", "office")],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::default()).for_port(8080);
    for (peer, want) in [
        ("10.200.0.1", true),
        ("10.9.3.4", false),
        ("10.1.2.3", false),
        ("10.1.2.4", true),
        ("192.168.0.1", false),
        ("fd12::7", true),
        ("fd13::7", false),
        ("::ffff:10.200.0.1", true),
    ] {
        assert_eq!(port.authorize(&plain(peer)).allowed, want, "plain {peer}");
        assert_eq!(
            port.authorize(&meshed(peer, WEB_ID)).allowed,
            want,
            "meshed {peer}"
        );
    }
}

#[test]
fn every_required_authentication_must_hold() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        ("mtls.yaml", meshtls("checkout-only", &[CHECKOUT_ID])),
        ("net.yaml", network("pods", "  - {cidr: 10.0.0.0/8}\n")),
        (
            "policy.yaml",
            policy(
                "checkout-from-pods",
                "Server web-http",
                &[
                    ("MeshTLSAuthentication", "checkout-only"),
                    ("NetworkAuthentication", "pods"),
                ],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::default()).for_port(8080);
    assert!(port.authorize(&meshed("10.3.3.3", CHECKOUT_ID)).allowed);
    assert!(!port.authorize(&meshed("192.168.3.3", CHECKOUT_ID)).allowed);
    assert!(!port.authorize(&meshed("10.3.3.3", WEB_ID)).allowed);
    assert!(!port.authorize(&plain("10.3.3.3")).allowed);
}

#[test]
fn any_policy_allowing_is_enough_and_names_itself() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "a.yaml",
            policy(
                "a-checkout",
                "Server web-http",
                &[("ServiceAccount", "checkout")],
            ),
        ),
        (
            "b.yaml",
            policy("b-web", "Server web-http", &[("ServiceAccount", "web")]),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let port = compile(&files, &InboundConfig::default()).for_port(8080);
    assert_eq!(
        port.authorize(&meshed(INSIDE, CHECKOUT_ID)).authz_name,
        "a-checkout"
    );
    assert_eq!(port.authorize(&meshed(INSIDE, WEB_ID)).authz_name, "b-web");
    assert!(!port.authorize(&meshed(INSIDE, API_ID)).allowed);
}

#[test]
fn namespace_policies_apply_to_every_server_in_the_namespace() {
    let other_ns = policy("elsewhere", "Namespace", &[("ServiceAccount", "api")])
        .replace("namespace: shop", "namespace: other")
        .replace("name: shop}", "name: other}");
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        ("srv2.yaml", server("web-metrics", "web", "9100", "")),
        (
            "policy.yaml",
            policy("shop-wide", "Namespace", &[("ServiceAccount", "checkout")]),
        ),
        ("other.yaml", other_ns),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let cfg = InboundConfig {
        default_policy: DefaultPolicy::Deny,
        ..InboundConfig::default()
    };
    let inbound = compile(&files, &cfg);
    for port in [8080, 9100] {
        let policy = inbound.for_port(port);
        let a = policy.authorize(&meshed(INSIDE, CHECKOUT_ID));
        assert!(a.allowed, "{port}");
        assert_eq!(a.authz_name, "shop-wide");
        assert!(
            !inbound
                .for_port(port)
                .authorize(&meshed(INSIDE, API_ID))
                .allowed
        );
    }
    // A port no Server selects is the default policy's, not the namespace policy's.
    assert!(
        !inbound
            .for_port(7000)
            .authorize(&meshed(INSIDE, CHECKOUT_ID))
            .allowed
    );
}

#[test]
fn servers_selecting_other_workloads_do_not_apply() {
    let files = [
        (
            "api.yaml",
            server("api-grpc", "api", "8080", "  proxyProtocol: gRPC\n"),
        ),
        (
            "prod.yaml",
            server("web-prod", "web", "8081", "").replace(
                "matchLabels: {app: web}",
                "matchLabels: {app: web, env: prod}",
            ),
        ),
        (
            "other-ns.yaml",
            server("web-elsewhere", "web", "8082", "")
                .replace("namespace: shop", "namespace: other"),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let (_dir, store) = load(&files, shop());
    let snap = store.snapshot();
    let cfg = InboundConfig::default();

    let inbound = snap.inbound_policy(NS, &web(), &cfg);
    assert!(inbound.server_ports().is_empty());
    for port in [8080, 8081, 8082] {
        let policy = inbound.for_port(port);
        let a = policy.authorize(&plain(INSIDE));
        assert!(a.allowed, "{port}: default policy");
        assert_eq!(a.srv_kind, "default");
    }

    let api = snap.inbound_policy(NS, &labels(&[("app", "api")]), &cfg);
    let policy = api.for_port(8080);
    let a = policy.authorize(&plain(INSIDE));
    assert!(!a.allowed);
    assert_eq!((a.srv_name, a.protocol), ("api-grpc", ProxyProtocol::Grpc));
}

#[test]
fn unresolved_authentications_fail_closed_and_are_warned_about() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "net.yaml",
            network("everyone", "  - {cidr: 0.0.0.0/0}\n  - {cidr: '::/0'}\n"),
        ),
        (
            "policy.yaml",
            policy(
                "web-policy",
                "Server web-http",
                &[
                    ("NetworkAuthentication", "everyone"),
                    ("MeshTLSAuthentication", "missing"),
                ],
            ),
        ),
        (
            "ghost.yaml",
            policy(
                "ghost",
                "Server no-such-server",
                &[("ServiceAccount", "web")],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let (dir, store) = load(&files, shop());
    let snap = store.snapshot();
    assert!(snap.errors().is_empty(), "{:?}", snap.errors());
    let port = snap
        .inbound_policy(NS, &web(), &InboundConfig::default())
        .for_port(8080);
    for client in [
        plain(INSIDE),
        meshed(INSIDE, WEB_ID),
        meshed(OUTSIDE, PROM_ID),
    ] {
        assert!(!port.authorize(&client).allowed, "{client:?}");
    }

    let warnings = snap.reference_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[0].file, dir.path().join("ghost.yaml"));
    assert_eq!(warnings[0].object, "AuthorizationPolicy shop/ghost");
    assert_eq!(warnings[0].field, "spec.targetRef.name");
    assert!(warnings[0]
        .message
        .contains("no Server shop/no-such-server"));
    assert_eq!(warnings[1].file, dir.path().join("policy.yaml"));
    assert_eq!(warnings[1].object, "AuthorizationPolicy shop/web-policy");
    assert_eq!(warnings[1].field, "spec.requiredAuthenticationRefs[1].name");
    assert!(
        warnings[1]
            .message
            .contains("no MeshTLSAuthentication shop/missing; the policy authorizes no client"),
        "{:?}",
        warnings[1]
    );
    assert_eq!(snap.warnings(), warnings, "part of the warnings");
    assert_eq!(store.config_errors_total(), 0, "warnings are not errors");

    // Nothing changed but a comment: nothing is published, derived warnings or not.
    write(
        dir.path(),
        "ghost.yaml",
        &format!("# touched\n{}", files[3].1),
    );
    store.reload();
    assert_eq!(store.snapshot().generation(), snap.generation());

    // The authentication appears: the policy works, the warning goes.
    write(dir.path(), "mtls.yaml", &meshtls("missing", &[WEB_ID]));
    store.reload();
    let snap = store.snapshot();
    assert_eq!(snap.reference_warnings().len(), 1);
    let port = snap
        .inbound_policy(NS, &web(), &InboundConfig::default())
        .for_port(8080);
    assert!(port.authorize(&meshed(INSIDE, WEB_ID)).allowed);
    assert!(!port.authorize(&plain(INSIDE)).allowed);
}

#[test]
fn a_reload_switches_decisions_and_held_policies_stay_as_they_were() {
    let srv = server("web-http", "web", "8080", "");
    let checkout = policy(
        "web-policy",
        "Server web-http",
        &[("ServiceAccount", "checkout")],
    );
    let (dir, store) = load(&[("srv.yaml", &srv), ("policy.yaml", &checkout)], shop());
    let cfg = InboundConfig::default();
    let mut updates = store.subscribe();
    let before = store
        .snapshot()
        .inbound_policy(NS, &web(), &cfg)
        .for_port(8080);
    assert!(before.authorize(&meshed(INSIDE, CHECKOUT_ID)).allowed);
    assert!(!before.authorize(&meshed(INSIDE, WEB_ID)).allowed);

    write(
        dir.path(),
        "policy.yaml",
        &policy(
            "web-policy",
            "Server web-http",
            &[("ServiceAccount", "web")],
        ),
    );
    store.reload();
    assert!(updates.has_changed().expect("store alive"));
    let snap = updates.borrow_and_update().clone();
    let after = snap.inbound_policy(NS, &web(), &cfg).for_port(8080);
    assert!(!after.authorize(&meshed(INSIDE, CHECKOUT_ID)).allowed);
    assert!(after.authorize(&meshed(INSIDE, WEB_ID)).allowed);
    // A connection holding the old policy keeps the decisions it was made with.
    assert!(before.authorize(&meshed(INSIDE, CHECKOUT_ID)).allowed);

    // An invalid edit keeps the last good policy in force.
    write(
        dir.path(),
        "policy.yaml",
        &policy("web-policy", "Server web-http", &[("Secret", "web")]),
    );
    store.reload();
    let snap = store.snapshot();
    assert_eq!(snap.errors().len(), 1);
    assert_eq!(
        snap.errors()[0].field,
        "spec.requiredAuthenticationRefs[0].kind"
    );
    let kept = snap.inbound_policy(NS, &web(), &cfg).for_port(8080);
    assert!(kept.authorize(&meshed(INSIDE, WEB_ID)).allowed);

    // The Server is deleted: the port is back on the default policy.
    std::fs::remove_file(dir.path().join("srv.yaml")).expect("rm");
    store.reload();
    let gone = store
        .snapshot()
        .inbound_policy(NS, &web(), &cfg)
        .for_port(8080);
    assert_eq!(gone.server_name(), None);
    assert!(gone.authorize(&plain(OUTSIDE)).allowed);
}

#[test]
fn named_ports_resolve_through_services_or_the_config() {
    let service = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: web-http}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: api-http}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-a
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{name: http, port: 9999}]
endpoints: [{addresses: [10.0.0.2]}]
";
    let files = [
        ("svc.yaml", service.to_string()),
        ("a.yaml", server("web-http", "web", "web-http", "")),
        ("b.yaml", server("web-admin", "web", "admin", "")),
        ("c.yaml", server("web-api-name", "web", "api-http", "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let (_dir, store) = load(&files, shop());
    let snap = store.snapshot();
    assert_eq!(
        snap.workload_port_names(NS, &web()),
        BTreeMap::from([("web-http".to_string(), 8080)])
    );
    let cfg = InboundConfig {
        port_names: BTreeMap::from([("admin".to_string(), 9990)]),
        ..InboundConfig::default()
    };
    let inbound = snap.inbound_policy(NS, &web(), &cfg);
    // `api-http` is another workload's port name: that Server selects nothing here.
    assert_eq!(
        inbound.server_ports(),
        [(8080, "web-http"), (9990, "web-admin")]
    );
}

#[test]
fn authorize_allocates_nothing() {
    let files = [
        ("srv.yaml", server("web-http", "web", "8080", "")),
        (
            "mtls.yaml",
            meshtls(
                "callers",
                &[
                    CHECKOUT_ID,
                    "*.ops.serviceaccount.identity.pylon.cluster.local",
                ],
            ),
        ),
        (
            "net.yaml",
            network("pods", "  - {cidr: 10.0.0.0/8, except: [10.9.0.0/16]}\n"),
        ),
        (
            "policy.yaml",
            policy(
                "web-policy",
                "Server web-http",
                &[
                    ("MeshTLSAuthentication", "callers"),
                    ("NetworkAuthentication", "pods"),
                ],
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let cfg = InboundConfig {
        default_policy: DefaultPolicy::ClusterAuthenticated,
        ..InboundConfig::default()
    };
    let inbound = compile(&files, &cfg);
    let clients = [
        plain(INSIDE),
        meshed("10.2.2.2", CHECKOUT_ID),
        meshed("10.2.2.2", PROM_ID),
        meshed("10.9.2.2", PROM_ID),
        meshed(OUTSIDE, WEB_ID),
    ];
    let (allowed, allocations) = alloc_count::allocations(|| {
        let mut allowed = 0;
        for port in [8080, 7000] {
            let policy = inbound.for_port(port);
            for client in &clients {
                let a = policy.authorize(client);
                allowed += usize::from(std::hint::black_box(a.allowed));
            }
        }
        allowed
    });
    // 8080: checkout and prometheus from the pod network; 7000: the meshed in the cluster.
    assert_eq!(allowed, 2 + 3);
    assert_eq!(allocations, 0);
    // The counter does count.
    let (_, counted) = alloc_count::allocations(|| std::hint::black_box(vec![0u8; 16]));
    assert_eq!(counted, 1);
}

#[test]
fn an_empty_store_uses_the_default_everywhere() {
    let store = Store::empty(shop());
    let inbound = store
        .snapshot()
        .inbound_policy(NS, &web(), &InboundConfig::default());
    let policy = inbound.for_port(1);
    let a = policy.authorize(&plain(OUTSIDE));
    assert!(a.allowed);
    assert_eq!((a.srv_kind, a.srv_name), ("default", "all-unauthenticated"));
}
