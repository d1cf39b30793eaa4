//! `e2e_endpoints_coverage`: a stale endpoint set made visible, end to end. The story's "2 of
//! 3 pods": Deployment `web` runs three ready Pods behind Service `web`, and its
//! EndpointSlices name only two of them, so the third gets no traffic and nothing else says so.
//!
//! A config dir as a cluster would have it (Pods owned by `web`'s ReplicaSet, each with its
//! proxy's `pylon-admin` port; slices naming the pods by `targetRef`; every pod at 127.0.0.1
//! on its own ports), real `pylon-proxy` processes for the three pods and a client, real
//! traffic through the client's outbound proxy, and a `pylon-controller` on the same dir.
//! Asserted:
//! - the traffic: the third pod's proxy receives none of it;
//! - the client proxy's and the controller's `/metrics`: `endpoints_ready_pods` 3,
//!   `endpoints_missing_pods` 1, `endpoints_missing_pod_info` naming the third pod;
//! - `pylon stat deployment/web` with `--config-dir` (and `-o json`) and with `--proxy`: the
//!   finding, naming the missing pod;
//! - rewriting the slices to name all three clears all of it, and the third pod gets traffic.
//!
//! Prerequisites: `pylon-proxy` and `pylon-controller` next to `pylon` (`cargo build -p
//! pylon-proxy -p pylon-cli -p pylon-controller --bins`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pylon_proxy_metrics::exposition;

mod blocking;
use blocking::*;

/// Service `web`'s port.
const PORT: u16 = 8080;
const WEB: &str = "web.default.svc.cluster.local";
const PODS: [&str; 3] = ["web-7c9f5-a", "web-7c9f5-b", "web-7c9f5-c"];
/// The pod the stale slices leave out.
const MISSING: &str = "web-7c9f5-c";
/// How long anything is waited for.
const DEADLINE: Duration = Duration::from_secs(30);

/// A Pod of `web`'s ReplicaSet (or the bare `client` pod), its proxy's admin port named.
fn pod_yaml(name: &str, app: &str, admin: SocketAddr) -> String {
    let owner = if app == "web" {
        "  labels: {app: web, pod-template-hash: 7c9f5}\n  \
         ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7c9f5, uid: u1, controller: true}]\n"
            .to_string()
    } else {
        format!("  labels: {{app: {app}}}\n")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n{owner}\
         spec:\n  containers:\n  - name: app\n  - name: pylon-proxy\n    \
         ports: [{{name: pylon-admin, containerPort: {port}}}]\n\
         status:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
        port = admin.port()
    )
}

/// An EndpointSlice naming one pod at its proxy's inbound port.
fn slice_yaml(pod: &str, inbound: SocketAddr) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {pod}\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         endpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n  \
         targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n",
        port = inbound.port()
    )
}

/// `client` calls Service `web`, whose three pods each have a proxy forwarding to a backend.
struct Mesh {
    dir: tempfile::TempDir,
    client: Proxy,
    web: Vec<Proxy>,
    controller_admin: SocketAddr,
    _controller: Proc,
}

impl Mesh {
    fn start() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().to_str().expect("utf-8 path").to_string();
        let proxy = |workload: &str, pod: &str, forward: Option<SocketAddr>| {
            let forward = forward.map(|f| f.to_string());
            let mut args = vec![
                "--config-dir",
                cfg.as_str(),
                "--workload",
                workload,
                "--namespace",
                "default",
                "--pod",
                pod,
            ];
            if let Some(f) = &forward {
                args.extend(["--inbound-forward", f.as_str()]);
            }
            start_proxy(&args)
        };
        let client = proxy("deployment/client", "client-0", None);
        let web = PODS
            .iter()
            .map(|p| proxy("deployment/web", p, Some(start_backend(200))))
            .collect();
        let controller_admin = free_addr();
        let mut command = Command::new(sibling("pylon-controller"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PYLON_")) {
            command.env_remove(k);
        }
        let controller = Proc(
            command
                .env("PYLON_LOG", "warn")
                .arg("--config-dir")
                .arg(dir.path())
                .args(["--destination-addr", "127.0.0.1:0"])
                .args(["--policy-addr", "127.0.0.1:0"])
                .args(["--identity-addr", "127.0.0.1:0"])
                .arg("--admin-addr")
                .arg(controller_admin.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn pylon-controller"),
        );
        Mesh {
            dir,
            client,
            web,
            controller_admin,
            _controller: controller,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the mesh: the pods, Service `web` and a slice for each pod in `in_slices`.
    /// Written whole and renamed into place, so a watcher never reads half a file.
    fn write(&self, in_slices: &[&str]) {
        let mut docs = vec![pod_yaml("client-0", "client", self.client.admin)];
        for (pod, proxy) in PODS.iter().zip(&self.web) {
            docs.push(pod_yaml(pod, "web", proxy.admin));
        }
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: {PORT}, targetPort: http}}]\n"
        ));
        for (pod, proxy) in PODS.iter().zip(&self.web) {
            if in_slices.contains(pod) {
                docs.push(slice_yaml(pod, proxy.inbound));
            }
        }
        let tmp = self.dir().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, docs.join("---\n")).expect("write the mesh");
        std::fs::rename(&tmp, self.dir().join("mesh.yaml")).expect("rename the mesh into place");
    }

    /// `n` GETs to `web` through the client's outbound proxy, on one connection; the statuses
    /// (0: no response).
    fn send(&self, n: usize) -> Vec<u16> {
        send_gets(
            self.client.outbound,
            &format!("{WEB}:{PORT}"),
            "/predict",
            n,
        )
    }

    /// Inbound requests each web pod's proxy received.
    fn received(&self) -> Vec<f64> {
        self.web
            .iter()
            .map(|p| {
                let metrics = http_get(p.admin, "/metrics")
                    .map(|(_, b)| b)
                    .unwrap_or_default();
                sample_sum(&metrics, "request_total", &[("direction", "inbound")])
            })
            .collect()
    }

    /// `pylon ARGS`, bounded to 40 s.
    fn pylon(&self, args: &[&str]) -> Output {
        run_pylon(args)
    }

    /// `pylon stat deployment/web --config-dir DIR [extra]`.
    fn stat_dir(&self, extra: &[&str]) -> (bool, String) {
        let dir = self.dir().to_str().expect("utf-8 path").to_string();
        let mut args = vec!["stat", "deployment/web", "--config-dir", dir.as_str()];
        args.extend(extra);
        let out = self.pylon(&args);
        (out.status.success(), shown(&out))
    }
}

