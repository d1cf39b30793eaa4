//! A logical destination followed on the control plane, as linkerd2-proxy follows one:
//! `GetProfile(authority)` gives its routes, its traffic split and what it is (a service by
//! its fully-qualified name, a known endpoint such as a pod, or nothing the control plane
//! knows); a service's endpoints then come from `Get(fqdn:port)`, a known endpoint is used as
//! is, and anything else falls back to DNS for a name or to the address itself.
//!
//! Both streams are followed with [`super::follow`]: a lost stream keeps the endpoints and
//! routes it last gave while it reconnects; the first message on a new stream replaces them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use linkerd2_proxy_api::destination::{self as api, tls_identity, update};
use pylon_proxy_policy::proto::{profile_from_proto, socket_addr};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{follow, ControlPlane, Event};
use crate::discovery::{unmeshed, Discovery, EndpointSpec, Logical};
use crate::split::BackendTarget;
use pylon_proxy_metrics::DstLabels;

/// How long a new destination's first request waits for the control plane's first answers.
/// Past it the request goes on with the DNS fallback (a name) or the address itself, and the
/// answers apply when they come.
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a DNS fallback is looked up again when the answer had no usable TTL.
const DNS_FALLBACK_REFRESH: Duration = Duration::from_secs(5);

/// Starts following `logical` (a `host:port` or `ip:port` authority); [`first_answer`] waits
/// for its first endpoints.
pub(crate) fn follow_logical(
    discovery: &Arc<Discovery>,
    logical: &Arc<Logical>,
    control: &Arc<ControlPlane>,
) {
    let (resolved_tx, resolved) = watch::channel(false);
    if logical.resolved.set(resolved).is_err() {
        return;
    }
    let follower = Follower {
        discovery: Arc::downgrade(discovery),
        logical: Arc::downgrade(logical),
        control: control.clone(),
        authority: logical.authority.clone(),
        resolved: Arc::new(resolved_tx),
    };
    tokio::spawn(follower.run());
}

/// Waits until a followed destination has its first endpoints, or [`FIRST_ANSWER_TIMEOUT`];
/// at once for any other.
pub(crate) async fn first_answer(logical: &Logical) {
    let Some(resolved) = logical.resolved.get() else {
        return;
    };
    let mut resolved = resolved.clone();
    if *resolved.borrow() {
        return;
    }
    let waited = tokio::time::timeout(FIRST_ANSWER_TIMEOUT, resolved.wait_for(|done| *done)).await;
    if waited.is_err() {
        crate::warn_limited!("control_plane_slow", authority = %logical.authority, "no answer from the control plane yet; going on without it");
    }
}

struct Follower {
    discovery: Weak<Discovery>,
    logical: Weak<Logical>,
    control: Arc<ControlPlane>,
    authority: Arc<str>,
    /// Set once the destination has endpoints to use (from any source).
    resolved: Arc<watch::Sender<bool>>,
}

/// Where a destination's endpoints come from, as its profile says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// `Get(fqdn:port)`.
    Service(Arc<str>),
    /// The profile names one endpoint (a pod's address).
    Endpoint(EndpointSpec),
    /// The control plane doesn't know it: DNS for a name, the address itself for an IP.
    Fallback,
}

