//! Automatic mTLS end to end: two real `pylon-proxy` processes with identities issued by
//! `pylon_identity::ca`, the way two meshed pods talk.
//!
//! ```text
//! app client ─ client proxy outbound ══ mesh TLS ══ server proxy inbound ─ app backend
//!              (--identity-dir client,                (--identity-dir server,
//!               Service `web`, its EndpointSlice      --inbound-forward backend)
//!               annotated pylon.io/identity: server)
//! ```
//!
//! HTTP/1 rides h2 between the proxies (`l5d-orig-proto`) and must arrive as the HTTP/1 it was;
//! WebSocket keeps HTTP/1 over TLS; h2 and gRPC pass as h2; opaque TCP is TLS too (that test
//! needs a network namespace and iptables for the original destination, hence root). A server
//! that can't prove the identity discovery names is refused, never reached in plaintext; and
//! certificates rotate under load without a failed request.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Version};
use hyper::body::Frame;
use pylon_identity::ca::{self, Ca, IssuedCert, ValidityWindow};
use pylon_identity::rustls::pki_types::pem::PemObject;
use pylon_identity::rustls::pki_types::{CertificateDer, ServerName};
use pylon_identity::tokio_rustls::TlsConnector;
use pylon_identity::Credentials;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NS: &str = "default";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long a config or identity change may take to apply (a second, with room to spare).
const APPLY: Duration = Duration::from_secs(10);

fn identity(sa: &str) -> String {
    format!("{sa}.{NS}.serviceaccount.identity.pylon.cluster.local")
}

