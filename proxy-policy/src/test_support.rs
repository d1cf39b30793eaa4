//! Helpers shared by the unit tests: real files in real temp dirs.

use std::path::Path;
use std::sync::Arc;

use crate::{Store, StoreConfig};

pub fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write test file");
}

/// A temp dir holding `files`, loaded into a Store.
pub fn load(files: &[(&str, &str)], cfg: StoreConfig) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        write(dir.path(), name, content);
    }
    let store = Store::load_dir(dir.path(), cfg).expect("load_dir");
    (dir, store)
}

/// `shop/web`: port 80 (`http` -> named targetPort), 9000 (`admin` -> 9990),
/// 9100 (`metrics` -> named port no slice carries).
pub const WEB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: admin
    port: 9000
    targetPort: 9990
  - name: metrics
    port: 9100
    targetPort: metrics
";

/// An EndpointSlice for `shop/web` with an `http` port of 8080.
pub fn web_slice(name: &str, endpoints: &str) -> String {
    format!(
        "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
{endpoints}"
    )
}

/// One ready endpoint entry for [`web_slice`].
pub fn endpoint(ip: &str, pod: &str) -> String {
    format!(
        "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: shop}}\n  zone: zone-a\n"
    )
}

/// The endpoint addresses of a resolution, as strings.
pub fn addrs(resolved: &crate::ResolvedService) -> Vec<String> {
    resolved
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}
