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
        for _ in 0..5 {
            get(proxy.outbound(), AUTHORITY, "/seen-in-top")
                .await
                .unwrap();
        }
        let mut last = String::new();
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
