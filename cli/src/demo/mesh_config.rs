//! The demo's mesh objects, as the YAML a user would drop into `--config-dir`: one `v1 Service`,
//! one `discovery.k8s.io/v1 EndpointSlice` per endpoint (each endpoint is a proxy on its own
//! loopback port, and a slice has a single port list), and a `linkerd.io/v1alpha2`
//! ServiceProfile with routes, a timeout and a retry budget, so route metrics have names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// File name of the objects inside the config dir.
pub const FILE_NAME: &str = "ml-inference.yaml";
/// Where the demo lists its pods.
pub const PODS_FILE_NAME: &str = "pods.yaml";

/// One endpoint of the service: the pod's name and the address its inbound proxy listens on.
pub struct EndpointObject<'a> {
    pub pod: &'a str,
    pub addr: SocketAddr,
}

/// Renders the Service and its EndpointSlices as one multi-document YAML file.
/// `identity`: the endpoints' mTLS identity (`pylon.io/identity` on each slice).
pub fn render(
    service: &str,
    namespace: &str,
    port: u16,
    endpoints: &[EndpointObject],
    identity: Option<&str>,
) -> String {
    let annotations = identity
        .map(|id| format!("  annotations:\n    pylon.io/identity: {id}\n"))
        .unwrap_or_default();
    let mut yaml = format!(
        "# Written by `pylon demo`: the service the demo's load generator calls.\n\
         apiVersion: v1\n\
         kind: Service\n\
         metadata:\n  name: {service}\n  namespace: {namespace}\n\
         spec:\n  selector:\n    app: {service}\n  ports:\n  \
         - name: http\n    port: {port}\n    protocol: TCP\n    targetPort: http\n"
    );
    yaml.push_str(&format!(
        "---\n\
         apiVersion: linkerd.io/v1alpha2\n\
         kind: ServiceProfile\n\
         metadata:\n  name: {service}.{namespace}.svc.cluster.local\n  namespace: {namespace}\n\
         spec:\n  routes:\n  \
         - name: POST /predict\n    condition:\n      method: POST\n      pathRegex: /predict\n    \
         timeout: 2s\n  \
         - name: GET /v1/models/{{id}}\n    condition:\n      method: GET\n      \
         pathRegex: /v1/models/[^/]+\n    isRetryable: true\n    timeout: 500ms\n  \
         retryBudget:\n    retryRatio: 0.2\n    minRetriesPerSecond: 10\n    ttl: 10s\n"
    ));
    for endpoint in endpoints {
        let pod = endpoint.pod;
        let ip = endpoint.addr.ip();
        let address_type = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        let target_port = endpoint.addr.port();
        yaml.push_str(&format!(
            "---\n\
             apiVersion: discovery.k8s.io/v1\n\
             kind: EndpointSlice\n\
             metadata:\n  name: {pod}\n  namespace: {namespace}\n  labels:\n    \
             kubernetes.io/service-name: {service}\n{annotations}\
             addressType: {address_type}\n\
             ports:\n- name: http\n  port: {target_port}\n  protocol: TCP\n\
             endpoints:\n- addresses:\n  - \"{ip}\"\n  conditions:\n    ready: true\n  \
             targetRef:\n    kind: Pod\n    name: {pod}\n    namespace: {namespace}\n"
        ));
    }
    yaml
}

/// A pod of the demo with a proxy, listed so `pylon stat --config-dir` finds every proxy.
pub struct PodObject<'a> {
    pub pod: &'a str,
    pub app: &'a str,
    pub admin: SocketAddr,
}

/// The `pod-template-hash` of every demo pod: its ReplicaSet is `APP-HASH`, which is how a
/// pod's Deployment is known (so `stat --to deployment/ml-inference` works on the demo).
const DEMO_TEMPLATE_HASH: &str = "5d8f7";

/// Renders the demo's pods as `v1 Pod`s of Deployment `app` (through a ReplicaSet, as a
/// cluster has them) whose proxy container names its admin port `pylon-admin`, at
/// `status.podIP` (loopback here, so each pod has its own port).
pub fn render_pods(namespace: &str, pods: &[PodObject]) -> String {
    let mut yaml =
        String::from("# Written by `pylon demo`: its pods and their proxies' admin ports.\n");
    for (i, p) in pods.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        yaml.push_str(&format!(
            "apiVersion: v1\n\
             kind: Pod\n\
             metadata:\n  name: {pod}\n  namespace: {namespace}\n  labels:\n    app: {app}\n    \
             pod-template-hash: {hash}\n  ownerReferences:\n  - apiVersion: apps/v1\n    \
             kind: ReplicaSet\n    name: {app}-{hash}\n    uid: demo-{app}\n    controller: true\n\
             spec:\n  containers:\n  - name: pylon-proxy\n    ports:\n    \
             - name: pylon-admin\n      containerPort: {port}\n\
             status:\n  phase: Running\n  podIP: \"{ip}\"\n  conditions:\n  - type: Ready\n    \
             status: \"True\"\n",
            pod = p.pod,
            app = p.app,
            port = p.admin.port(),
            ip = p.admin.ip(),
            hash = DEMO_TEMPLATE_HASH,
        ));
    }
    yaml
}

