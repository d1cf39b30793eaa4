//! Resource names as Linkerd's CLI spells them (`deployment/web`, `deploy/web`, `svc/web`,
//! `pod/web-0`, `ns/default`, `authority/web.default.svc.cluster.local`, or a kind alone for
//! every resource of that kind), and the label matchers that select their series.

use std::fmt;

/// What kind of thing a resource is, and which label names it in the proxies' metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A workload: the `deployment` label every proxy adds to its own series.
    Deployment,
    /// A pod: the proxy's `pod` label.
    Pod,
    /// A namespace: the proxy's `namespace` label.
    Namespace,
    /// A destination service: outbound series' `dst_service` / `dst_namespace`.
    Service,
    /// A request authority (`Host` / `:authority`): the `authority` label.
    Authority,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Kind::Deployment,
            "pod" | "pods" | "po" => Kind::Pod,
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            "service" | "services" | "svc" => Kind::Service,
            "authority" | "authorities" | "au" => Kind::Authority,
            _ => {
                return Err(format!(
                    "unknown resource kind {s:?} (expected deployment, pod, ns, svc or authority)"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "deployment",
            Kind::Pod => "pod",
            Kind::Namespace => "ns",
            Kind::Service => "svc",
            Kind::Authority => "authority",
        }
    }

    /// Whether the kind names the proxy's own workload (its constant labels).
    pub fn is_workload(self) -> bool {
        matches!(self, Kind::Deployment | Kind::Pod | Kind::Namespace)
    }

    /// The label holding the resource's name on a proxy's series, seen from the proxy that
    /// belongs to it (workloads) or from a client's outbound proxy (services).
    pub fn name_label(self) -> &'static str {
        match self {
            Kind::Deployment => "deployment",
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::Service => "dst_service",
            Kind::Authority => "authority",
        }
    }

    /// The label holding the resource's namespace, where it has one.
    pub fn namespace_label(self) -> Option<&'static str> {
        match self {
            Kind::Deployment | Kind::Pod => Some("namespace"),
            Kind::Service => Some("dst_namespace"),
            Kind::Namespace | Kind::Authority => None,
        }
    }
}

/// `KIND` or `KIND/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub kind: Kind,
    pub name: Option<String>,
    /// The namespace the name itself gives (`svc/web.shop.svc.cluster.local`); it wins over
    /// `-n` and `-A`.
    pub namespace: Option<String>,
}

/// How a dotted name reads (see [`Resource::parse`]).
fn dotted_name(kind: Kind, s: &str, name: &str) -> Result<(String, Option<String>), String> {
    let labels: Vec<&str> = name.split('.').collect();
    // `NAME.NS.svc` or `NAME.NS.svc.DOMAIN`: a service's in-cluster DNS name.
    if let [svc, ns, "svc", ..] = labels.as_slice() {
        if svc.is_empty() || ns.is_empty() {
            return Err(format!(
                "bad resource {s:?}: expected svc/NAME.NAMESPACE.svc[.DOMAIN]"
            ));
        }
        if kind == Kind::Service {
            return Ok((svc.to_string(), Some(ns.to_string())));
        }
        return Err(format!(
            "bad resource {s:?}: only services have DNS names; try svc/{svc} -n {ns} (or {}/NAME -n {ns})",
            kind.as_str()
        ));
    }
    let (local, cluster) = name.split_once('.').unwrap_or((name, ""));
    let as_namespace = match kind {
        Kind::Namespace => String::new(),
        _ => format!(
            "; if {cluster:?} is a namespace here, write {}/{local} -n {cluster}",
            kind.as_str()
        ),
    };
    Err(format!(
        "not supported yet: multicluster: {s} names {local:?} in cluster {cluster:?}, and Pylon reads this cluster's proxies only (--proxy, --config-dir, --prometheus){as_namespace}"
    ))
}

