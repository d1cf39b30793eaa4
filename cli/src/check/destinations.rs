//! Services the config names but cannot reach: split apexes and backends, `dstOverrides`
//! authorities and profiles for services that do not exist or have no ready endpoints, and
//! objects the proxy ignores because another one took their place.
//!
//! Where the config (or the cluster) has Pods, a Service's endpoints are compared with the
//! pods its selector picks: a ready pod missing from the EndpointSlices (the proxy sends it
//! nothing: "2 of 3 pods"), a slice address no pod has (a stale endpoint), a selector that
//! picks no pod. The comparison is proxy-policy's ([`Snapshot::endpoint_coverage`]), the same
//! one `pylon stat` and the proxies' and controller's `endpoints_*` gauges show.
//!
//! Every answer comes from the Snapshot the proxy itself would use (`resolve_name`,
//! `has_endpoint_slices`, `split_for`, `resolve_cluster_ip`), so "no ready endpoints" means
//! exactly what the proxy would find: no ready endpoint (nor, when none is ready, a serving
//! terminating one) for any port the proxy carries.

use std::net::SocketAddr;

use pylon_proxy_policy::{Protocol, Service, ServiceProfile, ServiceRef, Snapshot, TrafficSplit};

use super::ObjectFindings;

/// What a client sending to a service would find.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// No such Service.
    Missing,
    /// The Service exists but has no such (TCP) port.
    NoPort(u16),
    /// No EndpointSlice names the Service. The proxy sends a split backend's share to no
    /// endpoints at all, and asks DNS for any other name of it (which, outside the cluster,
    /// knows nothing of it).
    NoSlices,
    /// EndpointSlices exist, but no endpoint is ready.
    NoReadyEndpoints,
    Ready,
}

/// What sending to `service` (on `port`, or on any of its ports) would find.
fn reach(snapshot: &Snapshot, service: &ServiceRef, port: Option<u16>) -> Reach {
    let Some(svc) = snapshot.service(service) else {
        return Reach::Missing;
    };
    let fqdn = service.fqdn(snapshot.cluster_domain());
    let resolved = match port {
        Some(port) => match snapshot.resolve_name(&fqdn, port) {
            Some(r) => vec![r],
            None => return Reach::NoPort(port),
        },
        None => svc
            .ports
            .iter()
            .filter_map(|p| snapshot.resolve_name(&fqdn, p.port))
            .collect(),
    };
    if !snapshot.has_endpoint_slices(service) {
        Reach::NoSlices
    } else if resolved.iter().all(|r| r.endpoints.is_empty()) {
        Reach::NoReadyEndpoints
    } else {
        Reach::Ready
    }
}

/// Why traffic for `service` has nowhere to go, or `None` when it has.
fn unreachable_because(reach: &Reach, service: &ServiceRef) -> Option<String> {
    match reach {
        Reach::Ready => None,
        Reach::Missing => Some(format!("there is no Service {service}")),
        Reach::NoPort(port) => Some(format!("Service {service} has no port {port}")),
        Reach::NoSlices => Some(format!(
            "Service {service} has no EndpointSlice, so no endpoints the config knows of"
        )),
        Reach::NoReadyEndpoints => Some(format!(
            "Service {service} has no ready endpoints (its EndpointSlices list none)"
        )),
    }
}

/// The apex must exist, every backend that gets traffic must be reachable on the apex's ports
/// (the proxy sends a backend's share to the port the client asked the apex for), and the split
/// must be the one the proxy uses for its apex.
pub(super) fn check_split(snapshot: &Snapshot, split: &TrafficSplit, out: &mut ObjectFindings) {
    let apex = split.apex();
    let apex_ports: Vec<u16> = snapshot
        .service(&apex)
        .map(|svc| {
            svc.ports
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.port)
                .collect()
        })
        .unwrap_or_default();
    if snapshot.service(&apex).is_none() {
        out.error(
            "spec.service",
            format!(
                "there is no Service {apex}, so no client sends traffic this split could share"
            ),
        );
    }
    match snapshot.split_for(&apex) {
        Some(used) if used.meta.name != split.meta.name => out.warning(
            "spec.service",
            format!(
                "ignored: TrafficSplit {}/{} already splits {apex} (the first by name is used)",
                used.meta.namespace, used.meta.name
            ),
        ),
        _ => {}
    }
    let total = split.total_weight_milli();
    for (i, backend) in split.backends.iter().enumerate() {
        let service = split.backend_ref(backend);
        let reached = if apex_ports.is_empty() {
            reach(snapshot, &service, None)
        } else {
            apex_ports
                .iter()
                .map(|port| reach(snapshot, &service, Some(*port)))
                .find(|r| *r != Reach::Ready)
                .unwrap_or(Reach::Ready)
        };
        let Some(why) = unreachable_because(&reached, &service) else {
            continue;
        };
        let field = format!("spec.backends[{i}].service");
        target_unreachable(backend.weight_milli, total, &why, field, out);
    }
}

