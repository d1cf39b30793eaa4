//! Proxy injection: adds Pylon's sidecar to the pods of Kubernetes objects, and takes it out.
//! `pylon inject` runs it offline on YAML; `pylon-controller`'s admission webhook runs the same
//! code on each pod the API server creates and answers with the difference as a JSON patch, so
//! the two can never disagree.
//!
//! Injecting adds, to a pod template:
//! - `pylon-init`, an init container that installs the iptables redirects (`pylon-proxy init`,
//!   with NET_ADMIN and NET_RAW, as root, nothing else);
//! - `pylon-proxy`, either a native sidecar (an init container with `restartPolicy: Always`,
//!   started before the app and stopped after it; the default, for Kubernetes 1.29 and later)
//!   or the first regular container: ports 4143/4191/4190 named `pylon-proxy`/`pylon-admin`/
//!   `pylon-tap`, its environment (control plane addresses, identity, the pod's inbound ports),
//!   `/live` and `/ready` probes, a locked-down securityContext (uid 2102, read-only root
//!   filesystem, no capabilities) and the projected ServiceAccount token the identity service
//!   checks;
//! - labels naming the workload (`pylon.io/proxy-deployment: web`, ...) for Prometheus, and the
//!   proxy version as an annotation.
//!
//! It honours `pylon.io/inject` and Linkerd's `linkerd.io/inject` (`disabled` skips the pod) and
//! the `config.pylon.io/*` / `config.linkerd.io/*` annotations it knows (see [`ANNOTATIONS`]).
//! Injection is idempotent: an injected pod is first uninjected, so injecting twice is injecting
//! once. It works on [`serde_yaml_ng::Value`], which keeps the input's field order.
//!
//! It must not know about files, HTTP or the API server: callers hand it objects and write what
//! it returns.

use std::fmt;

use serde_yaml_ng::{Mapping, Value};

/// The proxy's container, its init container and its token volume.
pub const PROXY_CONTAINER: &str = "pylon-proxy";
pub const INIT_CONTAINER: &str = "pylon-init";
pub const TOKEN_VOLUME: &str = "pylon-identity-token";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The audience Linkerd's identity service expects (Pylon's controller checks it too).
pub const TOKEN_AUDIENCE: &str = "identity.l5d.io";

pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;
pub const TAP_PORT: u16 = 4190;
pub const PROXY_UID: u32 = 2102;

/// Annotations read from a pod template (Pylon's spelling wins over Linkerd's).
pub const ANNOTATIONS: &[&str] = &[
    "inject",
    "skip-inbound-ports",
    "skip-outbound-ports",
    "opaque-ports",
    "proxy-cpu-request",
    "proxy-cpu-limit",
    "proxy-memory-request",
    "proxy-memory-limit",
    "proxy-log-level",
    "default-inbound-policy",
];

/// The annotations that turn injection on (`enabled`) or off (`disabled`), Pylon's first.
pub const INJECT_ANNOTATIONS: [&str; 2] = ["pylon.io/inject", "linkerd.io/inject"];
const VERSION_ANNOTATION: &str = "pylon.io/proxy-version";
const CREATED_BY_ANNOTATION: &str = "pylon.io/created-by";
const CONTROL_PLANE_LABEL: &str = "pylon.io/control-plane-ns";
const WORKLOAD_NS_LABEL: &str = "pylon.io/workload-ns";
const WORKLOAD_LABEL_PREFIX: &str = "pylon.io/proxy-";

/// How pods are injected: the cluster's control plane and the proxy to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image holding `pylon-proxy` (its entrypoint).
    pub image: String,
    /// Recorded on the pod (`pylon.io/proxy-version`).
    pub version: String,
    /// Who injected it (`pylon.io/created-by`), e.g. `pylon/cli 0.1.0`.
    pub created_by: String,
    /// The control plane's namespace (its Services are `pylon-dst`, `pylon-policy` and
    /// `pylon-identity` there).
    pub control_plane_namespace: String,
    pub cluster_domain: String,
    pub trust_domain: String,
    /// The mesh's trust anchors (PEM). Without them the proxy runs without an identity.
    pub trust_anchors_pem: Option<String>,
    /// The proxy as a native sidecar (Kubernetes 1.29+) rather than a regular container.
    pub native_sidecar: bool,
}

