//! `io.linkerd.proxy.inbound.InboundServerPolicies`: a proxy asks for one of its pod's ports and
//! gets the Server that selects it (or the default policy) with its authorizations, kept
//! current as policy objects, the pod's labels or the namespace's annotations change.
//!
//! The policy is compiled by the same code a config-dir proxy runs
//! ([`pylon_proxy_policy::Snapshot::inbound_policy`]), so both answer alike.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use linkerd2_proxy_api::inbound::{
    self as api, inbound_server_policies_server::InboundServerPolicies,
};
use pylon_proxy_policy::{DefaultPolicy, InboundConfig, IpNet, MeshObject, Snapshot, Store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::mesh::MeshConfig;

/// Linkerd's annotation (on a pod or its namespace) choosing the default inbound policy.
pub const DEFAULT_POLICY_ANNOTATION: &str = "config.linkerd.io/default-inbound-policy";

/// The cluster-wide defaults the objects don't say.
#[derive(Clone, Debug)]
pub struct PolicyDefaults {
    pub default_policy: DefaultPolicy,
    pub cluster_networks: Vec<IpNet>,
}

impl Default for PolicyDefaults {
    fn default() -> Self {
        Self {
            default_policy: DefaultPolicy::default(),
            cluster_networks: pylon_proxy_policy::default_cluster_networks(),
        }
    }
}

#[derive(Clone)]
pub struct PolicyService {
    store: Arc<Store>,
    mesh: Arc<MeshConfig>,
    defaults: Arc<PolicyDefaults>,
}

impl PolicyService {
    pub fn new(store: Arc<Store>, mesh: Arc<MeshConfig>, defaults: Arc<PolicyDefaults>) -> Self {
        Self {
            store,
            mesh,
            defaults,
        }
    }

    /// The answer for one port of one pod, from one snapshot.
    fn server(
        &self,
        snapshot: &Snapshot,
        workload: &Workload,
        port: u16,
    ) -> Result<api::Server, Status> {
        let pod = snapshot
            .pod(&workload.namespace, &workload.pod)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "pod {}/{} not found",
                    workload.namespace, workload.pod
                ))
            })?;
        let annotation = |a: &std::collections::BTreeMap<String, String>| {
            a.get(DEFAULT_POLICY_ANNOTATION).and_then(|v| match v.parse::<DefaultPolicy>() {
                Ok(p) => Some(p),
                Err(error) => {
                    tracing::warn!(pod = %pod.meta.name, namespace = %pod.meta.namespace, %error, "ignoring {DEFAULT_POLICY_ANNOTATION}");
                    None
                }
            })
        };
        let default_policy = annotation(&pod.meta.annotations)
            .or_else(|| {
                snapshot
                    .namespace(&workload.namespace)
                    .and_then(|n| annotation(&n.meta.annotations))
            })
            .unwrap_or(self.defaults.default_policy);
        let config = InboundConfig {
            default_policy,
            cluster_networks: self.defaults.cluster_networks.clone(),
            identity_suffix: format!(
                "serviceaccount.identity.{}.{}",
                self.mesh.identity_issuer, self.mesh.trust_domain
            ),
            port_names: pod
                .named_ports
                .iter()
                .map(|(name, port, _)| (name.to_string(), *port))
                .collect(),
        };
        let policy = snapshot.inbound_policy(&workload.namespace, &pod.meta.labels, &config);
        let mut server = policy.for_port(port).to_proto();
        server.server_ips = pod.ips.iter().map(|ip: &IpAddr| (*ip).into()).collect();
        Ok(server)
    }
}

/// The pod a proxy runs in, as `PortSpec.workload` names it: Linkerd's JSON
/// (`{"ns":"shop","pod":"web-1"}`) or its older `shop:web-1`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Workload {
    namespace: String,
    pod: String,
}

