//! `pylon dashboard` against real meshes: its JSON API answers every page from a config-dir
//! mesh of real proxies with known failures, the pages show that mesh in a real headless
//! Chromium (the failing edge marked failing, in words as well as colour; live tap events of
//! requests sent during the test; no console errors), and `pylon demo` prints the URL of a
//! dashboard showing its own mesh. Screenshots go to `target/tmp/screenshots/dashboard/`.
//!
//! The mesh: `frontend` calls `api`, whose one pod fails every second request (50 %), and
//! `auth`, which always answers 200.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

mod blocking;
#[path = "blocking/browser.rs"]
mod browser;
#[path = "blocking/mesh.rs"]
mod mesh;
use blocking::*;
use browser::Browser;
use mesh::*;

/// Requests each of frontend's edges carries before the checks.
const SENT: usize = 40;

/// The test mesh, its traffic sent, and a dashboard reading its config dir.
struct Fixture {
    mesh: Mesh,
    frontend: usize,
    dashboard: Dashboard,
}

fn fixture() -> Fixture {
    let mut mesh = Mesh::new();
    let frontend = mesh.pod("frontend", None);
    mesh.serving("api", &[App::FailEvery { n: 2, status: 500 }]);
    mesh.serving("auth", &[App::Ok]);
    mesh.write();
    mesh.until_routed(frontend, "api");
    mesh.until_routed(frontend, "auth");
    let statuses = mesh.send(frontend, "api", "/orders/1", SENT);
    assert_eq!(
        statuses.iter().filter(|&&s| s == 500).count(),
        SENT / 2,
        "{statuses:?}"
    );
    assert!(mesh
        .send(frontend, "auth", "/login", SENT)
        .iter()
        .all(|&s| s == 200));
    let dashboard = Dashboard::start(&["--config-dir", mesh.dir()]);
    Fixture {
        mesh,
        frontend,
        dashboard,
    }
}

/// A running `pylon dashboard` and where it serves.
struct Dashboard {
    _proc: Proc,
    addr: SocketAddr,
}

