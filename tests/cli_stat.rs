//! End-to-end: `pylon stat`, `pylon routes` and `pylon edges` with the real binary, against real
//! proxies carrying real traffic. A `client` workload calls service `web` through its outbound
//! proxy; `web`'s inbound proxy forwards to a backend that answers every tenth request with
//! 500 (`x-status: 500`). Read by scraping the proxies' admin `/metrics` directly, and through a
//! real Prometheus (Debian's `prometheus`) scraping them every second.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Every tenth request fails.
mod blocking;
use blocking::*;

const FAIL_EVERY: u64 = 10;

/// Service `web` (port 80) whose one endpoint is `web`'s inbound proxy.
fn write_mesh(dir: &Path, web_inbound: SocketAddr) {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n\
         spec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-0\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\n\
         addressType: IPv4\nports:\n- name: http\n  port: {port}\n  protocol: TCP\n\
         endpoints:\n- addresses:\n  - \"127.0.0.1\"\n  conditions:\n    ready: true\n",
        port = web_inbound.port()
    );
    std::fs::write(dir.join("web.yaml"), yaml).expect("write the mesh config");
}

/// `client` -> svc `web` -> `web`'s inbound proxy -> backend, plus a load generator.
struct Mesh {
    web: Proxy,
    client: Proxy,
    _dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    load: Option<JoinHandle<()>>,
}

