//! `v1 Pod` and `v1 Namespace`: what a destination's endpoints *are* (the workload that owns
//! them, the ServiceAccount they run as, whether a proxy runs beside them) and a namespace's
//! annotations.
//!
//! Both come from Kubernetes itself, which has already validated them, and carry far more than
//! Pylon reads, so only the fields read here are checked and nothing is reported as unknown.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde_yaml_ng::Mapping;

use super::{
    as_mapping, get, is_dns1123_label, join, opt_bool, opt_mapping, opt_seq, opt_str, port_number,
    protocol, req_mapping, req_str, FieldError, ObjectMeta, Protocol,
};

/// Containers whose presence makes a pod meshed: Pylon's own, and Linkerd's (the two
/// interoperate, so either proxy serves mesh TLS).
pub const PROXY_CONTAINER_NAMES: &[&str] = &["pylon-proxy", "linkerd-proxy"];

/// The label the Deployment controller puts on the pods (and the name) of each ReplicaSet.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// A validated Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub meta: ObjectMeta,
    /// The controller among `metadata.ownerReferences` (`controller: true`), if any.
    pub owner: Option<OwnerRef>,
    /// `spec.serviceAccountName`, `default` when unset as Kubernetes defaults it.
    pub service_account: Arc<str>,
    /// `status.podIPs` (or `status.podIP`): empty until the pod is scheduled and started.
    pub ips: Vec<IpAddr>,
    /// `status.phase` is `Running` and the `Ready` condition is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down, and Kubernetes takes it
    /// out of its Services' ready endpoints even while its `Ready` condition still says `True`.
    pub terminating: bool,
    /// A proxy container (or native sidecar) runs beside the app: its endpoints speak mesh TLS.
    pub meshed: bool,
    /// Named container ports (`name` -> number), for Servers and Services that name a port.
    pub named_ports: Vec<(Arc<str>, u16, Protocol)>,
}

/// One `metadata.ownerReferences` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRef {
    pub kind: Arc<str>,
    pub name: Arc<str>,
}

/// The kinds of workload Linkerd names in its `dst_*` and `*_name` metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
    ReplicationController,
    /// A bare pod, owned by nothing Pylon knows.
    Pod,
}

impl WorkloadKind {
    /// Linkerd's label name for the kind (`deployment`, `statefulset`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::ReplicaSet => "replicaset",
            Self::StatefulSet => "statefulset",
            Self::DaemonSet => "daemonset",
            Self::Job => "job",
            Self::CronJob => "cronjob",
            Self::ReplicationController => "replicationcontroller",
            Self::Pod => "pod",
        }
    }
}

/// The workload a pod belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: Arc<str>,
}

impl fmt::Display for Workload {
    /// `deployment/web`, the form `pylon stat` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.label(), self.name)
    }
}

impl Pod {
    /// The pod's workload from its owner: a ReplicaSet made by a Deployment is named
    /// `<deployment>-<pod-template-hash>`, and the pod carries that hash as a label, so the
    /// Deployment is known without watching ReplicaSets (which Linkerd does, at the cost of
    /// one more watch of the whole cluster).
    pub fn workload(&self) -> Workload {
        let Some(owner) = &self.owner else {
            return Workload {
                kind: WorkloadKind::Pod,
                name: self.meta.name.clone(),
            };
        };
        let kind = match &*owner.kind {
            "ReplicaSet" => {
                let deployment = self
                    .meta
                    .labels
                    .get(POD_TEMPLATE_HASH_LABEL)
                    .and_then(|hash| owner.name.strip_suffix(hash.as_str()))
                    .and_then(|rest| rest.strip_suffix('-'))
                    .filter(|d| !d.is_empty());
                if let Some(deployment) = deployment {
                    return Workload {
                        kind: WorkloadKind::Deployment,
                        name: deployment.into(),
                    };
                }
                WorkloadKind::ReplicaSet
            }
            "Deployment" => WorkloadKind::Deployment,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Job" => WorkloadKind::Job,
            "CronJob" => WorkloadKind::CronJob,
            "ReplicationController" => WorkloadKind::ReplicationController,
            _ => {
                return Workload {
                    kind: WorkloadKind::Pod,
                    name: self.meta.name.clone(),
                }
            }
        };
        Workload {
            kind,
            name: owner.name.clone(),
        }
    }