/// A mesh CA (trust domain `cluster.local`) and the identity dirs it issues.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let window = ValidityWindow {
            not_before: now - Duration::from_secs(3600),
            not_after: now + 7 * DAY,
        };
        Ca::generate("cluster.local", window)
            .expect("generate the CA")
            .write(&dir.path().join("ca"))
            .expect("write the CA dir");
        Pki { dir }
    }

    /// The identity dir of service account `sa`.
    fn dir(&self, sa: &str) -> PathBuf {
        self.dir.path().join(sa)
    }

    /// (Re-)issues `sa`'s identity into its dir, valid for `valid_for`; every file is written
    /// atomically, so a proxy watching the dir never reads half of one.
    fn issue(&self, sa: &str, valid_for: Duration) -> IssuedCert {
        ca::issue(
            &self.dir.path().join("ca"),
            sa,
            NS,
            &self.dir(sa),
            valid_for,
        )
        .expect("issue an identity")
        .0
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ---------------------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------------------

/// How a test's mesh differs from the plain one.
#[derive(Default)]
struct Opts {
    /// The identity the EndpointSlice names; `None`: the server's own.
    slice_identity: Option<String>,
    /// No `pylon.io/identity` annotation at all (plaintext until one is added).
    unannotated: bool,
    /// The server's identity comes from another CA (same trust domain).
    server_from_other_ca: bool,
    /// The client proxy runs failure accrual (`--failure-accrual consecutive`).
    failure_accrual: bool,
}

struct Mesh {
    pki: Pki,
    /// Issued the server's identity when it is not `pki`.
    server_pki: Option<Pki>,
    cfg: ConfigDir,
    server: Proxy,
    client: Proxy,
}

impl Mesh {
    fn start(app: SocketAddr) -> Mesh {
        Self::start_with(app, Opts::default())
    }

    fn start_with(app: SocketAddr, opts: Opts) -> Mesh {
        let pki = Pki::new();
        pki.issue("client", DAY);
        let server_pki = opts.server_from_other_ca.then(Pki::new);
        let server_dir = match &server_pki {
            Some(other) => {
                other.issue("server", DAY);
                other.dir("server")
            }
            None => {
                pki.issue("server", DAY);
                pki.dir("server")
            }
        };
        let server = Proxy::builder()
            .arg("--identity-dir")
            .arg(path_str(&server_dir))
            .arg("--inbound-forward")
            .arg(app.to_string())
            .args(["--namespace", NS])
            .start();

        let cfg = ConfigDir::new();
        cfg.write_service("web", &[HTTP_PORT]);
        let slice_identity = match (&opts.slice_identity, opts.unannotated) {
            (_, true) => None,
            (Some(id), false) => Some(id.clone()),
            (None, false) => Some(identity("server")),
        };
        set_web_endpoint(&cfg, server.inbound(), slice_identity.as_deref());
        let accrual = if opts.failure_accrual {
            "consecutive"
        } else {
            "disabled"
        };
        let client = Proxy::builder()
            .arg("--identity-dir")
            .arg(path_str(&pki.dir("client")))
            .arg("--config-dir")
            .arg(cfg.path_str())
            .args(["--namespace", NS])
            .args(["--failure-accrual", accrual])
            .start();
        Mesh {
            pki,
            server_pki,
            cfg,
            server,
            client,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        get(self.client.outbound(), WEB_FQDN, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} through the client proxy: {e}"))
    }

    fn logs(&self) -> String {
        format!(
            "--- client proxy ---\n{}\n--- server proxy ---\n{}",
            self.client.log_tail(30),
            self.server.log_tail(30)
        )
    }
}

/// Service `web`'s one endpoint, `addr` (port name `http`), with `pylon.io/identity` when given.
fn set_web_endpoint(cfg: &ConfigDir, addr: SocketAddr, identity: Option<&str>) {
    cfg.write(
        &ConfigDir::endpoints_file("web"),
        &slice_yaml_with_identity("web", "web-1", "http", addr, identity),
    );
}

fn slice_yaml_with_identity(
    service: &str,
    name: &str,
    port_name: &str,
    addr: SocketAddr,
    identity: Option<&str>,
) -> String {
    let annotations = identity
        .map(|id| format!("  annotations:\n    pylon.io/identity: {id}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: {NS}\n  labels:\n    kubernetes.io/service-name: {service}\n{annotations}\
         addressType: IPv4\nports:\n  - name: {port_name}\n    port: {port}\n    protocol: TCP\n\
         endpoints:\n  - addresses: [\"{ip}\"]\n    conditions:\n      ready: true\n",
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// Sum of `name{labels}` (0 when absent).
fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.metric_value(name, labels).unwrap_or(0.0)
}

/// Waits (bounded) until `name{labels}` is at least `min`; returns the last value seen.
async fn wait_metric_at_least(proxy: &Proxy, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
    let deadline = Instant::now() + APPLY;
    loop {
        let v = metric(proxy, name, labels);
        if v >= min || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A response the proxy made itself because mesh TLS with the endpoint failed.
fn assert_tls_refused(rsp: &Resp, mesh: &Mesh, what: &str) {
    let err = rsp.proxy_error().unwrap_or_default();
    assert!(
        rsp.status == 502 && err.contains("TLS"),
        "{what}: want 502 naming the TLS failure, got {} {:?} {:?}\n{}",
        rsp.status,
        rsp.headers,
        rsp.text(),
        mesh.logs()
    );
    assert_eq!(rsp.backend(), None, "{what}: the app answered");
}

// ---------------------------------------------------------------------------------------------
// HTTP/1 over the mesh
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_http1_get_and_chunked_post_round_trip() {
    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start(app.addr);

        // GET: the app sees HTTP/1.1, the Host the client sent (case and all), its headers,
        // and nothing of the hop between the proxies.
        let mut c = h1_client(mesh.client.outbound()).await;
        let mut req = h1_request(
            "GET",
            "Web.Default.svc.cluster.local",
            "/hello?x=1",
            empty(),
        );
        req.headers_mut()
            .insert("x-request-case", HeaderValue::from_static("MiXeD"));
        let rsp = send_h1(&mut c, req).await.expect("meshed GET");
        assert_eq!(rsp.status, 200, "{}\n{}", rsp.text(), mesh.logs());
        assert_eq!(rsp.backend(), Some("app"));
        assert!(rsp.header("l5d-orig-proto").is_none());
        let seen = app.state.last().expect("the app saw the GET");
        assert_eq!(seen.version, Version::HTTP_11);
        assert_eq!(seen.uri, "/hello?x=1");
        assert_eq!(seen.headers["host"], "Web.Default.svc.cluster.local");
        assert_eq!(seen.headers["x-request-case"], "MiXeD");
        assert!(seen.headers.get("l5d-orig-proto").is_none(), "{seen:?}");

        // POST with a chunked body (no Content-Length): h2 frames it between the proxies and
        // the app gets it chunked again, every byte.
        let (tx, body) = channel_body();
        for chunk in ["abc", "defg", "hij"] {
            tx.send(Frame::data(Bytes::from_static(chunk.as_bytes())))
                .await
                .expect("queue a chunk");
        }
        drop(tx);
        let rsp = send_h1(&mut c, h1_request("POST", WEB_FQDN, "/count", body))
            .await
            .expect("chunked POST");
        assert_eq!((rsp.status.as_u16(), rsp.text()), (200, "10".to_string()));
        let seen = app.state.last().expect("the app saw the POST");
        assert_eq!(seen.version, Version::HTTP_11);
        assert_eq!(seen.headers["transfer-encoding"], "chunked");
        assert_eq!(seen.headers["host"], WEB_FQDN);

        // POST with a Content-Length, echoed.
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let rsp = send_h1(
            &mut c,
            h1_request("POST", WEB_FQDN, "/echo", full(payload.clone())),
        )
        .await
        .expect("POST with a length");
        assert_eq!(rsp.status, 200);
        assert!(rsp.body == payload, "echoed body differs");
        assert_eq!(
            app.state.last().expect("seen").headers["content-length"],
            "100000"
        );

        // On the wire: header names in any case, a chunked response stays chunked HTTP/1.1.
        let mut raw = RawConn::connect(mesh.client.outbound()).await;
        raw.send(format!(
            "GET /chunked HTTP/1.1\r\nHOST: {WEB_FQDN}\r\nX-UPPER-Case: Value\r\n\r\n"
        ))
        .await;
        let rsp = raw.response().await.expect("raw response");
        assert!(
            rsp.status_line.starts_with("HTTP/1.1 200"),
            "{}",
            rsp.status_line
        );
        assert!(
            rsp.chunked,
            "the chunked response lost its chunking: {rsp:?}"
        );
        assert_eq!(
            rsp.text(),
            "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;",
            "{rsp:?}"
        );
        let seen = app.state.last().expect("seen");
        assert_eq!(seen.headers["x-upper-case"], "Value");
        assert_eq!(seen.headers["host"], WEB_FQDN);

        // HTTP/1.0 travels as `l5d-orig-proto: HTTP/1.0` and is HTTP/1.0 at both ends.
        let mut raw = RawConn::connect(mesh.client.outbound()).await;
        raw.send(format!("GET /ten HTTP/1.0\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let rsp = raw.response().await.expect("HTTP/1.0 response");
        assert_eq!(rsp.status, 200, "{rsp:?}");
        assert!(
            rsp.status_line.starts_with("HTTP/1.0 "),
            "{}",
            rsp.status_line
        );
        assert_eq!(rsp.text(), "app");
        let seen = app.state.last().expect("seen");
        assert_eq!(seen.version, Version::HTTP_10);
        assert_eq!(seen.headers["host"], WEB_FQDN);

        // All of it went through the server proxy over mesh TLS, from the client's identity.
        let client_id = identity("client");
        let meshed = wait_metric_at_least(
            &mesh.server,
            "request_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("client_id", &client_id),
            ],
            5.0,
        )
        .await;
        assert_eq!(
            meshed,
            5.0,
            "{}",
            series_of(&mesh.server.metrics(), "request_total")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// WebSocket, h2 and gRPC over the mesh
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_mesh() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    test_body(async {
        let ws_server = WsServer::echo().await;
        let mesh = Mesh::start(ws_server.addr);

        let tcp = TcpStream::connect(mesh.client.outbound())
            .await
            .expect("connect");
        let (mut ws, rsp) = within(
            "websocket handshake",
            OP_TIMEOUT,
            tokio_tungstenite::client_async(format!("ws://{WEB_FQDN}/chat"), tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("websocket handshake through the mesh: {e}\n{}", mesh.logs()));
        assert_eq!(rsp.status(), 101);
        for i in 0..5 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.expect("send");
            let got = within("ws echo", OP_TIMEOUT, ws.next())
                .await
                .expect("ws closed")
                .expect("ws error");
            assert_eq!(got, Message::text(text));
        }
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
        ws.send(Message::binary(blob.clone())).await.expect("send");
        let got = within("ws binary echo", OP_TIMEOUT, ws.next())
            .await
            .expect("ws closed")
            .expect("ws error");
        assert_eq!(got.into_data().as_ref(), &blob[..], "binary echo");
        ws.close(None).await.ok();

        // The upgrade kept HTTP/1.1, over mesh TLS from the client's identity.
        let client_id = identity("client");
        let upgraded = wait_metric_at_least(
            &mesh.server,
            "request_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("client_id", &client_id),
            ],
            1.0,
        )
        .await;
        assert_eq!(
            upgraded,
            1.0,
            "{}",
            series_of(&mesh.server.metrics(), "request_total")
        );
        assert_eq!(ws_server.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_grpc_through_the_mesh_share_one_connection() {
    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start(app.addr);

        // h2 with prior knowledge from the app: h2 end to end.
        let mut h2 = h2_client(mesh.client.outbound()).await;
        let rsp = send_h2(&mut h2, abs_request("GET", WEB_FQDN, "/h2", empty()))
            .await
            .expect("h2 GET");
        assert_eq!(rsp.status, 200, "{}\n{}", rsp.text(), mesh.logs());
        assert_eq!(rsp.backend(), Some("app"));
        assert_eq!(app.state.last().expect("seen").version, Version::HTTP_2);

        // gRPC-like: a streamed body with request trailers, response trailers back.
        let (tx, body) = channel_body();
        tx.send(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello")))
            .await
            .expect("queue data");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-client-trailer", HeaderValue::from_static("sent"));
        tx.send(Frame::trailers(trailers))
            .await
            .expect("queue trailers");
        drop(tx);
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://{WEB_FQDN}/trailers"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .expect("request");
        let rsp = send_h2(&mut h2, req).await.expect("gRPC-like call");
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.text(), "trailers-ok");
        let trailers = rsp.trailers.as_ref().expect("response trailers");
        assert_eq!(trailers["x-backend-trailer"], "yes");
        let seen = app.state.last().expect("seen");
        assert_eq!(seen.headers["content-type"], "application/grpc");
        let got = app.state.trailers.lock().unwrap().clone();
        assert!(
            got.iter()
                .any(|t| t.get("x-client-trailer").is_some_and(|v| v == "sent")),
            "request trailers lost: {got:?}"
        );

        // HTTP/1.1 from another app connection joins the same multiplexed TLS connection.
        let rsp = mesh.get("/h1").await;
        assert_eq!(rsp.status, 200);
        assert_eq!(app.state.last().expect("seen").version, Version::HTTP_11);

        let client_id = identity("client");
        let requests = wait_metric_at_least(
            &mesh.server,
            "request_total",
            &[("direction", "inbound"), ("client_id", &client_id)],
            3.0,
        )
        .await;
        assert_eq!(requests, 3.0);
        let connections = metric(
            &mesh.server,
            "tcp_open_total",
            &[("direction", "inbound"), ("peer", "src")],
        );
        assert_eq!(
            connections,
            1.0,
            "one mesh TLS connection per endpoint:\n{}",
            series_of(&mesh.server.metrics(), "tcp_open_total")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Metrics and live identity changes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_the_server_and_client_identities() {
    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start(app.addr);
        for _ in 0..3 {
            let rsp = mesh.get("/").await;
            assert_eq!(rsp.status, 200, "{}\n{}", rsp.text(), mesh.logs());
        }
        let server_id = identity("server");
        let client_id = identity("client");

        let outbound = [
            ("direction", "outbound"),
            ("tls", "true"),
            ("server_id", server_id.as_str()),
            ("status_code", "200"),
        ];
        let got = wait_metric_at_least(&mesh.client, "response_total", &outbound, 3.0).await;
        assert_eq!(
            got,
            3.0,
            "{}",
            series_of(&mesh.client.metrics(), "response_total")
        );
        let plaintext = mesh.client.metric_sum("response_total", |s| {
            s.label("direction") == Some("outbound") && s.label("tls") != Some("true")
        });
        assert_eq!(plaintext.unwrap_or(0.0), 0.0, "outbound series without TLS");

        for name in ["request_total", "response_total"] {
            let inbound = [
                ("direction", "inbound"),
                ("tls", "true"),
                ("client_id", client_id.as_str()),
            ];
            let got = wait_metric_at_least(&mesh.server, name, &inbound, 3.0).await;
            assert_eq!(got, 3.0, "{}", series_of(&mesh.server.metrics(), name));
        }
    })
    .await
}

/// Tap says `tls=true` on both sides of a meshed hop, as Linkerd's tap does: outbound for the
/// endpoint reached over mesh TLS, inbound for the client that connected with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_names_the_hop_as_mesh_tls_on_both_sides() {
    use linkerd2_proxy_api::tap::tap_client::TapClient;
    use linkerd2_proxy_api::tap::{tap_event, ObserveRequest};

    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start(app.addr);
        assert_eq!(mesh.get("/").await.status, 200, "{}", mesh.logs());
        let mut streams = Vec::new();
        for proxy in [&mesh.client, &mesh.server] {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.tap()))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("tap connects");
            let stream = TapClient::new(channel)
                .observe(ObserveRequest {
                    limit: 1,
                    r#match: None,
                    extract: None,
                })
                .await
                .expect("observe accepted")
                .into_inner();
            streams.push(stream);
        }
        let rsp = mesh.get("/tapped").await;
        assert_eq!(rsp.status, 200, "{}", mesh.logs());
        for (mut stream, direction) in streams.into_iter().zip(["outbound", "inbound"]) {
            let ev = within("tap event", APPLY, stream.message())
                .await
                .expect("tap stream")
                .expect("an event");
            let expected = match direction {
                "outbound" => tap_event::ProxyDirection::Outbound,
                _ => tap_event::ProxyDirection::Inbound,
            };
            assert_eq!(ev.proxy_direction, expected as i32);
            let tls = ev
                .destination_meta
                .as_ref()
                .and_then(|m| m.labels.get("tls"))
                .map(String::as_str);
            assert_eq!(tls, Some("true"), "{direction}: {ev:?}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_annotation_applies_live() {
    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start_with(
            app.addr,
            Opts {
                unannotated: true,
                ..Opts::default()
            },
        );
        let server_id = identity("server");
        let meshed = [
            ("direction", "outbound"),
            ("tls", "true"),
            ("server_id", server_id.as_str()),
        ];
        let plain = [
            ("direction", "outbound"),
            ("no_tls_reason", "not_provided_by_service_discovery"),
        ];

        // No identity from discovery: plaintext, labelled so.
        let rsp = mesh.get("/").await;
        assert_eq!(rsp.status, 200, "{}", mesh.logs());
        assert_eq!(
            wait_metric_at_least(&mesh.client, "response_total", &plain, 1.0).await,
            1.0
        );

        // The slice gains the annotation: new connections, over mesh TLS.
        set_web_endpoint(&mesh.cfg, mesh.server.inbound(), Some(&server_id));
        let deadline = Instant::now() + APPLY;
        while metric(&mesh.client, "response_total", &meshed) < 1.0 && Instant::now() < deadline {
            let rsp = mesh.get("/").await;
            assert_eq!(rsp.status, 200, "{}", mesh.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            metric(&mesh.client, "response_total", &meshed) >= 1.0,
            "the annotation did not apply:\n{}",
            series_of(&mesh.client.metrics(), "response_total")
        );
        let client_id = identity("client");
        assert!(
            wait_metric_at_least(
                &mesh.server,
                "request_total",
                &[("tls", "true"), ("client_id", &client_id)],
                1.0
            )
            .await
                >= 1.0
        );

        // And loses it again: plaintext again, not the old TLS connection.
        let before = metric(&mesh.client, "response_total", &plain);
        set_web_endpoint(&mesh.cfg, mesh.server.inbound(), None);
        let deadline = Instant::now() + APPLY;
        while metric(&mesh.client, "response_total", &plain) <= before && Instant::now() < deadline
        {
            let rsp = mesh.get("/").await;
            assert_eq!(rsp.status, 200, "{}", mesh.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            metric(&mesh.client, "response_total", &plain) > before,
            "removing the annotation did not apply:\n{}",
            series_of(&mesh.client.metrics(), "response_total")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Refusals: never plaintext to a meshed endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_identity_is_refused_without_fallback() {
    test_body(async {
        let app = Backend::start("app").await;
        let expected = identity("other");
        let mesh = Mesh::start_with(
            app.addr,
            Opts {
                slice_identity: Some(expected.clone()),
                failure_accrual: true,
                ..Opts::default()
            },
        );

        // The server's proxy passes TLS for a name not its own through to its app (as
        // Linkerd's does), so what comes back is the app's answer to a ClientHello, not TLS.
        let rsp = mesh.get("/").await;
        assert_tls_refused(&rsp, &mesh, "wrong identity");
        assert!(
            rsp.proxy_error().unwrap_or_default().contains("identity"),
            "{:?}",
            rsp.headers
        );

        // The failure is the endpoint's: failure accrual counts it. Ejecting the only endpoint
        // would be an outage, so each would-be ejection (7 failures in a row) is counted
        // instead, and no request ever reaches the app.
        for _ in 0..20 {
            let rsp = mesh.get("/").await;
            assert_tls_refused(&rsp, &mesh, "wrong identity, again");
        }
        let capped = mesh
            .client
            .metric_sum("endpoint_ejections_capped_total", |_| true)
            .unwrap_or(0.0);
        assert_eq!(
            capped,
            3.0,
            "21 TLS failures are 3 would-be ejections:\n{}",
            series_of(&mesh.client.metrics(), "endpoint_ejections")
        );
        assert_eq!(app.requests(), 0, "the app was reached");
        assert_eq!(
            mesh.server
                .metric_value("request_total", &[("direction", "inbound")])
                .unwrap_or(0.0),
            0.0,
            "the server proxy saw a request"
        );

        // Logged at warn, with the endpoint and the identity it was expected to prove.
        let line = mesh
            .client
            .wait_for_log(OP_TIMEOUT, |l| {
                l.contains("mesh TLS handshake failed") && l.contains(&expected)
            })
            .await
            .unwrap_or_else(|| panic!("no warning naming {expected}\n{}", mesh.logs()));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&mesh.server.inbound().to_string()), "{line}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_from_another_ca_is_refused() {
    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start_with(
            app.addr,
            Opts {
                server_from_other_ca: true,
                ..Opts::default()
            },
        );
        assert!(mesh.server_pki.is_some());
        for _ in 0..3 {
            let rsp = mesh.get("/").await;
            assert_tls_refused(&rsp, &mesh, "another CA");
            assert!(
                rsp.proxy_error().unwrap_or_default().contains("CA"),
                "{:?}",
                rsp.headers
            );
        }
        assert_eq!(app.requests(), 0, "the app was reached");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Rotation under load
// ---------------------------------------------------------------------------------------------

/// The leaf certificate (DER) of a PEM chain.
fn leaf_der(chain_pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
}

/// The certificate `addr` presents on a new mesh TLS connection as `server_id`, connecting
/// with the identity in `client_dir`.
async fn presented_cert(
    addr: SocketAddr,
    client_dir: &Path,
    server_id: &str,
) -> CertificateDer<'static> {
    let config = Credentials::load(client_dir)
        .expect("client identity loads")
        .client_config_with_alpn(&[b"h2"]);
    let tcp = within("connect", OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect");
    let name = ServerName::try_from(server_id.to_string()).expect("server name");
    let tls = within(
        "TLS handshake",
        OP_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("mesh TLS handshake");
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    const CONNECTIONS: usize = 4;
    /// The load stops at this many requests at most (or when the test has seen enough).
    const MAX_REQUESTS: usize = 20_000;
    const MAX_LOAD_TIME: Duration = Duration::from_secs(30);
    /// Requests that must complete before the rotation, and after it was seen.
    const BEFORE: usize = 200;
    const AFTER: usize = 500;
    const TOTAL: usize = 2_000;

    test_body(async {
        let app = Backend::start("app").await;
        let mesh = Mesh::start(app.addr);
        let server_id = identity("server");
        let old_leaf =
            presented_cert(mesh.server.inbound(), &mesh.pki.dir("client"), &server_id).await;

        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let started = Instant::now();
        let mut load = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let (done, stop, failures) = (done.clone(), stop.clone(), failures.clone());
            let outbound = mesh.client.outbound();
            load.spawn(async move {
                let mut c = h1_client(outbound).await;
                while !stop.load(Ordering::SeqCst)
                    && done.load(Ordering::SeqCst) < MAX_REQUESTS
                    && started.elapsed() < MAX_LOAD_TIME
                {
                    match send_h1(&mut c, h1_request("GET", WEB_FQDN, "/", empty())).await {
                        Ok(rsp) if rsp.status == 200 && rsp.backend() == Some("app") => {}
                        Ok(rsp) => failures.lock().unwrap().push(format!(
                            "{} {:?} {}",
                            rsp.status,
                            rsp.proxy_error(),
                            rsp.text()
                        )),
                        Err(e) => {
                            failures.lock().unwrap().push(e.to_string());
                            // A broken client connection: carry on with a new one.
                            c = h1_client(outbound).await;
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }

        // Meanwhile, new mesh TLS connections to the server proxy, as other clients make
        // them: each must get a certificate that verifies, whichever side of the rotation.
        let handshakes = {
            let (stop, inbound) = (stop.clone(), mesh.server.inbound());
            let (client_dir, server_id) = (mesh.pki.dir("client"), server_id.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LOAD_TIME {
                    // Our own copy of the client identity may be caught mid-rotation.
                    let Ok(creds) = Credentials::load(&client_dir) else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let config = creds.client_config_with_alpn(&[b"h2"]);
                    let name = ServerName::try_from(server_id.clone()).expect("server name");
                    let tls = async {
                        let tcp = TcpStream::connect(inbound).await?;
                        TlsConnector::from(config).connect(name, tcp).await
                    };
                    match tokio::time::timeout(OP_TIMEOUT, tls).await {
                        Ok(Ok(_)) => ok += 1,
                        Ok(Err(e)) => failed.push(e.to_string()),
                        Err(_) => failed.push("handshake timed out".to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failed)
            })
        };

        let reached = |n: usize| {
            let done = done.clone();
            move || done.load(Ordering::SeqCst) >= n
        };
        assert!(
            wait_until(reached(BEFORE), Duration::from_secs(20)).await,
            "the load did not get going: {} requests\n{}",
            done.load(Ordering::SeqCst),
            mesh.logs()
        );

        // Re-issue both identities in place, valid for longer, so the expiry gauges move.
        let new_server = mesh.pki.issue("server", 2 * DAY);
        let new_client = mesh.pki.issue("client", 2 * DAY);
        for (proxy, cert) in [(&mesh.server, &new_server), (&mesh.client, &new_client)] {
            let want = cert.not_after as f64;
            let got = proxy
                .wait_metric(
                    "identity_cert_expiration_timestamp_seconds",
                    &[],
                    want,
                    APPLY,
                )
                .await;
            assert_eq!(
                got,
                Some(want),
                "the rotation was not picked up\n{}",
                mesh.logs()
            );
        }
        let rotated_at = done.load(Ordering::SeqCst);
        let enough = (rotated_at + AFTER).max(TOTAL);
        let finished = wait_until(reached(enough), Duration::from_secs(25)).await;
        stop.store(true, Ordering::SeqCst);
        while let Some(r) = load.join_next().await {
            r.expect("load task");
        }
        let (handshakes_ok, handshake_failures) = handshakes.await.expect("handshake task");
        assert!(
            handshake_failures.is_empty(),
            "{} new mesh TLS connections failed across the rotation ({handshakes_ok} did not): {:?}",
            handshake_failures.len(),
            &handshake_failures[..handshake_failures.len().min(5)]
        );
        assert!(handshakes_ok > 0, "no new connections were made during the load");
        let total = done.load(Ordering::SeqCst);
        let failures = failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} of {total} requests failed across the rotation, first: {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            mesh.logs()
        );
        assert!(
            finished,
            "only {total} requests ({rotated_at} before the rotation was seen)"
        );

        // New connections present the new certificate; and a new connection from the client
        // proxy (a second service on the same endpoint has its own) verifies it and works.
        let new_leaf =
            presented_cert(mesh.server.inbound(), &mesh.pki.dir("client"), &server_id).await;
        assert_eq!(
            new_leaf,
            leaf_der(&new_server.chain_pem),
            "serial {}",
            new_server.serial
        );
        assert_ne!(new_leaf, old_leaf);
        mesh.cfg.write_service("web2", &[HTTP_PORT]);
        mesh.cfg.write(
            &ConfigDir::endpoints_file("web2"),
            &slice_yaml_with_identity(
                "web2",
                "web2-1",
                "http",
                mesh.server.inbound(),
                Some(&server_id),
            ),
        );
        let authority = format!("web2.{NS}.svc.cluster.local");
        let mut last = None;
        let deadline = Instant::now() + APPLY;
        while Instant::now() < deadline {
            let rsp = get(mesh.client.outbound(), &authority, "/")
                .await
                .expect("GET web2");
            if rsp.status == 200 {
                last = Some(rsp);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rsp = last.unwrap_or_else(|| panic!("web2 never answered\n{}", mesh.logs()));
        assert_eq!(rsp.backend(), Some("app"));
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Opaque TCP over the mesh (transparent mode: a network namespace of its own)
// ---------------------------------------------------------------------------------------------

/// Runs a command to completion (bounded), panicking with its output when it fails.
fn run(program: &str, args: &[&str]) {
    let tool = find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    let mut child = std::process::Command::new(&tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    let deadline = Instant::now() + OP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {OP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "{program} {args:?}: {status}: {err}");
}

/// Runs `test` in a new network namespace: on a thread of its own (a network namespace is a
/// per-thread property), with a runtime whose threads, sockets and child processes (the
/// proxies) all start there. Its iptables rules vanish with it.
fn in_new_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET moves only the calling thread (and what it
        // starts afterwards) into a new network namespace; no memory is touched.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        run("ip", &["link", "set", "lo", "up"]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn service_with_cluster_ip(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\n\
         spec:\n  clusterIP: {ip}\n  ports:\n    - name: tcp\n      port: {port}\n      \
         targetPort: tcp\n      protocol: TCP\n"
    )
}

#[test]
fn opaque_tcp_through_the_mesh() {
    if !prerequisites(
        "opaque_tcp_through_the_mesh",
        &["ip", "iptables"],
        "iproute2 iptables",
    ) {
        return;
    }
    // Cluster IPs on loopback (all of 127/8 routes to `lo`), redirected by iptables.
    const DB_IP: &str = "127.0.0.77";
    const WRONG_IP: &str = "127.0.0.78";
    const DB_PORT: u16 = 7000;
    const BANNER: &[u8] = b"hello from the server\n";
    in_new_netns(|| async {
        test_body(async {
            let server_first = TcpServer::speaks_first(BANNER).await;
            let app_port = server_first.addr.port().to_string();
            let pki = Pki::new();
            pki.issue("client", DAY);
            pki.issue("server", DAY);
            let server = Proxy::builder()
                .arg("--identity-dir")
                .arg(path_str(&pki.dir("server")))
                .arg("--inbound-forward")
                .arg(server_first.addr.to_string())
                .args(["--opaque-ports", &app_port, "--namespace", NS])
                .start();
            let server_id = identity("server");

            let cfg = ConfigDir::new();
            cfg.write(
                "db-service.yaml",
                &service_with_cluster_ip("db", DB_IP, DB_PORT),
            );
            cfg.write(
                "db-endpoints.yaml",
                &slice_yaml_with_identity("db", "db-1", "tcp", server.inbound(), Some(&server_id)),
            );
            // The same endpoint, expected to be someone else.
            cfg.write(
                "wrong-service.yaml",
                &service_with_cluster_ip("wrong", WRONG_IP, DB_PORT),
            );
            cfg.write(
                "wrong-endpoints.yaml",
                &slice_yaml_with_identity(
                    "wrong",
                    "wrong-1",
                    "tcp",
                    server.inbound(),
                    Some(&identity("other")),
                ),
            );
            let client = Proxy::builder()
                .arg("--identity-dir")
                .arg(path_str(&pki.dir("client")))
                .arg("--config-dir")
                .arg(cfg.path_str())
                .args(["--opaque-ports", &DB_PORT.to_string(), "--namespace", NS])
                .start();
            let outbound_port = client.outbound().port().to_string();
            for ip in [DB_IP, WRONG_IP] {
                run(
                    "iptables",
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "OUTPUT",
                        "-p",
                        "tcp",
                        "-d",
                        ip,
                        "--dport",
                        &DB_PORT.to_string(),
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &outbound_port,
                    ],
                );
            }
            let logs = || format!("{}\n---\n{}", client.log_tail(20), server.log_tail(20));

            // The app dials the service; the server speaks first, then echoes.
            let db: SocketAddr = format!("{DB_IP}:{DB_PORT}").parse().expect("addr");
            let mut tcp = within("connect", OP_TIMEOUT, TcpStream::connect(db))
                .await
                .expect("connect to the service");
            let mut banner = vec![0u8; BANNER.len()];
            within("banner", OP_TIMEOUT, tcp.read_exact(&mut banner))
                .await
                .unwrap_or_else(|e| panic!("no banner through the mesh: {e}\n{}", logs()));
            assert_eq!(banner, BANNER);
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
            let (mut r, mut w) = tcp.split();
            let mut echoed = vec![0u8; payload.len()];
            within("echo", OP_TIMEOUT, async {
                let (wrote, read) = tokio::join!(w.write_all(&payload), r.read_exact(&mut echoed));
                wrote.expect("write");
                read.expect("read the echo");
            })
            .await;
            assert!(echoed == payload, "echo through the mesh differs");
            drop(tcp);

            // Both sides count the connection as mesh TLS, naming the other's identity.
            let client_id = identity("client");
            let out = wait_metric_at_least(
                &client,
                "tcp_open_total",
                &[
                    ("direction", "outbound"),
                    ("peer", "dst"),
                    ("tls", "true"),
                    ("server_id", &server_id),
                ],
                1.0,
            )
            .await;
            assert_eq!(
                out,
                1.0,
                "{}",
                series_of(&client.metrics(), "tcp_open_total")
            );
            let inb = wait_metric_at_least(
                &server,
                "tcp_open_total",
                &[
                    ("direction", "inbound"),
                    ("peer", "src"),
                    ("tls", "true"),
                    ("client_id", &client_id),
                ],
                1.0,
            )
            .await;
            assert_eq!(
                inb,
                1.0,
                "{}",
                series_of(&server.metrics(), "tcp_open_total")
            );

            // Expecting another identity: the server proxy passes the ClientHello through to
            // its app (not its name), the app's banner is no TLS, and the connection closes
            // without a byte either way.
            let wrong: SocketAddr = format!("{WRONG_IP}:{DB_PORT}").parse().expect("addr");
            let mut tcp = within("connect", OP_TIMEOUT, TcpStream::connect(wrong))
                .await
                .expect("connect to the other service");
            let _ = tcp.write_all(b"never in plaintext").await;
            let mut buf = [0u8; 64];
            let read = within("refused connection closes", OP_TIMEOUT, tcp.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "bytes through a refused connection: {read:?}"
            );
            let refused = wait_metric_at_least(
                &client,
                "tcp_close_total",
                &[
                    ("direction", "outbound"),
                    ("peer", "dst"),
                    ("errno", "EPROTO"),
                ],
                1.0,
            )
            .await;
            assert_eq!(
                refused,
                1.0,
                "{}",
                series_of(&client.metrics(), "tcp_close_total")
            );
        })
        .await
    });
}