/// A profile's service should exist and have endpoints, and its `dstOverrides` that name
/// cluster services must be reachable.
pub(super) fn check_profile(
    snapshot: &Snapshot,
    profile: &ServiceProfile,
    out: &mut ObjectFindings,
) {
    let name = &*profile.meta.name;
    let domain = snapshot.cluster_domain();
    match ServiceRef::from_fqdn(name, domain) {
        Some(service) => {
            if let Some(why) = unreachable_because(&reach(snapshot, &service, None), &service) {
                out.warning(
                    "metadata.name",
                    format!("the profile is for {name}, but {why}"),
                );
            }
        }
        // Profiles may describe services outside the cluster; only a cluster name with
        // another domain is surely a mistake.
        None if name.contains(".svc.") => out.warning(
            "metadata.name",
            format!(
                "{name} is not a service name in cluster domain {domain} \
                 (NAME.NAMESPACE.svc.{domain}), so no request is ever matched to this profile"
            ),
        ),
        None => {}
    }

    let overrides = profile.table.dst_overrides();
    let total: u64 = overrides.iter().map(|d| d.weight_milli).sum();
    for (i, target) in overrides.iter().enumerate() {
        let (host, port) = match target.authority.rsplit_once(':') {
            Some((host, port)) => match port.parse::<u16>() {
                Ok(port) => (host, Some(port)),
                Err(_) => (&*target.authority, None),
            },
            None => (&*target.authority, None),
        };
        // Authorities outside the cluster are DNS's business.
        let Some(service) = ServiceRef::from_fqdn(host, domain) else {
            continue;
        };
        let Some(why) = unreachable_because(&reach(snapshot, &service, port), &service) else {
            continue;
        };
        let field = format!("spec.dstOverrides[{i}].authority");
        target_unreachable(target.weight_milli, total, &why, field, out);
    }
}

/// A split target with nowhere to go: an error when it gets traffic, a warning when its
/// weight is 0 (nothing fails yet, but raising the weight would).
fn target_unreachable(
    weight_milli: u64,
    total_milli: u64,
    why: &str,
    field: String,
    out: &mut ObjectFindings,
) {
    if weight_milli == 0 {
        out.warning(
            field,
            format!("weight 0, so no traffic goes here yet, but {why}"),
        );
    } else {
        let share = weight_milli as f64 * 100.0 / total_milli as f64;
        out.error(
            field,
            format!("{share:.1}% of the traffic goes here, but {why}"),
        );
    }
}

/// A cluster IP belongs to one Service; the proxy maps it to the first by name.
pub(super) fn check_service(snapshot: &Snapshot, service: &Service, out: &mut ObjectFindings) {
    let me = service.service_ref();
    // Any TCP port will do to ask the proxy's mapping which service owns the IP.
    let Some(port) = service.ports.iter().find(|p| p.protocol == Protocol::Tcp) else {
        return;
    };
    for ip in &service.cluster_ips {
        let owner = snapshot.resolve_cluster_ip(SocketAddr::new(*ip, port.port));
        if let Some(owner) = owner.filter(|o| o.service != me) {
            out.warning(
                "spec.clusterIP",
                format!(
                    "cluster IP {ip} is also Service {}'s, and the proxy maps it to that one",
                    owner.service
                ),
            );
        }
    }
    check_pods(snapshot, service, out);
}