    /// The labels Linkerd's destination controller gives an endpoint on this pod (its
    /// `metric_labels`, which proxies export as `dst_<name>`): `pod`, the workload's kind and
    /// name (`deployment: web`), `pod_template_hash` and `serviceaccount`.
    pub fn metric_labels(&self) -> Vec<(&'static str, String)> {
        let mut labels = vec![("pod", self.meta.name.to_string())];
        let workload = self.workload();
        if workload.kind != WorkloadKind::Pod {
            labels.push((workload.kind.label(), workload.name.to_string()));
        }
        if let Some(hash) = self.meta.labels.get(POD_TEMPLATE_HASH_LABEL) {
            labels.push(("pod_template_hash", hash.clone()));
        }
        labels.push(("serviceaccount", self.service_account.to_string()));
        labels
    }

    /// The number of a named container port.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, _, p)| &**n == name && *p == Protocol::Tcp)
            .map(|(_, port, _)| *port)
    }
}

/// A validated Namespace: only its labels and annotations matter (Linkerd's
/// `config.linkerd.io/default-inbound-policy`, `linkerd.io/inject`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub meta: ObjectMeta,
}

pub(super) fn parse_pod(root: &Mapping, meta: ObjectMeta) -> Result<Pod, FieldError> {
    let meta_map = req_mapping(root, "", "metadata")?;
    let terminating = get(meta_map, "deletionTimestamp").is_some_and(|v| !v.is_null());
    let mut owner = None;
    for (i, item) in opt_seq(meta_map, "metadata", "ownerReferences")?
        .iter()
        .enumerate()
    {
        let path = format!("metadata.ownerReferences[{i}]");
        let r = as_mapping(item, &path)?;
        let kind = req_str(r, &path, "kind")?;
        let name = req_str(r, &path, "name")?;
        if opt_bool(r, &path, "controller")? == Some(true) {
            owner = Some(OwnerRef {
                kind: kind.into(),
                name: name.into(),
            });
        }
    }

    let empty = Mapping::new();
    let spec = opt_mapping(root, "", "spec")?.unwrap_or(&empty);
    let service_account = match opt_str(spec, "spec", "serviceAccountName")? {
        Some(sa) if !sa.is_empty() => {
            if !is_dns1123_label(sa) && !super::is_dns1123_subdomain(sa) {
                return Err(FieldError::new(
                    "spec.serviceAccountName",
                    format!("invalid ServiceAccount name {sa:?}"),
                ));
            }
            sa
        }
        _ => "default",
    };
    let mut meshed = false;
    let mut named_ports = Vec::new();
    for list in ["containers", "initContainers"] {
        for (i, item) in opt_seq(spec, "spec", list)?.iter().enumerate() {
            let path = format!("spec.{list}[{i}]");
            let c = as_mapping(item, &path)?;
            let name = opt_str(c, &path, "name")?.unwrap_or("");
            // An init container with `restartPolicy: Always` is a native sidecar.
            let sidecar =
                list == "containers" || opt_str(c, &path, "restartPolicy")? == Some("Always");
            if sidecar && PROXY_CONTAINER_NAMES.contains(&name) {
                meshed = true;
            }
            for (j, p) in opt_seq(c, &path, "ports")?.iter().enumerate() {
                let ppath = format!("{path}.ports[{j}]");
                let p = as_mapping(p, &ppath)?;
                let Some(port_name) = opt_str(p, &ppath, "name")?.filter(|n| !n.is_empty()) else {
                    continue;
                };
                let number = match get(p, "containerPort") {
                    Some(v) => port_number(v, &join(&ppath, "containerPort"))?,
                    None => continue,
                };
                named_ports.push((port_name.into(), number, protocol(p, &ppath)?));
            }
        }
    }

    let status = opt_mapping(root, "", "status")?.unwrap_or(&empty);
    let mut ips = Vec::new();
    for (i, item) in opt_seq(status, "status", "podIPs")?.iter().enumerate() {
        let path = format!("status.podIPs[{i}]");
        let ip = req_str(as_mapping(item, &path)?, &path, "ip")?;
        ips.push(parse_ip(ip, &join(&path, "ip"))?);
    }
    if ips.is_empty() {
        if let Some(ip) = opt_str(status, "status", "podIP")?.filter(|s| !s.is_empty()) {
            ips.push(parse_ip(ip, "status.podIP")?);
        }
    }
    let running = opt_str(status, "status", "phase")? == Some("Running");
    let mut ready_condition = false;
    for (i, item) in opt_seq(status, "status", "conditions")?.iter().enumerate() {
        let path = format!("status.conditions[{i}]");
        let c = as_mapping(item, &path)?;
        if opt_str(c, &path, "type")? == Some("Ready") {
            ready_condition = opt_str(c, &path, "status")? == Some("True");
        }
    }
    Ok(Pod {
        meta,
        owner,
        service_account: service_account.into(),
        ips,
        ready: running && ready_condition,
        terminating,
        meshed,
        named_ports,
    })
}

