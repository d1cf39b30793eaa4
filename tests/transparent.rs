//! End-to-end: transparent interception in real network namespaces, no mocks.
//!
//! Two namespaces joined by a veth pair (a private /30 that exists only inside them). Each gets
//! the rules of `pylon-proxy init` and a `pylon-proxy` running as the proxy uid. A plain client
//! in A calls B's app by B's IP; the call must pass through A's outbound and B's inbound proxy,
//! and neither proxy may loop. Opaque TCP (a client-first echo and a server-first banner) must
//! pass too. Another test checks `init` is idempotent and `--remove` leaves nothing.
//!
//! Needs root with `ip`, `iptables`, `curl`, `python3` and `setpriv`. Without them the tests
//! print a notice and pass, unless `CI=true`, where they fail saying what is missing.

mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_pylon-proxy");
const PROXY_UID: u32 = 2102;
const INBOUND_PORT: u16 = 4143;
const OUTBOUND_PORT: u16 = 4140;
const ADMIN_PORT: u16 = 4191;
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
const BANNER_PORT: u16 = 7001;
/// How many HTTP calls the client makes; each proxy must count exactly this many.
const CALLS: usize = 3;

// ----- preconditions -----

/// True when this test can run (root, and the tools it drives); see `support::prerequisites`.
fn preconditions(test: &str) -> bool {
    support::prerequisites(
        test,
        &["ip", "iptables", "curl", "python3", "setpriv"],
        "iproute2 iptables curl python3 util-linux",
    )
}

// ----- bounded commands -----