impl InjectConfig {
    /// Defaults for this version of Pylon.
    pub fn new(version: &str) -> Self {
        Self {
            image: format!("ghcr.io/pylon-mesh/pylon:{version}"),
            version: version.to_string(),
            created_by: format!("pylon/cli {version}"),
            control_plane_namespace: "pylon".into(),
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            trust_anchors_pem: None,
            native_sidecar: true,
        }
    }

    fn control_plane_addr(&self, service: &str, port: u16) -> String {
        format!(
            "{service}.{}.svc.{}.:{port}",
            self.control_plane_namespace, self.cluster_domain
        )
    }
}

/// Whether a Kubernetes version (`1.29`, `v1.30.2`) runs native sidecars by default.
pub fn supports_native_sidecars(version: &str) -> bool {
    let v = version.trim_start_matches('v');
    let mut parts = v.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts
        .next()
        .map(|p| p.trim_end_matches(|c: char| !c.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    major > 1 || (major == 1 && minor >= 29)
}

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// `Deployment shop/web`, or `document 3` when unnamed.
    pub object: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Uninjected,
    /// Left as it was, and why.
    Skipped(String),
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Injected => write!(f, "{}: injected", self.object),
            Outcome::Uninjected => write!(f, "{}: uninjected", self.object),
            Outcome::Skipped(why) => write!(f, "{}: skipped: {why}", self.object),
        }
    }
}

/// An object that could not be transformed, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{object}: {field}: {message}")]
pub struct InjectError {
    pub object: String,
    pub field: String,
    pub message: String,
}

/// Injects every pod template in `object` (a workload, a Pod, or a `List` of them). Objects of
/// other kinds, host-network pods and pods that opt out are left as they are, with a note.
pub fn inject(object: &mut Value, config: &InjectConfig) -> Result<Vec<Note>, InjectError> {
    let mut notes = Vec::new();
    transform(object, &mut |pod| inject_pod(pod, config), &mut notes)?;
    Ok(notes)
}

/// Takes the proxy out of every pod template in `object`.
pub fn uninject(object: &mut Value) -> Result<Vec<Note>, InjectError> {
    let mut notes = Vec::new();
    transform(
        object,
        &mut |pod| {
            Ok(if uninject_pod(pod)? {
                Outcome::Uninjected
            } else {
                Outcome::Skipped("no proxy to take out".into())
            })
        },
        &mut notes,
    )?;
    Ok(notes)
}

/// One pod template: its metadata and spec, and the workload it belongs to.
struct PodTemplate<'a> {
    meta: &'a mut Mapping,
    spec: &'a mut Mapping,
    /// `(kind, name)` of the owning workload (`("deployment", "web")`).
    workload: Option<(String, String)>,
    namespace: Option<String>,
    /// The workload's own annotations, read when the template doesn't say.
    owner_annotations: Mapping,
    describe: String,
}

