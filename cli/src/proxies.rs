//! Finding the proxies of a mesh from its config dir, so `stat`, `tap` and `top` can name
//! them all with one `--config-dir DIR` instead of a `--proxy` per pod.
//!
//! The dir holds Kubernetes-shaped objects (what `kubectl get pods -o yaml` writes, or what
//! `pylon demo` writes for its loopback mesh). A meshed pod is a `v1 Pod` with a container
//! port named `pylon-admin` (or Linkerd's `linkerd-admin`); its proxy's admin server is at
//! the pod's IP and that port. Other objects and unmeshed pods are ignored, so the same dir
//! the proxies read works here.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// The names a proxy's admin port goes by in a pod spec.
const ADMIN_PORT_NAMES: &[&str] = &["pylon-admin", "linkerd-admin"];

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

/// The admin addresses of every meshed pod in `dir` (sorted, no duplicates).
pub fn admin_addrs_in_dir(dir: &Path) -> Result<Vec<SocketAddr>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the config dir {}", dir.display()))?;
    let mut out = BTreeSet::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading the config dir {}", dir.display()))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !pylon_proxy_policy::is_config_file_name(name) || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            // A file the proxies would reject is theirs to report (`pylon check`); here the
            // rest of a file that isn't YAML just lists no pods (the parser can't resume).
            let Ok(value) = Value::deserialize(doc) else {
                break;
            };
            pods_of(&value, &mut out);
        }
    }
    if out.is_empty() {
        bail!(
            "no meshed pods in {}: expected v1 Pods with a container port named pylon-admin (their proxy's admin port) and status.podIP",
            dir.display()
        );
    }
    Ok(out.into_iter().collect())
}

/// Adds the admin address of `doc` if it is a meshed Pod, or of each item of a `List`.
fn pods_of(doc: &Value, out: &mut BTreeSet<SocketAddr>) {
    match doc["kind"].as_str() {
        Some("List") | Some("PodList") => {
            for item in doc["items"].as_sequence().into_iter().flatten() {
                pods_of(item, out);
            }
        }
        Some("Pod") if doc["apiVersion"].as_str() == Some("v1") => {
            if let Some(addr) = admin_addr(doc) {
                out.insert(addr);
            }
        }
        _ => {}
    }
}

fn admin_addr(pod: &Value) -> Option<SocketAddr> {
    let ip: IpAddr = pod["status"]["podIP"]
        .as_str()
        .or_else(|| pod["status"]["podIPs"][0]["ip"].as_str())?
        .parse()
        .ok()?;
    let port = pod["spec"]["containers"]
        .as_sequence()?
        .iter()
        .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
        .find(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| ADMIN_PORT_NAMES.contains(&n))
        })?["containerPort"]
        .as_u64()?;
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
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
}