/// Runs a command to completion within `timeout`, capturing its output.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd`, failing the test with its output unless it succeeds; returns stdout.
fn check(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn ip(args: &[&str]) -> String {
    check(Command::new("ip").args(args))
}

/// A command run inside namespace `ns` (as root).
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

// ----- the lab: namespaces and children, always cleaned up -----

static NEXT: AtomicU32 = AtomicU32::new(0);
const NS_PREFIX: &str = "pylon-e2e-";

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Owns the namespaces and processes of one test; dropping it (also on panic) kills the
/// processes and deletes the namespaces, which takes their veths and rules with them.
struct Lab {
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        remove_stale_namespaces();
        Lab {
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A fresh namespace with loopback up.
    fn netns(&mut self) -> String {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NS_PREFIX}{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair between `a` and `b` with `addr_a`/`addr_b` (CIDR form) on each end.
    fn link(&mut self, a: &str, addr_a: &str, b: &str, addr_b: &str) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // Interface names are at most 15 bytes.
        let (va, vb) = (
            format!("pv{}x{n}a", std::process::id()),
            format!("pv{}x{n}b", std::process::id()),
        );
        ip(&[
            "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ]);
        for (ns, dev, addr) in [(a, &va, addr_a), (b, &vb, addr_b)] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// Starts `program args` in `ns`, as `uid` when given; output goes to a log file.
    fn spawn(&mut self, ns: &str, name: &str, uid: Option<u32>, program: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let mut cmd = match uid {
            None => in_ns(ns, program),
            Some(uid) => {
                let mut cmd = in_ns(ns, "setpriv");
                cmd.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_string(),
                ])
                .arg(program);
                cmd
            }
        };
        cmd.args(args)
            .env("PYLON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            // Its own process group, so cleanup reaches anything it forks.
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
    }

    fn log_of(&self, name: &str) -> String {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Fails the test if `name` has exited.
    fn assert_running(&mut self, name: &str) {
        let status: Option<ExitStatus> = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .and_then(|p| p.child.try_wait().expect("try_wait"));
        if let Some(status) = status {
            panic!(
                "{name} exited early ({status}); its log:\n{}",
                self.log_of(name)
            );
        }
    }

    /// Waits until `check` is true, failing after `timeout` with `what` and `name`'s log.
    fn wait_until(
        &mut self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running(name);
            if check() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name}: {what} not within {timeout:?}; its log:\n{}",
                    self.log_of(name)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Ok(pid) = libc::pid_t::try_from(p.child.id()) {
                // SAFETY: signals our own child's process group (created with process_group(0)).
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            if thread::panicking() {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- last lines of {} ----", p.name);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for ns in &self.namespaces {
            let out = run_bounded(
                Command::new("ip").args(["netns", "del", ns]),
                Duration::from_secs(10),
            );
            if !out.status.success() {
                eprintln!("could not delete namespace {ns}: {}", text(&out.stderr));
            }
        }
    }
}

/// Deletes namespaces left by earlier runs whose process is gone (e.g. killed by a signal).
fn remove_stale_namespaces() {
    let out = run_bounded(
        Command::new("ip").args(["netns", "list"]),
        Duration::from_secs(10),
    );
    for line in text(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = run_bounded(
                Command::new("ip").args(["netns", "del", name]),
                Duration::from_secs(10),
            );
        }
    }
}

// ----- pieces of the scenario -----

/// B's app: HTTP on 8080 (a fixed body), a client-first echo on 7000 and a server-first
/// banner on 7001. Prints "ready" once all three listen.
const APP_PY: &str = r#"
import socket, sys, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

BODY = sys.argv[1].encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

def echo(conn):
    with conn:
        conn.settimeout(10)
        data = conn.recv(65536)
        conn.sendall(b"echo:" + data)

def banner(conn):
    with conn:
        conn.sendall(b"220 pylon-banner\r\n")

def serve(port, handle):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

serve(int(sys.argv[3]), echo)
serve(int(sys.argv[4]), banner)
httpd = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler)
print("ready", flush=True)
httpd.serve_forever()
"#;

/// A raw TCP client: connects, sends argv[3] (hex, may be empty), reads until EOF or
/// argv[4] bytes, prints what it got as hex. Exit 3 on timeout.
const CLIENT_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)
if sys.argv[3]:
    s.sendall(bytes.fromhex(sys.argv[3]))
want, got = int(sys.argv[4]), b""
try:
    while len(got) < want:
        d = s.recv(65536)
        if not d:
            break
        got += d
except socket.timeout:
    print(got.hex())
    sys.exit(3)
print(got.hex())
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn python() -> &'static str {
    // Prefer the system interpreter: version-manager shims fork and read dotfiles.
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `pylon-proxy init ARGS` in `ns`, as root.
fn init(ns: &str, args: &[&str]) -> String {
    check(in_ns(ns, PROXY).arg("init").args(args))
}

fn nat_rules(ns: &str) -> String {
    check(in_ns(ns, "iptables").args(["-w", "-t", "nat", "-S"]))
}

/// Starts a proxy in `ns` as the proxy uid and waits for its /ready.
fn start_proxy(lab: &mut Lab, ns: &str, name: &str) {
    let inbound = format!("0.0.0.0:{INBOUND_PORT}");
    let outbound = format!("127.0.0.1:{OUTBOUND_PORT}");
    let admin = format!("0.0.0.0:{ADMIN_PORT}");
    let opaque = BANNER_PORT.to_string();
    lab.spawn(
        ns,
        name,
        Some(PROXY_UID),
        PROXY,
        &[
            "--inbound-addr",
            &inbound,
            "--outbound-addr",
            &outbound,
            "--admin-addr",
            &admin,
            "--opaque-ports",
            &opaque,
        ],
    );
    let url = format!("http://127.0.0.1:{ADMIN_PORT}/ready");
    lab.wait_until(name, "GET /ready -> 200", Duration::from_secs(20), || {
        let out = run_bounded(
            in_ns(ns, "curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "1",
                &url,
            ]),
            Duration::from_secs(5),
        );
        text(&out.stdout) == "200"
    });
}

fn scrape(ns: &str) -> String {
    let url = format!("http://127.0.0.1:{ADMIN_PORT}/metrics");
    check(in_ns(ns, "curl").args(["-sS", "--max-time", "5", &url]))
}

/// The sum of `name`'s samples whose labels include all of `want`.
fn metric_sum(metrics: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    support::metric_value(metrics, name, want).unwrap_or(0.0)
}

fn requests(metrics: &str, direction: &str) -> f64 {
    metric_sum(metrics, "request_total", &[("direction", direction)])
}

/// Scrapes `ns` until `ok` holds (metrics are recorded as responses finish), at most 5 s;
/// returns the last scrape either way.
fn scrape_until(ns: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(ns);
        if ok(&m) || Instant::now() >= deadline {
            return m;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Raw TCP from `ns` to `host:port`: sends `send`, returns what came back (hex).
fn tcp_call(lab: &Lab, ns: &str, host: &str, port: u16, send: &[u8], want: usize) -> String {
    let script = lab.dir.path().join("client.py");
    let out = check(in_ns(ns, python()).arg(&script).args([
        host,
        &port.to_string(),
        &hex(send),
        &want.to_string(),
    ]));
    out.trim().to_string()
}

// ----- the tests -----

#[test]
fn call_passes_through_both_proxies_without_loops() {
    if !preconditions("call_passes_through_both_proxies_without_loops") {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = (lab.netns(), lab.netns());
    let octet = std::process::id() % 250 + 1;
    let (ip_a, ip_b) = (format!("10.77.{octet}.1"), format!("10.77.{octet}.2"));
    lab.link(&a, &format!("{ip_a}/30"), &b, &format!("{ip_b}/30"));

    let uid = PROXY_UID.to_string();
    for ns in [&a, &b] {
        init(ns, &["--proxy-uid", &uid]);
    }

    let token = format!("hello from namespace B, run {}", std::process::id());
    std::fs::write(lab.dir.path().join("app.py"), APP_PY).expect("write app.py");
    std::fs::write(lab.dir.path().join("client.py"), CLIENT_PY).expect("write client.py");
    let app = lab.dir.path().join("app.py");
    let app = app.to_str().expect("utf-8 temp path").to_string();
    let ports = [HTTP_PORT, ECHO_PORT, BANNER_PORT].map(|p| p.to_string());
    lab.spawn(
        &b,
        "app-b",
        None,
        python(),
        &[&app, &token, &ports[0], &ports[1], &ports[2]],
    );
    start_proxy(&mut lab, &a, "proxy-a");
    start_proxy(&mut lab, &b, "proxy-b");
    let app_log = lab.dir.path().join("app-b.log");
    lab.wait_until("app-b", "\"ready\"", Duration::from_secs(10), || {
        std::fs::read_to_string(&app_log).is_ok_and(|l| l.contains("ready"))
    });

    // The client in A knows nothing of proxies: it calls B's IP.
    let url = format!("http://{ip_b}:{HTTP_PORT}/");
    for i in 0..CALLS {
        let call = run_bounded(
            in_ns(&a, "curl").args(["-sS", "-i", "--max-time", "5", &url]),
            Duration::from_secs(10),
        );
        let out = text(&call.stdout);
        assert!(
            call.status.success(),
            "call {i} from A to {url} failed ({}): {}\nproxy A's log shows a redirect loop as \
             endless accepts (or 'Too many open files') if its own traffic is not exempt",
            call.status,
            text(&call.stderr)
        );
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "call {i}: not a 200:\n{out}"
        );
        assert!(
            !out.to_ascii_lowercase().contains("pylon-proxy-error"),
            "call {i}: a proxy-made response:\n{out}"
        );
        assert!(
            out.ends_with(&token),
            "call {i}: not the app's body:\n{out}"
        );
    }

    // A counted them outbound, B inbound, each exactly once: no loop through either proxy.
    let want = CALLS as f64;
    let ma = scrape_until(&a, |m| requests(m, "outbound") >= want);
    let mb = scrape_until(&b, |m| requests(m, "inbound") >= want);
    assert_eq!(requests(&ma, "outbound"), want, "proxy A outbound:\n{ma}");
    assert_eq!(requests(&ma, "inbound"), 0.0, "proxy A inbound:\n{ma}");
    assert_eq!(requests(&mb, "inbound"), want, "proxy B inbound:\n{mb}");
    assert_eq!(requests(&mb, "outbound"), 0.0, "proxy B outbound:\n{mb}");

    // Opaque TCP, client first: bytes that are not HTTP are echoed through both proxies.
    let opens_before = metric_sum(&ma, "tcp_open_total", &[("direction", "outbound")]);
    let ping = b"\x00\x01pylon-opaque-ping\n";
    let mut expected = b"echo:".to_vec();
    expected.extend_from_slice(ping);
    let got = tcp_call(&lab, &a, &ip_b, ECHO_PORT, ping, expected.len());
    assert_eq!(got, hex(&expected), "echo through the proxies");

    // Opaque TCP, server first (an opaque port on both proxies): the banner arrives.
    let banner = b"220 pylon-banner\r\n";
    let got = tcp_call(&lab, &a, &ip_b, BANNER_PORT, b"", banner.len());
    assert_eq!(got, hex(banner), "server-first banner through the proxies");

    let ma = scrape_until(&a, |m| {
        metric_sum(m, "tcp_open_total", &[("direction", "outbound")]) >= opens_before + 2.0
    });
    let mb = scrape(&b);
    assert!(
        metric_sum(&ma, "tcp_open_total", &[("direction", "outbound")]) >= opens_before + 2.0,
        "proxy A did not count the two opaque connections outbound:\n{ma}"
    );
    assert!(
        metric_sum(&mb, "tcp_open_total", &[("direction", "inbound")]) >= 2.0,
        "proxy B did not count inbound connections:\n{mb}"
    );

    // And nothing keeps going: a loop would grow these without bound.
    thread::sleep(Duration::from_millis(500));
    let (ma2, mb2) = (scrape(&a), scrape(&b));
    for (who, before, after) in [("A", &ma, &ma2), ("B", &mb, &mb2)] {
        for dir in ["inbound", "outbound"] {
            assert_eq!(
                requests(before, dir),
                requests(after, dir),
                "proxy {who} {dir} requests still growing"
            );
        }
        let opens = |m: &str| {
            ["inbound", "outbound"]
                .iter()
                .map(|d| metric_sum(m, "tcp_open_total", &[("direction", d)]))
                .sum::<f64>()
        };
        assert!(
            opens(after) <= 4.0 * CALLS as f64 + 10.0,
            "proxy {who} opened {} connections for {CALLS} calls and 2 TCP sessions",
            opens(after)
        );
        assert_eq!(
            opens(before),
            opens(after),
            "proxy {who} still opening connections"
        );
    }
    lab.assert_running("proxy-a");
    lab.assert_running("proxy-b");
}

/// `curl -X method url -d body` from `ns`: the status code and the body.
fn curl_in(ns: &str, method: &str, url: &str, body: &str) -> (String, String) {
    let out = run_bounded(
        in_ns(ns, "curl").args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "--data-binary",
            body,
            "-w",
            "\n%{http_code}",
            url,
        ]),
        Duration::from_secs(10),
    );
    let out = text(&out.stdout);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.to_string(), body.to_string())
}