fn transform(
    object: &mut Value,
    f: &mut dyn FnMut(&mut PodTemplate<'_>) -> Result<Outcome, InjectError>,
    notes: &mut Vec<Note>,
) -> Result<(), InjectError> {
    let kind = str_at(object, &["kind"]).unwrap_or_default();
    if kind == "List" {
        if let Some(Value::Sequence(items)) = object.get_mut("items") {
            for item in items {
                transform(item, f, notes)?;
            }
        }
        return Ok(());
    }
    let name = str_at(object, &["metadata", "name"]).unwrap_or_default();
    let namespace = str_at(object, &["metadata", "namespace"]);
    let describe = match &namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    let path: &[&str] = match kind.as_str() {
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "Pod" => &[],
        _ => {
            notes.push(Note {
                object: describe,
                outcome: Outcome::Skipped(format!("kind {kind:?} has no pod template")),
            });
            return Ok(());
        }
    };
    let owner_annotations = match object.get("metadata").and_then(|m| m.get("annotations")) {
        Some(Value::Mapping(a)) if !path.is_empty() => a.clone(),
        _ => Mapping::new(),
    };
    let workload = if path.is_empty() {
        pod_workload(object)
    } else {
        Some((kind.to_ascii_lowercase(), name.clone()))
    };
    let template = mapping_at(object, path, &describe)?;
    let (meta, spec) = split_template(template, &describe, path)?;
    let mut pod = PodTemplate {
        meta,
        spec,
        workload,
        namespace,
        owner_annotations,
        describe: describe.clone(),
    };
    let outcome = f(&mut pod)?;
    notes.push(Note {
        object: describe,
        outcome,
    });
    Ok(())
}

/// A Pod's workload from its owner, by the rule the controller labels metrics with
/// ([`pylon_proxy_policy::Pod::workload`]); `None` for a bare pod.
fn pod_workload(pod: &Value) -> Option<(String, String)> {
    use pylon_proxy_policy::{MeshObject, WorkloadKind};
    // A pod the webhook sees may have no name yet (`generateName`); the owner is what counts.
    let mut named = pod.clone();
    if str_at(&named, &["metadata", "name"]).is_none() {
        if let Some(meta) = named.get_mut("metadata").and_then(Value::as_mapping_mut) {
            meta.insert("name".into(), "pending".into());
        }
    }
    match pylon_proxy_policy::parse_pod(&named) {
        Some(MeshObject::Pod(p)) => {
            let w = p.workload();
            (w.kind != WorkloadKind::Pod).then(|| (w.kind.label().to_string(), w.name.to_string()))
        }
        _ => None,
    }
}

fn str_at(v: &Value, path: &[&str]) -> Option<String> {
    let mut v = v;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str().map(str::to_string)
}

fn error(object: &str, field: impl Into<String>, message: impl Into<String>) -> InjectError {
    InjectError {
        object: object.to_string(),
        field: field.into(),
        message: message.into(),
    }
}

/// The mapping at `path`, made if missing.
fn mapping_at<'v>(
    v: &'v mut Value,
    path: &[&str],
    describe: &str,
) -> Result<&'v mut Mapping, InjectError> {
    let mut v = v;
    let mut walked = String::new();
    for key in path {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(key);
        let map = v
            .as_mapping_mut()
            .ok_or_else(|| error(describe, &walked, "must be a mapping"))?;
        if !map.contains_key(*key) {
            map.insert((*key).into(), Value::Mapping(Mapping::new()));
        }
        v = map
            .get_mut(*key)
            .ok_or_else(|| error(describe, &walked, "missing"))?;
    }
    v.as_mapping_mut()
        .ok_or_else(|| error(describe, path.join("."), "must be a mapping"))
}

fn split_template<'v>(
    template: &'v mut Mapping,
    describe: &str,
    path: &[&str],
) -> Result<(&'v mut Mapping, &'v mut Mapping), InjectError> {
    for key in ["metadata", "spec"] {
        match template.get(key) {
            None | Some(Value::Null) => {
                template.insert(key.into(), Value::Mapping(Mapping::new()));
            }
            Some(Value::Mapping(_)) => {}
            Some(_) => {
                let field = [path, &[key]].concat().join(".");
                return Err(error(describe, field, "must be a mapping"));
            }
        }
    }
    let mut meta = None;
    let mut spec = None;
    for (k, v) in template.iter_mut() {
        match (k.as_str(), v) {
            (Some("metadata"), Value::Mapping(m)) => meta = Some(m),
            (Some("spec"), Value::Mapping(m)) => spec = Some(m),
            _ => {}
        }
    }
    match (meta, spec) {
        (Some(m), Some(s)) => Ok((m, s)),
        _ => Err(error(describe, path.join("."), "no metadata and spec")),
    }
}