/// The Service's endpoints against the pods its selector picks (when the source has Pods),
/// as [`Snapshot::endpoint_coverage`] compares them for every user of the finding.
fn check_pods(snapshot: &Snapshot, service: &Service, out: &mut ObjectFindings) {
    // Without Pods (a hand-written config dir) or a selector (endpoints managed by hand)
    // there is nothing to compare.
    let Some(coverage) = snapshot.endpoint_coverage(&service.service_ref()) else {
        return;
    };
    if coverage.selects_no_pod() {
        out.warning(
            "spec.selector",
            format!(
                "selects no Pod in namespace {}: the service has no workload behind it",
                service.meta.namespace
            ),
        );
        return;
    }
    let missing: Vec<String> = coverage
        .missing()
        .map(|p| match &p.listed_not_ready_in {
            Some(slice) => format!("{} ({}, not ready in EndpointSlice {slice})", p.name, p.ip),
            None => p.to_string(),
        })
        .collect();
    if !missing.is_empty() {
        out.warning(
            "endpoints",
            format!(
                "endpoints {} of {} ready pods: {} missing from the EndpointSlices, so the proxy \
                 sends {} nothing (a stale or hand-written slice, or the endpoint controller is behind)",
                coverage.covered_count(),
                coverage.ready_count(),
                missing.join(", "),
                if missing.len() == 1 { "it" } else { "them" }
            ),
        );
    }
    if !coverage.unknown_addresses.is_empty() {
        let stale: Vec<String> = coverage
            .unknown_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        out.warning(
            "endpoints",
            format!(
                "the EndpointSlices name {} that no Pod has: requests sent there fail (a stale endpoint)",
                stale.join(", ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{audit_files, on_field, profile, service};
    use super::super::Severity;

    fn split(backends: &str) -> String {
        format!(
            "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\n\
             metadata: {{name: web-split}}\nspec:\n  service: web\n  backends:\n{backends}"
        )
    }

    #[test]
    fn split_backends_that_are_missing_or_not_ready_are_errors() {
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("v2.yaml", &service("web-v2", Some(false))),
            ("v3.yaml", &service("web-v3", None)),
            (
                "v6.yaml",
                &service("web-v6", Some(true)).replace("port: 80,", "port: 8000,"),
            ),
            (
                "split.yaml",
                &split(
                    "  - {service: web, weight: 60}\n  - {service: web-v2, weight: 10}\n  \
                     - {service: web-v3, weight: 10}\n  - {service: web-v4, weight: 10}\n  \
                     - {service: web-v5, weight: 0}\n  - {service: web-v6, weight: 10}\n",
                ),
            ),
        ]);
        assert_eq!(on_field(&findings, "spec.backends[0].service"), []);
        assert_eq!(
            on_field(&findings, "spec.backends[1].service"),
            [(
                Severity::Error,
                "10.0% of the traffic goes here, but Service default/web-v2 has no ready \
                 endpoints (its EndpointSlices list none)"
            )]
        );
        let v3 = on_field(&findings, "spec.backends[2].service");
        assert_eq!(v3.len(), 1);
        assert_eq!(v3[0].0, Severity::Error);
        assert!(v3[0].1.contains("has no EndpointSlice"), "{v3:?}");
        assert_eq!(
            on_field(&findings, "spec.backends[3].service"),
            [(
                Severity::Error,
                "10.0% of the traffic goes here, but there is no Service default/web-v4"
            )]
        );
        assert_eq!(
            on_field(&findings, "spec.backends[4].service"),
            [(
                Severity::Warning,
                "weight 0, so no traffic goes here yet, but there is no Service default/web-v5"
            )]
        );
        assert_eq!(
            on_field(&findings, "spec.backends[5].service"),
            [(
                Severity::Error,
                "10.0% of the traffic goes here, but Service default/web-v6 has no port 80"
            )]
        );
        assert_eq!(findings.len(), 5, "{findings:#?}");
        let f = &findings[0];
        assert!(f.file.ends_with("split.yaml"), "{f:?}");
        assert_eq!(f.object, "TrafficSplit default/web-split");
    }

    #[test]
    fn a_missing_apex_is_an_error_and_a_second_split_is_ignored() {
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("split.yaml", &split("  - {service: web, weight: 1}\n")),
            (
                "other.yaml",
                &split("  - {service: web, weight: 1}\n").replace("web-split", "x-split"),
            ),
            (
                "orphan.yaml",
                &split("  - {service: web, weight: 1}\n")
                    .replace("service: web\n", "service: api\n")
                    .replace("web-split", "api-split"),
            ),
        ]);
        let apex: Vec<_> = findings
            .iter()
            .filter(|f| f.field == "spec.service")
            .map(|f| (f.severity, f.object.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            apex,
            [
                (
                    Severity::Error,
                    "TrafficSplit default/api-split",
                    "there is no Service default/api, so no client sends traffic this split \
                     could share"
                ),
                (
                    Severity::Warning,
                    "TrafficSplit default/x-split",
                    "ignored: TrafficSplit default/web-split already splits default/web (the \
                     first by name is used)"
                ),
            ]
        );
        assert_eq!(findings.len(), 2, "{findings:#?}");
    }

    #[test]
    fn dst_overrides_naming_cluster_services_must_be_reachable() {
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("v2.yaml", &service("web-v2", Some(false))),
            (
                "profile.yaml",
                &profile(
                    "  dstOverrides:\n  \
                     - {authority: web.default.svc.cluster.local:80, weight: 1}\n  \
                     - {authority: web-v2.default.svc.cluster.local:80, weight: 1}\n  \
                     - {authority: web.default.svc.cluster.local:8080, weight: 1}\n  \
                     - {authority: gone.default.svc.cluster.local:80, weight: 1}\n  \
                     - {authority: api.example.com:443, weight: 1}\n",
                ),
            ),
        ]);
        let on = |i: usize| on_field(&findings, &format!("spec.dstOverrides[{i}].authority"));
        assert_eq!(on(0), []);
        assert_eq!(
            on(1),
            [(
                Severity::Error,
                "20.0% of the traffic goes here, but Service default/web-v2 has no ready \
                 endpoints (its EndpointSlices list none)"
            )]
        );
        assert_eq!(
            on(2),
            [(
                Severity::Error,
                "20.0% of the traffic goes here, but Service default/web has no port 8080"
            )]
        );
        assert_eq!(
            on(3),
            [(
                Severity::Error,
                "20.0% of the traffic goes here, but there is no Service default/gone"
            )]
        );
        assert_eq!(on(4), [], "not a cluster service");
        assert_eq!(findings.len(), 3, "{findings:#?}");
    }

    #[test]
    fn profiles_for_unknown_or_endpointless_services_are_warnings() {
        let p =
            |name: &str| profile("  routes: []\n").replace("web.default.svc.cluster.local", name);
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            ("api.yaml", &service("api", Some(false))),
            ("a.yaml", &p("web.default.svc.cluster.local")),
            ("b.yaml", &p("api.default.svc.cluster.local")),
            ("c.yaml", &p("gone.default.svc.cluster.local")),
            ("d.yaml", &p("web.default.svc.corp.example")),
            ("e.yaml", &p("api.example.com")),
        ]);
        let got: Vec<_> = findings
            .iter()
            .map(|f| (f.severity, f.field.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    Severity::Warning,
                    "metadata.name",
                    "the profile is for api.default.svc.cluster.local, but Service default/api \
                     has no ready endpoints (its EndpointSlices list none)"
                ),
                (
                    Severity::Warning,
                    "metadata.name",
                    "the profile is for gone.default.svc.cluster.local, but there is no Service \
                     default/gone"
                ),
                (
                    Severity::Warning,
                    "metadata.name",
                    "web.default.svc.corp.example is not a service name in cluster domain \
                     cluster.local (NAME.NAMESPACE.svc.cluster.local), so no request is ever \
                     matched to this profile"
                ),
            ]
        );
    }

    #[test]
    fn a_cluster_ip_used_twice_is_a_warning_on_the_ignored_service() {
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
                 spec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n"
            )
        };
        let findings = audit_files(&[("a.yaml", &svc("api")), ("b.yaml", &svc("web"))]);
        let got: Vec<_> = findings
            .iter()
            .filter(|f| f.field == "spec.clusterIP")
            .map(|f| (f.object.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [(
                "Service default/web",
                "cluster IP 10.96.0.10 is also Service default/api's, and the proxy maps it to \
                 that one"
            )]
        );
    }

    fn pod(name: &str, ip: &str, ready: bool, app: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\n\
             spec: {{containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
            if ready { "True" } else { "False" }
        )
    }

    fn selected_service() -> String {
        service("web", Some(true)).replace("spec: {ports:", "spec: {selector: {app: web}, ports:")
    }

    #[test]
    fn a_ready_pod_missing_from_the_slices_is_named() {
        // The story's incident: three ready pods, a slice with one of them (10.0.0.1).
        let findings = audit_files(&[
            ("web.yaml", &selected_service()),
            ("a.yaml", &pod("web-a", "10.0.0.1", true, "web")),
            ("b.yaml", &pod("web-b", "10.0.0.2", true, "web")),
            ("c.yaml", &pod("web-c", "10.0.0.3", true, "web")),
            // Not ready: rightly absent.
            ("d.yaml", &pod("web-d", "10.0.0.4", false, "web")),
        ]);
        let on = on_field(&findings, "endpoints");
        assert_eq!(on.len(), 1, "{findings:?}");
        assert_eq!(on[0].0, Severity::Warning);
        assert!(
            on[0].1.starts_with(
                "endpoints 1 of 3 ready pods: web-b (10.0.0.2), web-c (10.0.0.3) missing"
            ),
            "{}",
            on[0].1
        );
    }

    #[test]
    fn a_stale_address_and_an_empty_selector_are_named() {
        let findings = audit_files(&[
            ("web.yaml", &selected_service()),
            ("b.yaml", &pod("web-b", "10.0.0.2", true, "web")),
        ]);
        let on = on_field(&findings, "endpoints");
        assert!(
            on.iter()
                .any(|(_, m)| m.contains("name 10.0.0.1 that no Pod has")),
            "{findings:?}"
        );
        let findings = audit_files(&[
            ("web.yaml", &selected_service()),
            ("other.yaml", &pod("api-0", "10.0.0.9", true, "api")),
        ]);
        assert_eq!(
            on_field(&findings, "spec.selector"),
            [(
                Severity::Warning,
                "selects no Pod in namespace default: the service has no workload behind it"
            )]
        );
        // A config dir without Pods: nothing to compare, nothing said.
        let findings = audit_files(&[("web.yaml", &selected_service())]);
        assert!(on_field(&findings, "endpoints").is_empty());
        assert!(on_field(&findings, "spec.selector").is_empty());
    }
}
