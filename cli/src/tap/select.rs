//! Which proxies `tap`, `top` and `profile --tap` use, and which of their requests they keep.
//!
//! The tap API matches what a request says of itself (authority, path, method, addresses) and
//! the destination labels the proxy puts on its events, but no direction, and not every proxy
//! labels the destination's workload on its events. So the proxies get the match they
//! can apply (a service's authority, `--authority`, `--method`, `--path`), and the CLI keeps
//! the rest: one side of the proxy (`--to`, `--from`, `profile --tap deployment/X`), and a
//! destination named by workload. A request's destination is known by the `dst_*` labels of
//! stat's `--to` ([`Resource::dst_matchers`]), gathered from the event's destination labels
//! (Linkerd's proxies put the endpoint's `pod`, `deployment`, `namespace`... there), else the
//! config dir's EndpointSlices and Pods for the endpoint address, and the service its
//! authority names.

use std::collections::HashMap;

use linkerd2_proxy_api::tap::observe_request::r#match::{self as pb, http as pbhttp};
use linkerd2_proxy_api::tap::observe_request::Match;
use linkerd2_proxy_api::tap::TapEvent;

use super::event::{Kind as EventKind, Line};
use crate::proxies::{DirMesh, DstLabels};
use crate::stat::resource::{service_of_authority, Kind, Resource};

// ---------------------------------------------------------------------------------------------
// Linkerd's match
// ---------------------------------------------------------------------------------------------

pub(super) fn http_match(m: pbhttp::Match) -> Match {
    Match {
        r#match: Some(pb::Match::Http(pb::Http { r#match: Some(m) })),
    }
}

pub(super) fn string_match(m: pbhttp::string_match::Match) -> pbhttp::StringMatch {
    pbhttp::StringMatch { r#match: Some(m) }
}

pub(super) fn any(matches: Vec<Match>) -> Match {
    Match {
        r#match: Some(pb::Match::Any(pb::Seq { matches })),
    }
}

pub(super) fn all(mut matches: Vec<Match>) -> Option<Match> {
    match matches.len() {
        0 => None,
        1 => matches.pop(),
        _ => Some(Match {
            r#match: Some(pb::Match::All(pb::Seq { matches })),
        }),
    }
}

pub(super) fn authority_prefix(prefix: String) -> Match {
    http_match(pbhttp::Match::Authority(string_match(
        pbhttp::string_match::Match::Prefix(prefix),
    )))
}

/// `HOST:PORT` exactly, or `HOST` with any port (or none).
pub(super) fn authority_is(a: &str) -> Match {
    let exact = http_match(pbhttp::Match::Authority(string_match(
        pbhttp::string_match::Match::Exact(a.to_string()),
    )));
    let has_port = a
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        exact
    } else {
        any(vec![exact, authority_prefix(format!("{a}:"))])
    }
}