fn parse_ip(raw: &str, field: &str) -> Result<IpAddr, FieldError> {
    raw.parse()
        .map_err(|_| FieldError::new(field, format!("invalid IP address {raw:?}")))
}

pub(super) fn parse_namespace(meta: ObjectMeta) -> Namespace {
    Namespace { meta }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_document, MeshObject, ParsedDocument};

    fn pod(yaml: &str) -> Pod {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).unwrap();
        match parse_document(&doc, "default") {
            ParsedDocument::Valid {
                object: MeshObject::Pod(p),
                unknown_fields,
            } => {
                assert!(unknown_fields.is_empty(), "{unknown_fields:?}");
                p
            }
            other => panic!("{other:?}"),
        }
    }

    const DEPLOYMENT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-x2x4z
  namespace: shop
  labels: {app: web, pod-template-hash: 7d4b9c}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: u1, controller: true}
  uid: abc
spec:
  serviceAccountName: web-sa
  nodeName: n1
  containers:
  - name: app
    image: web
    ports: [{name: http, containerPort: 8080}, {containerPort: 9000}]
  - name: pylon-proxy
    image: pylon
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
  conditions: [{type: Ready, status: "True"}]
  hostIP: 1.2.3.4
"#;

    #[test]
    fn a_deployments_pod_names_its_deployment() {
        let p = pod(DEPLOYMENT_POD);
        assert_eq!(p.workload().to_string(), "deployment/web");
        assert_eq!(&*p.service_account, "web-sa");
        assert_eq!(p.ips.len(), 2);
        assert!(p.ready && p.meshed);
        assert_eq!(p.named_port("http"), Some(8080));
    }

    #[test]
    fn other_owners_and_none() {
        let sts = DEPLOYMENT_POD
            .replace(
                "kind: ReplicaSet, name: web-7d4b9c",
                "kind: StatefulSet, name: db",
            )
            .replace("- name: pylon-proxy", "- name: other");
        let p = pod(&sts);
        assert_eq!(p.workload().to_string(), "statefulset/db");
        assert!(!p.meshed);
        // A ReplicaSet not made by a Deployment (its name lacks the hash).
        let rs = DEPLOYMENT_POD.replace("name: web-7d4b9c, uid", "name: standalone, uid");
        assert_eq!(pod(&rs).workload().to_string(), "replicaset/standalone");
        let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: solo}\nspec: {containers: []}\n";
        let p = pod(bare);
        assert_eq!(p.workload().to_string(), "pod/solo");
        assert_eq!(&*p.service_account, "default");
        assert!(!p.ready && p.ips.is_empty());
    }

    #[test]
    fn a_native_sidecar_proxy_meshes_the_pod() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  initContainers:\n  - {name: pylon-proxy, restartPolicy: Always}\n  containers: [{name: app}]\n";
        assert!(pod(yaml).meshed);
        let init_only = yaml.replace(", restartPolicy: Always", "");
        assert!(!pod(&init_only).meshed);
    }

    #[test]
    fn bad_fields_are_named() {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n",
        )
        .unwrap();
        let ParsedDocument::Invalid { error, .. } = parse_document(&doc, "default") else {
            panic!("should be invalid")
        };
        assert_eq!(error.field, "status.podIP");
    }
}