impl Follower {
    async fn run(self) {
        let Some(client) = self.control.destination.clone() else {
            return;
        };
        let request = api::GetDestination {
            scheme: "k8s".into(),
            path: self.authority.to_string(),
            context_token: self.control.context_token.clone(),
        };
        let mut current: Option<(Source, Option<JoinHandle<()>>)> = None;
        let logical = self.logical.clone();
        follow(
            "profile",
            &self.authority,
            &self.control.metrics,
            || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.get_profile(request).await }
            },
            |event| {
                let (Some(discovery), Some(logical)) =
                    (self.discovery.upgrade(), self.logical.upgrade())
                else {
                    return ControlFlow::Break(());
                };
                let wanted = match event {
                    Event::Message(profile) => {
                        self.apply_profile(&discovery, &logical, &profile);
                        self.source_of(&profile)
                    }
                    // Nothing received yet: go on without the control plane meanwhile.
                    Event::Failed { first: true } if current.is_none() => Source::Fallback,
                    Event::Failed { .. } => return ControlFlow::Continue(()),
                };
                if current.as_ref().map(|(s, _)| s) != Some(&wanted) {
                    if let Some((_, Some(task))) = current.take() {
                        task.abort();
                    }
                    let task = self.start_source(&discovery, &logical, &wanted);
                    current = Some((wanted, task));
                }
                ControlFlow::Continue(())
            },
            || logical.strong_count() > 0,
        )
        .await;
        if let Some((_, Some(task))) = current {
            task.abort();
        }
    }

    /// Routes and split from a profile. A profile the proxy can't use keeps the last good
    /// routes (and says why).
    fn apply_profile(
        &self,
        discovery: &Arc<Discovery>,
        logical: &Arc<Logical>,
        profile: &api::DestinationProfile,
    ) {
        logical.opaque.store(
            profile.opaque_protocol,
            std::sync::atomic::Ordering::Relaxed,
        );
        match profile_from_proto(profile) {
            Ok(table) => {
                let spec: Vec<(BackendTarget, u64)> = table
                    .dst_overrides()
                    .iter()
                    .map(|o| {
                        (
                            BackendTarget::Authority(o.authority.clone()),
                            o.weight_milli,
                        )
                    })
                    .collect();
                discovery
                    .profiles()
                    .set_table(&logical.routes, Some(Arc::new(table)));
                if spec != logical.backends.load().spec() {
                    let (discovery, logical) = (discovery.clone(), logical.clone());
                    tokio::spawn(async move {
                        let snapshot = discovery.store_snapshot();
                        let backends = discovery.resolve_backends(&logical, spec, &snapshot).await;
                        logical.backends.store(Arc::new(backends));
                    });
                }
            }
            Err(error) => {
                crate::warn_limited!("control_plane_bad_profile", authority = %self.authority, %error, "unusable profile from the control plane; keeping the last one");
            }
        }
    }

    fn source_of(&self, profile: &api::DestinationProfile) -> Source {
        if !profile.fully_qualified_name.is_empty() {
            let port = self
                .authority
                .rsplit_once(':')
                .map_or("80", |(_, port)| port);
            let fqdn = profile.fully_qualified_name.trim_end_matches('.');
            return Source::Service(format!("{fqdn}:{port}").into());
        }
        if let Some(spec) = profile
            .endpoint
            .as_ref()
            .and_then(|e| endpoint_spec(e, &[]))
        {
            return Source::Endpoint(spec);
        }
        Source::Fallback
    }

    fn start_source(
        &self,
        discovery: &Arc<Discovery>,
        logical: &Arc<Logical>,
        source: &Source,
    ) -> Option<JoinHandle<()>> {
        match source {
            Source::Endpoint(spec) => {
                discovery.set_endpoints(logical, std::slice::from_ref(spec));
                self.resolved.send_replace(true);
                None
            }
            Source::Service(path) => Some(tokio::spawn(follow_endpoints(
                self.discovery.clone(),
                self.logical.clone(),
                self.control.clone(),
                path.clone(),
                self.resolved.clone(),
            ))),
            Source::Fallback => {
                let (host, port) = split_authority(&self.authority);
                if let Ok(ip) = host.parse::<IpAddr>() {
                    discovery.set_endpoints(logical, &unmeshed(&[SocketAddr::new(ip, port)]));
                    self.resolved.send_replace(true);
                    return None;
                }
                Some(tokio::spawn(follow_dns(
                    self.discovery.clone(),
                    self.logical.clone(),
                    host.to_string(),
                    port,
                    self.resolved.clone(),
                )))
            }
        }
    }
}

fn split_authority(authority: &str) -> (&str, u16) {
    match authority.rsplit_once(':') {
        Some((host, port)) => (
            host.trim_start_matches('[').trim_end_matches(']'),
            port.parse().unwrap_or(80),
        ),
        None => (authority, 80),
    }
}

/// A service's endpoints from `Get`: adds and removes applied to the set, a new stream's first
/// message replacing it.
async fn follow_endpoints(
    discovery: Weak<Discovery>,
    logical: Weak<Logical>,
    control: Arc<ControlPlane>,
    path: Arc<str>,
    resolved: Arc<watch::Sender<bool>>,
) {
    let Some(client) = control.destination.clone() else {
        return;
    };
    let request = api::GetDestination {
        scheme: "k8s".into(),
        path: path.to_string(),
        context_token: control.context_token.clone(),
    };
    let mut endpoints: BTreeMap<SocketAddr, EndpointSpec> = BTreeMap::new();
    let mut fresh_stream = true;
    let alive = logical.clone();
    follow(
        "destination",
        &path,
        &control.metrics,
        || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.get(request).await }
        },
        |event| {
            let (Some(discovery), Some(logical)) = (discovery.upgrade(), logical.upgrade()) else {
                return ControlFlow::Break(());
            };
            let update = match event {
                Event::Message(api::Update { update: Some(u) }) => u,
                Event::Message(_) => return ControlFlow::Continue(()),
                Event::Failed { .. } => {
                    // Keep serving what we have; the next stream's first message replaces it.
                    fresh_stream = true;
                    resolved.send_replace(true);
                    return ControlFlow::Continue(());
                }
            };
            if std::mem::take(&mut fresh_stream) {
                endpoints.clear();
            }
            match update {
                update::Update::Add(set) => {
                    let set_labels: Vec<(String, String)> = set.metric_labels.into_iter().collect();
                    for addr in &set.addrs {
                        if let Some(spec) = endpoint_spec(addr, &set_labels) {
                            endpoints.insert(spec.addr, spec);
                        }
                    }
                }
                update::Update::Remove(set) => {
                    for addr in set.addrs.iter().filter_map(socket_addr) {
                        endpoints.remove(&addr);
                    }
                }
                update::Update::NoEndpoints(_) => endpoints.clear(),
            }
            let specs: Vec<EndpointSpec> = endpoints.values().cloned().collect();
            discovery.set_endpoints(&logical, &specs);
            resolved.send_replace(true);
            ControlFlow::Continue(())
        },
        || alive.strong_count() > 0,
    )
    .await;
}

