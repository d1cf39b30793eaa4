//! The demo's mesh objects, as the YAML a user would drop into `--config-dir`: one `v1 Service`
//! and one `discovery.k8s.io/v1 EndpointSlice` per endpoint (each endpoint is a proxy on its own
//! loopback port, and a slice has a single port list).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// File name of the objects inside the config dir.
pub const FILE_NAME: &str = "ml-inference.yaml";

/// One endpoint of the service: the pod's name and the address its inbound proxy listens on.
pub struct EndpointObject<'a> {
    pub pod: &'a str,
    pub addr: SocketAddr,
}

/// Renders the Service and its EndpointSlices as one multi-document YAML file.
pub fn render(service: &str, namespace: &str, port: u16, endpoints: &[EndpointObject]) -> String {
    let mut yaml = format!(
        "# Written by `pylon demo`: the service the demo's load generator calls.\n\
         apiVersion: v1\n\
         kind: Service\n\
         metadata:\n  name: {service}\n  namespace: {namespace}\n\
         spec:\n  selector:\n    app: {service}\n  ports:\n  \
         - name: http\n    port: {port}\n    protocol: TCP\n    targetPort: http\n"
    );
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
             kubernetes.io/service-name: {service}\n\
             addressType: {address_type}\n\
             ports:\n- name: http\n  port: {target_port}\n  protocol: TCP\n\
             endpoints:\n- addresses:\n  - \"{ip}\"\n  conditions:\n    ready: true\n  \
             targetRef:\n    kind: Pod\n    name: {pod}\n    namespace: {namespace}\n"
        ));
    }
    yaml
}

/// Writes `contents` to `dir/FILE_NAME` atomically (a hidden temporary file renamed into
/// place), so a proxy watching the directory never reads half a file.
pub fn write(dir: &Path, contents: &str) -> Result<PathBuf> {
    let path = dir.join(FILE_NAME);
    let staging = dir.join(format!(".{FILE_NAME}.tmp"));
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
        );
        let docs: Vec<&str> = yaml.split("\n---\n").collect();
        assert_eq!(docs.len(), 3);
        assert!(docs[0].contains("kind: Service\n"));
        assert!(docs[0].contains("port: 80\n"));
        assert!(docs[0].contains("targetPort: http\n"));
        assert!(docs[1].contains("kind: EndpointSlice\n"));
        assert!(docs[1].contains("kubernetes.io/service-name: ml-inference\n"));
        assert!(docs[1].contains("- name: http\n  port: 4001\n"));
        assert!(docs[1].contains("- \"127.0.0.1\"\n"));
        assert!(docs[2].contains("name: ml-inference-2\n"));
        assert!(docs[2].contains("port: 4002\n"));
    }

    #[test]
    fn writes_into_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "kind: Service\n").expect("write");
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