impl Resource {
    /// Parses `KIND` or `KIND/NAME`.
    ///
    /// Names with a dot. Services and namespaces have DNS-label names in Kubernetes (no
    /// dots), and the one dotted form of a service Pylon takes is its in-cluster DNS name
    /// (`svc/NAME.NS.svc`, `svc/NAME.NS.svc.cluster.local`, as `authority/` and the proxies'
    /// `authority` labels spell it), read as `svc/NAME -n NS`. Any other `NAME.SUFFIX` is a
    /// name qualified by another cluster, as multicluster guides write them
    /// (`deployment/data-service.remote-cluster`), which Pylon cannot answer for: its proxies,
    /// config dirs and Prometheus are one cluster's. That is refused at once with a "not
    /// supported yet" error, rather than read as a local name that never has traffic.
    /// Deployment and pod names may legally hold dots (DNS subdomains), but a dotted one is
    /// far more often a cluster-qualified name typed from such a guide, so the rule is the
    /// same for every kind; `authority/HOST` is a host and is taken as it is. (Linkerd's own
    /// mirrored services are named `NAME-CLUSTER`, a local Service like any other.)
    pub fn parse(s: &str) -> Result<Resource, String> {
        let (kind, name) = match s.split_once('/') {
            Some((kind, name)) => {
                if name.is_empty() || name.contains('/') {
                    return Err(format!(
                        "bad resource {s:?}: expected KIND/NAME, e.g. deployment/web"
                    ));
                }
                (kind, Some(name))
            }
            None => (s, None),
        };
        let kind = Kind::parse(kind)?;
        let (name, namespace) = match name {
            Some(name) if kind != Kind::Authority && name.contains('.') => {
                let (name, ns) = dotted_name(kind, s, name)?;
                (Some(name), ns)
            }
            name => (name.map(str::to_string), None),
        };
        Ok(Resource {
            kind,
            name,
            namespace,
        })
    }

    /// Parses a `--to`: any kind, named (outbound series and tap events name a destination
    /// by its `dst_*` labels or its authority).
    pub fn parse_to(s: &str) -> Result<Resource, String> {
        let r = Resource::parse(s)?;
        if r.name.is_none() {
            return Err(format!(
                "--to {r}: expected one destination: deployment/NAME, pod/NAME, ns/NAME, svc/NAME or authority/HOST"
            ));
        }
        Ok(r)
    }

    /// Parses a `--from`: a named workload (traffic is sent by the proxies of deployments,
    /// pods and namespaces; a service sends nothing).
    pub fn parse_from(s: &str) -> Result<Resource, String> {
        let r = Resource::parse(s)?;
        if r.name.is_none() || !r.kind.is_workload() {
            return Err(format!(
                "--from {r}: expected a workload: deployment/NAME, pod/NAME or ns/NAME"
            ));
        }
        Ok(r)
    }

    /// The namespace this resource is read in: its own, else `namespace` (`None` = all).
    pub fn namespace_or<'a>(&'a self, namespace: Option<&'a str>) -> Option<&'a str> {
        self.namespace.as_deref().or(namespace)
    }

    /// Matchers selecting this resource's series, from the point of view of the label names
    /// given by [`Kind::name_label`]; `namespace` applies to namespaced kinds (`None` = all).
    pub fn matchers(&self, namespace: Option<&str>) -> Vec<Matcher> {
        let namespace = self.namespace_or(namespace);
        let mut out = Vec::new();
        if let (Some(ns_label), Some(ns)) = (self.kind.namespace_label(), namespace) {
            out.push(Matcher::eq(ns_label, ns));
        }
        if let Some(name) = &self.name {
            out.push(match self.kind {
                Kind::Authority => Matcher::Host(name.clone()),
                kind => Matcher::eq(kind.name_label(), name),
            });
        }
        out
    }

    /// Matchers selecting this resource as a *destination*: outbound series name it by the
    /// `dst_*` labels (`dst_deployment`, `dst_pod`, `dst_service`, with `dst_namespace`), or
    /// by authority.
    pub fn dst_matchers(&self, namespace: Option<&str>) -> Vec<Matcher> {
        let name_label = match self.kind {
            Kind::Deployment => "dst_deployment",
            Kind::Pod => "dst_pod",
            Kind::Service => "dst_service",
            Kind::Namespace => "dst_namespace",
            Kind::Authority => return self.matchers(namespace),
        };
        let namespace = self.namespace_or(namespace);
        let mut out = Vec::new();
        if let (Some(ns), false) = (namespace, self.kind == Kind::Namespace) {
            out.push(Matcher::eq("dst_namespace", ns));
        }
        if let Some(name) = &self.name {
            out.push(Matcher::eq(name_label, name));
        }
        out
    }