/// Writes `contents` to `dir/name` atomically (a hidden temporary file renamed into place),
/// so a proxy watching the directory never reads half a file.
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let staging = dir.join(format!(".{name}.tmp"));
    std::fs::write(&staging, contents).with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, &path)
        .with_context(|| format!("renaming {} into place", staging.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_service_and_one_slice_per_endpoint() {
        let yaml = render(
            "ml-inference",
            "default",
            80,
            &[
                EndpointObject {
                    pod: "ml-inference-1",
                    addr: "127.0.0.1:4001".parse().expect("addr"),
                },
                EndpointObject {
                    pod: "ml-inference-2",
                    addr: "127.0.0.1:4002".parse().expect("addr"),
                },
            ],
            Some("ml-inference.default.serviceaccount.identity.pylon.cluster.local"),
        );
        let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
            .collect();
        assert_eq!(docs.len(), 4);

        let service = &docs[0];
        assert_eq!(service["apiVersion"].as_str(), Some("v1"));
        assert_eq!(service["kind"].as_str(), Some("Service"));
        assert_eq!(service["metadata"]["name"].as_str(), Some("ml-inference"));
        assert_eq!(service["metadata"]["namespace"].as_str(), Some("default"));
        let port = &service["spec"]["ports"][0];
        assert_eq!(port["name"].as_str(), Some("http"));
        assert_eq!(port["port"].as_u64(), Some(80));
        assert_eq!(port["targetPort"].as_str(), Some("http"));

        let profile = &docs[1];
        assert_eq!(profile["kind"].as_str(), Some("ServiceProfile"));
        assert_eq!(
            profile["metadata"]["name"].as_str(),
            Some("ml-inference.default.svc.cluster.local")
        );
        assert_eq!(
            profile["spec"]["routes"][0]["name"].as_str(),
            Some("POST /predict")
        );
        assert_eq!(profile["spec"]["routes"][0]["timeout"].as_str(), Some("2s"));
        assert_eq!(
            profile["spec"]["retryBudget"]["retryRatio"].as_f64(),
            Some(0.2)
        );

        for (slice, (pod, port)) in docs[2..]
            .iter()
            .zip([("ml-inference-1", 4001), ("ml-inference-2", 4002)])
        {
            assert_eq!(slice["apiVersion"].as_str(), Some("discovery.k8s.io/v1"));
            assert_eq!(slice["kind"].as_str(), Some("EndpointSlice"));
            assert_eq!(slice["metadata"]["name"].as_str(), Some(pod));
            assert_eq!(
                slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str(),
                Some("ml-inference")
            );
            assert_eq!(slice["addressType"].as_str(), Some("IPv4"));
            assert_eq!(slice["ports"][0]["name"].as_str(), Some("http"));
            assert_eq!(slice["ports"][0]["port"].as_u64(), Some(port));
            let endpoint = &slice["endpoints"][0];
            assert_eq!(endpoint["addresses"][0].as_str(), Some("127.0.0.1"));
            assert_eq!(endpoint["conditions"]["ready"].as_bool(), Some(true));
            assert_eq!(endpoint["targetRef"]["name"].as_str(), Some(pod));
            assert_eq!(
                slice["metadata"]["annotations"]["pylon.io/identity"].as_str(),
                Some("ml-inference.default.serviceaccount.identity.pylon.cluster.local")
            );
        }
    }

    #[test]
    fn lists_the_pods_so_the_cli_finds_their_proxies() {
        let yaml = render_pods(
            "default",
            &[
                PodObject {
                    pod: "loadgen-0",
                    app: "loadgen",
                    admin: "127.0.0.1:4191".parse().expect("addr"),
                },
                PodObject {
                    pod: "ml-inference-1",
                    app: "ml-inference",
                    admin: "127.0.0.1:4192".parse().expect("addr"),
                },
            ],
        );
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), PODS_FILE_NAME, &yaml).expect("write");
        let addrs = crate::proxies::admin_addrs_in_dir(dir.path()).expect("pods");
        assert_eq!(
            addrs,
            vec![
                "127.0.0.1:4191".parse::<SocketAddr>().expect("addr"),
                "127.0.0.1:4192".parse().expect("addr")
            ]
        );
    }

    #[test]
    fn writes_into_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), FILE_NAME, "kind: Service\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            "kind: Service\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
    }
}
