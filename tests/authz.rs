//! Inbound mesh TLS and authorization end to end: a real `pylon-proxy` with an identity issued
//! by `pylon_identity::ca`, `policy.linkerd.io` objects in its config dir, real backends, and
//! meshed clients simulated with a rustls client that presents a mesh identity (so the inbound
//! side is exercised on its own, whatever the outbound side does).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::TokioIo;
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::ObserveRequest;
use pylon_identity::ca::{self, Ca, IssuedCert, ValidityWindow};
use pylon_identity::rustls::pki_types::pem::PemObject;
use pylon_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use pylon_identity::rustls::{self, ClientConfig, ClientConnection, RootCertStore};
use pylon_identity::tokio_rustls::{client::TlsStream, TlsConnector};
use pylon_identity::Credentials;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NS: &str = "default";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long a config change may take to apply (the README says within a second).
const POLICY_APPLY: Duration = Duration::from_secs(10);

fn identity(sa: &str) -> String {
    format!("{sa}.{NS}.serviceaccount.identity.pylon.cluster.local")
}

/// A mesh CA (trust domain `cluster.local`, valid from three days ago for four days, so
/// expired leaves still fall within it) and the identity dirs it issues.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let ca = Ca::generate(
            "cluster.local",
            ValidityWindow {
                not_before: now - 3 * DAY,
                not_after: now + DAY,
            },
        )
        .expect("generate the CA");
        ca.write(&dir.path().join("ca")).expect("write the CA dir");
        Pki { dir, ca }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// An identity dir for service account `sa` in `default`, valid now.
    fn issue(&self, sa: &str) -> PathBuf {
        let out = self.dir.path().join(sa);
        ca::issue(&self.ca_dir(), sa, NS, &out, DAY).expect("issue an identity");
        out
    }

    /// A certificate for `sa` that expired a day ago.
    fn issue_expired(&self, sa: &str) -> IssuedCert {
        let now = SystemTime::now();
        let window = ValidityWindow {
            not_before: now - 2 * DAY,
            not_after: now - DAY,
        };
        let out = self.dir.path().join(format!("{sa}-expired"));
        ca::issue_with_validity(&self.ca_dir(), sa, NS, &out, window)
            .expect("issue an expired identity")
            .0
    }
}

/// The server side: the `web` workload's proxy with its identity, forwarding inbound traffic
/// to `forward`.
fn server_proxy(id_dir: &Path, forward: SocketAddr, cfg: &ConfigDir, extra: &[&str]) -> Proxy {
    Proxy::builder()
        .arg("--identity-dir")
        .arg(id_dir.to_str().expect("utf-8 path"))
        .arg("--inbound-forward")
        .arg(forward.to_string())
        .arg("--config-dir")
        .arg(cfg.path_str())
        .args(["--namespace", NS, "--workload-labels", "app=web"])
        .args(extra.iter().copied())
        .start()
}

// ---------------------------------------------------------------------------------------------
// Policy objects
// ---------------------------------------------------------------------------------------------

/// A Server selecting `app=web` on `port`, with an optional `proxyProtocol`.
fn server_yaml(name: &str, port: u16, protocol: Option<&str>) -> String {
    let protocol = protocol
        .map(|p| format!("  proxyProtocol: {p}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\n\
         metadata: {{name: {name}, namespace: {NS}}}\n\
         spec:\n  podSelector:\n    matchLabels: {{app: web}}\n  port: {port}\n{protocol}"
    )
}

fn meshtls_yaml(name: &str, identities: &[&str]) -> String {
    let ids: Vec<String> = identities.iter().map(|i| format!("'{i}'")).collect();
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\n\
         metadata: {{name: {name}, namespace: {NS}}}\nspec:\n  identities: [{}]\n",
        ids.join(", ")
    )
}

fn authz_yaml(name: &str, server: &str, meshtls: &str) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {NS}}}\nspec:\n  \
         targetRef: {{group: policy.linkerd.io, kind: Server, name: {server}}}\n  \
         requiredAuthenticationRefs:\n  \
         - {{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: {meshtls}}}\n"
    )
}