/// The admin port listens on every address (Linkerd's default), so its mutations check that
/// the peer is on this host: from another host, `PUT /proxy-log-level` (which could hide
/// authorization denials by turning logging off) and `POST /shutdown` are refused; reads work.
#[test]
fn admin_mutations_are_refused_from_another_host() {
    if !preconditions("admin_mutations_are_refused_from_another_host") {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = (lab.netns(), lab.netns());
    let octet = std::process::id() % 250 + 1;
    let (ip_a, ip_b) = (format!("10.78.{octet}.1"), format!("10.78.{octet}.2"));
    lab.link(&a, &format!("{ip_a}/30"), &b, &format!("{ip_b}/30"));
    start_proxy(&mut lab, &a, "proxy-a");

    let remote = format!("http://{ip_a}:{ADMIN_PORT}");
    let (code, body) = curl_in(&b, "PUT", &format!("{remote}/proxy-log-level"), "off");
    assert_eq!(code, "403", "remote PUT /proxy-log-level: {body}");
    let (code, body) = curl_in(&b, "POST", &format!("{remote}/shutdown"), "");
    assert_eq!(code, "403", "remote POST /shutdown: {body}");
    let (code, _) = curl_in(&b, "GET", &format!("{remote}/metrics"), "");
    assert_eq!(code, "200", "remote GET /metrics");
    let (code, body) = curl_in(&b, "GET", &format!("{remote}/proxy-log-level"), "");
    assert_eq!(
        (code.as_str(), body.trim()),
        ("200", "info"),
        "the remote PUT changed it"
    );
    lab.assert_running("proxy-a");

    // From the pod itself, the same change is made.
    let local = format!("http://127.0.0.1:{ADMIN_PORT}/proxy-log-level");
    let (code, body) = curl_in(&a, "PUT", &local, "warn");
    assert_eq!(code, "204", "local PUT /proxy-log-level: {body}");
    let (code, body) = curl_in(&a, "GET", &local, "");
    assert_eq!((code.as_str(), body.trim()), ("200", "warn"));
}

#[test]
fn init_is_idempotent_and_remove_takes_everything() {
    if !preconditions("init_is_idempotent_and_remove_takes_everything") {
        return;
    }
    let mut lab = Lab::new();
    let ns = lab.netns();
    let args = [
        "--skip-outbound-ports",
        "25,4567-4568",
        "--skip-outbound-cidrs",
        "10.96.0.0/12",
    ];
    let count = |rules: &str, prefix: &str, target: &str| {
        rules
            .lines()
            .filter(|l| l.starts_with(prefix) && l.ends_with(&format!("-j {target}")))
            .count()
    };

    init(&ns, &args);
    let once = nat_rules(&ns);
    init(&ns, &args);
    let twice = nat_rules(&ns);
    assert_eq!(once, twice, "a second init changed the rules");
    assert_eq!(
        count(&twice, "-A PREROUTING", "PYLON_INBOUND"),
        1,
        "{twice}"
    );
    assert_eq!(count(&twice, "-A OUTPUT", "PYLON_OUTPUT"), 1, "{twice}");
    for rule in [
        "-A PYLON_OUTPUT -m owner --uid-owner 2102",
        "-A PYLON_OUTPUT -o lo",
        "--dports 25,4567:4568",
        "-A PYLON_OUTPUT -d 10.96.0.0/12",
        "-j REDIRECT --to-ports 4140",
        "--dports 4190,4191",
        "-j REDIRECT --to-ports 4143",
    ] {
        assert!(twice.contains(rule), "missing {rule:?} in:\n{twice}");
    }

    // Changed flags replace the chain's rules; still one jump each.
    init(&ns, &["--inbound-port", "5143"]);
    let changed = nat_rules(&ns);
    assert!(changed.contains("--to-ports 5143"), "{changed}");
    assert!(!changed.contains("--to-ports 4143"), "{changed}");
    assert!(!changed.contains("10.96.0.0/12"), "{changed}");
    assert_eq!(count(&changed, "-A PREROUTING", "PYLON_INBOUND"), 1);
    assert_eq!(count(&changed, "-A OUTPUT", "PYLON_OUTPUT"), 1);

    // A dry run prints and touches nothing.
    let printed = init(&ns, &["--dry-run", "--remove"]);
    assert!(printed.contains("-X PYLON_OUTPUT"), "{printed}");
    assert_eq!(nat_rules(&ns), changed, "--dry-run changed the rules");

    init(&ns, &["--remove"]);
    let removed = nat_rules(&ns);
    assert!(!removed.contains("PYLON"), "left behind:\n{removed}");
    init(&ns, &["--remove"]); // absent is fine

    // Without CAP_NET_ADMIN it fails, says why and names the command.
    let out = run_bounded(
        in_ns(&ns, "setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", PROXY])
            .arg("init"),
        Duration::from_secs(20),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "unprivileged init succeeded: {err}");
    assert!(
        err.contains("not permitted") && err.contains("CAP_NET_ADMIN") && err.contains("-S"),
        "{err}"
    );
    assert!(!nat_rules(&ns).contains("PYLON"));
}