impl Workload {
    fn parse(s: &str) -> Result<Workload, Status> {
        let parsed = if s.trim_start().starts_with('{') {
            serde_json::from_str::<serde_json::Value>(s)
                .ok()
                .and_then(|v| {
                    Some(Workload {
                        namespace: v.get("ns")?.as_str()?.to_string(),
                        pod: v.get("pod")?.as_str()?.to_string(),
                    })
                })
        } else {
            s.split_once(':').map(|(ns, pod)| Workload {
                namespace: ns.to_string(),
                pod: pod.to_string(),
            })
        };
        parsed
            .filter(|w| !w.namespace.is_empty() && !w.pod.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "invalid workload {s:?}: expected {{\"ns\":NS,\"pod\":POD}} or NS:POD"
                ))
            })
    }
}

/// What a pod's port policy is compiled from, held so that unchanged objects are known by
/// `Arc::ptr_eq`: the pod (labels, named ports, annotation), its Namespace (annotation) and the
/// authorization objects. (Port names learnt from Services only fill in what the pod's own
/// container ports don't name, so Service changes are not watched for.)
struct PolicyInputs {
    pod: Option<Arc<MeshObject>>,
    namespace: Option<Arc<MeshObject>>,
    policy: Vec<Arc<MeshObject>>,
}

impl PolicyInputs {
    fn of(snapshot: &Snapshot, workload: &Workload) -> Self {
        Self {
            pod: snapshot
                .pod_object(&workload.namespace, &workload.pod)
                .cloned(),
            namespace: snapshot.namespace_object(&workload.namespace).cloned(),
            policy: snapshot.policy_objects().to_vec(),
        }
    }
}

impl PartialEq for PolicyInputs {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Option<Arc<MeshObject>>, b: &Option<Arc<MeshObject>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same(&self.pod, &other.pod)
            && same(&self.namespace, &other.namespace)
            && self.policy.len() == other.policy.len()
            && self
                .policy
                .iter()
                .zip(&other.policy)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

fn port(spec: &api::PortSpec) -> Result<u16, Status> {
    u16::try_from(spec.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("invalid port {}", spec.port)))
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<api::Server, Status>> + Send>>;

#[tonic::async_trait]
impl InboundServerPolicies for PolicyService {
    type WatchPortStream = ServerStream;

    async fn get_port(
        &self,
        request: Request<api::PortSpec>,
    ) -> Result<Response<api::Server>, Status> {
        let spec = request.get_ref();
        let workload = Workload::parse(&spec.workload)?;
        let server = self.server(&self.store.snapshot(), &workload, port(spec)?)?;
        Ok(Response::new(server))
    }

    async fn watch_port(
        &self,
        request: Request<api::PortSpec>,
    ) -> Result<Response<ServerStream>, Status> {
        let spec = request.get_ref();
        let workload = Workload::parse(&spec.workload)?;
        let port = port(spec)?;
        let mut snapshots = self.store.subscribe();
        // The first answer is checked here, so an unknown pod is an error the proxy sees (and
        // retries) rather than a stream that never speaks.
        let snapshot = snapshots.borrow_and_update().clone();
        let first = self.server(&snapshot, &workload, port)?;
        let mut inputs = PolicyInputs::of(&snapshot, &workload);
        drop(snapshot);
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut sent = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let snapshot = snapshots.borrow_and_update().clone();
                // Most changes (endpoints, routes) leave the policy's inputs as they were.
                let now = PolicyInputs::of(&snapshot, &workload);
                if now == inputs {
                    continue;
                }
                inputs = now;
                match this.server(&snapshot, &workload, port) {
                    Ok(server) if server != sent => {
                        if tx.send(Ok(server.clone())).await.is_err() {
                            return;
                        }
                        sent = server;
                    }
                    Ok(_) => {}
                    // The pod is gone: its proxy is going too; end the stream.
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_in_both_of_linkerds_forms() {
        let w = Workload {
            namespace: "shop".into(),
            pod: "web-1".into(),
        };
        assert_eq!(
            Workload::parse(r#"{"ns":"shop","pod":"web-1"}"#).ok(),
            Some(w.clone())
        );
        assert_eq!(Workload::parse("shop:web-1").ok(), Some(w));
        for bad in ["", "shop", "{}", r#"{"ns":"shop"}"#, ":web"] {
            assert!(Workload::parse(bad).is_err(), "{bad:?}");
        }
    }
}