/// A template annotation, Pylon's `config.pylon.io/<name>` before Linkerd's
/// `config.linkerd.io/<name>`, then the workload's own.
fn annotation(pod: &PodTemplate<'_>, name: &str) -> Option<String> {
    let keys = [
        format!("config.pylon.io/{name}"),
        format!("config.linkerd.io/{name}"),
    ];
    let template = pod.meta.get("annotations").and_then(Value::as_mapping);
    for annotations in [template, Some(&pod.owner_annotations)]
        .into_iter()
        .flatten()
    {
        for key in &keys {
            if let Some(v) = annotations.get(key.as_str()).and_then(Value::as_str) {
                return Some(v.to_string());
            }
        }
    }
    None
}

fn inject_value(pod: &PodTemplate<'_>) -> Option<String> {
    let template = pod.meta.get("annotations").and_then(Value::as_mapping);
    for annotations in [template, Some(&pod.owner_annotations)]
        .into_iter()
        .flatten()
    {
        for key in INJECT_ANNOTATIONS {
            if let Some(v) = annotations.get(key).and_then(Value::as_str) {
                return Some(v.to_string());
            }
        }
    }
    None
}

fn inject_pod(pod: &mut PodTemplate<'_>, config: &InjectConfig) -> Result<Outcome, InjectError> {
    if inject_value(pod).as_deref() == Some("disabled") {
        return Ok(Outcome::Skipped("injection disabled by annotation".into()));
    }
    if pod.spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "host-network pods share the node's network namespace; not injected".into(),
        ));
    }
    // Idempotent: whatever an earlier injection added goes first.
    uninject_pod(pod)?;

    let app_ports = container_ports(pod.spec, &pod.describe)?;
    let mut skip_inbound: Vec<String> = vec![TAP_PORT.to_string(), ADMIN_PORT.to_string()];
    skip_inbound.extend(port_list(annotation(pod, "skip-inbound-ports")));
    let skip_outbound = port_list(annotation(pod, "skip-outbound-ports"));

    let init = init_container(config, &skip_inbound, &skip_outbound);
    let proxy = proxy_container(pod, config, &app_ports);
    let spec = &mut *pod.spec;
    let mut inits = take_list(spec, "initContainers", &pod.describe)?;
    let mut containers = take_list(spec, "containers", &pod.describe)?;
    // The redirects first: nothing else in the pod runs before them.
    inits.insert(0, init);
    if config.native_sidecar {
        let mut proxy = proxy;
        proxy.insert("restartPolicy".into(), "Always".into());
        inits.insert(1, Value::Mapping(proxy));
    } else {
        // First, so the proxy starts (and stops) around the app as best a pod allows.
        containers.insert(0, Value::Mapping(proxy));
    }
    spec.insert("initContainers".into(), Value::Sequence(inits));
    spec.insert("containers".into(), Value::Sequence(containers));
    if config.trust_anchors_pem.is_some() {
        let mut volumes = take_list(spec, "volumes", &pod.describe)?;
        volumes.push(token_volume());
        spec.insert("volumes".into(), Value::Sequence(volumes));
    }

    let labels = child_mapping(pod.meta, "labels");
    labels.insert(
        CONTROL_PLANE_LABEL.into(),
        config.control_plane_namespace.clone().into(),
    );
    if let Some((kind, name)) = &pod.workload {
        labels.insert(
            format!("{WORKLOAD_LABEL_PREFIX}{kind}").into(),
            name.clone().into(),
        );
    }
    if let Some(ns) = &pod.namespace {
        labels.insert(WORKLOAD_NS_LABEL.into(), ns.clone().into());
    }
    let annotations = child_mapping(pod.meta, "annotations");
    annotations.insert(VERSION_ANNOTATION.into(), config.version.clone().into());
    annotations.insert(
        CREATED_BY_ANNOTATION.into(),
        config.created_by.clone().into(),
    );
    Ok(Outcome::Injected)
}

