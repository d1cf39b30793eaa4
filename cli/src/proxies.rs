//! Finding the proxies of a mesh, and what each belongs to, so `stat`, `tap` and `top` can
//! name them all with one `--config-dir DIR` instead of a `--proxy` per pod, and `tap`, `top`
//! and `profile --tap` of `deployment/X` can use X's proxies only.
//!
//! The dir holds Kubernetes-shaped objects (what `kubectl get pods -o yaml` writes, or what
//! `pylon demo` writes for its loopback mesh), read with the proxy's own parser. A meshed pod
//! is a `v1 Pod` with a container port named `pylon-admin` (or Linkerd's `linkerd-admin`); its
//! proxy's admin server is at the pod's IP and that port. The pod's workload comes from its
//! owner (a ReplicaSet's Deployment by the pod's `pod-template-hash`), as the control plane
//! names it; a bare pod's, and that of a proxy named with `--proxy`, from the proxy's own
//! labels (`proxy_build_info{namespace, deployment, pod}`, its `--namespace`, `--workload`,
//! `--pod`). The dir's EndpointSlices and Pods also say which pod and workload an endpoint
//! address is, which the proxies' tap events may not (see [`DirMesh::endpoint_labels`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use pylon_proxy_policy::{MeshObject, Pod, Store, StoreConfig, WorkloadKind};

use crate::demo::admin_client;
use crate::flags::ProxyFlags;
use crate::stat::resource::{Kind, Resource};

/// The names a proxy's admin port goes by in a pod spec.
const ADMIN_PORT_NAMES: &[&str] = &["pylon-admin", "linkerd-admin"];

/// A destination's labels as outbound metrics name them (`dst_namespace`, `dst_service`,
/// `dst_pod`, `dst_deployment`, ...).
pub type DstLabels = BTreeMap<String, String>;

/// What a proxy is known to belong to. `None` fields are unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// `("deployment", "web")`: the workload kind's label and the workload's name.
    pub workload: Option<(String, String)>,
}

impl Owner {
    fn of_pod(pod: &Pod) -> Owner {
        let workload = pod.workload();
        Owner {
            namespace: Some(pod.meta.namespace.to_string()),
            pod: Some(pod.meta.name.to_string()),
            // A bare pod's workload is the proxy's to say (its --workload).
            workload: (workload.kind != WorkloadKind::Pod)
                .then(|| (workload.kind.label().to_string(), workload.name.to_string())),
        }
    }

    /// Fills what is unknown here from `other`.
    fn fill(&mut self, other: Owner) {
        self.namespace = self.namespace.take().or(other.namespace);
        self.pod = self.pod.take().or(other.pod);
        self.workload = self.workload.take().or(other.workload);
    }

    /// Whether this is a proxy of `res` (a workload kind) read in `namespace` (`None`: any):
    /// `None` when what would tell is unknown.
    pub fn belongs_to(&self, res: &Resource, namespace: Option<&str>) -> Option<bool> {
        let name = res.name.as_deref();
        let own = match res.kind {
            Kind::Namespace => {
                return match name {
                    None => Some(true),
                    Some(n) => self.namespace.as_ref().map(|have| have == n),
                }
            }
            Kind::Deployment => self
                .workload
                .as_ref()
                .map(|(kind, have)| kind == "deployment" && name.is_none_or(|n| n == have)),
            Kind::Pod => self.pod.as_ref().map(|have| name.is_none_or(|n| n == have)),
            // Services and authorities are destinations, not a proxy's own.
            Kind::Service | Kind::Authority => return Some(true),
        };
        let in_namespace = match (res.namespace_or(namespace), &self.namespace) {
            (None, _) => Some(true),
            (Some(want), Some(have)) => Some(want == have),
            (Some(_), None) => None,
        };
        match (in_namespace, own) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        }
    }
}

impl fmt::Display for Owner {
    /// `pod web-5d8f7-x2x4z, deployment/web, namespace default`, or what of it is known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut facts = Vec::new();
        if let Some(pod) = &self.pod {
            facts.push(format!("pod {pod}"));
        }
        if let Some((kind, name)) = &self.workload {
            facts.push(format!("{kind}/{name}"));
        }
        if let Some(ns) = &self.namespace {
            facts.push(format!("namespace {ns}"));
        }
        if facts.is_empty() {
            return f.write_str("workload unknown");
        }
        f.write_str(&facts.join(", "))
    }
}