impl Dashboard {
    /// `pylon dashboard ARGS --addr 127.0.0.1:0`, once it prints its URL.
    fn start(args: &[&str]) -> Dashboard {
        let mut child = Command::new(PYLON)
            .arg("dashboard")
            .args(args)
            .args(["--addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pylon dashboard");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc(child);
        let url = printed_url(stdout, "dashboard: http://");
        Dashboard {
            _proc: proc,
            addr: url,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path`: the status, headers (lowercased names) and body.
    fn get(&self, path: &str) -> (u16, Vec<(String, String)>, String) {
        get_with_host(self.addr, path, &self.addr.to_string())
    }

    /// `GET path` answered 200 with JSON.
    fn json(&self, path: &str) -> Value {
        let (status, headers, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        assert!(
            header(&headers, "content-type").is_some_and(|t| t.starts_with("application/json")),
            "GET {path}: {headers:?}"
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }
}

/// Reads lines from a child's stdout (in a thread, bounded to 60 s) until one holds
/// `marker` followed by an address; the rest keeps being drained.
fn printed_url(stdout: impl Read + Send + 'static, marker: &'static str) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sent {
                continue;
            }
            if let Some(rest) = line.split_once(marker).map(|(_, r)| r) {
                let addr = rest.split(['/', ' ']).next().unwrap_or("").to_string();
                sent = tx.send(addr).is_ok();
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no {marker:?} line within 60 s"));
    addr.parse()
        .unwrap_or_else(|e| panic!("{marker}{addr}: not an address: {e}"))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A bounded HTTP/1.1 GET with the given `Host`, read to the end (`connection: close`).
fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> (u16, Vec<(String, String)>, String) {
    let mut conn = TcpStream::connect(addr).expect("connect to the dashboard");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if header(&headers, "transfer-encoding") == Some("chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, headers, body)
}

/// A row of api's traffic: the requests sent, half of them failed; and the probes that
/// waited for the mesh to route (which succeed, and are a few at most).
fn assert_half_failed(row: &Value) {
    let requests = row["requests"].as_u64().unwrap_or(0);
    let success = row["success_rate"].as_f64().unwrap_or(0.0);
    let probes = requests.saturating_sub(SENT as u64);
    assert!(
        (SENT as u64..=SENT as u64 + 5).contains(&requests),
        "{row:#}"
    );
    let expected = (SENT as f64 / 2.0 + probes as f64) / requests as f64;
    assert!(
        (success - expected).abs() < 1e-9,
        "{row:#}: expected {expected}"
    );
}

fn find<'a>(rows: &'a Value, key: &str, value: &str) -> &'a Value {
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r[key] == value))
        .unwrap_or_else(|| panic!("no row with {key}={value} in {rows:#}"))
}

fn edge<'a>(edges: &'a Value, src: &str, dst: &str) -> &'a Value {
    edges
        .as_array()
        .and_then(|edges| edges.iter().find(|e| e["src"] == src && e["dst"] == dst))
        .unwrap_or_else(|| panic!("no edge {src} -> {dst} in {edges:#}"))
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots/dashboard")
}

#[test]
fn the_api_answers_every_page_from_a_known_mesh() {
    let f = fixture();
    let d = &f.dashboard;

    // The overview: what each workload received, its pods, and its flags.
    let overview = d.json("/api/overview?window=1m");
    let api = find(&overview["workloads"], "name", "api");
    assert_eq!(api["namespace"], "default");
    assert_eq!(api["meshed"], 1);
    assert_half_failed(api);
    assert_eq!(api["failing"], true);
    let auth = find(&overview["workloads"], "name", "auth");
    assert_eq!(auth["success_rate"], 1.0);
    assert_eq!(auth["failing"], false);
    let frontend = find(&overview["workloads"], "name", "frontend");
    assert_eq!(frontend["requests"], 0, "frontend only sends");
    let ns = find(&overview["namespaces"], "name", "default");
    assert_eq!(ns["workloads"], 3);
    assert_eq!(ns["meshed"], 3);
    assert!(overview["source"]
        .as_str()
        .is_some_and(|s| s.contains(f.mesh.dir())));

    // The topology: the failing edge flagged with `pylon edges`' thresholds, both drawn.
    let topo = d.json("/api/topology");
    assert_eq!(topo["thresholds"]["failing_below"], 0.995);
    let failing = edge(&topo["edges"], "frontend", "api");
    assert_eq!(
        failing["flags"],
        serde_json::json!(["failing"]),
        "{failing:#}"
    );
    assert_half_failed(failing);
    assert_eq!(failing["dst_kind"], "deployment");
    assert_eq!(
        failing["tap"],
        "resource=deployment%2Ffrontend&to=deployment%2Fapi&namespace=default"
    );
    let ok = edge(&topo["edges"], "frontend", "auth");
    assert_eq!(ok["flags"], serde_json::json!([]));
    for e in [failing, ok] {
        assert!(e["width"].as_f64().is_some_and(|w| w >= 1.0), "{e:#}");
        assert!(
            e["points"].as_array().is_some_and(|p| p.len() >= 2),
            "{e:#}"
        );
    }
    let nodes = topo["nodes"].as_array().expect("nodes");
    let sender = find(&topo["nodes"], "id", "default/deployment/frontend");
    assert!(
        sender["sent_rps"].as_f64().is_some_and(|r| r > 0.0),
        "{sender:#}"
    );
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["id"].as_str()).collect();
    for id in [
        "default/deployment/frontend",
        "default/deployment/api",
        "default/deployment/auth",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    let x = |id: &str| {
        nodes
            .iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["x"].as_f64())
            .expect("x")
    };
    assert!(x("default/deployment/frontend") < x("default/deployment/api"));

    // A workload: who calls it, whom it calls, its routes and pods, its history.
    let w = d.json("/api/workload/default/api");
    assert_eq!(w["workload"]["name"], "api");
    assert_half_failed(edge(&w["inbound"], "frontend", "api"));
    assert_eq!(w["outbound"], serde_json::json!([]));
    assert_half_failed(find(&w["routes"], "name", "[DEFAULT]"));
    assert_half_failed(find(&w["pods"], "name", "api-7c9f5-a"));
    let w = d.json("/api/workload/default/frontend");
    assert_eq!(w["outbound"].as_array().map(Vec::len), Some(2), "{w:#}");
    let history = d.json("/api/workload/default/api/history");
    assert_eq!(history["step_seconds"], 60);
    let points = history["points"].as_array().expect("points");
    assert_eq!(points.len(), 15);
    let last = &points[14];
    assert_eq!(last["ago_seconds"], 0);
    assert_half_failed(last);
    assert_eq!(points[0]["ago_seconds"], 14 * 60);
    assert_eq!(
        points[0]["requests"], 0,
        "the proxies are younger than that"
    );
    // The minutes add up to what the proxies counted in all (nothing counted twice).
    let total: u64 = points.iter().filter_map(|p| p["requests"].as_u64()).sum();
    let counted = d.json("/api/overview?window=15m");
    assert_eq!(
        Some(total),
        find(&counted["workloads"], "name", "api")["requests"].as_u64(),
        "{history:#}"
    );

    // Check: the config dir's findings (this one is clean).
    let check = d.json("/api/check");
    assert_eq!(check["available"], true);
    assert_eq!(check["summary"]["errors"], 0, "{check:#}");
    assert!(check["summary"]["objects"].as_u64().is_some_and(|n| n > 0));

    // Mistakes get a status and a message the page shows.
    let (status, _, body) = d.get("/api/workload/default/nope");
    assert_eq!(status, 404);
    assert!(body.contains("no workload deployment/nope"), "{body}");
    let (status, _, body) = d.get("/api/overview?window=20m");
    assert_eq!(status, 400);
    assert!(body.contains("15m"), "{body}");
    let (status, _, body) = d.get("/api/overview?window=soon");
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = d.get("/api/nothing");
    assert_eq!(status, 404);
    // A page served elsewhere cannot reach it by rebinding a name to loopback.
    let (status, _, body) = get_with_host(d.addr, "/api/overview", "evil.example");
    assert_eq!(status, 403, "{body}");

    // The pages and assets: one shell per page, nothing from elsewhere.
    for (path, page) in [
        ("/", "overview"),
        ("/topology", "topology"),
        ("/tap", "tap"),
        ("/check", "check"),
        ("/workloads/default/api", "workload"),
    ] {
        let (status, headers, body) = d.get(path);
        assert_eq!(status, 200, "{path}");
        assert!(
            body.contains(&format!("data-page=\"{page}\"")),
            "{path}: {body}"
        );
        assert!(
            body.contains(f.mesh.dir()),
            "{path} names its source: {body}"
        );
        assert!(
            body.contains("data-failing-below=\"0.995\""),
            "{path} carries `pylon edges`' thresholds: {body}"
        );
        let csp = header(&headers, "content-security-policy").unwrap_or("");
        assert!(csp.contains("default-src 'self'"), "{path}: {headers:?}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}: no external URL"
        );
    }
    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let (status, headers, body) = d.get(path);
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), Some(kind), "{path}");
        assert!(
            !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }

    // The tap stream: server-sent events of requests sent while it is open.
    let mut conn = TcpStream::connect(d.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    write!(
        conn,
        "GET /api/tap?resource=deployment/frontend&to=deployment/api&namespace=default HTTP/1.1\r\nhost: {}\r\n\r\n",
        d.addr
    )
    .expect("send");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 16384];
    while !(seen.contains("\"path\":\"/orders/tapped\"") && seen.contains("event: top")) {
        assert!(
            Instant::now() < deadline,
            "no tap events within 20 s:\n{seen}"
        );
        f.mesh.send(f.frontend, "api", "/orders/tapped", 2);
        if let Ok(n) = conn.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(seen.contains("content-type: text/event-stream"), "{seen}");
    assert!(seen.contains("event: ready"), "{seen}");
    assert!(
        seen.contains("\"status\":500") || seen.contains("\"status\":200"),
        "{seen}"
    );
    assert!(
        !seen.contains("/login"),
        "only the edge to api is tapped:\n{seen}"
    );
    let (status, _, body) = d.get("/api/tap?resource=svc/api&to=deployment/auth");
    assert_eq!(status, 400, "a service sends nothing: {body}");
}

/// The Prometheus server of Debian's `prometheus` package (`./scripts/test` installs it).
const PROMETHEUS: &str = "/usr/bin/prometheus";

#[test]
fn prometheus_answers_the_pages_as_the_proxies_do() {
    if !std::path::Path::new(PROMETHEUS).exists() {
        let reason = format!("{PROMETHEUS} is not installed (./scripts/test installs it)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {reason}"
        );
        eprintln!("skipping: {reason}");
        return;
    }
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let targets: Vec<String> = f
        .mesh
        .pods
        .iter()
        .map(|p| format!("'{}'", p.proxy.admin))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: pylon\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .expect("write prometheus.yml");
    let (_prometheus, listen) = start_prometheus(
        std::path::Path::new(PROMETHEUS),
        &config,
        &dir.path().join("data"),
    );
    let prom = Dashboard::start(&["--prometheus", &format!("http://{listen}")]);

    // The proxies' own windows are the reference; Prometheus has it all once it scraped
    // every proxy after the traffic (bounded).
    // (Each proxy is scraped on its own schedule: api's side and frontend's both.)
    let direct = f.dashboard.json("/api/overview?window=5m");
    let want = find(&direct["workloads"], "name", "api").clone();
    let direct_topo = f.dashboard.json("/api/topology?window=5m");
    let sent = edge(&direct_topo["edges"], "frontend", "api")["requests"].clone();
    let answer = |path: &str| -> Option<Value> {
        let (status, _, body) = prom.get(path);
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let requests_of = |rows: &Value, key: &str, value: &str| {
        rows.as_array()
            .and_then(|rows| rows.iter().find(|r| r[key] == value))
            .map(|r| r["requests"].clone())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (overview, topo) = loop {
        let overview = answer("/api/overview?window=5m").unwrap_or_default();
        let topo = answer("/api/topology?window=5m").unwrap_or_default();
        if requests_of(&overview["workloads"], "name", "api") == Some(want["requests"].clone())
            && requests_of(&topo["edges"], "dst", "api") == Some(sent.clone())
        {
            break (overview, topo);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not have api's {} requests within 60 s: {overview} {topo}",
            want["requests"]
        );
        thread::sleep(Duration::from_millis(500));
    };
    let api = find(&overview["workloads"], "name", "api");
    assert_eq!(
        api["success_rate"], want["success_rate"],
        "{api:#} vs {want:#}"
    );
    assert_eq!(api["meshed"], 1);
    assert!(overview["source"]
        .as_str()
        .is_some_and(|s| s.contains("Prometheus")));

    assert_eq!(
        edge(&topo["edges"], "frontend", "api")["flags"],
        serde_json::json!(["failing"])
    );
    assert_eq!(
        edge(&topo["edges"], "frontend", "auth")["flags"],
        serde_json::json!([])
    );
    let w = prom.json("/api/workload/default/api?window=5m");
    assert_eq!(
        edge(&w["inbound"], "frontend", "api")["requests"],
        want["requests"]
    );
    // Fifteen one-minute windows of Prometheus' samples add up to everything counted.
    let history = prom.json("/api/workload/default/api/history");
    let points = history["points"].as_array().expect("points");
    assert_eq!(points.len(), 15);
    let total: u64 = points.iter().filter_map(|p| p["requests"].as_u64()).sum();
    assert_eq!(Some(total), want["requests"].as_u64(), "{history:#}");

    // Check audits a config dir and tap reads proxies: both say so rather than fail.
    let check = prom.json("/api/check");
    assert_eq!(check["available"], false);
    assert!(
        check["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--config-dir")),
        "{check:#}"
    );
    let (status, _, body) = prom.get("/api/tap?resource=deployment/frontend");
    assert_eq!(status, 400);
    assert!(body.contains("--proxy or --config-dir"), "{body}");
}

/// The number of elements matching a CSS selector.
fn count(page: &browser::Page, selector: &str) -> u64 {
    page.eval(&format!(
        "document.querySelectorAll({}).length",
        serde_json::to_string(selector).expect("json")
    ))
    .as_u64()
    .unwrap_or(0)
}

#[test]
fn the_pages_show_the_mesh_in_a_real_browser() {
    let f = fixture();
    let d = &f.dashboard;
    let shots = screenshots();
    let browser = Browser::launch();
    let page = browser.new_page();

    // Workloads: a row per workload, api's failure in words.
    page.goto(&d.url("/"));
    page.wait_for(
        "[...document.querySelectorAll('a')].some(a => a.getAttribute('href') === '/workloads/default/api')",
        "the overview links to api's page",
    );
    let text = page.eval("document.querySelector('main').innerText");
    let text = text.as_str().unwrap_or("");
    assert!(
        text.contains("failing"),
        "api is flagged failing in words: {text}"
    );
    assert!(text.contains("frontend") && text.contains("auth"), "{text}");
    page.screenshot(&shots.join("overview.png"));

    // The topology: the failing edge marked failing (class, flag and words), the healthy
    // one not; clicking it opens its stat and a tap link filtered to it.
    page.goto(&d.url("/topology"));
    page.wait_for(
        "document.querySelectorAll('#topology g.edge').length === 2",
        "two edges drawn",
    );
    let failing = "#topology g.edge[data-flags~='failing']";
    assert_eq!(count(&page, failing), 1);
    let marked = page.eval(&format!(
        "(() => {{ const e = document.querySelector(\"{failing}\"); \
         return [e.getAttribute('data-src'), e.getAttribute('data-dst'), \
         e.classList.contains('edge-failing'), e.textContent, e.getAttribute('aria-label')]; }})()"
    ));
    let marked = marked.as_array().expect("an array");
    assert!(
        marked[0].as_str().is_some_and(|s| s.contains("frontend")),
        "{marked:?}"
    );
    assert!(
        marked[1].as_str().is_some_and(|s| s.contains("api")),
        "{marked:?}"
    );
    assert_eq!(marked[2], true, "coloured as failing: {marked:?}");
    assert!(
        marked[3].as_str().is_some_and(|s| s.contains("failing")),
        "and says so: {marked:?}"
    );
    assert!(
        marked[4].as_str().is_some_and(|s| s.contains("failing")),
        "to a screen reader too: {marked:?}"
    );
    let healthy = page.eval(
        "[...document.querySelectorAll('#topology g.edge')].filter(e => e.classList.contains('edge-ok')).map(e => e.getAttribute('data-dst'))",
    );
    assert!(healthy.to_string().contains("auth"), "{healthy}");
    page.screenshot(&shots.join("topology.png"));
    // Keyboard first: Enter on the focused edge opens the panel.
    page.press_enter(failing);
    page.wait_for(
        "(() => { const p = document.querySelector('#edge-panel'); return p && !p.hidden && /failing/.test(p.innerText) && /%/.test(p.innerText); })()",
        "the edge's panel with its success rate",
    );
    let tap_href =
        page.eval("document.querySelector('#edge-panel a.tap-link').getAttribute('href')");
    let tap_href = tap_href.as_str().expect("a tap link").to_string();
    assert!(tap_href.starts_with("/tap?"), "{tap_href}");
    assert!(tap_href.contains("to=deployment%2Fapi"), "{tap_href}");
    page.screenshot(&shots.join("topology-edge.png"));

    // The tap page, from the edge's link: events for requests sent now.
    page.click("#edge-panel a.tap-link");
    page.wait_for(
        "document.body.dataset.page === 'tap' && document.readyState === 'complete'",
        "the tap page",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&page, ".tap-row") < 4 {
        assert!(
            Instant::now() < deadline,
            "no tap rows within 20 s: {}",
            page.eval("document.querySelector('main').innerText")
        );
        f.mesh.send(f.frontend, "api", "/orders/live", 2);
        thread::sleep(Duration::from_millis(200));
    }
    let paths =
        page.eval("[...document.querySelectorAll('.tap-row')].map(r => r.innerText).join('\\n')");
    let paths = paths.as_str().unwrap_or("");
    assert!(paths.contains("/orders/live"), "{paths}");
    assert!(
        !paths.contains("/login"),
        "only the edge is tapped: {paths}"
    );
    // The status filter keeps the failures only.
    page.eval(
        "(() => { const i = document.querySelector('#status'); i.value = '5xx'; \
         i.dispatchEvent(new Event('input', {bubbles: true})); })()",
    );
    page.wait_for(
        "[...document.querySelectorAll('.tap-row')].filter(r => r.offsetParent !== null).every(r => (r.dataset.status || '').startsWith('5'))",
        "only 5xx rows shown",
    );
    page.wait_for(
        "[...document.querySelectorAll('#top tbody tr:not(.empty)')].some(r => r.innerText.includes('/orders/live'))",
        "the top table's row for the path",
    );
    page.screenshot(&shots.join("tap.png"));
    // Pause: nothing is added while paused.
    page.click("#pause");
    page.wait_for(
        "document.querySelector('#pause').getAttribute('aria-pressed') === 'true'",
        "paused",
    );
    let before = count(&page, ".tap-row");
    f.mesh.send(f.frontend, "api", "/orders/while-paused", 4);
    thread::sleep(Duration::from_millis(800));
    assert_eq!(count(&page, ".tap-row"), before, "rows added while paused");
    page.wait_for(
        "document.querySelector('#tap-status').innerText.includes('paused')",
        "the page says it is paused",
    );

    // A workload's page: its callers, routes, pods and sparklines.
    page.goto(&d.url("/workloads/default/api"));
    page.wait_for(
        "document.querySelector('main').innerText.includes('api-7c9f5-a')",
        "api's pod listed",
    );
    page.wait_for(
        "document.querySelectorAll('#history svg.sparkline[role=img]').length >= 2",
        "the 15-minute sparklines",
    );
    let label =
        page.eval("document.querySelector('#history svg.sparkline').getAttribute('aria-label')");
    assert!(
        label.as_str().is_some_and(|l| l.contains('%')),
        "described for screen readers: {label}"
    );
    let text = page.eval("document.querySelector('main').innerText");
    assert!(
        text.as_str().is_some_and(|t| t.contains("frontend")),
        "{text}"
    );
    page.screenshot(&shots.join("workload.png"));

    // Check: the config dir's audit.
    page.goto(&d.url("/check"));
    page.wait_for(
        "/0 errors|no problems|No problems/i.test(document.querySelector('main').innerText)",
        "check's summary",
    );
    page.screenshot(&shots.join("check.png"));

    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

#[test]
fn the_demo_prints_its_dashboard_and_shows_its_mesh() {
    let mut child: Child = Command::new(PYLON)
        .args(["demo", "--duration", "90s", "--rps", "20"])
        .args(["--dashboard-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pylon demo");
    let stdout = child.stdout.take().expect("stdout");
    let demo = Demo(child);
    let addr = printed_url(stdout, "dashboard   http://");
    let browser = Browser::launch();
    let page = browser.new_page();
    page.goto(&format!("http://{addr}/topology"));
    page.wait_for(
        "[...document.querySelectorAll('#topology g.edge')].some(e => (e.getAttribute('data-src') || '').includes('loadgen') && (e.getAttribute('data-dst') || '').includes('ml-inference'))",
        "the demo's loadgen -> ml-inference edge",
    );
    page.screenshot(&screenshots().join("demo-topology.png"));
    page.goto(&format!("http://{addr}/"));
    page.wait_for(
        "document.querySelector('main').innerText.includes('ml-inference')",
        "the demo's workloads",
    );
    page.screenshot(&screenshots().join("demo-overview.png"));
    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    drop(page);
    drop(browser);
    demo.stop();
}

/// The demo, interrupted as Ctrl-C would (so it stops its proxies) when done or dropped.
struct Demo(Child);

impl Demo {
    fn stop(mut self) {
        self.interrupt();
    }

    fn interrupt(&mut self) {
        let Ok(pid) = i32::try_from(self.0.id()) else {
            return;
        };
        // SAFETY: a plain signal to our own child.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.interrupt();
        }
    }
}

#[test]
fn a_dashboard_for_the_network_or_without_a_source_is_refused() {
    let out = run_pylon(&[
        "dashboard",
        "--config-dir",
        "/nonexistent",
        "--addr",
        "0.0.0.0:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--allow-remote"), "{err}");
    let out = run_pylon(&["dashboard", "--addr", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no data source"), "{err}");
}
