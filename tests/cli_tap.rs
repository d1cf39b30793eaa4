//! End-to-end: `pylon tap` and `pylon profile --tap` with the real binary, against real proxies
//! (the shared harness) carrying real traffic to a real backend. The CLI is given only each
//! proxy's admin address and learns the tap port from it.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

const PYLON: &str = env!("CARGO_BIN_EXE_pylon");
const AUTHORITY: &str = "web.default.svc.cluster.local:80";

/// A running `pylon` with its output collected line by line; killed when dropped.
struct Cli {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

impl Cli {
    fn spawn(args: &[&str]) -> Cli {
        let mut child = Command::new(PYLON)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pylon");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Cli {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until the taps are open: the CLI says so on stderr.
    async fn wait_tapping(&mut self) {
        let ok = wait_until(
            || self.stderr().contains("tapping ") || matches!(self.child.try_wait(), Ok(Some(_))),
            OP_TIMEOUT,
        )
        .await;
        assert!(
            ok && self.stderr().contains("tapping "),
            "pylon did not start tapping: {}",
            self.stderr()
        );
    }

    async fn wait_stdout_lines(&self, n: usize) {
        let ok = wait_until(|| self.stdout.lock().unwrap().len() >= n, OP_TIMEOUT).await;
        assert!(
            ok,
            "wanted {n} lines, got {:#?}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
    }

    /// Waits (bounded) for the exit, and for the output readers to drain.
    async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        let child = &mut self.child;
        wait_until(
            || {
                status = child.try_wait().ok().flatten();
                status.is_some()
            },
            OP_TIMEOUT,
        )
        .await;
        let status = status.unwrap_or_else(|| panic!("pylon did not exit: {}", self.stderr()));
        // The reader threads see EOF right after the exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `pylon` to its end (bounded), for the error cases.
async fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let mut cli = Cli::spawn(args);
    let status = cli.wait_exit().await;
    (status, cli.stdout().join("\n"), cli.stderr())
}

fn profile_yaml(routes: &str) -> String {
    format!(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {{name: web.default.svc.cluster.local, namespace: default}}\nspec:\n  routes:\n{routes}"
    )
}

fn lines_of<'a>(lines: &'a [String], kind: &str) -> Vec<&'a String> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("{kind} ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_prints_each_request_its_response_and_end_up_to_the_limit() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            &profile_yaml(
                "  - name: GET /users\n    condition: {method: GET, pathRegex: '/users/\\d+'}\n",
            ),
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        let admin = proxy.admin().to_string();
        let mut cli = Cli::spawn(&[
            "tap",
            "deploy/client",
            "--proxy",
            &admin,
            "--path",
            "/users",
            "--limit",
            "3",
        ]);
        cli.wait_tapping().await;

