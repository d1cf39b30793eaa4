//! The incidents of the 3 AM story (`shared/000_9425fc1ae493f183.txt`), each reproduced on
//! loopback with real Pylon proxies and real traffic, and diagnosed from Pylon's own output in
//! at most three commands typed as the story types them: `pylon` for `linkerd` and
//! `linkerd viz`, plus `--config-dir DIR` to say where the mesh is. Each test asserts that the
//! output names the cause.
//!
//! The mesh is a config dir as a cluster would have it: per workload a Service selecting its
//! Pods, EndpointSlices naming each Pod's inbound proxy, and Pods owned by a Deployment's
//! ReplicaSet whose `pylon-proxy` container has a `pylon-admin` port. Every Pod is a real
//! `pylon-proxy` process; a serving Pod's proxy forwards to a small app whose misbehaviour is
//! the incident. Pods all have the address 127.0.0.1 (each with its own ports); slices name
//! them by `targetRef`.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod blocking;
use blocking::*;

/// Every Service's port.
const PORT: u16 = 8080;
/// Requests to this path always succeed and are not counted by the apps: the tests use them
/// to wait for the mesh (and for a tap) to be ready.
const PROBE: &str = "/probe";

/// What an app does with the requests it counts.
#[derive(Clone, Copy, Debug)]
enum App {
    /// 200 to everything.
    Ok,
    /// Every `n`th request is answered `status`.
    FailEvery { n: u64, status: u16 },
    /// Every `n`th request is answered after `delay`.
    SlowEvery { n: u64, delay: Duration },
    /// 200 with a header line no HTTP parser accepts (a space in the header name).
    InvalidHeader,
}

fn start_app(app: App) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an app");
    let addr = listener.local_addr().expect("addr");
    let counted = Arc::new(AtomicU64::new(0));
    thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let counted = counted.clone();
            thread::spawn(move || serve_app(conn, app, &counted));
        }
    });
    addr
}

fn serve_app(conn: TcpStream, app: App, counted: &AtomicU64) {
    serve_requests(conn, |req| {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string();
        if req.path == PROBE {
            return ok;
        }
        let i = counted.fetch_add(1, Ordering::Relaxed) + 1;
        match app {
            App::Ok => ok,
            App::FailEvery { n, status } if i.is_multiple_of(n) => {
                format!("HTTP/1.1 {status} X\r\ncontent-length: 4\r\n\r\nfail")
            }
            App::FailEvery { .. } => ok,
            App::SlowEvery { n, delay } => {
                if i.is_multiple_of(n) {
                    thread::sleep(delay);
                }
                ok
            }
            App::InvalidHeader => {
                "HTTP/1.1 200 OK\r\nx-auth user: alice\r\ncontent-length: 2\r\n\r\nok".into()
            }
        }
    });
}

/// One Pod: its name, Deployment and proxy.
struct Pod {
    name: String,
    deployment: String,
    proxy: Proxy,
}

/// A Service over a Deployment's Pods, and which of them its EndpointSlices name.
struct Service {
    deployment: String,
    in_slices: Vec<usize>,
}

