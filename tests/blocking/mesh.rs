//! A config-dir mesh of real `pylon-proxy` processes, as a cluster would have it: per
//! workload a Service selecting its Pods, EndpointSlices naming each Pod's inbound proxy, and
//! Pods owned by a Deployment's ReplicaSet whose `pylon-proxy` container has a `pylon-admin`
//! port. A serving Pod's proxy forwards to a small app that misbehaves as told ([`App`]).
//! Pods all have the address 127.0.0.1 (each with its own ports); slices name them by
//! `targetRef`. Shared by the incident and dashboard tests (`#[path]`-included beside
//! `mod blocking;`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::blocking::*;

/// Every Service's port.
pub const PORT: u16 = 8080;
/// Requests to this path always succeed and are not counted by the apps: the tests use them
/// to wait for the mesh (and for a tap) to be ready.
pub const PROBE: &str = "/probe";

/// What an app does with the requests it counts.
#[derive(Clone, Copy, Debug)]
pub enum App {
    /// 200 to everything.
    Ok,
    /// Every `n`th request is answered `status`.
    FailEvery { n: u64, status: u16 },
    /// Every `n`th request is answered after `delay`.
    SlowEvery { n: u64, delay: Duration },
    /// 200 with a header line no HTTP parser accepts (a space in the header name).
    InvalidHeader,
}

pub fn start_app(app: App) -> SocketAddr {
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
pub struct Pod {
    pub name: String,
    pub deployment: String,
    pub proxy: Proxy,
}

/// A Service over a Deployment's Pods, and which of them its EndpointSlices name.
pub struct Service {
    pub deployment: String,
    pub in_slices: Vec<usize>,
}

/// A config-dir mesh of real proxies.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// More objects (ServiceProfiles, TrafficSplits), as YAML documents.
    pub objects: Vec<String>,
}

impl Mesh {
    pub fn new() -> Mesh {
        Mesh {
            dir: tempfile::tempdir().expect("tempdir"),
            pods: Vec::new(),
            services: Vec::new(),
            objects: Vec::new(),
        }
    }

    pub fn dir(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 path")
    }

    /// Starts a Pod of `deployment` (its proxy forwarding to `app`, if it serves) and returns
    /// its index. Pods are named `DEPLOYMENT-7c9f5-a`, `-b`, ... as a ReplicaSet names them.
    pub fn pod(&mut self, deployment: &str, app: Option<App>) -> usize {
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
    pub fn serving(&mut self, deployment: &str, apps: &[App]) -> Vec<usize> {
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
    pub fn write(&self) {
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
    pub fn until_routed(&self, from: usize, service: &str) {
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
    pub fn send(&self, from: usize, service: &str, path: &str, n: usize) -> Vec<u16> {
        self.send_to(from, &fqdn(service), path, n)
    }

    /// [`Mesh::send`] to an authority as the app writes it.
    pub fn send_to(&self, from: usize, authority: &str, path: &str, n: usize) -> Vec<u16> {
        send_gets(self.pods[from].proxy.outbound, authority, path, n)
    }

    /// `pylon ARGS --config-dir DIR`, bounded to 40 s.
    pub fn pylon(&self, args: &str) -> Output {
        let mut argv: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        argv.extend(["--config-dir".to_string(), self.dir().to_string()]);
        run_pylon(&argv)
    }

    /// `pylon tap ARGS --config-dir DIR` running until dropped, once it prints requests:
    /// probes go from Pod `from` to `authority` until the tap shows one (bounded).
    pub fn tap(&self, args: &str, from: usize, authority: &str) -> Tap {
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
pub struct Tap {
    _child: Proc,
    lines: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
    argv: Vec<String>,
}

impl Tap {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The lines matching `pred`, once there are `n` of them (bounded).
    pub fn until(&self, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
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
pub fn fqdn(service: &str) -> String {
    format!("{service}.default.svc.cluster.local:{PORT}")
}
