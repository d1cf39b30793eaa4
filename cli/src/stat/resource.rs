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
}

impl Resource {
    pub fn parse(s: &str) -> Result<Resource, String> {
        let (kind, name) = match s.split_once('/') {
            Some((kind, name)) => {
                if name.is_empty() || name.contains('/') {
                    return Err(format!(
                        "bad resource {s:?}: expected KIND/NAME, e.g. deployment/web"
                    ));
                }
                (kind, Some(name.to_string()))
            }
            None => (s, None),
        };
        Ok(Resource {
            kind: Kind::parse(kind)?,
            name,
        })
    }

    /// Matchers selecting this resource's series, from the point of view of the label names
    /// given by [`Kind::name_label`]; `namespace` applies to namespaced kinds (`None` = all).
    pub fn matchers(&self, namespace: Option<&str>) -> Vec<Matcher> {
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
                    name: Some("web".into())
                })
            );
        }
        assert_eq!(
            Resource::parse("deployment"),
            Ok(Resource {
                kind: Kind::Deployment,
                name: None
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