impl Mesh {
    /// The mesh with ~100 requests/s of steady load, one in ten failing.
    fn start() -> Mesh {
        let mut mesh = Mesh::quiet();
        let load = {
            let (stop, sent, failed) = (mesh.stop.clone(), mesh.sent.clone(), mesh.failed.clone());
            let outbound = mesh.client.outbound;
            thread::spawn(move || load(outbound, &stop, &sent, &failed))
        };
        mesh.load = Some(load);
        let deadline = Instant::now() + Duration::from_secs(15);
        while mesh.sent.load(Ordering::Relaxed) < 20 {
            assert!(
                Instant::now() < deadline,
                "no traffic through the mesh within 15 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
        mesh
    }

    /// The mesh with no traffic until the test sends some.
    fn quiet() -> Mesh {
        let backend = start_backend(200);
        let dir = tempfile::tempdir().expect("tempdir");
        let web = start_proxy(&[
            "--workload",
            "deployment/web",
            "--namespace",
            "default",
            "--pod",
            "web-0",
            "--inbound-forward",
            &backend.to_string(),
        ]);
        write_mesh(dir.path(), web.inbound);
        let client = start_proxy(&[
            "--workload",
            "deployment/client",
            "--namespace",
            "default",
            "--pod",
            "client-0",
            "--config-dir",
            dir.path().to_str().expect("utf-8 path"),
        ]);
        Mesh {
            web,
            client,
            _dir: dir,
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            load: None,
        }
    }

    /// Sends exactly `n` requests through the client's outbound proxy on one connection, every
    /// `fail_every`th asking for a 500, and returns how many came back as 5xx.
    fn send(&self, n: u64, fail_every: u64) -> u64 {
        let conn = TcpStream::connect_timeout(&self.client.outbound, Duration::from_secs(2))
            .expect("connect to the client's outbound proxy");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut writer = conn;
        let mut failed = 0;
        for i in 1..=n {
            let extra = if i.is_multiple_of(fail_every) {
                "x-status: 500\r\n"
            } else {
                ""
            };
            // One write per request: a head split over writes meets Nagle's algorithm.
            let req = format!(
                "GET http://web.default.svc.cluster.local/ HTTP/1.1\r\nhost: web.default.svc.cluster.local\r\n{extra}\r\n"
            );
            writer.write_all(req.as_bytes()).expect("send a request");
            let status = read_response(&mut reader).expect("a response");
            if status >= 500 {
                failed += 1;
            }
        }
        failed
    }

    fn admins(&self) -> Vec<String> {
        vec![
            "--proxy".into(),
            self.web.admin.to_string(),
            "--proxy".into(),
            self.client.admin.to_string(),
        ]
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.load.take() {
            let _ = h.join();
        }
    }
}

/// ~100 requests/s through the client's outbound proxy (an HTTP proxy), every tenth asking
/// the backend for a 500; counts what it got back.
fn load(outbound: SocketAddr, stop: &AtomicBool, sent: &AtomicU64, failed: &AtomicU64) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(conn) = TcpStream::connect_timeout(&outbound, Duration::from_secs(2)) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut writer = conn;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let extra = if n.is_multiple_of(FAIL_EVERY) {
                "x-status: 500\r\n"
            } else {
                ""
            };
            let req = format!(
                "GET http://web.default.svc.cluster.local/ HTTP/1.1\r\nhost: web.default.svc.cluster.local\r\n{extra}\r\n"
            );
            if writer.write_all(req.as_bytes()).is_err() {
                break;
            }
            let Some(status) = read_response(&mut reader) else {
                break;
            };
            sent.fetch_add(1, Ordering::Relaxed);
            if status >= 500 {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn pylon(args: &[String]) -> Output {
    run_pylon(args)
}

fn args(list: &[&str], more: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.to_string())
        .chain(more.iter().cloned())
        .collect()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The table's rows as maps from header to cell.
fn rows(table: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = table.lines().filter(|l| !l.trim().is_empty());
    let headers: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    lines
        .take_while(|l| !l.contains(" edges: "))
        .map(|l| {
            headers
                .iter()
                .cloned()
                .zip(l.split_whitespace().map(str::to_owned))
                .collect()
        })
        .collect()
}

fn percent(cell: &str) -> f64 {
    cell.strip_suffix('%')
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a percentage: {cell:?}"))
}

fn rps(cell: &str) -> f64 {
    cell.strip_suffix("rps")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a rate: {cell:?}"))
}

/// The success rate the load generator saw: 90% (one in ten fails).
const EXPECTED_SUCCESS: f64 = 100.0 * (1.0 - 1.0 / FAIL_EVERY as f64);

#[test]
fn stat_routes_and_edges_from_direct_scrapes() {
    let mesh = Mesh::start();
    let admins = mesh.admins();

    // What web received: one meshed pod, ~90% success, some rate, latencies.
    let out = pylon(&args(&["stat", "deploy/web", "--window", "2s"], &admins));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon stat deploy/web --window 2s\n{text}");
    assert!(text.starts_with("NAME   MESHED   SUCCESS"), "{text}");
    let r = rows(&text);
    assert_eq!(r.len(), 1, "{text}");
    assert_eq!(r[0]["NAME"], "web");
    assert_eq!(r[0]["MESHED"], "1/1");
    let success = percent(&r[0]["SUCCESS"]);
    assert!(
        (success - EXPECTED_SUCCESS).abs() <= 4.0,
        "success {success}% vs ~{EXPECTED_SUCCESS}%\n{text}"
    );
    assert!(rps(&r[0]["RPS"]) > 0.0, "{text}");
    assert!(r[0]["LATENCY_P50"].ends_with("ms"), "{text}");
    assert_ne!(
        r[0]["TCP_CONN"], "0",
        "the load generator keeps a connection open\n{text}"
    );

    // The same as JSON.
    let out = pylon(&args(
        &["stat", "deployment/web", "--window", "2s", "-o", "json"],
        &admins,
    ));
    assert!(out.status.success(), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let row = &doc["rows"][0];
    assert_eq!(row["name"], "web");
    assert_eq!(row["namespace"], "default");
    assert_eq!(row["meshed"], 1);
    let rate = row["success_rate"].as_f64().expect("success_rate");
    assert!((rate * 100.0 - EXPECTED_SUCCESS).abs() <= 4.0, "{doc}");
    assert!(row["rps"].as_f64().expect("rps") > 0.0);

    // Proxies keep 15 minutes and answer at once (wait_pylon gives any command 40 s); longer
    // windows are Prometheus' job.
    let out = pylon(&args(&["stat", "deploy/web", "--window", "15m"], &admins));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(rows(&stdout(&out))[0]["MESHED"], "1/1");
    let out = pylon(&args(&["stat", "deploy/web", "--window", "16m"], &admins));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--prometheus"),
        "{}",
        show(&out)
    );

    // What client sent to web, wide (RETRY%: no retries configured -> 0.00%).
    let out = pylon(&args(
        &[
            "stat",
            "deploy/client",
            "--to",
            "svc/web",
            "--window",
            "2s",
            "-o",
            "wide",
        ],
        &admins,
    ));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon stat deploy/client --to svc/web -o wide\n{text}");
    let r = rows(&text);
    assert_eq!(r[0]["NAME"], "client", "{text}");
    assert!(
        (percent(&r[0]["SUCCESS"]) - EXPECTED_SUCCESS).abs() <= 4.0,
        "{text}"
    );
    assert_eq!(r[0]["RETRY%"], "0.00%", "{text}");
    // The client proxy's connections to web's endpoint are counted (peer="dst").
    assert!(
        r[0]["TCP_CONN"].parse::<u32>().is_ok_and(|n| n >= 1),
        "TCP_CONN: {text}"
    );

    // The same traffic seen as the service's.
    let out = pylon(&args(
        &[
            "stat",
            "svc/web",
            "--from",
            "deploy/client",
            "--window",
            "2s",
        ],
        &admins,
    ));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(rows(&stdout(&out))[0]["NAME"], "web", "{}", show(&out));

    // Routes: no ServiceProfile, so everything is [DEFAULT].
    let out = pylon(&args(
        &[
            "routes",
            "deploy/client",
            "--to",
            "svc/web",
            "--window",
            "2s",
        ],
        &admins,
    ));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon routes deploy/client --to svc/web\n{text}");
    let r = rows(&text);
    assert_eq!(r[0]["ROUTE"], "[DEFAULT]", "{text}");
    assert_eq!(r[0]["SERVICE"], "web", "{text}");
    assert!(
        (percent(&r[0]["SUCCESS"]) - EXPECTED_SUCCESS).abs() <= 4.0,
        "{text}"
    );

    // The routes web serves, from its inbound proxy.
    let out = pylon(&args(&["routes", "deploy/web", "--window", "2s"], &admins));
    assert!(out.status.success(), "{}", show(&out));
    let r = rows(&stdout(&out));
    assert_eq!(r[0]["ROUTE"], "[DEFAULT]", "{}", show(&out));
    assert!(rps(&r[0]["RPS"]) > 0.0, "{}", show(&out));

    // Edges: client -> web, failing (90% < 99.5%), not secured (no mTLS yet).
    let out = pylon(&args(&["edges", "deployment", "--window", "2s"], &admins));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon edges deployment\n{text}");
    let r = rows(&text);
    assert_eq!(r.len(), 1, "{text}");
    assert_eq!(
        (
            r[0]["SRC"].as_str(),
            r[0]["DST"].as_str(),
            r[0]["SECURED"].as_str()
        ),
        ("client", "web", "no"),
        "{text}"
    );
    assert!(text.contains("!! failing"), "{text}");
    assert!(text.contains("1 edges: 1 failing"), "{text}");
    let out = pylon(&args(
        &["edges", "deployment", "--window", "2s", "-o", "json"],
        &admins,
    ));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["edges"][0]["flags"][0], "failing", "{doc}");

    let sent = mesh.sent.load(Ordering::Relaxed);
    let failed = mesh.failed.load(Ordering::Relaxed);
    assert!(
        sent > 0 && failed > 0,
        "the load generator saw {failed}/{sent} failures"
    );
}

#[test]
fn errors_a_user_can_act_on() {
    // Unreachable proxy: exit 1, naming the address.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let out = pylon(&args(
        &[
            "stat",
            "deploy/web",
            "--window",
            "1s",
            "--proxy",
            &closed.to_string(),
        ],
        &[],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&closed.to_string()) && err.contains("unreachable"),
        "{err}"
    );