/// Needs neither root nor iptables: a dry run only prints.
#[test]
fn init_dry_run_and_input_errors_need_no_privileges() {
    let out = run_bounded(
        Command::new(PROXY).args([
            "init",
            "--dry-run",
            "--iptables",
            "/nonexistent/iptables",
            "--skip-outbound-ports",
            "4567-4568",
        ]),
        Duration::from_secs(20),
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "dry run failed: {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("/nonexistent/iptables -w -t nat -N PYLON_INBOUND"),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.ends_with(
            "-A PREROUTING -m comment --comment pylon/install-inbound -j PYLON_INBOUND"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("--dports 4567:4568"), "{stdout}");

    let out = run_bounded(
        Command::new(PROXY).args(["init", "--iptables", "/nonexistent/iptables"]),
        Duration::from_secs(20),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("iptables not found: install the iptables package"),
        "{err}"
    );

    for (flag, value, says) in [
        ("--skip-outbound-cidrs", "10.0.0.0/33", "invalid CIDR"),
        ("--skip-inbound-ports", "4191,99999", "invalid port"),
        ("--outbound-port", "0", "invalid port"),
    ] {
        let out = run_bounded(
            Command::new(PROXY).args(["init", "--dry-run", flag, value]),
            Duration::from_secs(20),
        );
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(err.contains(says) && err.contains(value), "{flag}: {err}");
    }
}

#[test]
fn metric_lines_parse() {
    let m = "# TYPE request counter\n\
             request_total{direction=\"outbound\",authority=\"a,b\\\"c\"} 2\n\
             request_total{direction=\"inbound\"} 5 1700000000\n\
             request_total_other 9\n";
    assert_eq!(requests(m, "outbound"), 2.0);
    assert_eq!(requests(m, "inbound"), 5.0);
    assert_eq!(metric_sum(m, "request_total", &[]), 7.0);
}