/// One multi-document file: Server `server` on `port`, reachable only by clients whose mesh
/// identity matches one of `identities` (AuthorizationPolicy `<server>-authn`,
/// MeshTLSAuthentication `<server>-clients`).
fn require_identity(
    server: &str,
    port: u16,
    protocol: Option<&str>,
    identities: &[&str],
) -> String {
    let clients = format!("{server}-clients");
    [
        server_yaml(server, port, protocol),
        meshtls_yaml(&clients, identities),
        authz_yaml(&format!("{server}-authn"), server, &clients),
    ]
    .join("---\n")
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A TLS 1.3 client config trusting `anchor_pem` and presenting `cert` (chain and key PEM), or
/// no certificate at all; built by hand for what `Credentials::load` rightly refuses (expired,
/// another CA's) or can't express (anonymous TLS).
fn client_config(anchor_pem: &str, cert: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(anchor_pem.as_bytes()) {
        roots.add(c.expect("anchor PEM")).expect("anchor");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match cert {
        Some((chain_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("chain PEM");
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The HTTP/1.1 client config of the identity in `dir` (what a meshed client proxy holds).
fn meshed_config(dir: &Path) -> Arc<ClientConfig> {
    Credentials::load(dir)
        .expect("client identity loads")
        .client_config_with_alpn(&[b"http/1.1"])
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_id: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_id.to_string()).expect("server name");
    let tcp = within("connect", OP_TIMEOUT, TcpStream::connect(addr)).await?;
    let _ = tcp.set_nodelay(true);
    within(
        "TLS handshake",
        OP_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
}

/// An HTTP/1.1 connection over mesh TLS to `addr`, which must prove `server_id`.
async fn meshed_client(addr: SocketAddr, config: Arc<ClientConfig>, server_id: &str) -> H1Client {
    let tls = tls_connect(addr, config, server_id)
        .await
        .unwrap_or_else(|e| panic!("mesh TLS handshake with {addr} as {server_id}: {e}"));
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// GET `path` on a fresh meshed connection.
async fn meshed_get(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_id: &str,
    path: &str,
) -> Resp {
    let mut c = meshed_client(addr, config.clone(), server_id).await;
    send_h1(&mut c, h1_request("GET", "web", path, empty()))
        .await
        .unwrap_or_else(|e| panic!("meshed GET {path}: {e}"))
}

/// GET `path` on a fresh plain connection.
async fn plain_get(addr: SocketAddr, path: &str) -> Resp {
    get(addr, "web", path)
        .await
        .unwrap_or_else(|e| panic!("plain GET {path}: {e}"))
}

fn assert_denied(rsp: &Resp, who: &str) {
    assert_eq!(rsp.status, 403, "{who}: {}", rsp.text());
    assert_eq!(
        rsp.proxy_error(),
        Some("unauthorized connection"),
        "{who}: {:?}",
        rsp.headers
    );
    assert_eq!(
        rsp.backend(),
        None,
        "{who}: the proxy answered, not the app"
    );
}

fn assert_allowed(rsp: &Resp, backend: &Backend, who: &str) {
    assert_eq!(rsp.status, 200, "{who}: {}", rsp.text());
    assert_eq!(rsp.backend(), Some(backend.name()), "{who}");
}

/// Waits (bounded) until `name{labels}` reaches at least `min`; returns the last value seen.
async fn wait_metric_at_least(proxy: &Proxy, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
    let deadline = Instant::now() + OP_TIMEOUT;
    loop {
        let v = proxy.metric_value(name, labels).unwrap_or(0.0);
        if v >= min || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts `name{labels} == want` (waiting, bounded, for it to get there).
async fn assert_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = proxy.wait_metric(name, labels, want, OP_TIMEOUT).await;
    assert_eq!(
        got,
        Some(want),
        "{name}{labels:?}\n{}",
        series_of(&proxy.metrics(), name)
    );
}

// ---------------------------------------------------------------------------------------------
// 1. The default policy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_admits_plain_and_meshed_clients_and_labels_them() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let config = meshed_config(&client_dir);

        let rsp = plain_get(proxy.inbound(), "/plain").await;
        assert_allowed(&rsp, &backend, "plain");
        let rsp = meshed_get(proxy.inbound(), &config, &identity("web"), "/meshed").await;
        assert_allowed(&rsp, &backend, "meshed");
        let paths: Vec<String> = backend
            .state
            .recorded()
            .iter()
            .map(|r| r.uri.clone())
            .collect();
        assert_eq!(paths, ["/plain", "/meshed"]);

        let client_id = identity("client");
        let inbound = ("direction", "inbound");
        assert_metric(
            &proxy,
            "response_total",
            &[
                inbound,
                ("tls", "true"),
                ("client_id", &client_id),
                ("status_code", "200"),
            ],
            1.0,
        )
        .await;
        assert_metric(
            &proxy,
            "response_total",
            &[
                inbound,
                ("tls", "no_identity"),
                ("no_tls_reason", "no_tls_from_remote"),
                ("status_code", "200"),
            ],
            1.0,
        )
        .await;
        let default = [("srv_kind", "default"), ("srv_name", "all-unauthenticated")];
        assert_metric(&proxy, "inbound_http_authz_allow_total", &default, 2.0).await;
        let mut meshed = default.to_vec();
        meshed.push(("client_id", &client_id));
        assert_metric(&proxy, "inbound_http_authz_allow_total", &meshed, 1.0).await;
        let port = backend.addr.port().to_string();
        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[("srv_port", &port), ("authz_name", "all-unauthenticated")],
            2.0,
        )
        .await;
        assert_eq!(
            proxy
                .metric_value("inbound_http_authz_deny_total", &[])
                .unwrap_or(0.0),
            0.0
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 2, 3. A Server requiring mesh identities
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_requiring_any_identity_refuses_plain_clients_on_its_port_only() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let other = Backend::start("web-admin").await;
        let cfg = ConfigDir::new();
        cfg.write(
            "web-http.yaml",
            &require_identity("web-http", backend.addr.port(), None, &["*"]),
        );
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let config = meshed_config(&client_dir);

        let rsp = plain_get(proxy.inbound(), "/plain").await;
        assert_denied(&rsp, "plain");
        assert_eq!(
            backend.requests(),
            0,
            "a denied request never reaches the app"
        );
        // Every request on a denied connection is refused, not only the first.
        let mut c = h1_client(proxy.inbound()).await;
        for i in 0..3 {
            let rsp = send_h1(&mut c, h1_request("GET", "web", "/again", empty()))
                .await
                .unwrap_or_else(|e| panic!("request {i} on a denied connection: {e}"));
            assert_denied(&rsp, "plain, same connection");
        }
        let rsp = meshed_get(proxy.inbound(), &config, &identity("web"), "/meshed").await;
        assert_allowed(&rsp, &backend, "meshed");
        assert_eq!(backend.requests(), 1);

        let server = [("srv_kind", "server"), ("srv_name", "web-http")];
        assert_metric(&proxy, "inbound_http_authz_deny_total", &server, 4.0).await;
        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[
                ("srv_name", "web-http"),
                ("authz_kind", "authorizationpolicy"),
                ("authz_name", "web-http-authn"),
                ("client_id", &identity("client")),
            ],
            1.0,
        )
        .await;

        // The same workload's proxy for another port (another --inbound-forward target, not
        // the Server's port) takes the default policy: plain clients are accepted there.
        let proxy2 = server_proxy(&server_dir, other.addr, &cfg, &[]);
        let rsp = plain_get(proxy2.inbound(), "/elsewhere").await;
        assert_allowed(&rsp, &other, "plain, another port");
        assert_metric(
            &proxy2,
            "inbound_http_authz_allow_total",
            &[("srv_kind", "default"), ("srv_name", "all-unauthenticated")],
            1.0,
        )
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshtls_authentication_admits_only_the_identities_it_lists() {
    test_body(async {
        let pki = Pki::new();
        let server_dir = pki.issue("web");
        let (client_dir, books_dir) = (pki.issue("client"), pki.issue("books"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let books = identity("books");
        cfg.write(
            "web-http.yaml",
            &require_identity("web-http", backend.addr.port(), None, &[&books]),
        );
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);

        let rsp = meshed_get(
            proxy.inbound(),
            &meshed_config(&client_dir),
            &identity("web"),
            "/",
        )
        .await;
        assert_denied(&rsp, "meshed, an identity not listed");
        let rsp = plain_get(proxy.inbound(), "/").await;
        assert_denied(&rsp, "plain");
        assert_eq!(backend.requests(), 0);
        let rsp = meshed_get(
            proxy.inbound(),
            &meshed_config(&books_dir),
            &identity("web"),
            "/",
        )
        .await;
        assert_allowed(&rsp, &backend, "meshed, the listed identity");

        assert_metric(
            &proxy,
            "inbound_http_authz_deny_total",
            &[("srv_name", "web-http"), ("client_id", &identity("client"))],
            1.0,
        )
        .await;
        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[("srv_name", "web-http"), ("client_id", &books)],
            1.0,
        )
        .await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. --default-policy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policies_decide_ports_no_server_selects() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let config = meshed_config(&client_dir);
        let web = identity("web");

        let deny = server_proxy(
            &server_dir,
            backend.addr,
            &cfg,
            &["--default-policy", "deny"],
        );
        assert_denied(&plain_get(deny.inbound(), "/").await, "deny: plain");
        assert_denied(
            &meshed_get(deny.inbound(), &config, &web, "/").await,
            "deny: meshed",
        );
        assert_metric(
            &deny,
            "inbound_http_authz_deny_total",
            &[("srv_kind", "default"), ("srv_name", "deny")],
            2.0,
        )
        .await;
        drop(deny);

        let authn = server_proxy(
            &server_dir,
            backend.addr,
            &cfg,
            &["--default-policy", "all-authenticated"],
        );
        assert_denied(
            &plain_get(authn.inbound(), "/").await,
            "all-authenticated: plain",
        );
        assert_eq!(backend.requests(), 0);
        let rsp = meshed_get(authn.inbound(), &config, &web, "/").await;
        assert_allowed(&rsp, &backend, "all-authenticated: meshed");
        let default = [("srv_kind", "default"), ("srv_name", "all-authenticated")];
        assert_metric(&authn, "inbound_http_authz_deny_total", &default, 1.0).await;
        assert_metric(&authn, "inbound_http_authz_allow_total", &default, 1.0).await;
        drop(authn);

        // cluster-unauthenticated: any client from the cluster networks (loopback is in the
        // defaults), nobody from outside them.
        let cluster = server_proxy(
            &server_dir,
            backend.addr,
            &cfg,
            &["--default-policy", "cluster-unauthenticated"],
        );
        let rsp = plain_get(cluster.inbound(), "/").await;
        assert_allowed(
            &rsp,
            &backend,
            "cluster-unauthenticated: plain from loopback",
        );
        drop(cluster);
        let elsewhere = server_proxy(
            &server_dir,
            backend.addr,
            &cfg,
            &[
                "--default-policy",
                "cluster-unauthenticated",
                "--cluster-networks",
                "10.0.0.0/8",
            ],
        );
        assert_denied(
            &plain_get(elsewhere.inbound(), "/").await,
            "cluster-unauthenticated: loopback outside the cluster networks",
        );
        assert_denied(
            &meshed_get(elsewhere.inbound(), &config, &web, "/").await,
            "cluster-unauthenticated: meshed, outside the cluster networks",
        );
        drop(elsewhere);

        // audit: everyone in, flagged.
        let audit = server_proxy(
            &server_dir,
            backend.addr,
            &cfg,
            &["--default-policy", "audit"],
        );
        assert_allowed(
            &plain_get(audit.inbound(), "/").await,
            &backend,
            "audit: plain",
        );
        assert_metric(
            &audit,
            "inbound_http_authz_allow_total",
            &[("srv_name", "audit"), ("authz_name", "audit")],
            1.0,
        )
        .await;
    })
    .await
}

/// GET `/` on a plain connection from `local` (a loopback address of our choosing).
async fn plain_get_from(local: &str, addr: SocketAddr) -> Resp {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local}:0").parse().expect("local addr"))
        .expect("bind a loopback source address");
    let tcp = within("connect", OP_TIMEOUT, socket.connect(addr))
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send_h1(&mut send, h1_request("GET", "web", "/", empty()))
        .await
        .unwrap_or_else(|e| panic!("GET from {local}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_authentication_admits_its_networks_minus_exceptions() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let port = backend.addr.port();
        let objects = [
            server_yaml("web-http", port, None),
            format!(
                "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n\
                 metadata: {{name: local, namespace: {NS}}}\nspec:\n  networks:\n  \
                 - cidr: 127.0.0.0/8\n    except: [127.0.0.2/32]\n"
            ),
            format!(
                "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: from-local, namespace: {NS}}}\nspec:\n  \
                 targetRef: {{group: policy.linkerd.io, kind: Server, name: web-http}}\n  \
                 requiredAuthenticationRefs:\n  \
                 - {{group: policy.linkerd.io, kind: NetworkAuthentication, name: local}}\n"
            ),
        ];
        cfg.write("web-http.yaml", &objects.join("---\n"));
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);

        let rsp = plain_get_from("127.0.0.1", proxy.inbound()).await;
        assert_allowed(&rsp, &backend, "plain from 127.0.0.1");
        let rsp = plain_get_from("127.0.0.3", proxy.inbound()).await;
        assert_allowed(&rsp, &backend, "plain from 127.0.0.3");
        let rsp = plain_get_from("127.0.0.2", proxy.inbound()).await;
        assert_denied(&rsp, "plain from the excepted 127.0.0.2");
        // A network requirement alone admits meshed clients from the network too.
        let rsp = meshed_get(
            proxy.inbound(),
            &meshed_config(&client_dir),
            &identity("web"),
            "/",
        )
        .await;
        assert_allowed(&rsp, &backend, "meshed from 127.0.0.1");

        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[("srv_name", "web-http"), ("authz_name", "from-local")],
            3.0,
        )
        .await;
        assert_metric(
            &proxy,
            "inbound_http_authz_deny_total",
            &[("srv_name", "web-http")],
            1.0,
        )
        .await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 5. Opaque TCP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_server_closes_unauthorized_tcp_and_echoes_for_meshed_clients() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let echo = TcpServer::echo().await;
        let cfg = ConfigDir::new();
        cfg.write(
            "web-tcp.yaml",
            &require_identity("web-tcp", echo.addr.port(), Some("opaque"), &["*"]),
        );
        let proxy = server_proxy(&server_dir, echo.addr, &cfg, &[]);

        // Plain: the connection is closed, nothing reaches the app.
        let mut raw = RawConn::connect(proxy.inbound()).await;
        raw.send(b"hello from nowhere\n").await;
        let mut got = Vec::new();
        let read = within(
            "the proxy closes a denied connection",
            OP_TIMEOUT,
            raw.reader.read_to_end(&mut got),
        )
        .await;
        assert!(
            got.is_empty(),
            "no data for a denied client: {:?} ({read:?})",
            String::from_utf8_lossy(&got)
        );
        assert_metric(
            &proxy,
            "inbound_tcp_authz_deny_total",
            &[("srv_kind", "server"), ("srv_name", "web-tcp")],
            1.0,
        )
        .await;
        assert_eq!(
            echo.connections.load(Ordering::SeqCst),
            0,
            "the app saw no connection"
        );
        assert_eq!(echo.bytes.load(Ordering::SeqCst), 0);

        // Meshed (no ALPN, as an opaque hop): its bytes come back.
        let config = Credentials::load(&client_dir)
            .expect("client identity")
            .client_config();
        let mut tls = tls_connect(proxy.inbound(), config, &identity("web"))
            .await
            .expect("mesh TLS handshake");
        let msg = b"ping over mesh TLS\n";
        for round in 0..3 {
            within("echo write", OP_TIMEOUT, tls.write_all(msg))
                .await
                .expect("write");
            let mut back = vec![0u8; msg.len()];
            within("echo read", OP_TIMEOUT, tls.read_exact(&mut back))
                .await
                .unwrap_or_else(|e| panic!("echo round {round}: {e}"));
            assert_eq!(back, msg);
        }
        drop(tls);
        assert_eq!(echo.connections.load(Ordering::SeqCst), 1);
        assert_eq!(echo.bytes.load(Ordering::SeqCst), 3 * msg.len() as u64);
        assert_metric(
            &proxy,
            "inbound_tcp_authz_allow_total",
            &[("srv_name", "web-tcp"), ("client_id", &identity("client"))],
            1.0,
        )
        .await;
        // Opaque means no HTTP: nothing counted as requests.
        assert_eq!(
            proxy
                .metric_value("inbound_http_authz_allow_total", &[])
                .unwrap_or(0.0)
                + proxy
                    .metric_value("inbound_http_authz_deny_total", &[])
                    .unwrap_or(0.0),
            0.0
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 6. TLS refusals
// ---------------------------------------------------------------------------------------------

/// After a handshake the server refuses (TLS 1.3: the client may think it is done first), the
/// connection must not carry a request: writing or reading fails, or reads EOF.
async fn assert_refused_after_handshake(
    result: std::io::Result<TlsStream<TcpStream>>,
    what: &str,
) -> String {
    let mut tls = match result {
        Err(e) => return format!("handshake: {e}"),
        Ok(tls) => tls,
    };
    if let Err(e) = tls
        .write_all(b"GET /refused HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
    {
        return format!("write: {e}");
    }
    if let Err(e) = tls.flush().await {
        return format!("flush: {e}");
    }
    let mut buf = vec![0u8; 4096];
    match within(what, OP_TIMEOUT, tls.read(&mut buf)).await {
        Ok(0) => "eof".to_string(),
        Err(e) => format!("read: {e}"),
        Ok(n) => panic!(
            "{what}: the server answered a refused client: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_with_bad_certificates_or_the_wrong_server_name_fail() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let web = identity("web");

        // A client certificate from another CA (of the same trust domain), trusting ours.
        let other_ca = Ca::generate("cluster.local", ValidityWindow::starting_now(DAY).unwrap())
            .expect("another CA");
        let foreign = other_ca
            .issue("client", NS, ValidityWindow::starting_now(DAY).unwrap())
            .expect("issue from the other CA");
        let config = client_config(
            pki.ca.anchor_pem(),
            Some((&foreign.chain_pem, &foreign.key_pem)),
        );
        let why = assert_refused_after_handshake(
            tls_connect(proxy.inbound(), config, &web).await,
            "another CA's client certificate",
        )
        .await;
        eprintln!("another CA's client: {why}");

        // An expired client certificate from our CA.
        let expired = pki.issue_expired("client");
        let config = client_config(
            pki.ca.anchor_pem(),
            Some((&expired.chain_pem, &expired.key_pem)),
        );
        let why = assert_refused_after_handshake(
            tls_connect(proxy.inbound(), config, &web).await,
            "an expired client certificate",
        )
        .await;
        eprintln!("expired client: {why}");

        // A client that expects another server's identity: the proxy terminates only TLS for
        // its own name (as Linkerd, by SNI), so this TLS goes on to the app, which speaks
        // plain HTTP: the handshake fails and no request reaches the app.
        let err = tls_connect(
            proxy.inbound(),
            meshed_config(&client_dir),
            &identity("api"),
        )
        .await
        .expect_err("nobody proves api's identity here");
        eprintln!("client expecting api: {err}");

        // A client that names the proxy's identity but trusts another CA: it refuses the
        // proxy's certificate.
        let foreign_trust = client_config(
            other_ca.anchor_pem(),
            Some((&foreign.chain_pem, &foreign.key_pem)),
        );
        let err = tls_connect(proxy.inbound(), foreign_trust, &web)
            .await
            .expect_err("the proxy's certificate is not from the CA this client trusts");
        let msg = err.to_string();
        assert!(
            msg.contains("UnknownIssuer"),
            "a certificate error, not {msg:?}"
        );

        assert_eq!(
            backend.requests(),
            0,
            "no request got through a failed handshake"
        );
        // Three of them were the proxy's failed handshakes, logged.
        let failed = |p: &Proxy| {
            p.logs()
                .iter()
                .filter(|l| l.contains("mesh TLS handshake failed"))
                .count()
        };
        assert!(
            wait_until(|| failed(&proxy) >= 3, OP_TIMEOUT).await,
            "three failed handshakes logged, got {}:\n{}",
            failed(&proxy),
            proxy.log_tail(20)
        );

        // The proxy keeps serving, meshed and plain.
        let rsp = meshed_get(proxy.inbound(), &meshed_config(&client_dir), &web, "/after").await;
        assert_allowed(&rsp, &backend, "meshed after the refusals");
        assert_allowed(
            &plain_get(proxy.inbound(), "/after").await,
            &backend,
            "plain after",
        );
        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[("client_id", &identity("client"))],
            1.0,
        )
        .await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// TLS without a client certificate, and h2 by ALPN
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_certificate_is_secured_but_not_authenticated() {
    test_body(async {
        let pki = Pki::new();
        let server_dir = pki.issue("web");
        let backend = Backend::start("web-a").await;
        let locked = Backend::start("web-locked").await;
        let cfg = ConfigDir::new();
        cfg.write(
            "web-locked.yaml",
            &require_identity("web-locked", locked.addr.port(), None, &["*"]),
        );
        let anonymous = client_config(pki.ca.anchor_pem(), None);
        let web = identity("web");

        // The default policy admits it, labelled as TLS without a client identity.
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let rsp = meshed_get(proxy.inbound(), &anonymous, &web, "/anonymous").await;
        assert_allowed(&rsp, &backend, "anonymous TLS, default policy");
        let text = proxy.metrics();
        let tls_series = metric_sum(&text, "response_total", |s| {
            s.label("direction") == Some("inbound") && s.label("tls") == Some("true")
        });
        assert_eq!(
            tls_series,
            Some(1.0),
            "{}",
            series_of(&text, "response_total")
        );
        assert_eq!(
            metric_sum(&text, "response_total", |s| s.label("client_id").is_some()),
            None,
            "no client_id without a certificate:\n{}",
            series_of(&text, "response_total")
        );

        // A Server requiring an identity refuses it: TLS alone is not authentication.
        let proxy = server_proxy(&server_dir, locked.addr, &cfg, &[]);
        let rsp = meshed_get(proxy.inbound(), &anonymous, &web, "/anonymous").await;
        assert_denied(&rsp, "anonymous TLS, identity required");
        assert_eq!(locked.requests(), 0);
        assert_metric(
            &proxy,
            "inbound_http_authz_deny_total",
            &[("srv_name", "web-locked"), ("tls", "true")],
            1.0,
        )
        .await;
    })
    .await
}

/// A TLS echo server of the app's own (not the mesh's): `dir`'s certificate, no client auth
/// required.
async fn app_tls_echo(dir: &Path) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let config = Credentials::load(dir)
        .expect("app identity")
        .server_config();
    let acceptor = pylon_identity::tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let done = handshakes.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                done.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = tls.flush().await;
                }
            });
        }
    });
    (addr, handshakes, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_another_name_passes_through_to_an_app_serving_its_own_tls() {
    test_body(async {
        let pki = Pki::new();
        let server_dir = pki.issue("web");
        // The app's own certificate, from a CA the mesh knows nothing about.
        let app_ca = Ca::generate("example.org", ValidityWindow::starting_now(DAY).unwrap())
            .expect("the app's CA");
        let app_dir = pki.dir.path().join("app-tls");
        app_ca
            .issue("shop", "prod", ValidityWindow::starting_now(DAY).unwrap())
            .expect("the app's certificate")
            .write(&app_dir)
            .expect("write the app's certificate");
        let app_name = "shop.prod.serviceaccount.identity.pylon.example.org";
        let (app, handshakes, _task) = app_tls_echo(&app_dir).await;
        let cfg = ConfigDir::new();
        let proxy = server_proxy(&server_dir, app, &cfg, &[]);

        // A client of the app (not of the mesh): it trusts only the app's CA and names the app.
        let config = client_config(app_ca.anchor_pem(), None);
        let mut tls = tls_connect(proxy.inbound(), config, app_name)
            .await
            .expect("TLS with the app itself, through the proxy");
        let msg = b"hello, app\n";
        within("echo write", OP_TIMEOUT, tls.write_all(msg))
            .await
            .expect("write");
        within("echo flush", OP_TIMEOUT, tls.flush())
            .await
            .expect("flush");
        let mut back = vec![0u8; msg.len()];
        within("echo read", OP_TIMEOUT, tls.read_exact(&mut back))
            .await
            .expect("the app echoes");
        assert_eq!(back, msg);
        assert_eq!(
            handshakes.load(Ordering::SeqCst),
            1,
            "the app terminated the TLS"
        );
        drop(tls);
        // The passed-through connection is not mesh TLS: no identity, decided as plain TCP.
        assert_metric(
            &proxy,
            "inbound_tcp_authz_allow_total",
            &[("srv_name", "all-unauthenticated"), ("tls", "no_identity")],
            1.0,
        )
        .await;

        // So a Server requiring an identity refuses it: the app's own TLS is no way around
        // the policy.
        cfg.write(
            "app.yaml",
            &require_identity("app-tls", app.port(), None, &["*"]),
        );
        let locked = server_proxy(&server_dir, app, &cfg, &[]);
        let config = client_config(app_ca.anchor_pem(), None);
        let result = tls_connect(locked.inbound(), config, app_name).await;
        assert!(
            result.is_err(),
            "the connection is closed before the app's handshake"
        );
        assert_eq!(
            handshakes.load(Ordering::SeqCst),
            1,
            "the app saw no new handshake"
        );
        assert_metric(
            &locked,
            "inbound_tcp_authz_deny_total",
            &[("srv_name", "app-tls"), ("tls", "no_identity")],
            1.0,
        )
        .await;
    })
    .await
}

/// An HTTP/2 connection over mesh TLS, negotiated by ALPN.
async fn meshed_h2_client(addr: SocketAddr, dir: &Path, server_id: &str) -> H2Client {
    let config = Credentials::load(dir)
        .expect("client identity loads")
        .client_config_with_alpn(&[b"h2"]);
    let tls = tls_connect(addr, config, server_id)
        .await
        .unwrap_or_else(|e| panic!("mesh TLS handshake with {addr}: {e}"));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_by_alpn_is_served_without_detection_and_obeys_the_policy() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir, books_dir) =
            (pki.issue("web"), pki.issue("client"), pki.issue("books"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let books = identity("books");
        cfg.write(
            "web-http.yaml",
            &require_identity("web-http", backend.addr.port(), None, &[&books]),
        );
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let web = identity("web");

        // Allowed: several requests multiplexed on one connection.
        let mut h2 = meshed_h2_client(proxy.inbound(), &books_dir, &web).await;
        let mut sends = Vec::new();
        for i in 0..3 {
            let req = abs_request("GET", "web:80", &format!("/h2/{i}"), empty());
            let mut c = h2.clone();
            sends.push(tokio::spawn(async move { send_h2(&mut c, req).await }));
        }
        for s in sends {
            let rsp = s.await.expect("task").expect("h2 response");
            assert_allowed(&rsp, &backend, "h2, allowed identity");
        }
        // A request another proxy carried over h2 for an HTTP/1.1 client reaches the app as
        // HTTP/1.1, without the hop's header.
        let mut req = abs_request("GET", "web:80", "/orig-proto", empty());
        req.headers_mut()
            .insert("l5d-orig-proto", http::HeaderValue::from_static("HTTP/1.1"));
        let rsp = send_h2(&mut h2, req).await.expect("orig-proto response");
        assert_allowed(&rsp, &backend, "h2 carrying HTTP/1.1");
        let rec = backend.state.last().expect("recorded");
        assert_eq!(rec.uri, "/orig-proto");
        assert_eq!(rec.version, http::Version::HTTP_11);
        assert!(
            rec.headers.get("l5d-orig-proto").is_none(),
            "{:?}",
            rec.headers
        );
        assert_eq!(
            rec.headers.get("host").and_then(|h| h.to_str().ok()),
            Some("web:80")
        );
        let h2_versions = backend
            .state
            .recorded()
            .iter()
            .filter(|r| r.version == http::Version::HTTP_2)
            .count();
        assert_eq!(h2_versions, 3, "plain h2 requests stay h2");

        // Denied: every stream of the connection gets the proxy's 403.
        let mut h2 = meshed_h2_client(proxy.inbound(), &client_dir, &web).await;
        for i in 0..2 {
            let req = abs_request("GET", "web:80", &format!("/denied/{i}"), empty());
            let rsp = send_h2(&mut h2, req).await.expect("h2 response");
            assert_denied(&rsp, "h2, identity not listed");
        }
        assert_eq!(backend.requests(), 4);
        assert_metric(
            &proxy,
            "inbound_http_authz_deny_total",
            &[("srv_name", "web-http"), ("client_id", &identity("client"))],
            2.0,
        )
        .await;
        assert_metric(
            &proxy,
            "inbound_http_authz_allow_total",
            &[("srv_name", "web-http"), ("client_id", &books)],
            4.0,
        )
        .await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 7. Live policy changes
// ---------------------------------------------------------------------------------------------

/// Polls (fresh plain connections, bounded) until a request gets `status`.
async fn plain_until(addr: SocketAddr, status: u16, what: &str) -> Resp {
    let deadline = Instant::now() + POLICY_APPLY;
    loop {
        let rsp = plain_get(addr, "/poll").await;
        if rsp.status == status {
            return rsp;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} after {POLICY_APPLY:?}",
            rsp.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_apply_to_new_connections_live() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let config = meshed_config(&client_dir);
        let web = identity("web");

        assert_allowed(&plain_get(proxy.inbound(), "/").await, &backend, "before");
        // A kept-alive connection opened before the change: its next request is decided on
        // the new policy.
        let mut early = h1_client(proxy.inbound()).await;
        let rsp = send_h1(&mut early, h1_request("GET", "web", "/early", empty()))
            .await
            .unwrap();
        assert_allowed(&rsp, &backend, "early connection");

        // ConfigDir::write stages the file and renames it into place.
        cfg.write(
            "web-http.yaml",
            &require_identity("web-http", backend.addr.port(), None, &["*"]),
        );
        let rsp = plain_until(proxy.inbound(), 403, "the new Server applies").await;
        assert_denied(&rsp, "plain, after the Server appeared");
        let rsp = meshed_get(proxy.inbound(), &config, &web, "/").await;
        assert_allowed(&rsp, &backend, "meshed, after the Server appeared");
        let rsp = send_h1(&mut early, h1_request("GET", "web", "/early", empty()))
            .await
            .unwrap();
        assert_denied(&rsp, "the connection opened before the change");
        assert!(
            wait_metric_at_least(
                &proxy,
                "inbound_http_authz_deny_total",
                &[("srv_name", "web-http")],
                1.0
            )
            .await
                >= 1.0
        );

        cfg.remove("web-http.yaml");
        let rsp = plain_until(proxy.inbound(), 200, "the Server's removal applies").await;
        assert_allowed(&rsp, &backend, "plain, after the Server went away");
        assert_eq!(
            proxy
                .metric_value("config_errors_total", &[])
                .unwrap_or(0.0),
            0.0,
            "{}",
            proxy.log_tail(20)
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 8. The tap and admin ports obey the policy
// ---------------------------------------------------------------------------------------------

async fn tap_client(proxy: &Proxy) -> TapClient<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.tap()))
        .expect("endpoint");
    let channel = within("tap connect", OP_TIMEOUT, endpoint.connect())
        .await
        .expect("tap client connects");
    TapClient::new(channel)
}

/// Observe's outcome: `Ok` (the tap was accepted) or the gRPC status code.
async fn observe(tap: &mut TapClient<tonic::transport::Channel>) -> Result<(), tonic::Code> {
    match within(
        "observe",
        OP_TIMEOUT,
        tap.observe(ObserveRequest::default()),
    )
    .await
    {
        Ok(stream) => {
            drop(stream);
            Ok(())
        }
        Err(status) => Err(status.code()),
    }
}

async fn observe_until(proxy: &Proxy, want: Result<(), tonic::Code>, what: &str) {
    let mut tap = tap_client(proxy).await;
    let deadline = Instant::now() + POLICY_APPLY;
    loop {
        let got = observe(&mut tap).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: observe still {got:?} after {POLICY_APPLY:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_and_admin_shutdown_obey_servers_on_their_ports() {
    test_body(async {
        let pki = Pki::new();
        let server_dir = pki.issue("web");
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let mut proxy = server_proxy(&server_dir, backend.addr, &cfg, &["--shutdown-grace", "5s"]);

        // Loopback may tap by default.
        observe_until(&proxy, Ok(()), "tap before any Server").await;

        // One file, so both Servers arrive in the same snapshot.
        let both = [
            require_identity("tap-server", proxy.tap().port(), None, &["*"]),
            require_identity("admin-server", proxy.admin().port(), None, &["*"]),
        ]
        .join("---\n");
        cfg.write("ports.yaml", &both);
        observe_until(
            &proxy,
            Err(tonic::Code::PermissionDenied),
            "tap with a Server requiring identity",
        )
        .await;
        assert!(
            wait_metric_at_least(
                &proxy,
                "inbound_tcp_authz_deny_total",
                &[("srv_kind", "server"), ("srv_name", "tap-server")],
                1.0
            )
            .await
                >= 1.0
        );

        let (status, body) = proxy.admin_request("POST", "/shutdown", "");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("authorization policy"), "{body}");
        assert_metric(
            &proxy,
            "inbound_http_authz_deny_total",
            &[("srv_name", "admin-server")],
            1.0,
        )
        .await;
        // Still running and serving.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            proxy.is_running(),
            "a refused shutdown must not stop the proxy"
        );
        assert_eq!(proxy.admin_request("GET", "/ready", "").0, 200);
        assert_allowed(
            &plain_get(proxy.inbound(), "/").await,
            &backend,
            "inbound still served",
        );

        // Without the Servers both work again: the refusals were the policy's.
        cfg.remove("ports.yaml");
        observe_until(&proxy, Ok(()), "tap after the Server went away").await;
        let (status, body) = proxy.admin_request("POST", "/shutdown", "");
        assert_eq!(status, 200, "{body}");
        let exit = proxy.wait_exit(OP_TIMEOUT).await.expect("the proxy exits");
        assert!(exit.success(), "{exit:?}");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 9. Fuzzing the inbound TLS detection and handshake
// ---------------------------------------------------------------------------------------------

/// SplitMix64: small, seeded, good enough to pick fuzz inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A real ClientHello (its TLS records, as the client would send them).
fn client_hello(config: Arc<ClientConfig>, server_id: &str) -> Vec<u8> {
    let name = ServerName::try_from(server_id.to_string()).expect("server name");
    let mut conn = ClientConnection::new(config, name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write to a Vec");
    }
    assert!(
        out.len() > 64 && out[0] == 22,
        "a handshake record: {out:?}"
    );
    out
}

const FUZZ_CASES: usize = 8;

/// One fuzz input: `(case, bytes)`.
fn fuzz_input(rng: &mut Rng, hello: &[u8]) -> (usize, Vec<u8>) {
    let case = rng.below(FUZZ_CASES);
    let bytes = match case {
        // Random bytes.
        0 => {
            let n = 1 + rng.below(1024);
            rng.bytes(n)
        }
        // A truncated ClientHello.
        1 => hello[..1 + rng.below(hello.len() - 1)].to_vec(),
        // A ClientHello with a few bytes flipped.
        2 => {
            let mut h = hello.to_vec();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(h.len());
                h[i] ^= 1 + rng.below(255) as u8;
            }
            h
        }
        // A handshake record header claiming a huge (or the maximum, or zero) length, then a
        // bit of a ClientHello.
        3 => {
            let len: u16 = [0xffff, 0x4000, 0x4001, 0, 0x8000][rng.below(5)];
            let mut h = vec![22, 3, 1];
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&hello[5..5 + rng.below(hello.len() - 5)]);
            h
        }
        // A ClientHello whose handshake message claims 16 MiB.
        4 => {
            let mut h = hello.to_vec();
            h[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
            h
        }
        // A ClientHello, then garbage records.
        5 => {
            let mut h = hello.to_vec();
            let n = 1 + rng.below(512);
            h.extend(rng.bytes(n));
            h
        }
        // A ClientHello, then records of every content type with huge lengths.
        6 => {
            let mut h = hello.to_vec();
            for _ in 0..1 + rng.below(4) {
                let ty = [20u8, 21, 22, 23, 24][rng.below(5)];
                h.extend_from_slice(&[ty, 3, 3, 0xff, 0xff]);
                let n = rng.below(64);
                h.extend(rng.bytes(n));
            }
            h
        }
        // The complete ClientHello alone.
        _ => hello.to_vec(),
    };
    (case, bytes)
}

/// Fuzzes the inbound port from `workers` concurrent tasks until `total` connections or
/// `cap`; returns the connections made per case.
async fn fuzz_round(
    addr: SocketAddr,
    hello: Arc<Vec<u8>>,
    seed: u64,
    total: usize,
    cap: Duration,
) -> Vec<usize> {
    const WORKERS: u64 = 16;
    let started = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + cap;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (hello, started) = (hello.clone(), started.clone());
        tasks.spawn(async move {
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut per_case = vec![0usize; FUZZ_CASES];
            while started.fetch_add(1, Ordering::SeqCst) < total && Instant::now() < deadline {
                let (case, bytes) = fuzz_input(&mut rng, &hello);
                let Ok(Ok(mut tcp)) =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
                else {
                    panic!("fuzz: cannot connect to the proxy");
                };
                per_case[case] += 1;
                // The proxy may close first: write errors are fine.
                let _ = tcp.write_all(&bytes).await;
                match rng.below(4) {
                    // Close at once.
                    0 | 1 => {}
                    // Stall briefly, then close.
                    2 => tokio::time::sleep(Duration::from_millis(rng.below(50) as u64)).await,
                    // Half-close and read what comes back for a moment.
                    _ => {
                        let _ = tcp.shutdown().await;
                        let mut sink = vec![0u8; 8192];
                        let _ = tokio::time::timeout(Duration::from_millis(50), async {
                            while let Ok(n) = tcp.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                }
            }
            per_case
        });
    }
    let mut per_case = vec![0usize; FUZZ_CASES];
    while let Some(done) = tasks.join_next().await {
        for (sum, n) in per_case.iter_mut().zip(done.expect("fuzz worker")) {
            *sum += n;
        }
    }
    per_case
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_client_hellos_neither_crash_nor_leak() {
    test_body(async {
        let pki = Pki::new();
        let (server_dir, client_dir) = (pki.issue("web"), pki.issue("client"));
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::new();
        let mut proxy = server_proxy(&server_dir, backend.addr, &cfg, &[]);
        let config = meshed_config(&client_dir);
        let web = identity("web");
        let hello = Arc::new(client_hello(config.clone(), &web));
        let seed = 0x5eed_0fa1_1d5e_u64;

        let addr = proxy.inbound();
        let check = |label: &'static str| {
            let (config, web, backend) = (config.clone(), web.clone(), &backend);
            async move {
                assert_allowed(&meshed_get(addr, &config, &web, "/").await, backend, label);
                assert_allowed(&plain_get(addr, "/").await, backend, label);
            }
        };

        // Warm-up: the same fuzz, so allocator pools and metric series exist before measuring.
        let warm = fuzz_round(addr, hello.clone(), seed, 1_000, Duration::from_secs(8)).await;
        check("after the warm-up").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = proxy.rss_kib().expect("the proxy's VmRSS");

        let fuzzed = fuzz_round(
            addr,
            hello.clone(),
            seed.rotate_left(17),
            3_000,
            Duration::from_secs(20),
        )
        .await;
        let total: usize = fuzzed.iter().sum();
        eprintln!("fuzz seed {seed:#x}: warm-up {warm:?}, measured {fuzzed:?} (per case)");
        assert!(
            fuzzed.iter().all(|&n| n > 0),
            "every case ran at least once: {fuzzed:?}"
        );
        assert!(proxy.is_running(), "{}", proxy.log_tail(30));
        check("after the fuzz").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = proxy.rss_kib().expect("the proxy's VmRSS");
        let grown_kib = rss_after.saturating_sub(rss_before);
        eprintln!("RSS {rss_before} KiB -> {rss_after} KiB over {total} connections");
        assert!(
            grown_kib < 30 * 1024,
            "RSS grew by {grown_kib} KiB over {total} fuzzed connections \
             ({rss_before} -> {rss_after} KiB)"
        );
        // The TLS path was exercised: handshakes failed and were logged.
        let failed = proxy
            .logs()
            .iter()
            .filter(|l| l.contains("mesh TLS handshake failed"))
            .count();
        assert!(
            failed > 0,
            "no failed handshake logged:\n{}",
            proxy.log_tail(20)
        );
        assert!(
            !proxy.logs_joined().contains("panicked"),
            "{}",
            proxy.log_tail(30)
        );
    })
    .await
}