        // Not under --path: never shown.
        get(proxy.outbound(), AUTHORITY, "/other").await.unwrap();
        for i in 1..=4 {
            let rsp = get(proxy.outbound(), AUTHORITY, &format!("/users/{i}"))
                .await
                .unwrap();
            assert_eq!(rsp.status, 200);
        }

        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 9, "3 requests x req/rsp/end: {out:#?}");
        let reqs = lines_of(&out, "req");
        assert_eq!(reqs.len(), 3, "{out:#?}");
        for (i, req) in reqs.iter().enumerate() {
            assert!(req.contains(" proxy=out "), "{req}");
            assert!(req.contains(&format!(" dst={} ", backend.addr)), "{req}");
            assert!(req.contains(" tls=no_identity "), "{req}");
            assert!(req.contains(" :method=GET "), "{req}");
            assert!(req.contains(&format!(" :authority={AUTHORITY} ")), "{req}");
            assert!(req.contains(&format!(" :path=/users/{} ", i + 1)), "{req}");
            assert!(req.ends_with(" route=GET /users"), "{req}");
        }
        for rsp in lines_of(&out, "rsp") {
            assert!(rsp.contains(" :status=200 latency="), "{rsp}");
            assert!(!rsp.contains("proxy_error"), "{rsp}");
        }
        for end in lines_of(&out, "end") {
            assert!(end.contains(" duration="), "{end}");
            assert!(end.contains(" response-length="), "{end}");
        }
        // Each request's three events share its id.
        let id = |l: &str| l.split_whitespace().nth(1).unwrap().to_string();
        for req in &reqs {
            assert_eq!(
                out.iter().filter(|l| id(l) == id(req)).count(),
                3,
                "{out:#?}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_shows_retry_attempts_and_the_proxys_own_errors() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            &profile_yaml("  - name: GET /flaky\n    condition: {method: GET, pathRegex: /flaky}\n    isRetryable: true\n  retryBudget: {retryRatio: 0.0, minRetriesPerSecond: 1, ttl: 1s}\n"),
        );
        cfg.write_service("empty", &[HTTP_PORT]);
        cfg.set_endpoints("empty", "http", &[]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let admin = proxy.admin().to_string();
        // Two attempts of /flaky and the request to `empty`: three tapped requests.
        let mut cli = Cli::spawn(&["tap", "deploy/client", "--proxy", &admin, "--limit", "3"]);
        cli.wait_tapping().await;

        let rsp = get_with(proxy.outbound(), AUTHORITY, "/flaky", &[("x-status", "503")])
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);
        assert_eq!(backend.requests(), 2, "retried once");
        let rsp = get(proxy.outbound(), "empty.default.svc.cluster.local:80", "/nothing")
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);

        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        let reqs = lines_of(&out, "req");
        let flaky: Vec<_> = reqs.iter().filter(|l| l.contains(":path=/flaky ")).collect();
        assert_eq!(flaky.len(), 2, "{out:#?}");
        assert!(flaky[0].contains(" attempt=1"), "{}", flaky[0]);
        assert!(flaky[1].contains(" attempt=2"), "{}", flaky[1]);
        assert!(flaky.iter().all(|l| l.ends_with(" route=GET /flaky")), "{flaky:?}");
        let proxy_made: Vec<_> = lines_of(&out, "rsp")
            .into_iter()
            .filter(|l| l.contains("proxy_error="))
            .collect();
        assert_eq!(proxy_made.len(), 1, "{out:#?}");
        assert!(
            proxy_made[0].contains(" :status=503 ") && proxy_made[0].ends_with(" proxy_error=no endpoints"),
            "{}",
            proxy_made[0]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_json_lines_parse_and_ctrl_c_stops_cleanly() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let admin = proxy.admin().to_string();
        // No limit: runs until Ctrl-C.
        let mut cli = Cli::spawn(&[
            "tap", "svc/web", "--proxy", &admin, "-o", "json", "--method", "GET",
        ]);
        cli.wait_tapping().await;
        let rsp = get(proxy.outbound(), AUTHORITY, "/json/1").await.unwrap();
        assert_eq!(rsp.status, 200);
        cli.wait_stdout_lines(3).await;

        let rc = unsafe { libc::kill(cli.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0);
        let status = cli.wait_exit().await;
        assert!(
            status.success(),
            "Ctrl-C exits 0: {status}: {}",
            cli.stderr()
        );

        let out = cli.stdout();
        assert_eq!(out.len(), 3, "{out:#?}");
        let events: Vec<serde_json::Value> = out
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["req", "rsp", "end"]);
        assert!(events.iter().all(|e| e["id"] == events[0]["id"]));
        assert_eq!(events[0]["proxy"], "out");
        assert_eq!(events[0]["method"], "GET");
        assert_eq!(events[0]["path"], "/json/1");
        assert_eq!(events[0]["authority"], AUTHORITY);
        assert_eq!(events[0]["dst"], backend.addr.to_string());
        assert_eq!(events[1]["status"], 200);
        assert!(events[1]["latency_us"].is_u64());
        assert!(events[2]["response_bytes"].as_u64().unwrap() > 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_errors_say_what_to_do() {
    test_body(async {
        // Refused: loopback is not in the allowed networks.
        let proxy = Proxy::start(&["--tap-allow", "10.0.0.0/8"]);
        let admin = proxy.admin().to_string();
        let (status, _, err) = run(&["tap", "deploy/web", "--proxy", &admin]).await;
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("tap refused by"), "{err}");
        assert!(err.contains("see --tap-allow"), "{err}");
        assert!(
            err.contains(&proxy.tap().to_string()),
            "names the tap port: {err}"
        );

        // No proxy there.
        let closed = closed_port().to_string();
        let (status, _, err) = run(&["tap", "deploy/web", "--proxy", &closed]).await;
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("admin address {closed} is unreachable")),
            "{err}"
        );
        let (status, _, err) = run(&["tap", "deploy/web", "--tap", &closed]).await;
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("tap port {closed} is unreachable")),
            "{err}"
        );

        // Command-line mistakes.
        let (status, _, err) = run(&["tap", "widget/web", "--proxy", &admin]).await;
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("unknown resource kind \"widget\""), "{err}");
        let (status, _, err) = run(&["tap", "deploy/web"]).await;
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("--proxy ADMIN_ADDR"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profile_from_tap_passes_check_and_routes_the_same_traffic() {
    test_body(async {
        const UUID: &str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let admin = proxy.admin().to_string();

        let paths = [
            "/users/1".to_string(),
            "/users/22".to_string(),
            format!("/items/{UUID}/tags"),
            "/health".to_string(),
        ];
        let send = |proxy: std::net::SocketAddr| {
            let paths = paths.clone();
            async move {
                for p in &paths {
                    assert_eq!(get(proxy, AUTHORITY, p).await.unwrap().status, 200);
                }
                let mut c = h1_client(proxy).await;
                let rsp = send_h1(&mut c, h1_request("POST", AUTHORITY, "/users/3", full("x")))
                    .await
                    .unwrap();
                assert_eq!(rsp.status, 200);
            }
        };

        let mut cli = Cli::spawn(&[
            "profile",
            "--tap",
            "svc/web",
            "--tap-duration",
            "3s",
            "--proxy",
            &admin,
        ]);
        cli.wait_tapping().await;
        send(proxy.outbound()).await;
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let yaml = cli.stdout().join("\n") + "\n";
        assert!(
            yaml.contains("name: 'web.default.svc.cluster.local'"),
            "{yaml}"
        );
        for route in [
            "GET /users/{id}",
            "POST /users/{id}",
            "GET /items/{uuid}/tags",
            "GET /health",
        ] {
            assert!(
                yaml.contains(&format!("- name: '{route}'")),
                "{route}: {yaml}"
            );
        }

        // The real `pylon check` accepts it, next to the service it profiles.
        cfg.write("web-profile.yaml", &yaml);
        let check = Command::new(PYLON)
            .arg("check")
            .arg(cfg.path())
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "pylon check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        // And a proxy started with it routes the same traffic into those routes.
        let profiled = Proxy::with_config(&cfg, &[]);
        send(profiled.outbound()).await;
        let requests = |route: &str| {
            profiled
                .metric_sum("route_request_total", |s| {
                    s.label("rt_route") == Some(route)
                })
                .unwrap_or(0.0)
        };
        assert_eq!(requests("GET /users/{id}"), 2.0, "{}", profiled.metrics());
        assert_eq!(requests("POST /users/{id}"), 1.0);
        assert_eq!(requests("GET /items/{uuid}/tags"), 1.0);
        assert_eq!(requests("GET /health"), 1.0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_once_shows_the_busiest_paths_with_counts_latency_and_success() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let admin = proxy.admin().to_string();
        let mut cli = Cli::spawn(&["top", "deploy/web", "--once", "3s", "--proxy", &admin]);
        cli.wait_tapping().await;
        for i in 0..6 {
            assert_eq!(
                get(proxy.outbound(), AUTHORITY, "/busy")
                    .await
                    .unwrap()
                    .status,
                200
            );
            let status = if i % 2 == 0 { "500" } else { "200" };
            get_with(
                proxy.outbound(),
                AUTHORITY,
                "/half",
                &[("x-status", status)],
            )
            .await
            .unwrap();
        }
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert!(out[0].starts_with("METHOD"), "{out:#?}");
        let row = |path: &str| {
            out.iter()
                .find(|l| l.split_whitespace().nth(2) == Some(path))
                .unwrap_or_else(|| panic!("no {path} row: {out:#?}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let busy = row("/busy");
        assert_eq!(busy[0], "GET");
        assert_eq!(busy[3], "6", "{busy:?}");
        assert_eq!(busy[7], "100.00%", "{busy:?}");
        let half = row("/half");
        assert_eq!(half[3], "6", "{half:?}");
        assert_eq!(half[7], "50.00%", "{half:?}");
    })
    .await
}

/// The live view, driven in tmux: its screen is read back with `capture-pane`, `s` re-sorts and
/// `q` quits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_is_driven_in_tmux_and_its_screen_read_back() {
    test_body(async {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var("CI").is_err(),
                "tmux is missing (scripts/test installs it)"
            );
            eprintln!("skipping: tmux is not installed");
            return;
        }
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let session = format!("pylon-top-{}", std::process::id());
        let tmux = |args: &[&str]| {
            Command::new("tmux")
                .args(["-L", &session])
                .args(args)
                .output()
                .expect("run tmux")
        };
        let cmd = format!("{PYLON} top deploy/web --proxy {}", proxy.admin());
        let started = tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "150",
            "-y",
            "30",
            &cmd,
        ]);
        assert!(started.status.success(), "{started:?}");
        let screen = |tmux: &dyn Fn(&[&str]) -> std::process::Output| {
            String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout)
                .into_owned()
        };
        // The view is drawn once the taps are open: requests sent before would not be seen.
        let mut last = String::new();
        let open = wait_until(
            || {
                last = screen(&tmux);
                last.contains("METHOD")
            },
            OP_TIMEOUT,
        )
        .await;
        assert!(open, "pylon top never drew its table:\n{last}");
        for _ in 0..5 {
            get(proxy.outbound(), AUTHORITY, "/seen-in-top")
                .await
                .unwrap();
        }
        let drawn = wait_until(
            || {
                last = screen(&tmux);
                last.contains("/seen-in-top") && last.contains("100.00%")
            },
            OP_TIMEOUT,
        )
        .await;
        assert!(drawn, "the path never showed on the screen:\n{last}");
        assert!(
            last.contains("METHOD") && last.contains("sorted by Count"),
            "{last}"
        );
        // `s` re-sorts.
        tmux(&["send-keys", "-t", &session, "s"]);
        let resorted = wait_until(
            || {
                last = screen(&tmux);
                last.contains("sorted by Worst")
            },
            OP_TIMEOUT,
        )
        .await;
        assert!(resorted, "{last}");
        // `q` quits: the session (its only pane ran pylon) ends.
        tmux(&["send-keys", "-t", &session, "q"]);
        let quit = wait_until(
            || !tmux(&["has-session", "-t", &session]).status.success(),
            OP_TIMEOUT,
        )
        .await;
        if !quit {
            tmux(&["kill-server"]);
        }
        assert!(quit, "q did not quit pylon top");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A workload's proxies, and destinations by workload
// ---------------------------------------------------------------------------------------------

const B_AUTHORITY: &str = "b.default.svc.cluster.local:80";
const C_AUTHORITY: &str = "c.default.svc.cluster.local:80";
const A_POD: &str = "a-5c6d7-aaaaa";
const B_POD: &str = "b-7d9f8-bbbbb";

/// A Deployment's pod on loopback: `name` is `<deployment>-<hash>-<suffix>`, owned by the
/// ReplicaSet `<deployment>-<hash>`; `admin` is its proxy's admin port, if it has one.
fn pod_yaml(deployment: &str, hash: &str, name: &str, admin: Option<u16>) -> String {
    let proxy = admin.map_or(String::new(), |port| {
        format!(
            "\n  - name: pylon-proxy\n    ports: [{{name: pylon-admin, containerPort: {port}}}]"
        )
    });
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {deployment}, pod-template-hash: {hash}}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {deployment}-{hash}, uid: u-{name}, controller: true}}]\nspec:\n  serviceAccountName: {deployment}\n  containers:\n  - name: app{proxy}\nstatus: {{phase: Running, podIP: 127.0.0.1, conditions: [{{type: Ready, status: 'True'}}]}}\n"
    )
}