    // Unknown kind, bad window, no source, --from where the data has no source: exit 2.
    for (argv, needle) in [
        (
            vec!["stat", "cronjob/x", "--proxy", "127.0.0.1:1"],
            "unknown resource kind",
        ),
        (
            vec![
                "stat",
                "deploy/web",
                "--window",
                "5 minutes",
                "--proxy",
                "127.0.0.1:1",
            ],
            "bad --window",
        ),
        (vec!["stat", "deploy/web"], "no data source"),
        (
            vec![
                "stat",
                "deploy/web",
                "--from",
                "deploy/client",
                "--proxy",
                "127.0.0.1:1",
            ],
            "no client identity",
        ),
        (
            vec![
                "stat",
                "deploy/client",
                "--to",
                "deployment",
                "--proxy",
                "127.0.0.1:1",
            ],
            "expected one destination: deployment/NAME, pod/NAME, ns/NAME, svc/NAME or authority/HOST",
        ),
        (
            vec![
                "routes",
                "svc/web",
                "--to",
                "deploy/db",
                "--proxy",
                "127.0.0.1:1",
            ],
            "not a workload",
        ),
        (vec!["edges", "svc", "--proxy", "127.0.0.1:1"], "workloads"),
    ] {
        let out = pylon(&args(&argv, &[]));
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{argv:?}: {err}");
    }