/// Takes out what [`inject_pod`] added; `false` when there was nothing.
fn uninject_pod(pod: &mut PodTemplate<'_>) -> Result<bool, InjectError> {
    let mut found = false;
    for list in ["initContainers", "containers"] {
        let mut items = take_list(pod.spec, list, &pod.describe)?;
        let before = items.len();
        items.retain(|c| {
            let name = c.get("name").and_then(Value::as_str);
            name != Some(PROXY_CONTAINER) && name != Some(INIT_CONTAINER)
        });
        found |= items.len() != before;
        // A list only the injection made goes with it.
        if !(items.is_empty() && list == "initContainers") {
            pod.spec.insert(list.into(), Value::Sequence(items));
        }
    }
    let mut volumes = take_list(pod.spec, "volumes", &pod.describe)?;
    let before = volumes.len();
    volumes.retain(|v| v.get("name").and_then(Value::as_str) != Some(TOKEN_VOLUME));
    found |= volumes.len() != before;
    if !volumes.is_empty() {
        pod.spec.insert("volumes".into(), Value::Sequence(volumes));
    }
    for (field, is_ours) in [
        (
            "labels",
            (|k: &str| {
                k == CONTROL_PLANE_LABEL
                    || k == WORKLOAD_NS_LABEL
                    || k.starts_with(WORKLOAD_LABEL_PREFIX)
            }) as fn(&str) -> bool,
        ),
        ("annotations", |k: &str| {
            k == VERSION_ANNOTATION || k == CREATED_BY_ANNOTATION
        }),
    ] {
        if let Some(Value::Mapping(map)) = pod.meta.get_mut(field) {
            let before = map.len();
            map.retain(|k, _| !k.as_str().is_some_and(is_ours));
            found |= map.len() != before;
            if map.is_empty() {
                pod.meta.remove(field);
            }
        }
    }
    Ok(found)
}

/// The list at `key` (taken out; put it back), empty when absent.
fn take_list(spec: &mut Mapping, key: &str, describe: &str) -> Result<Vec<Value>, InjectError> {
    match spec.remove(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(items)) => Ok(items),
        Some(other) => {
            spec.insert(key.into(), other);
            Err(error(describe, format!("spec.{key}"), "must be a list"))
        }
    }
}

fn child_mapping<'m>(parent: &'m mut Mapping, key: &str) -> &'m mut Mapping {
    if !matches!(parent.get(key), Some(Value::Mapping(_))) {
        parent.insert(key.into(), Value::Mapping(Mapping::new()));
    }
    match parent.get_mut(key) {
        Some(Value::Mapping(m)) => m,
        // Just made a mapping there.
        _ => unreachable!("a mapping was inserted at {key}"),
    }
}

/// The app containers' TCP ports: the proxy's `/ready` waits for their inbound policy.
fn container_ports(spec: &Mapping, describe: &str) -> Result<Vec<u16>, InjectError> {
    let mut ports = Vec::new();
    let Some(containers) = spec.get("containers") else {
        return Ok(ports);
    };
    let containers = containers
        .as_sequence()
        .ok_or_else(|| error(describe, "spec.containers", "must be a list"))?;
    for c in containers {
        let Some(list) = c.get("ports").and_then(Value::as_sequence) else {
            continue;
        };
        for p in list {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            if let (true, Some(port)) = (tcp, p.get("containerPort").and_then(Value::as_u64)) {
                if let Ok(port) = u16::try_from(port) {
                    if !ports.contains(&port) {
                        ports.push(port);
                    }
                }
            }
        }
    }
    Ok(ports)
}

