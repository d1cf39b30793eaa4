//! A port's policy in Linkerd's inbound policy API (`io.linkerd.proxy.inbound.Server`), both
//! ways: the controller answers `WatchPort` with [`PortPolicy::to_proto`], and a proxy fed by a
//! controller (Pylon's or Linkerd's) decides with [`PortPolicy::from_proto`].
//!
//! Linkerd's proxies authorize HTTP requests per route: a server without routes admits no
//! request. Pylon has no route objects yet, so every HTTP protocol carries one default route
//! (`/` prefix, any gRPC method) with the server's authorizations, as Linkerd's controller
//! synthesizes when no HTTPRoute selects the server.

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use linkerd2_proxy_api::inbound as api;
use linkerd2_proxy_api::meta;
use linkerd2_proxy_api::{grpc_route, http_route};

use super::{Authz, IdentitySet, PortPolicy, ServerPolicy, DEFAULT_KIND};
use crate::objects::{Network, ProxyProtocol};
use crate::proto::ProtoError;

/// What Linkerd's controller sends as the detection timeout.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

impl PortPolicy {
    /// The port's server and authorizations as a `WatchPort` answer.
    pub fn to_proto(&self) -> api::Server {
        let s = &*self.server;
        let authorizations: Vec<api::Authz> = s.authzs.iter().map(authz_to_proto).collect();
        let protocol = protocol_to_proto(s.protocol, &authorizations);
        api::Server {
            protocol: Some(api::ProxyProtocol {
                kind: Some(protocol),
            }),
            server_ips: Vec::new(),
            authorizations,
            labels: labels(&s.group, &s.kind, &s.name),
        }
    }