    // A proxy with no traffic: exit 1, "no traffic in the last 1s".
    let idle = start_proxy(&["--workload", "deployment/idle", "--namespace", "default"]);
    let out = pylon(&args(
        &[
            "stat",
            "deploy/idle",
            "--window",
            "1s",
            "--proxy",
            &idle.admin.to_string(),
        ],
        &[],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no traffic for deployment/idle in the last 1s"),
        "{}",
        show(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// The value of a one-element PromQL answer.
fn prom_value(prometheus: SocketAddr, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={encoded}"))?;
    if status != 200 {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    doc["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn json_rows(out: &Output, key: &str) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", show(out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    doc[key].as_array().cloned().unwrap_or_default()
}

/// A known burst of requests with a known failure pattern, read back through a real
/// Prometheus and by scraping the proxies directly: both count every request and give the
/// exact success rate.
#[test]
fn stat_and_edges_from_prometheus() {
    if !Path::new(PROMETHEUS).exists() {
        let reason = format!("{PROMETHEUS} is not installed (./scripts/test installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true: {reason}");
        }
        eprintln!("skipping: {reason}");
        return;
    }
    const SENT: u64 = 400;
    const FAIL: u64 = 8;
    let mesh = Mesh::quiet();
    let dir = tempfile::tempdir().expect("tempdir");
    let config: PathBuf = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: pylon\n  static_configs:\n  - targets: ['{}', '{}']\n",
            mesh.web.admin, mesh.client.admin
        ),
    )
    .expect("write prometheus.yml");
    let (_prometheus, listen) =
        start_prometheus(Path::new(PROMETHEUS), &config, &dir.path().join("data"));
    let url = format!("http://{listen}");

    // Until Prometheus scrapes both proxies (bounded).
    let deadline = Instant::now() + Duration::from_secs(45);
    while prom_value(listen, "sum(up)") != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both proxies within 45 s"
        );
        thread::sleep(Duration::from_millis(250));
    }

    let failed = mesh.send(SENT, FAIL);
    assert_eq!(
        failed,
        SENT / FAIL,
        "the backend fails every {FAIL}th request"
    );
    let expected_success = (SENT - failed) as f64 / SENT as f64;
    // The proxies' own windows, asked right after the burst: every request is in them.
    let direct_args = args(
        &["stat", "deploy/web", "--window", "1m", "-o", "json"],
        &mesh.admins(),
    );
    let direct = json_rows(&pylon(&direct_args), "rows");
    println!("proxies' windows: {direct:?}");
    assert_eq!(direct.len(), 1, "{direct:?}");
    assert_eq!(direct[0]["requests"], SENT, "{direct:?}");
    assert_eq!(direct[0]["success_rate"], expected_success, "{direct:?}");

    // Until Prometheus has scraped both proxies after the burst (each on its own schedule).
    let deadline = Instant::now() + Duration::from_secs(20);
    for side in [
        r#"sum(response_total{direction="inbound",deployment="web"})"#,
        r#"sum(response_total{direction="outbound",deployment="client"})"#,
    ] {
        while prom_value(listen, side) != Some(SENT as f64) {
            assert!(
                Instant::now() < deadline,
                "Prometheus did not see the {SENT} requests within 20 s: {side} = {:?}",
                prom_value(listen, side)
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
    let prom = |argv: &[&str]| pylon(&args(argv, &["--prometheus".into(), url.clone()]));
    let within_1pct = |row: &serde_json::Value| {
        let n = row["requests"].as_u64().expect("requests") as f64;
        (n - SENT as f64).abs() <= 0.01 * SENT as f64
    };

    // What web received, from Prometheus: the same count and the exact success rate.
    let out = prom(&["stat", "deploy/web", "--window", "1m"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon stat deploy/web --prometheus URL --window 1m\n{text}");
    let r = rows(&text);
    assert_eq!(
        (r.len(), r[0]["NAME"].as_str(), r[0]["MESHED"].as_str()),
        (1, "web", "1/1"),
        "{text}"
    );
    assert_eq!(
        percent(&r[0]["SUCCESS"]),
        100.0 * expected_success,
        "{text}"
    );
    let web = json_rows(
        &prom(&["stat", "deploy/web", "--window", "1m", "-o", "json"]),
        "rows",
    );
    assert!(within_1pct(&web[0]), "{web:?}");
    assert_eq!(web[0]["success_rate"], expected_success, "{web:?}");
    // Direct-scrape mode agrees with Prometheus mode.
    assert_eq!(
        (&web[0]["requests"], &web[0]["success_rate"]),
        (&direct[0]["requests"], &direct[0]["success_rate"])
    );

    // What client sent to web, its routes, and the edge: the same requests.
    let client = json_rows(
        &prom(&[
            "stat",
            "deploy/client",
            "--to",
            "svc/web",
            "--window",
            "1m",
            "-o",
            "json",
        ]),
        "rows",
    );
    assert!(within_1pct(&client[0]), "{client:?}");
    assert_eq!(client[0]["success_rate"], expected_success, "{client:?}");
    let routes = json_rows(
        &prom(&[
            "routes",
            "deploy/client",
            "--to",
            "svc/web",
            "--window",
            "1m",
            "-o",
            "json",
        ]),
        "rows",
    );
    assert_eq!(routes[0]["name"], "[DEFAULT]", "{routes:?}");
    assert!(within_1pct(&routes[0]), "{routes:?}");
    assert_eq!(routes[0]["success_rate"], expected_success, "{routes:?}");
    let edges = json_rows(
        &prom(&["edges", "deployment", "--window", "1m", "-o", "json"]),
        "edges",
    );
    assert_eq!(
        (&edges[0]["src"], &edges[0]["dst"]),
        (&"client".into(), &"web".into()),
        "{edges:?}"
    );
    assert!(within_1pct(&edges[0]), "{edges:?}");
    assert_eq!(edges[0]["flags"][0], "failing", "{edges:?}");

    // A resource Prometheus has nothing for: exit 1, no traffic.
    let out = prom(&["stat", "deploy/nothing", "--window", "5s"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no traffic for deployment/nothing in the last 5s"),
        "{}",
        show(&out)
    );

    // Prometheus unreachable: exit 1, naming it.
    let dead = format!("http://{}", free_addr());
    let out = pylon(&args(&["stat", "deploy/web", "--prometheus", &dead], &[]));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dead),
        "{}",
        show(&out)
    );
}

/// Route names hold braces (`GET /orders/{id}`, as Linkerd's and `pylon profile --tap`'s do):
/// `pylon routes` shows them with their traffic. And the destination is a workload too: the
/// config dir's Pod names its deployment, so `stat deploy/client --to deploy/web` answers.
#[test]
fn routes_with_braces_and_destinations_by_workload() {
    let backend = start_backend(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n\
         spec:\n  ports:\n  - name: http\n    port: 80\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-0\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\n\
         addressType: IPv4\nports:\n- name: http\n  port: {port}\n\
         endpoints:\n- addresses: [\"127.0.0.1\"]\n  targetRef: {{kind: Pod, name: web-5d8f7-x2x4z, namespace: default}}\n\
         ---\napiVersion: v1\nkind: Pod\n\
         metadata:\n  name: web-5d8f7-x2x4z\n  namespace: default\n  labels: {{app: web, pod-template-hash: 5d8f7}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f7, uid: u, controller: true}}]\n\
         spec: {{serviceAccountName: web, containers: [{{name: app}}]}}\n\
         status: {{phase: Running, podIP: 127.0.0.1, conditions: [{{type: Ready, status: \"True\"}}]}}\n\
         ---\napiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
         metadata:\n  name: web.default.svc.cluster.local\n  namespace: default\n\
         spec:\n  routes:\n  - name: GET /orders/{{id}}\n    condition: {{method: GET, pathRegex: '/orders/[^/]+'}}\n    isRetryable: true\n",
        port = backend.port()
    );
    std::fs::write(dir.path().join("web.yaml"), yaml).expect("write");
    let client = start_proxy(&[
        "--config-dir",
        dir.path().to_str().expect("utf-8"),
        "--workload",
        "deployment/client",
    ]);
    let admins = vec!["--proxy".to_string(), client.admin.to_string()];
    let conn =
        TcpStream::connect_timeout(&client.outbound, Duration::from_secs(2)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    // Requests on the route, then what `pylon` says about the window they are in.
    let mut measure = |list: &[&str]| {
        for i in 0..20 {
            write!(
                writer,
                "GET http://web.default.svc.cluster.local/orders/{i} HTTP/1.1\r\nhost: web.default.svc.cluster.local\r\n\r\n"
            )
            .expect("send");
            assert_eq!(read_response(&mut reader), Some(200));
        }
        pylon(&args(list, &admins))
    };
    let out = measure(&[
        "routes",
        "deploy/client",
        "--to",
        "svc/web",
        "--window",
        "2s",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    println!("$ pylon routes deploy/client --to svc/web\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with("GET /orders/{id} ")),
        "{text}"
    );
    // The same in JSON, with its traffic.
    let out = measure(&[
        "routes",
        "deploy/client",
        "--to",
        "svc/web",
        "--window",
        "2s",
        "-o",
        "json",
    ]);
    let routes = json_rows(&out, "rows");
    let route = routes
        .iter()
        .find(|r| r["name"] == "GET /orders/{id}")
        .unwrap_or_else(|| panic!("the route is shown: {routes:?}"));
    assert!(route["rps"].as_f64().unwrap_or(0.0) > 0.0, "{routes:?}");

    // Linkerd's users type --to deployment/ first.
    let out = measure(&[
        "stat",
        "deploy/client",
        "--to",
        "deploy/web",
        "--window",
        "2s",
        "-o",
        "json",
    ]);
    let rows = json_rows(&out, "rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0]["rps"].as_f64().unwrap_or(0.0) > 0.0, "{rows:?}");
    assert_eq!(rows[0]["success_rate"], 1.0, "{rows:?}");
}

/// Names qualified by another cluster (`NAME.CLUSTER`, as multicluster guides type them) fail
/// at once with what Pylon supports, before Prometheus (unreachable here, so asking it would
/// fail differently) is asked, and without waiting the window out. The flags `stat`, `routes`
/// and `edges` share with `tap` and `top` (`--to`, `--from`, `-A`) are taken by all three.
#[test]
fn multicluster_names_fail_at_once_and_peers_are_shared() {
    let dead = format!("http://{}", free_addr());
    let source = vec![
        "--prometheus".to_string(),
        dead.clone(),
        "--window".into(),
        "10m".into(),
    ];
    for list in [
        &[
            "stat",
            "deployment/api-gateway",
            "--to",
            "deployment/data-service.remote-cluster",
        ][..],
        &[
            "stat",
            "svc/data-service.remote-cluster",
            "--from",
            "deployment/api-gateway",
        ],
        &[
            "routes",
            "deployment/api-gateway",
            "--to",
            "svc/data-service.remote-cluster",
        ],
        &[
            "edges",
            "deployment",
            "--to",
            "deploy/data-service.remote-cluster",
            "-A",
        ],
    ] {
        let out = pylon(&args(list, &source));
        assert_eq!(out.status.code(), Some(2), "{list:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not supported yet: multicluster: ")
                && err.contains("data-service.remote-cluster names \"data-service\" in cluster \"remote-cluster\""),
            "{list:?}: {err}"
        );
    }
    // The same flags reach the data source when the names are this cluster's: Prometheus
    // is asked (and is unreachable).
    for list in [
        &["edges", "deployment", "--to", "svc/web"][..],
        &["edges", "deployment", "--from", "deploy/client"],
        &["routes", "svc/web", "--from", "deploy/client", "-A"],
    ] {
        let out = pylon(&args(list, &source));
        assert_eq!(out.status.code(), Some(1), "{list:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&dead),
            "{list:?}: {}",
            show(&out)
        );
    }
}