/// A name the control plane doesn't know: DNS, re-resolved on its TTL.
async fn follow_dns(
    discovery: Weak<Discovery>,
    logical: Weak<Logical>,
    host: String,
    port: u16,
    resolved: Arc<watch::Sender<bool>>,
) {
    loop {
        let (Some(d), Some(l)) = (discovery.upgrade(), logical.upgrade()) else {
            return;
        };
        let wait = match d.resolve_dns(&host, port).await {
            Ok((addrs, ttl)) => {
                d.set_endpoints(&l, &unmeshed(&addrs));
                ttl
            }
            // Keep the last answer (the resolver logs, rate-limited).
            Err(_) => DNS_FALLBACK_REFRESH,
        };
        resolved.send_replace(true);
        drop((d, l));
        tokio::time::sleep(wait).await;
    }
}

/// An endpoint as the proxy uses it: its address, identity and labels (the set's, then its
/// own, sorted by name). `None` for an address that can't be read.
fn endpoint_spec(
    addr: &api::WeightedAddr,
    set_labels: &[(String, String)],
) -> Option<EndpointSpec> {
    let sock = socket_addr(addr.addr.as_ref()?)?;
    let identity = addr
        .tls_identity
        .as_ref()
        .and_then(|id| match &id.strategy {
            Some(tls_identity::Strategy::DnsLikeIdentity(d)) => Some(Arc::from(d.name.as_str())),
            // A URI identity (SPIFFE) is verified by its DNS-like server name when one is sent.
            _ => id.server_name.as_ref().map(|n| Arc::from(n.name.as_str())),
        });
    let mut labels: BTreeMap<&str, &str> = set_labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    labels.extend(
        addr.metric_labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let labels: Option<DstLabels> = (!labels.is_empty()).then(|| {
        labels
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect()
    });
    Some(EndpointSpec {
        addr: sock,
        identity,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proxy_policy::proto::tcp_address;

    #[test]
    fn endpoints_take_their_identity_and_merged_labels() {
        let addr = api::WeightedAddr {
            addr: Some(tcp_address("10.0.0.1:8080".parse().expect("addr"))),
            weight: 10_000,
            metric_labels: [("pod".to_string(), "web-1".to_string())].into(),
            tls_identity: Some(api::TlsIdentity {
                strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
                    tls_identity::DnsLikeIdentity {
                        name: "web.shop.serviceaccount.identity.pylon.cluster.local".into(),
                    },
                )),
                server_name: None,
            }),
            ..Default::default()
        };
        let set = [
            ("namespace".to_string(), "shop".to_string()),
            ("service".to_string(), "web".to_string()),
        ];
        let spec = endpoint_spec(&addr, &set).expect("valid");
        assert_eq!(spec.addr, "10.0.0.1:8080".parse().expect("addr"));
        assert_eq!(
            spec.identity.as_deref(),
            Some("web.shop.serviceaccount.identity.pylon.cluster.local")
        );
        let labels: Vec<(&str, &str)> = spec
            .labels
            .as_deref()
            .expect("labels")
            .iter()
            .map(|(k, v)| (&**k, &**v))
            .collect();
        assert_eq!(
            labels,
            [("namespace", "shop"), ("pod", "web-1"), ("service", "web")]
        );
        assert!(endpoint_spec(&api::WeightedAddr::default(), &set).is_none());
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("web.shop:8080"), ("web.shop", 8080));
        assert_eq!(split_authority("[fd00::1]:80"), ("fd00::1", 80));
        assert_eq!(split_authority("web"), ("web", 80));
    }
}