/// What a command printed (and shows it in the test's output).
fn shown(out: &Output) -> String {
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{shown}");
    shown
}

/// The sum of `name`'s samples whose labels include every pair of `labels`.
fn sample_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(exposition)
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn parse(exposition: &str) -> Vec<exposition::Sample> {
    exposition::parse(exposition).unwrap_or_else(|e| panic!("unparsable /metrics: {e}"))
}

/// Web's coverage as `admin`'s `/metrics` says it: (ready, missing, the missing pods named).
fn gauges(admin: SocketAddr) -> (f64, f64, Vec<String>) {
    let text = http_get(admin, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let svc = [("dst_namespace", "default"), ("dst_service", "web")];
    let named = parse(&text)
        .iter()
        .filter(|s| s.name == "endpoints_missing_pod_info" && s.label("dst_service") == Some("web"))
        .filter_map(|s| {
            let pod = s.label("dst_pod")?;
            let deployment = s.label("dst_deployment")?;
            Some(format!("{pod} of deployment/{deployment}"))
        })
        .collect();
    (
        sample_sum(&text, "endpoints_ready_pods", &svc),
        sample_sum(&text, "endpoints_missing_pods", &svc),
        named,
    )
}

/// Polls `what` until `done` holds of its value (bounded): the last value.
fn until<T: std::fmt::Debug>(
    what: &str,
    mut get: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = get();
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}; last: {value:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stale_endpoint_set_is_visible_in_metrics_and_stat_until_fixed() {
    let mesh = Mesh::start();
    mesh.write(&PODS[..2]);

    // Real traffic: the client reaches web, and only the two pods in the slices serve it.
    until(
        "web answers through the client's proxy",
        || mesh.send(1),
        |s| s[0] == 200,
    );
    let statuses = mesh.send(60);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let received = until(
        "the web pods' proxies count the requests",
        || mesh.received(),
        |r| r[0] + r[1] >= 61.0,
    );
    assert_eq!(received[2], 0.0, "{MISSING} gets no traffic: {received:?}");

    // The gauge, from the client's proxy (config-dir mode) and from the controller.
    let want = |g: &(f64, f64, Vec<String>)| {
        g.0 == 3.0 && g.1 == 1.0 && g.2 == [format!("{MISSING} of deployment/web")]
    };
    until(
        "the client proxy's endpoints_* gauges",
        || gauges(mesh.client.admin),
        want,
    );
    until(
        "the controller's endpoints_* gauges",
        || gauges(mesh.controller_admin),
        want,
    );

    // `pylon stat deployment/web --config-dir DIR`: the table, and the finding naming the pod.
    let (ok, out) = mesh.stat_dir(&[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("endpoints 2 of 3 ready pods of svc/web"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{MISSING} (127.0.0.1) is ready but not in EndpointSlices"
        )),
        "{out}"
    );
    let (ok, out) = mesh.stat_dir(&["-o", "json"]);
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let web = &json["endpoints"][0];
    assert_eq!(web["service"], "web", "{json}");
    assert_eq!(
        (web["ready_pods"].as_u64(), web["missing_pods"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(web["missing"][0]["pod"], MISSING, "{json}");
    assert_eq!(web["missing"][0]["workload"], "deployment/web", "{json}");

    // `--proxy`: the same finding, from the proxies' gauges.
    let mut args = vec!["stat".to_string(), "deployment/web".to_string()];
    for p in std::iter::once(&mesh.client).chain(&mesh.web) {
        args.extend(["--proxy".to_string(), p.admin.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mesh.pylon(&args);
    let text = shown(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "endpoints 2 of 3 ready pods of svc/web (namespace default): {MISSING} (deployment/web) is ready"
        )),
        "{text}"
    );

    // Fixed: the slices name all three. The gauges and stat clear, and the third pod serves.
    mesh.write(&PODS);
    let fixed = |g: &(f64, f64, Vec<String>)| g.0 == 3.0 && g.1 == 0.0 && g.2.is_empty();
    until(
        "the client proxy's gauges after the fix",
        || gauges(mesh.client.admin),
        fixed,
    );
    until(
        "the controller's gauges after the fix",
        || gauges(mesh.controller_admin),
        fixed,
    );
    let (ok, out) = mesh.stat_dir(&[]);
    assert!(ok, "{out}");
    assert!(
        !out.contains("endpoints "),
        "nothing to say once fixed: {out}"
    );
    until(
        "traffic reaches the third pod",
        || {
            mesh.send(20);
            mesh.received()
        },
        |r| r[2] > 0.0,
    );
}