    /// The labels a row of this kind is grouped by.
    pub fn group_labels(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if let Some(ns) = self.kind.namespace_label() {
            out.push(ns);
        }
        out.push(self.kind.name_label());
        out
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{}/{name}", self.kind.as_str()),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

/// One condition on a series' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// `label="value"`.
    Eq(&'static str, String),
    /// The `authority` label is `HOST` or `HOST:PORT`.
    Host(String),
}

impl Matcher {
    pub fn eq(label: &'static str, value: impl Into<String>) -> Matcher {
        Matcher::Eq(label, value.into())
    }

    pub fn matches(&self, label: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Matcher::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
            Matcher::Host(host) => label("authority").is_some_and(|a| {
                a == *host
                    || a.strip_prefix(host.as_str())
                        .and_then(|rest| rest.strip_prefix(':'))
                        .is_some_and(|port| {
                            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
                        })
            }),
        }
    }

    /// The PromQL label matcher.
    pub fn promql(&self) -> String {
        match self {
            Matcher::Eq(k, v) => format!("{k}=\"{}\"", promql_escape(v)),
            Matcher::Host(host) => {
                let mut re = String::new();
                for c in host.chars() {
                    if !c.is_ascii_alphanumeric() && c != '-' && c != '_' {
                        re.push('\\');
                    }
                    re.push(c);
                }
                format!("authority=~\"{}(:[0-9]+)?\"", promql_escape(&re))
            }
        }
    }
}

/// Escapes a PromQL string literal's contents.
pub fn promql_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `web.default.svc.cluster.local:80` -> `("web", "default")`: the service an in-cluster
/// authority names (route series carry the authority in `dst`, not `dst_service`).
pub fn service_of_authority(authority: &str) -> Option<(String, String)> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let mut parts = host.split('.');
    let svc = parts.next()?;
    let ns = parts.next()?;
    (parts.next() == Some("svc") && !svc.is_empty() && !ns.is_empty())
        .then(|| (svc.to_string(), ns.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parses_kinds_names_and_aliases() {
        for s in ["deployment/web", "deploy/web", "deployments/web"] {
            assert_eq!(
                Resource::parse(s),
                Ok(Resource {
                    kind: Kind::Deployment,
                    name: Some("web".into()),
                    namespace: None,
                })
            );
        }
        assert_eq!(
            Resource::parse("deployment"),
            Ok(Resource {
                kind: Kind::Deployment,
                name: None,
                namespace: None,
            })
        );
        assert_eq!(
            Resource::parse("svc/web").map(|r| r.kind),
            Ok(Kind::Service)
        );
        assert_eq!(Resource::parse("po/web-0").map(|r| r.kind), Ok(Kind::Pod));
        assert_eq!(
            Resource::parse("ns/default").map(|r| r.kind),
            Ok(Kind::Namespace)
        );
        assert_eq!(
            Resource::parse("authority/web.default.svc.cluster.local:80")
                .map(|r| r.to_string())
                .as_deref(),
            Ok("authority/web.default.svc.cluster.local:80")
        );
    }

    #[test]
    fn rejects_unknown_kinds_and_bad_names() {
        let err = Resource::parse("cronjob/nightly").expect_err("unknown kind");
        assert!(err.contains("unknown resource kind \"cronjob\""), "{err}");
        assert!(Resource::parse("deployment/").is_err());
        assert!(Resource::parse("deployment/a/b").is_err());
    }

    #[test]
    fn dotted_names_are_multicluster_unless_a_service_dns_name() {
        for s in [
            "deployment/data-service.remote-cluster",
            "deploy/data-service.remote-cluster",
            "svc/data-service.remote-cluster",
            "pod/web-0.west",
            "ns/shop.west",
        ] {
            let err = Resource::parse(s).expect_err(s);
            assert!(
                err.starts_with("not supported yet: multicluster"),
                "{s}: {err}"
            );
            assert!(err.contains(s), "names what was given: {err}");
        }
        let err = Resource::parse("svc/web.shop").expect_err("multicluster");
        assert!(err.contains("write svc/web -n shop"), "{err}");
        assert!(err.contains("names \"web\" in cluster \"shop\""), "{err}");
        assert!(!Resource::parse("ns/a.b").expect_err("x").contains(" -n "));

        // A service's in-cluster DNS name is a namespace form.
        for s in ["svc/web.shop.svc", "svc/web.shop.svc.cluster.local"] {
            let r = Resource::parse(s).expect(s);
            assert_eq!(r.name.as_deref(), Some("web"));
            assert_eq!(r.namespace.as_deref(), Some("shop"));
            assert_eq!(
                r.matchers(Some("default")),
                vec![
                    Matcher::eq("dst_namespace", "shop"),
                    Matcher::eq("dst_service", "web")
                ]
            );
            assert_eq!(
                r.dst_matchers(None)[0],
                Matcher::eq("dst_namespace", "shop")
            );
        }
        let err = Resource::parse("deploy/web.shop.svc.cluster.local").expect_err("not a svc");
        assert!(err.contains("only services have DNS names"), "{err}");
        assert!(Resource::parse("svc/.shop.svc").is_err());
        // Hosts are hosts.
        let r = Resource::parse("authority/data-service.remote-cluster:80").expect("a host");
        assert_eq!(r.name.as_deref(), Some("data-service.remote-cluster:80"));
    }

    #[test]
    fn to_and_from_name_one_resource() {
        for ok in [
            "deploy/web",
            "pod/web-0",
            "ns/shop",
            "svc/web",
            "authority/web:80",
        ] {
            assert!(Resource::parse_to(ok).is_ok(), "{ok}");
        }
        let err = Resource::parse_to("deployment").expect_err("no name");
        assert!(err.contains("expected one destination"), "{err}");
        for ok in ["deploy/client", "pod/client-0", "ns/shop"] {
            assert!(Resource::parse_from(ok).is_ok(), "{ok}");
        }
        for bad in ["svc/web", "authority/web:80", "deployment"] {
            let err = Resource::parse_from(bad).expect_err(bad);
            assert!(err.contains("expected a workload"), "{err}");
        }
        let err = Resource::parse_to("deploy/x.remote").expect_err("multicluster");
        assert!(err.starts_with("not supported yet"), "{err}");
    }

    #[test]
    fn matchers_select_by_name_and_namespace() {
        let web = Resource::parse("deploy/web").expect("parses");
        let m = web.matchers(Some("default"));
        assert_eq!(
            m,
            vec![
                Matcher::eq("namespace", "default"),
                Matcher::eq("deployment", "web")
            ]
        );
        let row = [("namespace", "default"), ("deployment", "web")];
        assert!(m.iter().all(|m| m.matches(labels(&row))));
        let other = [("namespace", "prod"), ("deployment", "web")];
        assert!(!m.iter().all(|m| m.matches(labels(&other))));
        // Services are selected by the destination labels of outbound series.
        let svc = Resource::parse("svc/web").expect("parses");
        assert_eq!(
            svc.matchers(Some("default")),
            vec![
                Matcher::eq("dst_namespace", "default"),
                Matcher::eq("dst_service", "web")
            ]
        );
        assert_eq!(svc.group_labels(), vec!["dst_namespace", "dst_service"]);
    }

    #[test]
    fn host_matcher_ignores_the_port_only() {
        let m = Matcher::Host("web.default".into());
        assert!(m.matches(labels(&[("authority", "web.default")])));
        assert!(m.matches(labels(&[("authority", "web.default:80")])));
        assert!(!m.matches(labels(&[("authority", "web.default.svc:80")])));
        assert!(!m.matches(labels(&[("authority", "web.default:")])));
        assert_eq!(m.promql(), r#"authority=~"web\\.default(:[0-9]+)?""#);
        assert_eq!(
            Matcher::eq("deployment", "we\"b").promql(),
            r#"deployment="we\"b""#
        );
    }

    #[test]
    fn service_of_an_in_cluster_authority() {
        assert_eq!(
            service_of_authority("web.default.svc.cluster.local:80"),
            Some(("web".into(), "default".into()))
        );
        assert_eq!(
            service_of_authority("web.prod.svc.cluster.local"),
            Some(("web".into(), "prod".into()))
        );
        assert_eq!(service_of_authority("example.com:443"), None);
        assert_eq!(service_of_authority("10.0.0.1:80"), None);
    }
}