/// A config-dir mesh of real proxies.
struct Mesh {
    dir: tempfile::TempDir,
    pods: Vec<Pod>,
    services: Vec<Service>,
    /// More objects (ServiceProfiles, TrafficSplits), as YAML documents.
    objects: Vec<String>,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh {
            dir: tempfile::tempdir().expect("tempdir"),
            pods: Vec::new(),
            services: Vec::new(),
            objects: Vec::new(),
        }
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 path")
    }

    /// Starts a Pod of `deployment` (its proxy forwarding to `app`, if it serves) and returns
    /// its index. Pods are named `DEPLOYMENT-7c9f5-a`, `-b`, ... as a ReplicaSet names them.
    fn pod(&mut self, deployment: &str, app: Option<App>) -> usize {
        let n = self
            .pods
            .iter()
            .filter(|p| p.deployment == deployment)
            .count();
        let name = format!("{deployment}-7c9f5-{}", char::from(b'a' + n as u8));
        let workload = format!("deployment/{deployment}");
        let dir = self.dir().to_string();
        let forward = app.map(|a| start_app(a).to_string());
        let mut args = vec![
            "--config-dir",
            dir.as_str(),
            "--workload",
            workload.as_str(),
            "--namespace",
            "default",
            "--pod",
            name.as_str(),
        ];
        if let Some(f) = &forward {
            args.extend(["--inbound-forward", f.as_str()]);
        }
        let proxy = start_proxy(&args);
        self.pods.push(Pod {
            name,
            deployment: deployment.to_string(),
            proxy,
        });
        self.pods.len() - 1
    }

    /// `replicas` Pods of a serving Deployment behind a Service of the same name; the
    /// EndpointSlices name all of them.
    fn serving(&mut self, deployment: &str, apps: &[App]) -> Vec<usize> {
        let pods: Vec<usize> = apps
            .iter()
            .map(|app| self.pod(deployment, Some(*app)))
            .collect();
        self.services.push(Service {
            deployment: deployment.to_string(),
            in_slices: pods.clone(),
        });
        pods
    }

    /// Writes the config dir: every Pod, Service, EndpointSlice and extra object.
    fn write(&self) {
        let mut docs = Vec::new();
        for pod in &self.pods {
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
                 labels: {{app: {d}, pod-template-hash: 7c9f5}}\n  \
                 ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {d}-7c9f5, uid: u-{d}, controller: true}}]\n\
                 spec:\n  serviceAccountName: {d}\n  containers:\n  - name: app\n  - name: pylon-proxy\n    \
                 ports: [{{name: pylon-admin, containerPort: {admin}}}]\n\
                 status:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                name = pod.name,
                d = pod.deployment,
                admin = pod.proxy.admin.port(),
            ));
        }
        for svc in &self.services {
            docs.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {d}\n  namespace: default\n\
                 spec:\n  selector: {{app: {d}}}\n  ports:\n  - name: http\n    port: {PORT}\n    targetPort: http\n",
                d = svc.deployment
            ));
            for &i in &svc.in_slices {
                let pod = &self.pods[i];
                docs.push(format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {d}\n\
                     addressType: IPv4\nports:\n- name: http\n  port: {port}\n  protocol: TCP\n\
                     endpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n  \
                     targetRef: {{kind: Pod, name: {name}, namespace: default}}\n",
                    name = pod.name,
                    d = svc.deployment,
                    port = pod.proxy.inbound.port(),
                ));
            }
        }
        docs.extend(self.objects.iter().cloned());
        std::fs::write(self.dir.path().join("mesh.yaml"), docs.join("---\n"))
            .expect("write the mesh");
    }

    /// Waits (bounded) until Pod `from` reaches `service` through its outbound proxy.
    fn until_routed(&self, from: usize, service: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.send(from, service, PROBE, 1).first() == Some(&200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not reach {service} within 20 s",
                self.pods[from].name
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `n` GETs for `path` from Pod `from` to `service`, on one connection; their
    /// statuses (0: no response).
    fn send(&self, from: usize, service: &str, path: &str, n: usize) -> Vec<u16> {
        self.send_to(from, &fqdn(service), path, n)
    }

    /// [`Mesh::send`] to an authority as the app writes it.
    fn send_to(&self, from: usize, authority: &str, path: &str, n: usize) -> Vec<u16> {
        send_gets(self.pods[from].proxy.outbound, authority, path, n)
    }

    /// `pylon ARGS --config-dir DIR`, bounded to 40 s.
    fn pylon(&self, args: &str) -> Output {
        let mut argv: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        argv.extend(["--config-dir".to_string(), self.dir().to_string()]);
        run_pylon(&argv)
    }

    /// `pylon tap ARGS --config-dir DIR` running until dropped, once it prints requests:
    /// probes go from Pod `from` to `authority` until the tap shows one (bounded).
    fn tap(&self, args: &str, from: usize, authority: &str) -> Tap {
        let mut argv: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        argv.extend(["--config-dir".to_string(), self.dir().to_string()]);
        let mut child = Command::new(PYLON)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pylon tap");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let keep = |from: Box<dyn Read + Send>, to: Arc<Mutex<Vec<String>>>| {
            thread::spawn(move || {
                for line in BufReader::new(from).lines().map_while(Result::ok) {
                    if let Ok(mut to) = to.lock() {
                        to.push(line);
                    }
                }
            });
        };
        keep(
            Box::new(child.stdout.take().expect("stdout")),
            lines.clone(),
        );
        keep(
            Box::new(child.stderr.take().expect("stderr")),
            errors.clone(),
        );
        let tap = Tap {
            _child: Proc(child),
            lines,
            errors,
            argv,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tap.lines().iter().any(|l| l.contains(PROBE)) {
            assert!(
                Instant::now() < deadline,
                "pylon {:?} printed no request within 20 s: {:?}",
                tap.argv,
                tap.lines()
            );
            self.send_to(from, authority, PROBE, 1);
            thread::sleep(Duration::from_millis(100));
        }
        tap
    }
}

/// A running `pylon tap` and the lines it printed.
struct Tap {
    _child: Proc,
    lines: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
    argv: Vec<String>,
}

impl Tap {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The lines matching `pred`, once there are `n` of them (bounded).
    fn until(&self, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<String> = self.lines().into_iter().filter(|l| pred(l)).collect();
            if found.len() >= n {
                return found;
            }
            if Instant::now() > deadline {
                let errors = self.errors.lock().map(|e| e.join("\n")).unwrap_or_default();
                panic!(
                    "pylon {:?}: {} of {n} matching lines within 20 s\n{}\n--- stderr ---\n{errors}",
                    self.argv,
                    found.len(),
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A service's authority as its clients' proxies see it.
fn fqdn(service: &str) -> String {
    format!("{service}.default.svc.cluster.local:{PORT}")
}

fn text(out: &Output) -> String {
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{shown}");
    shown
}

/// The table's rows as header -> cell maps.
fn rows(table: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = table.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    lines
        .map(|l| {
            names
                .iter()
                .map(|n| n.to_string())
                .zip(l.split_whitespace().map(str::to_string))
                .collect()
        })
        .collect()
}

fn percent(cell: &str) -> f64 {
    cell.trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("not a percentage: {cell:?}"))
}

/// "This one command revealed the hidden retry storm": payment-service's calls to
/// order-service all succeed, because its proxy retries the one in seven that fails. The
/// retries show as RETRY% and as a retry-heavy edge.
#[test]
fn a_retry_storm_shows_as_retries_on_the_edge() {
    let mut mesh = Mesh::new();
    let payment = mesh.pod("payment-service", None);
    mesh.serving("order-service", &[App::FailEvery { n: 7, status: 503 }]);
    mesh.objects.push(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
         metadata:\n  name: order-service.default.svc.cluster.local\n  namespace: default\n\
         spec:\n  routes:\n  - name: GET /orders/{id}\n    condition: {method: GET, pathRegex: '/orders/[^/]+'}\n    isRetryable: true\n\
         \x20 retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 100, ttl: 10s}\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(payment, "order-service");
    let statuses = mesh.send(payment, "order-service", "/orders/42", 210);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "retries hide every failure from the app: {statuses:?}"
    );

    let out = mesh.pylon("stat deployment/payment-service --to deployment/order-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let r = rows(&shown);
    let retries = percent(&r[0]["RETRY%"]);
    assert!(
        (10.0..20.0).contains(&retries),
        "about one request in seven is a retry: {shown}"
    );
    // Every attempt counts: the app saw 100%, the mesh 6 in 7.
    let success = percent(&r[0]["SUCCESS"]);
    assert!((80.0..92.0).contains(&success), "{shown}");
    assert!(
        shown.contains("payment-service to deployment/order-service:")
            && shown.contains("were retries"),
        "the retries are called out: {shown}"
    );

    // The route the retries are on.
    let out = mesh.pylon("routes deployment/payment-service --to deployment/order-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.lines().any(|l| l.starts_with("GET /orders/{id}")),
        "{shown}"
    );

    let out = mesh.pylon("edges deployment");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let edge = shown
        .lines()
        .find(|l| l.contains("payment-service") && l.contains("order-service"))
        .unwrap_or_else(|| panic!("no payment-service -> order-service edge:\n{shown}"));
    assert!(edge.contains("retry-heavy"), "{shown}");
}

/// "Traffic split percentages: math errors that send 110% traffic to new versions": the
/// TrafficSplit's weights add to 110, which `pylon check` names with what each backend really
/// gets.
#[test]
fn a_traffic_split_adding_to_110_percent() {
    let mut mesh = Mesh::new();
    let checkout = mesh.pod("frontend", None);
    mesh.serving("checkout-service", &[App::Ok]);
    mesh.serving("checkout-service-v1", &[App::Ok]);
    mesh.serving("checkout-service-debug", &[App::Ok]);
    mesh.objects.push(
        "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\n\
         metadata:\n  name: debug-checkout-flow\n  namespace: default\n\
         spec:\n  service: checkout-service\n  backends:\n  - service: checkout-service-v1\n    weight: 100\n\
         \x20 - service: checkout-service-debug\n    weight: 10\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(checkout, "checkout-service");

    let out = Command::new(PYLON)
        .args(["check", mesh.dir()])
        .output()
        .expect("pylon check");
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "errors exit 1: {shown}");
    let finding = shown
        .lines()
        .position(|l| l.contains("TrafficSplit default/debug-checkout-flow"))
        .unwrap_or_else(|| panic!("the split is not named:\n{shown}"));
    assert!(
        shown.contains("weights sum to 110"),
        "the sum is named:\n{shown}"
    );
    assert!(
        shown.lines().skip(finding).any(|l| l.contains("90.9%")),
        "what v1 really gets (100/110) is named:\n{shown}"
    );
}

/// "exactly every 50th request was failing with a 503": recommendation-service's calls to
/// ml-inference fail at 2% (stat), and tap shows the 503s and the one pod they come from.
#[test]
fn every_50th_request_fails_with_503_from_one_pod() {
    let mut mesh = Mesh::new();
    let recommendation = mesh.pod("recommendation-service", None);
    // Two pods; the second fails one request in 25 of its (half the) traffic: 1 in 50.
    let pods = mesh.serving(
        "ml-inference",
        &[App::Ok, App::FailEvery { n: 25, status: 503 }],
    );
    mesh.write();
    mesh.until_routed(recommendation, "ml-inference");
    let statuses = mesh.send(recommendation, "ml-inference", "/predict", 300);
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert!(failed > 0, "{statuses:?}");

    let out = mesh
        .pylon("stat deployment/recommendation-service --to deployment/ml-inference --window 5m");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let success = percent(&rows(&shown)[0]["SUCCESS"]);
    assert!(
        success < 99.5 && success > 90.0,
        "a few percent fail: {shown}"
    );

    let tap = mesh.tap(
        "tap deployment/recommendation-service --to deployment/ml-inference",
        recommendation,
        &fqdn("ml-inference"),
    );
    // At the pace of a service, until the tap has shown a 503 (bounded: 1,000 requests).
    for _ in 0..100 {
        mesh.send(recommendation, "ml-inference", "/predict", 10);
        if tap.lines().iter().any(|l| l.contains(":status=503")) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let failing = tap.until(1, |l| l.contains(":status=503"));
    let bad_pod = &mesh.pods[pods[1]].name;
    for line in &failing {
        assert!(
            line.contains(bad_pod.as_str()),
            "the failing response names its pod {bad_pod}: {line}"
        );
    }
}

/// "Tap revealed that 504 Gateway Timeout errors were coming from the mesh proxy, not the
/// application": user-service's route has a timeout shorter than its slowest requests, and
/// tap shows the proxy making the 504.
#[test]
fn a_504_from_the_proxys_own_route_timeout() {
    let mut mesh = Mesh::new();
    let gateway = mesh.pod("api-gateway", None);
    mesh.serving(
        "user-service",
        &[App::SlowEvery {
            n: 3,
            delay: Duration::from_secs(2),
        }],
    );
    mesh.objects.push(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
         metadata:\n  name: user-service.default.svc.cluster.local\n  namespace: default\n\
         spec:\n  routes:\n  - name: GET /users/{id}\n    condition: {method: GET, pathRegex: '/users/[^/]+'}\n    timeout: 500ms\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(gateway, "user-service");

    let tap = mesh.tap(
        "tap deployment/api-gateway --to deployment/user-service --authority user-service:8080",
        gateway,
        "user-service:8080",
    );
    let statuses = mesh.send_to(gateway, "user-service:8080", "/users/7", 6);
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        2,
        "every third request outlasts the timeout: {statuses:?}"
    );
    // `| grep -E "(status=[45][0-9][0-9]|timeout)"`
    let grep = regex::Regex::new("(status=[45][0-9][0-9]|timeout)").expect("regex");
    let found = tap.until(2, |l| l.starts_with("rsp") && grep.is_match(l));
    for line in &found {
        assert!(line.contains(":status=504"), "{line}");
        assert!(
            line.contains("proxy_error=") && line.contains("timeout"),
            "the proxy says it made the 504 for a timeout: {line}"
        );
    }
}

/// "The service profile was outdated, causing Linkerd to only load balance between 2 of the 3
/// available pods. The third pod was receiving zero traffic": ml-inference runs three ready
/// pods and its endpoints name two.
#[test]
fn a_stale_endpoint_set_uses_2_of_3_pods() {
    let mut mesh = Mesh::new();
    let recommendation = mesh.pod("recommendation-service", None);
    let pods = mesh.serving("ml-inference", &[App::Ok, App::Ok, App::Ok]);
    mesh.services
        .last_mut()
        .expect("the service")
        .in_slices
        .truncate(2);
    mesh.write();
    mesh.until_routed(recommendation, "ml-inference");
    mesh.send(recommendation, "ml-inference", "/predict", 60);
    let missing = &mesh.pods[pods[2]].name;

    let out = mesh.pylon("stat deployment/ml-inference");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("2 of 3"), "{shown}");
    assert!(
        shown.contains(missing.as_str()),
        "the idle pod is named: {shown}"
    );

    let out = Command::new(PYLON)
        .args(["check", mesh.dir()])
        .output()
        .expect("pylon check");
    let shown = text(&out);
    assert!(shown.contains(missing.as_str()), "{shown}");
    assert!(shown.contains("Service default/ml-inference"), "{shown}");
}

/// "our new authentication service was returning invalid HTTP headers, causing the mesh to
/// classify successful responses as errors": the app answers 200 with a header no parser
/// accepts; stat shows the failures, tap shows the proxy's 502 and why, and the proxy's log
/// (`kubectl logs ... | jq 'select(.level == "ERROR")'`) names the header.
#[test]
fn successful_responses_made_errors_by_an_invalid_header() {
    let mut mesh = Mesh::new();
    let frontend = mesh.pod("frontend", None);
    mesh.serving("auth-service", &[App::InvalidHeader]);
    mesh.write();
    mesh.until_routed(frontend, "auth-service");
    let statuses = mesh.send(frontend, "auth-service", "/login", 20);
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");

    let out = mesh.pylon("stat deployment/frontend --to deployment/auth-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        percent(&rows(&shown)[0]["SUCCESS"]) < 10.0,
        "the 200s are failures: {shown}"
    );

    let tap = mesh.tap(
        "tap deployment/frontend --to deployment/auth-service",
        frontend,
        &fqdn("auth-service"),
    );
    mesh.send(frontend, "auth-service", "/login", 3);
    let found = tap.until(1, |l| l.starts_with("rsp") && l.contains(":status=502"));
    assert!(found[0].contains("proxy_error="), "{}", found[0]);

    // The frontend's proxy made the 502s: its log says what was wrong with the response.
    let logged: Vec<serde_json::Value> = mesh.pods[frontend]
        .proxy
        .log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| matches!(v["level"].as_str(), Some("ERROR") | Some("WARN")))
        .collect();
    assert!(
        logged.iter().any(|v| {
            let line = v.to_string();
            line.contains("auth-service") && line.to_ascii_lowercase().contains("header")
        }),
        "no WARN/ERROR line names the endpoint and the header: {logged:#?}"
    );
}