/// Service `name`'s one endpoint `addr`, on pod `pod`.
fn slice_with_pod(name: &str, addr: std::net::SocketAddr, pod: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n- addresses: ['{ip}']\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n",
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// Two meshed deployments on loopback, as a config dir lists them: `a` calls service `b`,
/// whose endpoint is `b`'s inbound proxy (forwarding to its app), and service `c`, an
/// unmeshed pod of deployment `c`. Every pod has IP 127.0.0.1, so only the EndpointSlices'
/// `targetRef`s tell the endpoints apart.
struct TwoWorkloads {
    cfg: ConfigDir,
    a: Proxy,
    b: Proxy,
    b_app: Backend,
    _c_app: Backend,
}

impl TwoWorkloads {
    async fn start() -> TwoWorkloads {
        let b_app = Backend::start("b-app").await;
        let c_app = Backend::start("c-app").await;
        let forward = b_app.addr.to_string();
        let b = Proxy::start(&[
            "--workload",
            "deployment/b",
            "--namespace",
            "default",
            "--pod",
            B_POD,
            "--inbound-forward",
            &forward,
        ]);
        let cfg = ConfigDir::new();
        for svc in ["b", "c"] {
            cfg.write_service(svc, &[HTTP_PORT]);
        }
        cfg.write("b-endpoints.yaml", &slice_with_pod("b", b.inbound(), B_POD));
        cfg.write(
            "c-endpoints.yaml",
            &slice_with_pod("c", c_app.addr, "c-6b8f9-ccccc"),
        );
        let a = Proxy::with_config(
            &cfg,
            &[
                "--workload",
                "deployment/a",
                "--namespace",
                "default",
                "--pod",
                A_POD,
            ],
        );
        let pods = [
            pod_yaml("a", "5c6d7", A_POD, Some(a.admin().port())),
            pod_yaml("b", "7d9f8", B_POD, Some(b.admin().port())),
            pod_yaml("c", "6b8f9", "c-6b8f9-ccccc", None),
        ];
        cfg.write("pods.yaml", &pods.join("---\n"));
        let mesh = TwoWorkloads {
            cfg,
            a,
            b,
            b_app,
            _c_app: c_app,
        };
        // Both paths work before anything is tapped.
        mesh.call(B_AUTHORITY, "/warm").await;
        mesh.call(C_AUTHORITY, "/warm").await;
        mesh
    }

    async fn call(&self, authority: &str, path: &str) {
        let rsp = get(self.a.outbound(), authority, path).await.unwrap();
        assert_eq!(
            rsp.status,
            200,
            "{authority}{path}: {}",
            self.a.log_tail(20)
        );
    }

    fn dir(&self) -> String {
        self.cfg.path_str()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_of_a_workload_uses_its_proxies_and_to_takes_a_deployment() {
    test_body(async {
        let mesh = TwoWorkloads::start().await;
        let dir = mesh.dir();
        let b_endpoint = mesh.b.inbound().to_string();

        // What a sends to b: a's proxy only, its outbound side, b's requests only.
        let mut cli = Cli::spawn(&[
            "tap",
            "deployment/a",
            "--to",
            "deployment/b",
            "--config-dir",
            &dir,
            "--limit",
            "2",
        ]);
        cli.wait_tapping().await;
        let err = cli.stderr();
        assert!(
            err.contains("tapping deployment/a to deployment/b on 1 proxy:"),
            "{err}"
        );
        assert!(
            err.contains(&format!("of proxy {} (pod {A_POD}", mesh.a.admin())),
            "{err}"
        );
        mesh.call(C_AUTHORITY, "/c-only").await;
        mesh.call(C_AUTHORITY, "/c-only").await;
        for i in 1..=2 {
            mesh.call(B_AUTHORITY, &format!("/b/{i}")).await;
        }
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 6, "2 requests x req/rsp/end: {out:#?}");
        let reqs = lines_of(&out, "req");
        for (i, req) in reqs.iter().enumerate() {
            assert!(req.contains(" proxy=out "), "{req}");
            assert!(req.contains(&format!(" dst={b_endpoint} ")), "{req}");
            assert!(
                req.contains(&format!(" :authority={B_AUTHORITY} ")),
                "{req}"
            );
            assert!(req.contains(&format!(" :path=/b/{} ", i + 1)), "{req}");
        }
        assert!(!out.iter().any(|l| l.contains("c-only")), "{out:#?}");

        // -o wide names the pod and workload behind the address.
        let mut cli = Cli::spawn(&[
            "tap",
            "deploy/a",
            "--to",
            "deploy/b",
            "--config-dir",
            &dir,
            "--limit",
            "1",
            "-o",
            "wide",
        ]);
        cli.wait_tapping().await;
        mesh.call(B_AUTHORITY, "/wide").await;
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 3, "{out:#?}");
        // The pod is on every line already; wide adds the workload and namespace.
        for line in &out {
            assert!(line.contains(&format!(" dst_pod={B_POD} ")), "{line}");
            assert!(
                line.contains(" dst_res=deployment/b dst_ns=default"),
                "{line}"
            );
        }

        // b's own proxy, both sides: what b serves shows as `in`, from b's proxy alone.
        let mut cli = Cli::spawn(&["tap", "deployment/b", "--config-dir", &dir, "--limit", "1"]);
        cli.wait_tapping().await;
        assert!(
            cli.stderr()
                .contains(&format!("of proxy {} (pod {B_POD}", mesh.b.admin())),
            "{}",
            cli.stderr()
        );
        mesh.call(B_AUTHORITY, "/served").await;
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 3, "{out:#?}");
        let req = lines_of(&out, "req");
        assert!(req[0].contains(" proxy=in "), "{out:#?}");
        assert!(req[0].contains(" :path=/served "), "{out:#?}");
        assert!(
            req[0].contains(&format!(" dst={} ", mesh.b_app.addr)),
            "{out:#?}"
        );

        // --from: b's requests from a, seen where both ends are known (a's outbound side).
        let mut cli = Cli::spawn(&[
            "tap",
            "svc/b",
            "--from",
            "deployment/a",
            "--config-dir",
            &dir,
            "--limit",
            "1",
        ]);
        cli.wait_tapping().await;
        mesh.call(C_AUTHORITY, "/c-only").await;
        mesh.call(B_AUTHORITY, "/from-a").await;
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 3, "{out:#?}");
        assert!(
            out[0].contains(" proxy=out ") && out[0].contains(":path=/from-a "),
            "{out:#?}"
        );

        // A workload with no proxy in the dir: exit 1, naming those there are.
        let (status, _, err) = run(&["tap", "deployment/nothing", "--config-dir", &dir]).await;
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.contains("no proxy of deployment/nothing in namespace default in the config dir"),
            "{err}"
        );
        assert!(
            err.contains("deployment/a") && err.contains("deployment/b"),
            "{err}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_and_profile_of_a_workload_count_its_own_requests_once() {
    test_body(async {
        let mesh = TwoWorkloads::start().await;
        let dir = mesh.dir();

        // top: a's requests to b only, split by destination.
        let mut cli = Cli::spawn(&[
            "top",
            "deployment/a",
            "--to",
            "deployment/b",
            "--once",
            "3s",
            "-o",
            "wide",
            "--config-dir",
            &dir,
        ]);
        cli.wait_tapping().await;
        for _ in 0..3 {
            mesh.call(B_AUTHORITY, "/top").await;
            mesh.call(C_AUTHORITY, "/c-only").await;
        }
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert!(out[0].starts_with("METHOD"), "{out:#?}");
        assert_eq!(out.len(), 2, "one row: {out:#?}");
        let row: Vec<&str> = out[1].split_whitespace().collect();
        assert_eq!(
            row[..5],
            ["GET", B_AUTHORITY, "deployment/b", "/top", "3"],
            "{out:#?}"
        );

        // profile: what b serves (its inbound side, each request once), not a's calls to c.
        let mut cli = Cli::spawn(&[
            "profile",
            "--tap",
            "deployment/b",
            "--tap-duration",
            "3s",
            "--config-dir",
            &dir,
        ]);
        cli.wait_tapping().await;
        for i in 1..=3 {
            mesh.call(B_AUTHORITY, &format!("/users/{i}")).await;
        }
        mesh.call(B_AUTHORITY, "/health").await;
        mesh.call(C_AUTHORITY, "/c-only").await;
        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let yaml = cli.stdout().join("\n") + "\n";
        assert!(
            yaml.contains("name: 'b.default.svc.cluster.local'"),
            "{yaml}"
        );
        assert!(
            yaml.contains("from 4 request(s) observed"),
            "counted once: {yaml}"
        );
        assert!(
            yaml.contains("# 3 request(s) observed\n  - name: 'GET /users/{id}'"),
            "{yaml}"
        );
        assert!(yaml.contains("- name: 'GET /health'"), "{yaml}");
        assert!(!yaml.contains("c-only"), "{yaml}");
    })
    .await
}

/// `NAME.CLUSTER` names are refused before any proxy is asked (the proxy given is closed:
/// asking it would fail differently), for every command that takes a resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multicluster_names_and_bad_peers_fail_at_once() {
    test_body(async {
        let closed = closed_port().to_string();
        for args in [
            &["tap", "deployment/api-gateway", "--to", "deployment/data-service.remote-cluster"][..],
            &["tap", "svc/data-service.remote-cluster", "--from", "deployment/api-gateway"],
            &["top", "deployment/api-gateway", "--to", "svc/data-service.remote-cluster", "--once", "1s"],
            &["profile", "--tap", "deployment/data-service.remote-cluster"],
        ] {
            let mut argv = args.to_vec();
            argv.extend(["--proxy", &closed]);
            let (status, _, err) = run(&argv).await;
            assert_eq!(status.code(), Some(2), "{argv:?}: {err}");
            assert!(
                err.contains("not supported yet: multicluster: ")
                    && err.contains("data-service.remote-cluster names \"data-service\" in cluster \"remote-cluster\""),
                "{argv:?}: {err}"
            );
        }
        let (status, _, err) =
            run(&["tap", "deploy/a", "--from", "svc/b", "--proxy", &closed]).await;
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("--from svc/b: expected a workload"), "{err}");
        let (status, _, err) =
            run(&["top", "svc/a", "--to", "deploy/b", "--proxy", &closed]).await;
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("svc/a is not a workload"), "{err}");
        let (status, _, err) = run(&["top", "deploy/a", "-o", "json", "--proxy", &closed]).await;
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("-o json prints the table of --once"), "{err}");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The proxy's own responses, as `pylon tap` prints them
// ---------------------------------------------------------------------------------------------