    /// The policy a `WatchPort` answer describes for `port`.
    pub fn from_proto(port: u16, server: &api::Server) -> Result<PortPolicy, ProtoError> {
        use api::proxy_protocol::Kind;
        let protocol = match server.protocol.as_ref().and_then(|p| p.kind.as_ref()) {
            None => return Err(error("protocol", "missing")),
            Some(Kind::Detect(_)) => ProxyProtocol::Unknown,
            Some(Kind::Http1(_)) => ProxyProtocol::Http1,
            Some(Kind::Http2(_)) => ProxyProtocol::Http2,
            Some(Kind::Grpc(_)) => ProxyProtocol::Grpc,
            Some(Kind::Opaque(_)) => ProxyProtocol::Opaque,
            Some(Kind::Tls(_)) => ProxyProtocol::Tls,
        };
        let authzs = server
            .authorizations
            .iter()
            .enumerate()
            .map(|(i, a)| authz_from_proto(a, &format!("authorizations[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let (group, kind, name) = names(&server.labels, None);
        Ok(PortPolicy {
            port,
            server: Arc::new(ServerPolicy {
                group,
                kind,
                name,
                protocol,
                authzs: authzs.into(),
            }),
        })
    }
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ProtoError {
    ProtoError {
        field: field.into(),
        message: message.into(),
    }
}

fn labels(group: &str, kind: &str, name: &str) -> std::collections::HashMap<String, String> {
    [
        ("group".to_string(), group.to_string()),
        ("kind".to_string(), kind.to_string()),
        ("name".to_string(), name.to_string()),
    ]
    .into()
}

/// `group`, `kind` and `name` from Linkerd's labels, else from the metadata.
fn names(
    labels: &std::collections::HashMap<String, String>,
    metadata: Option<&meta::Metadata>,
) -> (Arc<str>, Arc<str>, Arc<str>) {
    let label = |k: &str| labels.get(k).map(|v| Arc::from(v.as_str()));
    let from_meta = match metadata.and_then(|m| m.kind.as_ref()) {
        Some(meta::metadata::Kind::Default(name)) => {
            Some(("".into(), DEFAULT_KIND.into(), name.as_str().into()))
        }
        Some(meta::metadata::Kind::Resource(r)) => Some((
            r.group.as_str().into(),
            r.kind.to_ascii_lowercase().into(),
            r.name.as_str().into(),
        )),
        None => None,
    };
    match (label("kind"), label("name")) {
        (Some(kind), Some(name)) => (label("group").unwrap_or_else(|| "".into()), kind, name),
        _ => from_meta.unwrap_or_else(|| ("".into(), DEFAULT_KIND.into(), "".into())),
    }
}

fn authz_to_proto(a: &Authz) -> api::Authz {
    let networks = match intersect_networks(&a.networks) {
        Some(nets) => nets,
        // No network requirement: every address.
        None => vec![
            Network {
                cidr: IpNet::V4(Default::default()),
                except: Vec::new(),
            },
            Network {
                cidr: IpNet::V6(Default::default()),
                except: Vec::new(),
            },
        ],
    };
    let permit = match intersect_identities(&a.identities) {
        None => api::authn::Permit::Unauthenticated(api::authn::PermitUnauthenticated {}),
        Some(set) => {
            let mut suffixes: Vec<api::IdentitySuffix> = set
                .suffixes
                .iter()
                .map(|s| api::IdentitySuffix {
                    parts: s
                        .trim_start_matches('.')
                        .split('.')
                        .map(str::to_string)
                        .collect(),
                })
                .collect();
            if set.any {
                // Linkerd's "*": a suffix of no parts.
                suffixes.push(api::IdentitySuffix { parts: Vec::new() });
            }
            let mut identities: Vec<api::Identity> = set
                .exact
                .iter()
                .map(|i| api::Identity {
                    name: i.to_string(),
                })
                .collect();
            identities.sort_by(|a, b| a.name.cmp(&b.name));
            api::authn::Permit::MeshTls(api::authn::PermitMeshTls {
                clients: Some(api::authn::permit_mesh_tls::Clients::Identities(
                    api::authn::permit_mesh_tls::PermitClientIdentities {
                        identities,
                        suffixes,
                    },
                )),
            })
        }
    };
    let metadata = if &*a.kind == DEFAULT_KIND {
        meta::metadata::Kind::Default(a.name.to_string())
    } else {
        meta::metadata::Kind::Resource(meta::Resource {
            group: a.group.to_string(),
            kind: a.kind.to_string(),
            name: a.name.to_string(),
            ..Default::default()
        })
    };
    api::Authz {
        networks: networks
            .into_iter()
            .map(|n| api::Network {
                net: Some(n.cidr.into()),
                except: n.except.into_iter().map(Into::into).collect(),
            })
            .collect(),
        authentication: Some(api::Authn {
            permit: Some(permit),
        }),
        labels: labels(&a.group, &a.kind, &a.name),
        metadata: Some(meta::Metadata {
            kind: Some(metadata),
        }),
    }
}

/// Every requirement must hold, and the API carries one network list per authorization: CIDRs
/// are nested or disjoint, so the intersection of two lists is exact. `None`: no requirement.
fn intersect_networks(lists: &[Arc<[Network]>]) -> Option<Vec<Network>> {
    let (first, rest) = lists.split_first()?;
    let mut acc: Vec<Network> = first.to_vec();
    for list in rest {
        let mut next = Vec::new();
        for a in &acc {
            for b in list.iter() {
                let cidr = if a.cidr.contains(&b.cidr) {
                    b.cidr
                } else if b.cidr.contains(&a.cidr) {
                    a.cidr
                } else {
                    continue;
                };
                let mut except = a.except.clone();
                except.extend(b.except.iter().copied());
                next.push(Network { cidr, except });
            }
        }
        acc = next;
    }
    Some(acc)
}

/// The identities all of `sets` accept, as one set (`None`: no identity requirement). Exact
/// names are kept when every set accepts them; suffixes survive only beside "any", so the
/// result never admits more than the requirements do.
fn intersect_identities(sets: &[Arc<IdentitySet>]) -> Option<IdentitySet> {
    let specific: Vec<&IdentitySet> = sets.iter().map(|s| &**s).filter(|s| !s.any).collect();
    match specific.as_slice() {
        [] if sets.is_empty() => None,
        [] => Some(IdentitySet::any()),
        [one] => Some(IdentitySet {
            any: false,
            exact: one.exact.clone(),
            suffixes: one.suffixes.clone(),
        }),
        [first, rest @ ..] => Some(IdentitySet {
            any: false,
            exact: first
                .exact
                .iter()
                .filter(|id| rest.iter().all(|s| s.matches(id)))
                .cloned()
                .collect(),
            suffixes: Box::new([]),
        }),
    }
}

fn protocol_to_proto(protocol: ProxyProtocol, authzs: &[api::Authz]) -> api::proxy_protocol::Kind {
    use api::proxy_protocol::{Detect, Grpc, Http1, Http2, Kind, Opaque, Tls};
    let http_routes = || {
        vec![api::HttpRoute {
            metadata: Some(default_meta()),
            hosts: Vec::new(),
            authorizations: authzs.to_vec(),
            rules: vec![api::http_route::Rule {
                matches: vec![http_route::HttpRouteMatch {
                    path: Some(http_route::PathMatch {
                        kind: Some(http_route::path_match::Kind::Prefix("/".into())),
                    }),
                    ..Default::default()
                }],
                filters: Vec::new(),
            }],
        }]
    };
    match protocol {
        ProxyProtocol::Unknown => Kind::Detect(Detect {
            timeout: prost_types::Duration::try_from(DETECT_TIMEOUT).ok(),
            http_routes: http_routes(),
            http_local_rate_limit: None,
        }),
        ProxyProtocol::Http1 => Kind::Http1(Http1 {
            routes: http_routes(),
            local_rate_limit: None,
        }),
        ProxyProtocol::Http2 => Kind::Http2(Http2 {
            routes: http_routes(),
            local_rate_limit: None,
        }),
        ProxyProtocol::Grpc => Kind::Grpc(Grpc {
            routes: vec![api::GrpcRoute {
                metadata: Some(default_meta()),
                hosts: Vec::new(),
                authorizations: authzs.to_vec(),
                rules: vec![api::grpc_route::Rule {
                    matches: vec![grpc_route::GrpcRouteMatch::default()],
                    filters: Vec::new(),
                }],
            }],
        }),
        ProxyProtocol::Opaque => Kind::Opaque(Opaque {}),
        ProxyProtocol::Tls => Kind::Tls(Tls {}),
    }
}

fn default_meta() -> meta::Metadata {
    meta::Metadata {
        kind: Some(meta::metadata::Kind::Default("default".into())),
    }
}

fn authz_from_proto(a: &api::Authz, field: &str) -> Result<Authz, ProtoError> {
    let mut networks = Vec::with_capacity(a.networks.len());
    for (i, n) in a.networks.iter().enumerate() {
        let net = |n: &linkerd2_proxy_api::net::IpNetwork, f: String| {
            IpNet::try_from(*n).map_err(|e| error(f, e.to_string()))
        };
        let cidr = n
            .net
            .as_ref()
            .ok_or_else(|| error(format!("{field}.networks[{i}].net"), "missing"))?;
        networks.push(Network {
            cidr: net(cidr, format!("{field}.networks[{i}].net"))?.trunc(),
            except: n
                .except
                .iter()
                .enumerate()
                .map(|(j, e)| net(e, format!("{field}.networks[{i}].except[{j}]")))
                .collect::<Result<_, _>>()?,
        });
    }
    use api::authn::permit_mesh_tls::Clients;
    use api::authn::Permit;
    let identities = match a.authentication.as_ref().and_then(|p| p.permit.as_ref()) {
        None => return Err(error(format!("{field}.authentication"), "missing")),
        Some(Permit::Unauthenticated(_)) => Vec::new(),
        Some(Permit::MeshTls(m)) => match &m.clients {
            None => {
                return Err(error(
                    format!("{field}.authentication.meshTLS"),
                    "no clients",
                ))
            }
            // Any TLS client: Pylon's proxies always present an identity.
            Some(Clients::Unauthenticated(_)) => vec![Arc::new(IdentitySet::any())],
            Some(Clients::Identities(ids)) => {
                let mut set = IdentitySet::default();
                let mut suffixes = Vec::new();
                for s in &ids.suffixes {
                    if s.parts.is_empty() {
                        set.any = true;
                    } else {
                        suffixes.push(format!(".{}", s.parts.join(".")).into_boxed_str());
                    }
                }
                set.exact = ids
                    .identities
                    .iter()
                    .map(|i| i.name.as_str().into())
                    .collect();
                set.suffixes = suffixes.into();
                vec![Arc::new(set)]
            }
        },
    };
    let (group, kind, name) = names(&a.labels, a.metadata.as_ref());
    // A list covering every address is no requirement at all.
    let everything = networks
        .iter()
        .any(|n| n.cidr.prefix_len() == 0 && n.except.is_empty())
        && networks.iter().filter(|n| n.cidr.prefix_len() == 0).count() == 2;
    Ok(Authz {
        group,
        kind,
        name,
        identities: identities.into(),
        networks: if everything || networks.is_empty() && a.networks.is_empty() {
            Box::new([])
        } else {
            Box::new([networks.into()])
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::inbound::{ClientInfo, InboundConfig};
    use crate::test_support::load;
    use crate::StoreConfig;

    use super::*;

    const POLICY: &str = r#"
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  port: 8080
  proxyProtocol: HTTP/1
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: from-gateway, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  requiredAuthenticationRefs:
  - {group: policy.linkerd.io, kind: MeshTLSAuthentication, name: gateway}
  - {group: policy.linkerd.io, kind: NetworkAuthentication, name: pods}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: gateway, namespace: shop}
spec:
  identities: ["gw.edge.serviceaccount.identity.pylon.cluster.local", "*.ops.serviceaccount.identity.pylon.cluster.local"]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: pods, namespace: shop}
spec:
  networks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]
"#;

    fn policy(port: u16) -> PortPolicy {
        let (_dir, store) = load(&[("p.yaml", POLICY)], StoreConfig::default());
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        store
            .snapshot()
            .inbound_policy("shop", &labels, &InboundConfig::default())
            .for_port(port)
    }

    fn client(peer: &str, identity: Option<&'static str>) -> ClientInfo<'static> {
        ClientInfo {
            peer: peer.parse().expect("ip"),
            tls: identity.is_some(),
            identity,
        }
    }

    #[test]
    fn a_port_policy_survives_the_round_trip() {
        let policy = policy(8080);
        let proto = policy.to_proto();
        assert_eq!(proto.labels["name"], "web-http");
        assert_eq!(proto.labels["kind"], "server");
        let Some(api::proxy_protocol::Kind::Http1(http1)) =
            proto.protocol.as_ref().and_then(|p| p.kind.clone())
        else {
            panic!("HTTP/1 with a default route")
        };
        assert_eq!(http1.routes.len(), 1);
        assert_eq!(http1.routes[0].authorizations, proto.authorizations);
        let back = PortPolicy::from_proto(8080, &proto).expect("valid");
        assert_eq!(back.protocol(), ProxyProtocol::Http1);
        assert_eq!(back.server_name(), Some("web-http"));
        let gw = Some("gw.edge.serviceaccount.identity.pylon.cluster.local");
        let ops = Some("x.ops.serviceaccount.identity.pylon.cluster.local");
        for (c, allowed) in [
            (client("10.1.2.3", gw), true),
            (client("10.1.2.3", ops), true),
            (client("10.9.2.3", gw), false),
            (client("192.168.1.1", gw), false),
            (client("10.1.2.3", None), false),
            (
                client(
                    "10.1.2.3",
                    Some("web.shop.serviceaccount.identity.pylon.cluster.local"),
                ),
                false,
            ),
        ] {
            let (a, b) = (policy.authorize(&c), back.authorize(&c));
            assert_eq!(a.allowed, allowed, "{c:?}");
            assert_eq!(b.allowed, allowed, "{c:?} after the round trip");
            assert_eq!((a.authz_kind, a.authz_name), (b.authz_kind, b.authz_name));
        }
    }

    #[test]
    fn default_ports_round_trip_too() {
        let policy = policy(9999);
        let proto = policy.to_proto();
        assert!(matches!(
            proto.protocol.as_ref().and_then(|p| p.kind.as_ref()),
            Some(api::proxy_protocol::Kind::Detect(_))
        ));
        assert_eq!(
            proto.authorizations[0].metadata,
            Some(meta::Metadata {
                kind: Some(meta::metadata::Kind::Default("all-unauthenticated".into()))
            })
        );
        let back = PortPolicy::from_proto(9999, &proto).expect("valid");
        let a = back.authorize(&client("203.0.113.9", None));
        assert!(a.allowed);
        assert_eq!((a.srv_kind, a.srv_name), ("default", "all-unauthenticated"));
        assert_eq!(
            (a.authz_kind, a.authz_name),
            ("default", "all-unauthenticated")
        );
    }

    #[test]
    fn network_lists_intersect_exactly() {
        let n = |s: &str| Network {
            cidr: s.parse().expect("cidr"),
            except: Vec::new(),
        };
        let a: Arc<[Network]> = vec![n("10.0.0.0/8"), n("192.168.0.0/16")].into();
        let b: Arc<[Network]> = vec![n("10.1.0.0/16"), n("172.16.0.0/12")].into();
        let both = intersect_networks(&[a, b]).expect("some");
        assert_eq!(both, vec![n("10.1.0.0/16")]);
    }
}
