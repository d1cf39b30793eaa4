//! A real `pylon-proxy` fed by a real `pylon-controller` over Linkerd's proxy API
//! (`--destination-addr`, `--policy-addr`): it routes on what the controller serves, labels its
//! metrics with the controller's `dst_*` names, follows changes, and keeps routing on the last
//! state while the controller is gone, reconnecting when it is back.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

/// A bound on how long a change may take to reach the proxy; the observed time is printed.
const PROPAGATION_BOUND: Duration = Duration::from_secs(2);

/// Service `web` in `default`, one slice whose endpoints name their pods, and the pods
/// (Deployment `web`, ServiceAccount `web`).
fn write_web(cfg: &ConfigDir, backends: &[(&str, SocketAddr)]) {
    let mut y = service_yaml("web", "default", &[HTTP_PORT]);
    for (pod, _) in backends {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: default\n  labels: {{app: web, pod-template-hash: 5f6d7}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-5f6d7, uid: u, controller: true}}]\nspec:\n  serviceAccountName: web\n  containers: [{{name: app}}]\nstatus: {{phase: Running}}\n"
        ));
    }
    // One slice per endpoint: each backend listens on its own port.
    for (pod, addr) in backends {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{pod}\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n",
            addr.port(),
            addr.ip()
        ));
    }
    cfg.write("web.yaml", &y);
}

const WEB: &str = "web.default.svc.cluster.local";

#[tokio::test]
async fn a_proxy_routes_on_the_controllers_answers_and_keeps_them_when_it_goes() {
    test_body(async {
        let a = Backend::start("a").await;
        let b = Backend::start("b").await;
        let cfg = ConfigDir::new();
        write_web(&cfg, &[("web-5f6d7-aaaaa", a.addr)]);
        let mut controller = ControllerProcess::start(&["--config-dir", &cfg.path_str()]);
        let proxy = Proxy::builder()
            .args(["--destination-addr", &controller.destination.to_string()])
            .args(["--policy-addr", &controller.policy.to_string()])
            .args(["--namespace", "default", "--pod", "client-0"])
            .start();

        assert_eq!(proxy.backend_for(WEB).await, "a");
        // The controller's metric_labels become dst_* labels.
        let metrics = proxy.metrics();
        let labelled = metric_sum(&metrics, "response_total", |s| {
            s.label("direction") == Some("outbound")
                && s.label("dst_pod") == Some("web-5f6d7-aaaaa")
                && s.label("dst_deployment") == Some("web")
                && s.label("dst_serviceaccount") == Some("web")
                && s.label("dst_service") == Some("web")
                && s.label("dst_namespace") == Some("default")
        });
        assert_eq!(
            labelled,
            Some(1.0),
            "{}",
            series_of(&metrics, "response_total")
        );

        // An endpoint change reaches the proxy.
        write_web(&cfg, &[("web-5f6d7-bbbbb", b.addr)]);
        let took = proxy.until_backends(WEB, &["b"], PROPAGATION_BOUND).await;
        println!("endpoint change reached the proxy in {took:?}");

        // The controller goes: the proxy keeps routing on the last endpoints and says so.
        controller.kill();
        for _ in 0..5 {
            assert_eq!(proxy.backend_for(WEB).await, "b");
        }
        // One subscription (web's endpoints) runs on its last state.
        let noticed = proxy
            .wait_metric(
                "control_plane_streams",
                &[("api", "destination"), ("state", "disconnected")],
                1.0,
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            noticed,
            Some(1.0),
            "{}",
            series_of(&proxy.metrics(), "control_plane_streams")
        );
        // Logged before the gauge moved, but read from the pipe by a thread of its own.
        let logged = proxy
            .wait_for_log(Duration::from_secs(10), |l| {
                l.contains("control plane stream failed")
            })
            .await;
        assert!(logged.is_some(), "{}", proxy.log_tail(20));
        assert_eq!(proxy.backend_for(WEB).await, "b");

        // Changes made while it was away arrive when it is back.
        write_web(&cfg, &[("web-5f6d7-aaaaa", a.addr)]);
        controller.spawn();
        // Reconnecting waits out the backoff (at most 10 s), then the change applies at once.
        let start = Instant::now();
        while proxy.backend_for(WEB).await != "a" {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the proxy did not reconnect\n{}",
                proxy.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("reconnected and caught up in {:?}", start.elapsed());
        let restored = proxy
            .wait_metric(
                "control_plane_streams",
                &[("api", "destination"), ("state", "connected")],
                1.0,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(restored, Some(1.0));
    })
    .await
}

#[tokio::test]
async fn ready_waits_for_the_inbound_policy_of_the_declared_ports() {
    test_body(async {
        let cfg = ConfigDir::new();
        cfg.write(
            "pod.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: server-0\n  namespace: default\n  labels: {app: server}\nspec:\n  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]\nstatus: {phase: Running, podIP: 127.0.0.1}\n---\napiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: server-http, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  port: http\n  proxyProtocol: HTTP/1\n",
        );
        let mut controller = ControllerProcess::new(&["--config-dir", &cfg.path_str()]);
        // No controller yet: not ready.
        let proxy = Proxy::builder()
            .args(["--policy-addr", &controller.policy.to_string()])
            .args(["--inbound-ports", "8080"])
            .args(["--namespace", "default", "--pod", "server-0"])
            .start();
        let (status, body) = proxy.admin_request("GET", "/ready", "");
        assert_eq!(status, 503, "{body}");
        controller.spawn();
        let ready = wait_until(
            || proxy.admin_request("GET", "/ready", "").0 == 200,
            Duration::from_secs(15),
        )
        .await;
        assert!(ready, "{}", proxy.log_tail(20));
        // The log line reaches the buffer through a reader thread, which may not have read it by
        // the time `/ready` answers 200 (a loaded machine delays it).
        let logged = proxy
            .wait_for_log(Duration::from_secs(10), |l| {
                l.contains("inbound policy from the control plane")
            })
            .await;
        assert!(logged.is_some(), "{}", proxy.log_tail(20));
    })
    .await
}