/// A proxy, and what it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub admin: SocketAddr,
    pub owner: Owner,
    /// Listed by the config dir (rather than named with `--proxy` only).
    pub from_dir: bool,
    /// Asked for its labels already: `Err` says why that failed.
    asked: Option<Result<(), String>>,
}

/// What a config dir says of the mesh.
#[derive(Debug)]
pub struct DirMesh {
    dir: PathBuf,
    /// The meshed pods' proxies, by admin address.
    proxies: BTreeMap<SocketAddr, Owner>,
    /// Why asking a proxy for its labels failed, by admin address.
    unasked: BTreeMap<SocketAddr, String>,
    /// Endpoint address -> its labels, from the EndpointSlices naming their pods.
    endpoints: HashMap<SocketAddr, DstLabels>,
    /// Pod IP -> the labels of the one pod with it (`None`: several pods share it, as on
    /// loopback, so the IP alone names none of them).
    by_ip: HashMap<IpAddr, Option<DstLabels>>,
}

/// `dst_pod`, `dst_deployment`, `dst_serviceaccount`... and `dst_namespace`: the labels a
/// proxy gives an endpoint on `pod` (the control plane's `metric_labels`, prefixed).
fn pod_dst_labels(pod: &Pod) -> DstLabels {
    let mut out: DstLabels = pod
        .metric_labels()
        .into_iter()
        .map(|(k, v)| (format!("dst_{k}"), v))
        .collect();
    out.insert("dst_namespace".into(), pod.meta.namespace.to_string());
    out
}

impl DirMesh {
    /// Reads `dir` once, with the proxies' parser (objects it rejects are left out, as the
    /// proxies leave them out; `pylon check DIR` reports them).
    pub fn load(dir: &Path) -> Result<DirMesh> {
        let store = Store::load_dir(dir, StoreConfig::default())
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading the config dir {}", dir.display()))?;
        let snapshot = store.snapshot();
        let mut proxies = BTreeMap::new();
        let mut pods_by_ip: HashMap<IpAddr, Vec<&Pod>> = HashMap::new();
        for object in snapshot.objects() {
            let MeshObject::Pod(pod) = object else {
                continue;
            };
            for ip in &pod.ips {
                pods_by_ip.entry(*ip).or_default().push(pod);
            }
            let port = ADMIN_PORT_NAMES
                .iter()
                .find_map(|name| pod.named_port(name));
            if let (Some(ip), Some(port)) = (pod.ips.first(), port) {
                proxies.insert(SocketAddr::new(*ip, port), Owner::of_pod(pod));
            }
        }
        if proxies.is_empty() {
            bail!(
                "no meshed pods in {}: expected v1 Pods with a container port named pylon-admin (their proxy's admin port) and status.podIP",
                dir.display()
            );
        }
        let mut endpoints = HashMap::new();
        for object in snapshot.objects() {
            let MeshObject::EndpointSlice(slice) = object else {
                continue;
            };
            let namespace = &slice.meta.namespace;
            for ep in &slice.endpoints {
                let (Some(ip), Some(pod)) = (ep.address, ep.pod.as_deref()) else {
                    continue;
                };
                let Some(pod) = snapshot.pod(namespace, pod) else {
                    continue;
                };
                let labels = pod_dst_labels(pod);
                for port in slice.ports.iter().filter_map(|p| p.port) {
                    endpoints.insert(SocketAddr::new(ip, port), labels.clone());
                }
            }
        }
        let by_ip = pods_by_ip
            .into_iter()
            .map(|(ip, pods)| {
                let one = match pods.as_slice() {
                    [pod] => Some(pod_dst_labels(pod)),
                    _ => None,
                };
                (ip, one)
            })
            .collect();
        Ok(DirMesh {
            dir: dir.to_path_buf(),
            proxies,
            unasked: BTreeMap::new(),
            endpoints,
            by_ip,
        })
    }