/// What the proxies can match of a destination: a service's in-cluster names
/// (`NAME.NS.svc.…`; any namespace's `NAME.…` with `-A`) or an authority. Workloads are the
/// CLI's to match.
fn server_match(r: &Resource, ns: Option<&str>) -> Option<Match> {
    match (r.kind, &r.name) {
        (Kind::Service, Some(name)) => Some(match r.namespace_or(ns) {
            Some(ns) => authority_prefix(format!("{name}.{ns}.svc.")),
            None => authority_prefix(format!("{name}.")),
        }),
        (Kind::Authority, Some(host)) => Some(authority_is(host)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// The request filters of `tap` (`--authority`, `--method`, `--path`).
#[derive(Debug, Default)]
pub struct Filters<'a> {
    pub authority: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
}

/// The side of a proxy a request was seen on, as tap lines name it.
pub const INBOUND: &str = "in";
pub const OUTBOUND: &str = "out";

/// What to tap and what to keep.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// Use only this workload's proxies (`None`: every proxy given).
    pub proxies_of: Option<Resource>,
    /// Keep only requests seen on this side (`in`/`out`).
    pub side: Option<&'static str>,
    /// Keep only requests to this destination.
    pub to: Option<Resource>,
    /// The namespace names are read in (`None`: every one).
    pub namespace: Option<String>,
    /// Linkerd's match, for the proxies.
    pub matcher: Option<Match>,
}

impl Plan {
    /// `tap RESOURCE [--to DST | --from SRC]` and `top`: a workload's proxies, both sides;
    /// with `--to`, its outbound side's requests to DST; with `--from SRC`, SRC's outbound
    /// requests to RESOURCE (where both ends are known: inbound requests name their client
    /// only by address and mTLS identity). A service or authority alone: its requests, on
    /// every proxy given.
    pub fn new(
        res: &Resource,
        to: Option<&Resource>,
        from: Option<&Resource>,
        filters: &Filters<'_>,
        ns: Option<&str>,
    ) -> Result<Plan, String> {
        let (proxies_of, side, dst) = match (to, from) {
            (Some(to), _) => {
                if !res.kind.is_workload() {
                    return Err(format!(
                        "--to: {res} is not a workload; requests are sent by deployments, pods or namespaces (try `pylon tap {to}`, or `--from` for its clients)"
                    ));
                }
                (Some(res.clone()), Some(OUTBOUND), Some(to.clone()))
            }
            (None, Some(from)) => (Some(from.clone()), Some(OUTBOUND), Some(res.clone())),
            (None, None) if res.kind.is_workload() => (Some(res.clone()), None, None),
            (None, None) => (None, None, Some(res.clone())),
        };
        let mut matches = Vec::new();
        matches.extend(dst.as_ref().and_then(|d| server_match(d, ns)));
        if let Some(a) = filters.authority {
            matches.push(authority_is(a));
        }
        if let Some(m) = filters.method {
            let m = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("bad --method {m:?}"))?;
            matches.push(http_match(pbhttp::Match::Method(m.into())));
        }
        if let Some(p) = filters.path {
            if !p.starts_with('/') {
                return Err(format!("bad --path {p:?}: a path prefix starts with /"));
            }
            matches.push(http_match(pbhttp::Match::Path(string_match(
                pbhttp::string_match::Match::Prefix(p.to_string()),
            ))));
        }
        Ok(Plan {
            proxies_of,
            side,
            to: dst,
            namespace: ns.map(str::to_string),
            matcher: all(matches),
        })
    }

    /// `profile --tap RESOURCE`: a workload's inbound requests (those it serves, which its
    /// ServiceProfile describes; its outbound ones are other services' routes); a service's
    /// or authority's requests on every proxy given, each side counted apart (see
    /// [`super::profile::Observed`]).
    pub fn for_profile(res: &Resource, ns: &str) -> Result<Plan, String> {
        let mut plan = Plan::new(res, None, None, &Filters::default(), Some(ns))?;
        if res.kind.is_workload() {
            plan.side = Some(INBOUND);
        }
        Ok(plan)
    }

    /// Whether the proxies can count the requests for `--limit` (nothing left for the CLI
    /// to filter).
    pub fn server_side_only(&self) -> bool {
        self.side.is_none() && self.to.is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// Keeping requests
// ---------------------------------------------------------------------------------------------

/// Linkerd's names for an endpoint's labels on tap events (the control plane's
/// `metric_labels`), which outbound metrics carry as `dst_<name>`.
const ENDPOINT_LABELS: &[&str] = &[
    "namespace",
    "service",
    "pod",
    "deployment",
    "statefulset",
    "daemonset",
    "replicaset",
    "job",
    "cronjob",
    "replicationcontroller",
    "serviceaccount",
    "pod_template_hash",
];

/// The workload kinds, in the order a destination is named by (`dst_res=`).
const WORKLOAD_LABELS: &[&str] = &[
    "deployment",
    "statefulset",
    "daemonset",
    "job",
    "cronjob",
    "replicaset",
    "replicationcontroller",
];

/// A request's destination as `dst_*` labels, plus its `authority`.
pub fn dst_labels(ev: &TapEvent, line: &Line, mesh: Option<&DirMesh>) -> DstLabels {
    let mut out = DstLabels::new();
    let meta = ev.destination_meta.as_ref().map(|m| &m.labels);
    for (k, v) in meta.into_iter().flatten() {
        if v.is_empty() {
            continue;
        }
        if k.starts_with("dst_") {
            out.insert(k.clone(), v.clone());
        } else if ENDPOINT_LABELS.contains(&k.as_str()) {
            out.insert(format!("dst_{k}"), v.clone());
        }
    }
    if let (Some(mesh), Some(addr)) = (mesh, line.dst) {
        for (k, v) in mesh.endpoint_labels(addr).into_iter().flatten() {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    // The service is the one the request addressed (a split's backend is still its apex's).
    let canonical = meta.and_then(|m| m.get("authority"));
    if let Some((svc, ns)) = line
        .authority
        .iter()
        .chain(canonical)
        .find_map(|a| service_of_authority(a))
    {
        out.insert("dst_service".into(), svc);
        out.entry("dst_namespace".into()).or_insert(ns);
    }
    if let Some(a) = &line.authority {
        out.insert("authority".into(), a.clone());
    }
    out
}

/// `dst_res=deployment/web dst_ns=default dst_pod=web-0`: what is known of a destination, as
/// Linkerd's wide tap lines name it.
pub fn wide_fields(labels: &DstLabels) -> String {
    let mut out = String::new();
    if let Some((kind, name)) = WORKLOAD_LABELS
        .iter()
        .find_map(|k| labels.get(&format!("dst_{k}")).map(|v| (k, v)))
    {
        out.push_str(&format!(" dst_res={kind}/{name}"));
    } else if let Some(svc) = labels.get("dst_service") {
        out.push_str(&format!(" dst_res=svc/{svc}"));
    }
    if let Some(ns) = labels.get("dst_namespace") {
        out.push_str(&format!(" dst_ns={ns}"));
    }
    if let Some(pod) = labels.get("dst_pod") {
        out.push_str(&format!(" dst_pod={pod}"));
    }
    out
}

/// The destination's best name for a table: its workload, else its pod, else its service.
pub fn destination_name(labels: &DstLabels) -> Option<String> {
    WORKLOAD_LABELS
        .iter()
        .find_map(|k| labels.get(&format!("dst_{k}")).map(|v| format!("{k}/{v}")))
        .or_else(|| labels.get("dst_pod").map(|p| format!("pod/{p}")))
        .or_else(|| labels.get("dst_service").map(|s| format!("svc/{s}")))
}

/// Bound on requests awaiting their end, so lost events can't grow memory.
const MAX_OPEN: usize = 10_000;

/// Keeps the requests a [`Plan`] asks for: decided at each request's `req` event, which
/// names its destination, and remembered for its `rsp` and `end`.
pub struct Selector {
    plan: Plan,
    mesh: Option<DirMesh>,
    open: HashMap<(usize, String), DstLabels>,
    /// Said once: a destination no label or config dir places.
    warned: bool,
}

impl Selector {
    pub fn new(plan: Plan, mesh: Option<DirMesh>) -> Self {
        Self {
            plan,
            mesh,
            open: HashMap::new(),
            warned: false,
        }
    }

    /// The destination's labels when the event is kept, `None` when it is not.
    pub fn keep(&mut self, proxy: usize, ev: &TapEvent, line: &Line) -> Option<DstLabels> {
        let key = (proxy, line.id.clone());
        match line.kind {
            Some(EventKind::Req) => {
                if self.plan.side.is_some_and(|side| line.proxy != side) {
                    return None;
                }
                let labels = dst_labels(ev, line, self.mesh.as_ref());
                if let Some(to) = &self.plan.to {
                    let matchers = to.dst_matchers(self.plan.namespace.as_deref());
                    if !matchers
                        .iter()
                        .all(|m| m.matches(|k| labels.get(k).cloned()))
                    {
                        if !self.warned {
                            if let Some(note) = unplaced(to, line, &labels, self.mesh.as_ref()) {
                                self.warned = true;
                                eprintln!("{note}");
                            }
                        }
                        return None;
                    }
                }
                if self.open.len() >= MAX_OPEN {
                    self.open.clear();
                }
                self.open.insert(key, labels.clone());
                Some(labels)
            }
            Some(EventKind::Rsp) => self.open.get(&key).cloned(),
            Some(EventKind::End) => self.open.remove(&key),
            None => None,
        }
    }
}

/// What to say (once) when `--to` names a workload and a request's destination has no
/// workload labels: the operator can then give the config dir that places it.
fn unplaced(
    to: &Resource,
    line: &Line,
    labels: &DstLabels,
    mesh: Option<&DirMesh>,
) -> Option<String> {
    let label = match to.kind {
        Kind::Deployment => "dst_deployment",
        Kind::Pod => "dst_pod",
        _ => return None,
    };
    if labels.contains_key(label) {
        return None;
    }
    let dst = line
        .dst
        .map_or_else(|| "an endpoint".to_string(), |a| a.to_string());
    let hint = match (mesh, labels.get("dst_pod")) {
        (Some(mesh), Some(pod)) => format!(
            "its pod {pod} has no owner in {} and no proxy that names its workload",
            mesh.dir().display()
        ),
        (Some(mesh), None) => format!(
            "{} has no EndpointSlice with a targetRef Pod for it",
            mesh.dir().display()
        ),
        (None, _) => {
            "give --config-dir DIR (its EndpointSlices and Pods name the pods behind the addresses)"
                .to_string()
        }
    };
    Some(format!(
        "note: the request to {dst} cannot be matched to --to {to}: the proxy's tap events name no workload for it, and {hint}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkerd2_proxy_api::tap::tap_event;
    use std::net::SocketAddr;

    fn r(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    fn prefix(p: &str) -> Match {
        authority_prefix(p.to_string())
    }

    fn none() -> Filters<'static> {
        Filters::default()
    }

    #[test]
    fn workloads_use_their_own_proxies_services_their_authority() {
        let p = Plan::new(&r("deploy/web"), None, None, &none(), Some("default")).unwrap();
        assert_eq!(p.proxies_of, Some(r("deploy/web")));
        assert_eq!((p.side, &p.to, &p.matcher), (None, &None, &None));
        assert!(p.server_side_only());

        let p = Plan::new(&r("svc/web"), None, None, &none(), Some("prod")).unwrap();
        assert_eq!(p.proxies_of, None);
        assert_eq!(p.matcher, Some(prefix("web.prod.svc.")));
        let p = Plan::new(
            &r("svc/web.shop.svc.cluster.local"),
            None,
            None,
            &none(),
            None,
        )
        .unwrap();
        assert_eq!(p.matcher, Some(prefix("web.shop.svc.")));
        let p = Plan::new(&r("svc/web"), None, None, &none(), None).unwrap();
        assert_eq!(p.matcher, Some(prefix("web.")), "-A");
    }

    #[test]
    fn to_and_from_keep_the_senders_outbound_side() {
        let p = Plan::new(
            &r("deploy/a"),
            Some(&r("deploy/b")),
            None,
            &none(),
            Some("default"),
        )
        .unwrap();
        assert_eq!(p.proxies_of, Some(r("deploy/a")));
        assert_eq!(p.side, Some(OUTBOUND));
        assert_eq!(p.to, Some(r("deploy/b")));
        assert_eq!(p.matcher, None, "the proxies can't match a workload");
        assert!(!p.server_side_only());

        // --from SRC: SRC's outbound requests to RESOURCE.
        let p = Plan::new(
            &r("svc/b"),
            None,
            Some(&r("deploy/a")),
            &none(),
            Some("default"),
        )
        .unwrap();
        assert_eq!(p.proxies_of, Some(r("deploy/a")));
        assert_eq!(p.side, Some(OUTBOUND));
        assert_eq!(p.matcher, Some(prefix("b.default.svc.")));

        let err = Plan::new(&r("svc/web"), Some(&r("svc/db")), None, &none(), None)
            .expect_err("a service sends nothing");
        assert!(err.contains("not a workload"), "{err}");
    }

    #[test]
    fn filters_are_all_of_the_match() {
        let filters = Filters {
            authority: None,
            method: Some("get"),
            path: Some("/users"),
        };
        let p = Plan::new(
            &r("deploy/client"),
            Some(&r("svc/web")),
            None,
            &filters,
            Some("default"),
        )
        .unwrap();
        let method = http_match(pbhttp::Match::Method(http::Method::GET.into()));
        let path = http_match(pbhttp::Match::Path(string_match(
            pbhttp::string_match::Match::Prefix("/users".into()),
        )));
        assert_eq!(
            p.matcher,
            all(vec![prefix("web.default.svc."), method, path])
        );
        let bad = |f: Filters<'_>| Plan::new(&r("deploy/a"), None, None, &f, None).unwrap_err();
        let err = bad(Filters {
            method: Some("G T"),
            ..none()
        });
        assert!(err.contains("bad --method"), "{err}");
        let err = bad(Filters {
            path: Some("users"),
            ..none()
        });
        assert!(err.contains("bad --path"), "{err}");
    }

    #[test]
    fn authorities_match_with_or_without_port() {
        let exact = |a: &str| {
            http_match(pbhttp::Match::Authority(string_match(
                pbhttp::string_match::Match::Exact(a.into()),
            )))
        };
        assert_eq!(authority_is("web:80"), exact("web:80"));
        assert_eq!(
            authority_is("web.example.com"),
            any(vec![exact("web.example.com"), prefix("web.example.com:")])
        );
        let p = Plan::new(&r("authority/web:80"), None, None, &none(), None).unwrap();
        assert_eq!(p.matcher, Some(exact("web:80")));
    }

    #[test]
    fn profiles_of_workloads_read_what_they_serve() {
        let p = Plan::for_profile(&r("deploy/b"), "default").unwrap();
        assert_eq!(p.proxies_of, Some(r("deploy/b")));
        assert_eq!(p.side, Some(INBOUND));
        let p = Plan::for_profile(&r("svc/b"), "default").unwrap();
        assert_eq!((p.proxies_of, p.side), (None, None));
    }

    fn req_event(
        id: u64,
        side: tap_event::ProxyDirection,
        authority: &str,
        dst: &str,
        labels: &[(&str, &str)],
    ) -> TapEvent {
        use tap_event::http;
        let dst: SocketAddr = dst.parse().unwrap();
        TapEvent {
            source: Some("127.0.0.1:5000".parse::<SocketAddr>().unwrap().into()),
            source_meta: None,
            route_meta: None,
            destination: Some(dst.into()),
            destination_meta: Some(tap_event::EndpointMeta {
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                    .collect(),
            }),
            proxy_direction: side as i32,
            event: Some(tap_event::Event::Http(tap_event::Http {
                event: Some(http::Event::RequestInit(http::RequestInit {
                    id: Some(http::StreamId {
                        base: 0,
                        stream: id,
                    }),
                    method: Some(::http::Method::GET.into()),
                    scheme: None,
                    authority: authority.into(),
                    path: "/".into(),
                    headers: None,
                })),
            })),
        }
    }

    fn end_event(id: u64) -> TapEvent {
        use tap_event::http;
        TapEvent {
            proxy_direction: tap_event::ProxyDirection::Outbound as i32,
            event: Some(tap_event::Event::Http(tap_event::Http {
                event: Some(http::Event::ResponseEnd(http::ResponseEnd {
                    id: Some(http::StreamId {
                        base: 0,
                        stream: id,
                    }),
                    ..Default::default()
                })),
            })),
            ..Default::default()
        }
    }

    fn keep(sel: &mut Selector, ev: &TapEvent) -> Option<DstLabels> {
        let line = Line::from_event(ev).expect("an http event");
        sel.keep(0, ev, &line)
    }

    #[test]
    fn destinations_are_matched_by_the_events_labels() {
        use tap_event::ProxyDirection::{Inbound, Outbound};
        let plan = Plan::new(
            &r("deploy/a"),
            Some(&r("deploy/b")),
            None,
            &none(),
            Some("default"),
        )
        .unwrap();
        let mut sel = Selector::new(plan, None);
        // Linkerd's names, and the `dst_` ones.
        let b = [
            ("deployment", "b"),
            ("namespace", "default"),
            ("pod", "b-0"),
        ];
        let to_b = req_event(
            1,
            Outbound,
            "b.default.svc.cluster.local:80",
            "10.0.0.2:80",
            &b,
        );
        let labels = keep(&mut sel, &to_b).expect("to b");
        assert_eq!(labels["dst_deployment"], "b");
        assert_eq!(labels["dst_service"], "b");
        assert_eq!(
            wide_fields(&labels),
            " dst_res=deployment/b dst_ns=default dst_pod=b-0"
        );
        assert_eq!(destination_name(&labels).as_deref(), Some("deployment/b"));
        let prefixed = [("dst_deployment", "b"), ("dst_namespace", "default")];
        let ev = req_event(2, Outbound, "b:80", "10.0.0.2:80", &prefixed);
        assert!(keep(&mut sel, &ev).is_some());
        // Another deployment, another namespace, the inbound side: not kept.
        let c = [("deployment", "c"), ("namespace", "default")];
        let ev = req_event(
            3,
            Outbound,
            "c.default.svc.cluster.local:80",
            "10.0.0.3:80",
            &c,
        );
        assert!(keep(&mut sel, &ev).is_none());
        let elsewhere = [("deployment", "b"), ("namespace", "prod")];
        let ev = req_event(
            4,
            Outbound,
            "b.prod.svc.cluster.local:80",
            "10.0.0.4:80",
            &elsewhere,
        );
        assert!(keep(&mut sel, &ev).is_none());
        let ev = req_event(
            5,
            Inbound,
            "b.default.svc.cluster.local:80",
            "10.0.0.2:80",
            &b,
        );
        assert!(keep(&mut sel, &ev).is_none());
        // The end of a kept request is kept, once; the end of another is not.
        assert!(keep(&mut sel, &end_event(1)).is_some());
        assert!(keep(&mut sel, &end_event(1)).is_none());
        assert!(keep(&mut sel, &end_event(3)).is_none());
        // Unplaced destinations were said once.
        assert!(!sel.warned, "every destination above had labels");
        let ev = req_event(6, Outbound, "x:80", "10.0.0.9:80", &[]);
        assert!(keep(&mut sel, &ev).is_none());
        assert!(sel.warned);
    }

    #[test]
    fn services_are_matched_by_the_authority_they_were_asked_by() {
        use tap_event::ProxyDirection::Outbound;
        let plan = Plan::new(&r("svc/web"), None, None, &none(), None).unwrap();
        let mut sel = Selector::new(plan, None);
        let ev = req_event(
            1,
            Outbound,
            "web.shop.svc.cluster.local:80",
            "10.0.0.2:80",
            &[],
        );
        let labels = keep(&mut sel, &ev).expect("-A: any namespace's web");
        assert_eq!(labels["dst_namespace"], "shop");
        assert_eq!(wide_fields(&labels), " dst_res=svc/web dst_ns=shop");
        let ev = req_event(2, Outbound, "web.example.com", "10.0.0.2:80", &[]);
        assert!(
            keep(&mut sel, &ev).is_none(),
            "not a service of the cluster"
        );
    }
}