/// `25,443, 8000-8100` as its entries (ranges kept as ranges).
fn port_list(list: Option<String>) -> Vec<String> {
    list.map(|l| {
        l.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

fn map(entries: Vec<(&str, Value)>) -> Mapping {
    entries.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

fn env(name: &str, value: impl Into<String>) -> Value {
    Value::Mapping(map(vec![
        ("name", name.into()),
        ("value", value.into().into()),
    ]))
}

fn env_field(name: &str, field: &str) -> Value {
    Value::Mapping(map(vec![
        ("name", name.into()),
        (
            "valueFrom",
            Value::Mapping(map(vec![(
                "fieldRef",
                Value::Mapping(map(vec![("fieldPath", field.into())])),
            )])),
        ),
    ]))
}

fn port(name: &str, number: u16) -> Value {
    Value::Mapping(map(vec![
        ("name", name.into()),
        ("containerPort", u64::from(number).into()),
    ]))
}

fn init_container(config: &InjectConfig, skip_in: &[String], skip_out: &[String]) -> Value {
    let mut args: Vec<Value> = vec![
        "init".into(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string().into(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string().into(),
        "--proxy-uid".into(),
        PROXY_UID.to_string().into(),
        "--skip-inbound-ports".into(),
        skip_in.join(",").into(),
    ];
    if !skip_out.is_empty() {
        args.push("--skip-outbound-ports".into());
        args.push(skip_out.join(",").into());
    }
    Value::Mapping(map(vec![
        ("name", INIT_CONTAINER.into()),
        ("image", config.image.clone().into()),
        ("imagePullPolicy", "IfNotPresent".into()),
        ("args", Value::Sequence(args)),
        (
            "resources",
            Value::Mapping(map(vec![
                (
                    "requests",
                    Value::Mapping(map(vec![("cpu", "10m".into()), ("memory", "10Mi".into())])),
                ),
                (
                    "limits",
                    Value::Mapping(map(vec![("cpu", "100m".into()), ("memory", "20Mi".into())])),
                ),
            ])),
        ),
        // iptables needs root and these two capabilities, for this one step only.
        (
            "securityContext",
            Value::Mapping(map(vec![
                ("runAsUser", 0u64.into()),
                ("runAsNonRoot", false.into()),
                ("allowPrivilegeEscalation", false.into()),
                ("readOnlyRootFilesystem", true.into()),
                (
                    "capabilities",
                    Value::Mapping(map(vec![
                        (
                            "add",
                            Value::Sequence(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                        ),
                        ("drop", Value::Sequence(vec!["ALL".into()])),
                    ])),
                ),
            ])),
        ),
    ]))
}

fn proxy_container(pod: &PodTemplate<'_>, config: &InjectConfig, app_ports: &[u16]) -> Mapping {
    let mut envs = vec![
        env("PYLON_INBOUND_ADDR", format!("0.0.0.0:{INBOUND_PORT}")),
        env("PYLON_OUTBOUND_ADDR", format!("127.0.0.1:{OUTBOUND_PORT}")),
        env("PYLON_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
        env("PYLON_TAP_ADDR", format!("0.0.0.0:{TAP_PORT}")),
        env_field("PYLON_NAMESPACE", "metadata.namespace"),
        env_field("PYLON_POD", "metadata.name"),
        env_field("_pod_sa", "spec.serviceAccountName"),
        env(
            "PYLON_DESTINATION_ADDR",
            config.control_plane_addr("pylon-dst", 8086),
        ),
        env(
            "PYLON_POLICY_ADDR",
            config.control_plane_addr("pylon-policy", 8090),
        ),
        env("PYLON_CLUSTER_DOMAIN", config.cluster_domain.clone()),
    ];
    if let Some((kind, name)) = &pod.workload {
        envs.push(env("PYLON_WORKLOAD", format!("{kind}/{name}")));
    }
    if !app_ports.is_empty() {
        let ports: Vec<String> = app_ports.iter().map(u16::to_string).collect();
        envs.push(env("PYLON_INBOUND_PORTS", ports.join(",")));
    }
    if let Some(anchors) = &config.trust_anchors_pem {
        envs.push(env(
            "PYLON_IDENTITY_ADDR",
            config.control_plane_addr("pylon-identity", 8080),
        ));
        envs.push(env(
            "PYLON_IDENTITY_NAME",
            format!(
                "$(_pod_sa).$(PYLON_NAMESPACE).serviceaccount.identity.pylon.{}",
                config.trust_domain
            ),
        ));
        envs.push(env(
            "PYLON_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_VOLUME}"),
        ));
        envs.push(env("PYLON_IDENTITY_TRUST_ANCHORS", anchors.clone()));
    }
    if let Some(level) = annotation(pod, "proxy-log-level") {
        envs.push(env("PYLON_LOG", level));
    }
    if let Some(ports) = annotation(pod, "opaque-ports") {
        envs.push(env("PYLON_OPAQUE_PORTS", ports));
    }
    if let Some(policy) = annotation(pod, "default-inbound-policy") {
        envs.push(env("PYLON_DEFAULT_POLICY", policy));
    }

    let quantity =
        |name: &str, default: &str| annotation(pod, name).unwrap_or_else(|| default.to_string());
    let mut limits = Mapping::new();
    for (key, name) in [("cpu", "proxy-cpu-limit"), ("memory", "proxy-memory-limit")] {
        if let Some(v) = annotation(pod, name) {
            limits.insert(key.into(), v.into());
        }
    }
    let mut resources = map(vec![(
        "requests",
        Value::Mapping(map(vec![
            ("cpu", quantity("proxy-cpu-request", "100m").into()),
            ("memory", quantity("proxy-memory-request", "20Mi").into()),
        ])),
    )]);
    if !limits.is_empty() {
        resources.insert("limits".into(), Value::Mapping(limits));
    }
    let probe = |path: &str| {
        Value::Mapping(map(vec![
            (
                "httpGet",
                Value::Mapping(map(vec![
                    ("path", path.into()),
                    ("port", u64::from(ADMIN_PORT).into()),
                ])),
            ),
            ("initialDelaySeconds", 1u64.into()),
            ("periodSeconds", 10u64.into()),
        ]))
    };
    let mut container = map(vec![
        ("name", PROXY_CONTAINER.into()),
        ("image", config.image.clone().into()),
        ("imagePullPolicy", "IfNotPresent".into()),
        (
            "ports",
            Value::Sequence(vec![
                port("pylon-proxy", INBOUND_PORT),
                port("pylon-admin", ADMIN_PORT),
                port("pylon-tap", TAP_PORT),
            ]),
        ),
        ("env", Value::Sequence(envs)),
        ("livenessProbe", probe("/live")),
        ("readinessProbe", probe("/ready")),
        ("resources", Value::Mapping(resources)),
        (
            "securityContext",
            Value::Mapping(map(vec![
                ("runAsUser", u64::from(PROXY_UID).into()),
                ("runAsGroup", u64::from(PROXY_UID).into()),
                ("runAsNonRoot", true.into()),
                ("readOnlyRootFilesystem", true.into()),
                ("allowPrivilegeEscalation", false.into()),
                (
                    "capabilities",
                    Value::Mapping(map(vec![("drop", Value::Sequence(vec!["ALL".into()]))])),
                ),
                (
                    "seccompProfile",
                    Value::Mapping(map(vec![("type", "RuntimeDefault".into())])),
                ),
            ])),
        ),
        ("terminationMessagePolicy", "FallbackToLogsOnError".into()),
    ]);
    if config.trust_anchors_pem.is_some() {
        container.insert(
            "volumeMounts".into(),
            Value::Sequence(vec![Value::Mapping(map(vec![
                ("name", TOKEN_VOLUME.into()),
                ("mountPath", TOKEN_DIR.into()),
                ("readOnly", true.into()),
            ]))]),
        );
    }
    container
}

/// A ServiceAccount token for the identity service's audience, rotated by the kubelet.
fn token_volume() -> Value {
    Value::Mapping(map(vec![
        ("name", TOKEN_VOLUME.into()),
        (
            "projected",
            Value::Mapping(map(vec![(
                "sources",
                Value::Sequence(vec![Value::Mapping(map(vec![(
                    "serviceAccountToken",
                    Value::Mapping(map(vec![
                        ("path", TOKEN_VOLUME.into()),
                        ("expirationSeconds", 86_400u64.into()),
                        ("audience", TOKEN_AUDIENCE.into()),
                    ])),
                )]))]),
            )])),
        ),
    ]))
}

#[cfg(test)]
mod tests;