    /// Asks the proxies of the pods whose owner names no workload (bare pods, as `pylon demo`
    /// writes them) for their own labels, all at once, so that both those proxies and the
    /// endpoints on their pods are placed.
    pub async fn learn_workloads(&mut self) {
        let mut asks = tokio::task::JoinSet::new();
        for (admin, owner) in &self.proxies {
            if owner.workload.is_none() {
                let admin = *admin;
                asks.spawn(async move { (admin, ask_owner(admin).await) });
            }
        }
        while let Some(joined) = asks.join_next().await {
            let Ok((admin, answer)) = joined else {
                continue;
            };
            match answer {
                Ok(owner) => {
                    if let Some(known) = self.proxies.get_mut(&admin) {
                        known.fill(owner);
                    }
                }
                Err(e) => {
                    self.unasked.insert(admin, format!("{e:#}"));
                }
            }
        }
        let placed: HashMap<(&str, &str), &(String, String)> = self
            .proxies
            .values()
            .filter_map(|o| {
                Some((
                    (o.namespace.as_deref()?, o.pod.as_deref()?),
                    o.workload.as_ref()?,
                ))
            })
            .collect();
        let endpoints = self
            .endpoints
            .values_mut()
            .chain(self.by_ip.values_mut().flatten());
        for labels in endpoints {
            let workload = match (labels.get("dst_namespace"), labels.get("dst_pod")) {
                (Some(ns), Some(pod)) => placed.get(&(ns.as_str(), pod.as_str())),
                _ => None,
            };
            if let Some((kind, name)) = workload {
                labels
                    .entry(format!("dst_{kind}"))
                    .or_insert_with(|| name.clone());
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin addresses of every meshed pod (sorted, no duplicates).
    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        self.proxies.keys().copied().collect()
    }

    /// The labels a proxy gives the endpoint at `addr` (`dst_pod`, `dst_deployment`,
    /// `dst_namespace`...): its EndpointSlice's pod (`targetRef`), else the one pod with its
    /// IP. `None` when the dir doesn't say.
    pub fn endpoint_labels(&self, addr: SocketAddr) -> Option<&DstLabels> {
        self.endpoints
            .get(&addr)
            .or_else(|| self.by_ip.get(&addr.ip())?.as_ref())
    }
}

/// The admin addresses of every meshed pod in `dir` (sorted, no duplicates).
pub fn admin_addrs_in_dir(dir: &Path) -> Result<Vec<SocketAddr>> {
    Ok(DirMesh::load(dir)?.admin_addrs())
}

/// The proxies a command talks to: those named with `--proxy` and those listed in
/// `--config-dir`, each once (a proxy named both ways would otherwise be scraped or tapped
/// twice, and its numbers counted twice).
pub fn resolve(named: &[SocketAddr], dir: Option<&Path>) -> Result<Vec<SocketAddr>> {
    let mut all: BTreeSet<SocketAddr> = named.iter().copied().collect();
    if let Some(dir) = dir {
        all.extend(admin_addrs_in_dir(dir)?);
    }
    Ok(all.into_iter().collect())
}

/// The proxies the flags name, each once with what the dir (and, for its bare pods, their
/// proxies) says of it, and the dir's mesh.
pub async fn locate(flags: &ProxyFlags) -> Result<(Vec<Located>, Option<DirMesh>)> {
    let mut mesh = flags.config_dir.as_deref().map(DirMesh::load).transpose()?;
    if let Some(mesh) = &mut mesh {
        mesh.learn_workloads().await;
    }
    let mut all: BTreeMap<SocketAddr, Located> = BTreeMap::new();
    if let Some(mesh) = &mesh {
        for (admin, owner) in &mesh.proxies {
            let asked = match mesh.unasked.get(admin) {
                Some(e) => Some(Err(e.clone())),
                None => owner.workload.is_some().then_some(Ok(())),
            };
            all.insert(
                *admin,
                Located {
                    admin: *admin,
                    owner: owner.clone(),
                    from_dir: true,
                    asked,
                },
            );
        }
    }
    for admin in &flags.proxies {
        all.entry(*admin).or_insert(Located {
            admin: *admin,
            owner: Owner::default(),
            from_dir: false,
            asked: None,
        });
    }
    Ok((all.into_values().collect(), mesh))
}

/// What a proxy says it belongs to: the constant labels of its `proxy_build_info`.
pub async fn ask_owner(admin: SocketAddr) -> Result<Owner> {
    let text = admin_client::metrics(admin).await?;
    let samples = pylon_proxy_metrics::exposition::parse(&text)
        .with_context(|| format!("reading GET http://{admin}/metrics"))?;
    Ok(owner_from_samples(&samples))
}

fn owner_from_samples(samples: &[pylon_proxy_metrics::exposition::Sample]) -> Owner {
    let Some(info) = samples.iter().find(|s| s.name == "proxy_build_info") else {
        return Owner::default();
    };
    let label = |k: &str| info.label(k).filter(|v| !v.is_empty()).map(str::to_string);
    Owner {
        namespace: label("namespace"),
        pod: label("pod"),
        workload: label("deployment").map(|d| ("deployment".to_string(), d)),
    }
}

/// The proxies of `of` (a workload: `deployment/X`, `pod/X`, `ns/X`) among `located`, read in
/// `namespace`. A proxy whose pod the dir doesn't place is asked for its labels. One known to
/// be another workload's is left out; one nothing places is kept when named with `--proxy`
/// (the operator chose it) and left out when only the dir lists it (the dir lists the whole
/// mesh). No proxy left is an error naming those there are.
pub async fn scope(
    mut located: Vec<Located>,
    of: &Resource,
    namespace: Option<&str>,
    source: &str,
) -> Result<Vec<Located>> {
    for p in &mut located {
        if p.owner.belongs_to(of, namespace).is_none() && p.asked.is_none() {
            p.asked = Some(match ask_owner(p.admin).await {
                Ok(owner) => {
                    p.owner.fill(owner);
                    Ok(())
                }
                Err(e) => Err(format!("{e:#}")),
            });
        }
    }
    let unasked: Vec<String> = located
        .iter()
        .filter_map(|p| match &p.asked {
            Some(Err(e)) => Some(format!("{}: {e}", p.admin)),
            _ => None,
        })
        .collect();
    let (kept, left): (Vec<Located>, Vec<Located>) =
        located
            .into_iter()
            .partition(|p| match p.owner.belongs_to(of, namespace) {
                Some(known) => known,
                None => !p.from_dir,
            });
    if !kept.is_empty() {
        return Ok(kept);
    }
    let ns = match of.namespace_or(namespace) {
        Some(ns) if of.kind != Kind::Namespace => format!(" in namespace {ns}"),
        _ => String::new(),
    };
    let mut msg = format!("no proxy of {of}{ns} in {source}");
    if !left.is_empty() {
        const SHOWN: usize = 10;
        let there: Vec<String> = left
            .iter()
            .take(SHOWN)
            .map(|p| format!("{} ({})", p.admin, p.owner))
            .collect();
        let more = left.len().saturating_sub(SHOWN);
        msg.push_str(&format!(
            "; the proxies there are {}{}",
            there.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    if let Some(first) = unasked.first() {
        let more = match unasked.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        msg.push_str(&format!(
            "; could not ask {} for their workload: {first}{more}",
            if unasked.len() == 1 {
                "a proxy"
            } else {
                "proxies"
            }
        ));
    }
    bail!("{msg} (check the name and -n)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
  - name: pylon-proxy
    ports: [{name: pylon-admin, containerPort: 4191}]
status: {podIP: 10.0.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy}
spec:
  containers: [{name: app, ports: [{name: http, containerPort: 80}]}]
status: {podIP: 10.0.0.8}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: api-0}
  spec:
    containers: [{name: linkerd-proxy, ports: [{name: linkerd-admin, containerPort: 4191}]}]
  status: {podIPs: [{ip: 'fd00::9'}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
";

    #[test]
    fn finds_meshed_pods_and_their_admin_ports() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pods.yaml"), PODS).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "kind: Pod").expect("write");
        std::fs::write(dir.path().join("broken.yaml"), "kind: [").expect("write");
        let addrs = admin_addrs_in_dir(dir.path()).expect("pods");
        let want: Vec<SocketAddr> = vec![
            "10.0.0.7:4191".parse().expect("addr"),
            "[fd00::9]:4191".parse().expect("addr"),
        ];
        assert_eq!(addrs, want);
    }

    #[test]
    fn a_proxy_named_twice_is_used_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("PODS.YAML"), PODS).expect("write");
        let named: Vec<SocketAddr> = vec![
            "10.0.0.7:4191".parse().expect("addr"),
            "10.0.0.7:4191".parse().expect("addr"),
            "127.0.0.1:4191".parse().expect("addr"),
        ];
        let all = resolve(&named, Some(dir.path())).expect("resolve");
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(resolve(&named, None).expect("resolve").len(), 2);
    }

    #[tokio::test]
    async fn located_proxies_merge_the_dir_and_the_flags() {
        // A bare pod's proxy is asked for its labels: nothing listens there (a port just
        // freed), so it stays unplaced, with the reason.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("tempdir");
        let bare = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0}}\nspec:\n  containers: [{{name: pylon-proxy, ports: [{{name: pylon-admin, containerPort: {}}}]}}]\nstatus: {{podIP: 127.0.0.1}}\n",
            closed.port()
        );
        std::fs::write(dir.path().join("pods.yaml"), bare).expect("write");
        let flags = ProxyFlags {
            proxies: vec![closed, "127.0.0.1:1".parse().expect("addr")],
            config_dir: Some(dir.path().to_path_buf()),
        };
        let (located, mesh) = locate(&flags).await.expect("locate");
        assert!(mesh.is_some());
        assert_eq!(located.len(), 2, "{located:?}");
        let web = located.iter().find(|p| p.admin == closed).expect("web-0");
        assert!(web.from_dir, "the dir's facts win: {web:?}");
        assert_eq!(web.owner.pod.as_deref(), Some("web-0"));
        assert!(
            matches!(&web.asked, Some(Err(e)) if e.contains("/metrics")),
            "{web:?}"
        );
        let named = located.iter().find(|p| p.admin != closed).expect("named");
        assert_eq!((named.from_dir, &named.asked), (false, &None));
    }

    #[test]
    fn a_dir_without_meshed_pods_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\n",
        )
        .expect("write");
        let err = admin_addrs_in_dir(dir.path()).expect_err("no pods");
        assert!(err.to_string().contains("no meshed pods"), "{err}");
        let err = admin_addrs_in_dir(&dir.path().join("missing")).expect_err("no dir");
        assert!(err.to_string().contains("reading the config dir"), "{err}");
    }

    /// Two deployments' pods on one IP (loopback), `b` behind service `b`.
    const MESH: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: a-5c6d7-aaaaa
  namespace: default
  labels: {pod-template-hash: 5c6d7}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: a-5c6d7, uid: u1, controller: true}]