/// The story's "504s came from the mesh proxy, not the application": every response the proxy
/// makes itself is a `rsp` line with its status and `proxy_error=`, and its `end` says so too,
/// outbound (a route timeout, a refused connection) and inbound (an authorization denial), so
/// `pylon tap ... | grep -E "status=5[0-9][0-9]|timeout"` finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_prints_the_proxys_own_responses_with_their_reason() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            &profile_yaml("  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 300ms\n"),
        );
        cfg.write_service("refused", &[HTTP_PORT]);
        cfg.set_endpoints("refused", "http", &[closed_port()]);
        cfg.write("web-server.yaml", &identity_only_server_yaml(backend.addr.port()));
        let forward = backend.addr.to_string();
        let proxy = Proxy::with_config(
            &cfg,
            &["--inbound-forward", &forward, "--workload-labels", "app=web", "--namespace", "default"],
        );
        let admin = proxy.admin().to_string();
        let mut cli = Cli::spawn(&["tap", "deploy/web", "--proxy", &admin, "--limit", "3"]);
        cli.wait_tapping().await;

        // The app would take 30 s; the route's timeout answers at 300 ms.
        let rsp = get_with(proxy.outbound(), AUTHORITY, "/slow", &[("x-delay-ms", "30000")])
            .await
            .unwrap();
        assert_eq!(rsp.status, 504, "{}", rsp.text());
        let rsp = get(proxy.outbound(), "refused.default.svc.cluster.local:80", "/refused")
            .await
            .unwrap();
        assert_eq!(rsp.status, 502, "{}", rsp.text());
        let rsp = get(proxy.inbound(), "web", "/denied").await.unwrap();
        assert_eq!(rsp.status, 403, "{}", rsp.text());

        let status = cli.wait_exit().await;
        assert!(status.success(), "exit {status}: {}", cli.stderr());
        let out = cli.stdout();
        assert_eq!(out.len(), 9, "3 requests x req/rsp/end: {out:#?}");
        let id = |l: &str| l.split_whitespace().nth(1).unwrap_or_default().to_string();
        for (path, direction, status, reason) in [
            ("/slow", "out", 504, "route timeout"),
            ("/refused", "out", 502, "endpoint connection refused"),
            ("/denied", "in", 403, "unauthorized connection"),
        ] {
            let req = out
                .iter()
                .find(|l| {
                    l.starts_with("req ")
                        && l.split_whitespace().any(|w| w == format!(":path={path}"))
                })
                .unwrap_or_else(|| panic!("no req line for {path}: {out:#?}"));
            assert!(req.contains(&format!(" proxy={direction} ")), "{req}");
            let of = |kind: &str| {
                out.iter()
                    .find(|l| l.starts_with(kind) && id(l) == id(req))
                    .unwrap_or_else(|| panic!("no {kind} line for {path}: {out:#?}"))
            };
            let rsp = of("rsp ");
            assert!(rsp.contains(&format!(" :status={status} ")), "{rsp}");
            assert!(rsp.ends_with(&format!(" proxy_error={reason}")), "{rsp}");
            let end = of("end ");
            assert!(end.ends_with(&format!(" proxy_error={reason}")), "{end}");
            assert!(!end.contains("reset-error"), "not a reset: {end}");
        }
        // What the story's grep keeps: the 504's response line (and its end, by its reason).
        let grepped: Vec<&String> = out
            .iter()
            .filter(|l| {
                l.split_whitespace().any(|w| {
                    w.strip_prefix(":status=5")
                        .is_some_and(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_digit()))
                }) || l.contains("timeout")
            })
            .collect();
        assert!(
            grepped.iter().any(|l| l.starts_with("rsp ") && l.contains(":status=504")),
            "{grepped:#?}"
        );
    })
    .await
}

/// `pylon completion SHELL` prints a script that knows the subcommands; bash parses it.
#[test]
fn completion_scripts_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(PYLON)
            .args(["completion", shell])
            .output()
            .expect("run pylon completion");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("UTF-8");
        for sub in [
            "stat",
            "routes",
            "edges",
            "tap",
            "top",
            "profile",
            "completion",
        ] {
            assert!(script.contains(sub), "{shell} script lacks {sub}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join("pylon.bash");
            std::fs::write(&file, &script).expect("write");
            match Command::new("bash").arg("-n").arg(&file).output() {
                Ok(check) => assert!(
                    check.status.success(),
                    "bash -n: {}",
                    String::from_utf8_lossy(&check.stderr)
                ),
                Err(e) => assert!(std::env::var("CI").is_err(), "bash is missing: {e}"),
            }
        }
    }
    let out = Command::new(PYLON)
        .args(["completion", "powershell-7"])
        .output()
        .expect("run pylon completion");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
