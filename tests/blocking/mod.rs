//! Blocking helpers for the CLI's end-to-end tests, which drive real processes from plain
//! threads: a proxy started on loopback with the addresses it logs, an HTTP/1.1 backend that
//! answers the status a request asks for, and one-shot HTTP clients.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `pylon`, the binary these tests drive.
pub const PYLON: &str = env!("CARGO_BIN_EXE_pylon");

/// A binary next to `pylon` in the target dir (`cargo build --workspace --bins` builds them).
pub fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(PYLON).with_file_name(name);
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p {name} --bins`",
        bin.display()
    );
    bin
}

/// Kills the child process when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One HTTP/1.1 GET, `Connection: close`: `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A `pylon-proxy` on loopback (port 0 everywhere), with the addresses it logged.
pub struct Proxy {
    pub _proc: Proc,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// Its log (JSON lines), as `kubectl logs` would show it: the last 10,000 lines.
    pub logs: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl Proxy {
    /// The log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

pub fn start_proxy(args: &[&str]) -> Proxy {
    let mut cmd = Command::new(sibling("pylon-proxy"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PYLON_") || k.starts_with("LINKERD2_PROXY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("PYLON_LOG", "info")
        .env("PYLON_THREADS", "1")
        .args(["--inbound-addr", "127.0.0.1:0"])
        .args(["--outbound-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--tap-addr", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pylon-proxy");
    let stderr = child.stderr.take().expect("stderr");
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel::<(String, SocketAddr)>();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let kept = logs.clone();
    thread::spawn(move || {
        // {"message":"listening","listener":"admin","addr":"127.0.0.1:40123",...}, the fields
        // at the top level or under "fields".
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut kept) = kept.lock() {
                if kept.len() == 10_000 {
                    kept.pop_front();
                }
                kept.push_back(line.clone());
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let field = |k: &str| {
                v.get(k)
                    .or_else(|| v.get("fields").and_then(|f| f.get(k)))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            if field("message").as_deref() == Some("listening") {
                if let (Some(l), Some(Ok(addr))) =
                    (field("listener"), field("addr").map(|a| a.parse()))
                {
                    let _ = tx.send((l, addr));
                }
            }
        }
    });
    let mut found = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while found.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (l, addr) = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("pylon-proxy {args:?} did not log its 4 listeners within 15 s: {found:?}")
        });
        found.insert(l, addr);
    }
    Proxy {
        _proc: proc,
        inbound: found["inbound"],
        outbound: found["outbound"],
        admin: found["admin"],
        logs,
    }
}

/// An HTTP/1.1 server answering `x-status` (else `default_status`), keep-alive.
pub fn start_backend(default_status: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || serve(conn, default_status));
        }
    });
    addr
}

fn serve(conn: TcpStream, default_status: u16) {
    serve_requests(conn, |req| {
        let status = req
            .header("x-status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_status);
        format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok")
    });
}

/// A request a test server read: its path and headers (names lower-cased); the body is
/// read and dropped.
pub struct ServedRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl ServedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers the requests of one keep-alive connection with what `respond` writes (a whole
/// raw response), until the client closes it.
pub fn serve_requests(conn: TcpStream, mut respond: impl FnMut(&ServedRequest) -> String) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = conn;
    while let Some(req) = read_request(&mut reader) {
        if writer.write_all(respond(&req).as_bytes()).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<ServedRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let req = ServedRequest { path, headers };
    let length = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(req)
}

/// Reads one response (status line, headers, content-length body); its status.
pub fn read_response(reader: &mut BufReader<TcpStream>) -> Option<u16> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(status)
}

/// A Prometheus server for `config` on a free loopback port, its data under `data`: the
/// process (killed when dropped) and its address.
pub fn start_prometheus(program: &Path, config: &Path, data: &Path) -> (Proc, SocketAddr) {
    let listen = free_addr();
    let proc = Proc(
        Command::new(program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    (proc, listen)
}

/// `pylon ARGS` to completion, bounded to 40 s (a command that blocks fails the test).
pub fn run_pylon<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> std::process::Output {
    let child = Command::new(PYLON)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pylon");
    wait_pylon(child, args)
}

/// Waits (at most 40 s) for a `pylon` started with `args`.
pub fn wait_pylon<S: std::fmt::Debug>(mut child: Child, args: &[S]) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pylon {args:?} did not finish within 40 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `n` GETs for `http://AUTHORITY/PATH` through a proxy's outbound listener, on one
/// keep-alive connection: their statuses, 0 for each one that got no response.
pub fn send_gets(outbound: SocketAddr, authority: &str, path: &str, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    if let Ok(conn) = TcpStream::connect_timeout(&outbound, Duration::from_secs(2)) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        if let Ok(read_half) = conn.try_clone() {
            let mut reader = BufReader::new(read_half);
            let mut writer = conn;
            for _ in 0..n {
                let req =
                    format!("GET http://{authority}{path} HTTP/1.1\r\nhost: {authority}\r\n\r\n");
                if writer.write_all(req.as_bytes()).is_err() {
                    break;
                }
                match read_response(&mut reader) {
                    Some(status) => statuses.push(status),
                    None => break,
                }
            }
        }
    }
    statuses.resize(n, 0);
    statuses
}