spec:
  serviceAccountName: a
  containers: [{name: pylon-proxy, ports: [{name: pylon-admin, containerPort: 4191}]}]
status: {podIP: 127.0.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: b-7d9f8-bbbbb
  namespace: default
  labels: {pod-template-hash: 7d9f8}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: b-7d9f8, uid: u2, controller: true}]
spec:
  serviceAccountName: b
  containers: [{name: pylon-proxy, ports: [{name: pylon-admin, containerPort: 4192}]}]
status: {podIP: 127.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: lone, namespace: shop}
spec:
  containers: [{name: pylon-proxy, ports: [{name: pylon-admin, containerPort: 4193}]}]
status: {podIP: 10.1.0.3}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: b-1
  namespace: default
  labels: {kubernetes.io/service-name: b}
addressType: IPv4
ports: [{name: http, port: 4143}]
endpoints:
- addresses: ['127.0.0.1']
  targetRef: {kind: Pod, name: b-7d9f8-bbbbb, namespace: default}
";

    fn mesh() -> (tempfile::TempDir, DirMesh) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), MESH).expect("write");
        let mesh = DirMesh::load(dir.path()).expect("load");
        (dir, mesh)
    }

    fn r(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    #[test]
    fn pods_are_placed_by_their_owner_and_endpoints_by_their_slice() {
        let (_dir, mesh) = mesh();
        let a = &mesh.proxies[&"127.0.0.1:4191".parse().expect("addr")];
        assert_eq!(
            a.workload,
            Some(("deployment".to_string(), "a".to_string()))
        );
        assert_eq!(
            a.to_string(),
            "pod a-5c6d7-aaaaa, deployment/a, namespace default"
        );
        assert_eq!(Owner::default().to_string(), "workload unknown");
        let lone = &mesh.proxies[&"10.1.0.3:4193".parse().expect("addr")];
        assert_eq!(lone.workload, None, "a bare pod's proxy says");
        assert_eq!(lone.namespace.as_deref(), Some("shop"));

        let b = mesh
            .endpoint_labels("127.0.0.1:4143".parse().expect("addr"))
            .expect("b's endpoint");
        assert_eq!(b["dst_deployment"], "b");
        assert_eq!(b["dst_pod"], "b-7d9f8-bbbbb");
        assert_eq!(b["dst_namespace"], "default");
        assert_eq!(b["dst_serviceaccount"], "b");
        // Loopback is every pod's IP here: the address alone names no pod.
        assert_eq!(
            mesh.endpoint_labels("127.0.0.1:9999".parse().expect("addr")),
            None
        );
        // A pod alone on its IP is that IP's.
        let lone = mesh
            .endpoint_labels("10.1.0.3:8080".parse().expect("addr"))
            .expect("by IP");
        assert_eq!(lone["dst_pod"], "lone");
    }

    #[test]
    fn owners_belong_to_workloads_by_name_and_namespace() {
        let (_dir, mesh) = mesh();
        let a = &mesh.proxies[&"127.0.0.1:4191".parse().expect("addr")];
        let ns = Some("default");
        assert_eq!(a.belongs_to(&r("deploy/a"), ns), Some(true));
        assert_eq!(a.belongs_to(&r("deploy/b"), ns), Some(false));
        assert_eq!(a.belongs_to(&r("deploy/a"), Some("shop")), Some(false));
        assert_eq!(a.belongs_to(&r("deploy/a"), None), Some(true));
        assert_eq!(a.belongs_to(&r("pod/a-5c6d7-aaaaa"), ns), Some(true));
        assert_eq!(a.belongs_to(&r("ns/default"), Some("shop")), Some(true));
        assert_eq!(a.belongs_to(&r("ns/shop"), ns), Some(false));
        assert_eq!(a.belongs_to(&r("deployment"), ns), Some(true));
        let unknown = Owner::default();
        assert_eq!(unknown.belongs_to(&r("deploy/a"), ns), None);
        let lone = &mesh.proxies[&"10.1.0.3:4193".parse().expect("addr")];
        assert_eq!(lone.belongs_to(&r("deploy/a"), Some("shop")), None);
        assert_eq!(lone.belongs_to(&r("deploy/a"), ns), Some(false));
    }

    #[test]
    fn a_proxy_tells_its_workload_by_its_labels() {
        let text = "# TYPE proxy_build_info gauge\nproxy_build_info{namespace=\"default\",deployment=\"web\",pod=\"\",version=\"0.1.0\"} 1\n";
        let samples = pylon_proxy_metrics::exposition::parse(text).expect("parse");
        let owner = owner_from_samples(&samples);
        assert_eq!(
            owner,
            Owner {
                namespace: Some("default".into()),
                pod: None,
                workload: Some(("deployment".into(), "web".into())),
            }
        );
        assert_eq!(owner_from_samples(&[]), Owner::default());
        let mut dir_facts = Owner {
            pod: Some("web-0".into()),
            ..Owner::default()
        };
        dir_facts.fill(owner);
        assert_eq!(dir_facts.pod.as_deref(), Some("web-0"));
        assert_eq!(dir_facts.namespace.as_deref(), Some("default"));
    }

    #[tokio::test]
    async fn scoping_keeps_the_workloads_proxies_and_names_the_others() {
        let (_dir, mesh) = mesh();
        let located: Vec<Located> = mesh
            .proxies
            .iter()
            .filter(|(_, o)| o.workload.is_some())
            .map(|(admin, owner)| Located {
                admin: *admin,
                owner: owner.clone(),
                from_dir: true,
                asked: Some(Ok(())),
            })
            .collect();
        let kept = scope(located.clone(), &r("deploy/b"), Some("default"), "DIR")
            .await
            .expect("b's proxy");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].admin.port(), 4192);
        let err = scope(located, &r("deploy/c"), Some("default"), "DIR")
            .await
            .expect_err("no c");
        let err = err.to_string();
        assert!(
            err.starts_with("no proxy of deployment/c in namespace default in DIR"),
            "{err}"
        );
        assert!(
            err.contains("127.0.0.1:4192 (pod b-7d9f8-bbbbb, deployment/b, namespace default)"),
            "{err}"
        );
    }
}
