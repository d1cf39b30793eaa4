use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use clap::Parser;
use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use pylon_identity::ca::{Ca, ValidityWindow};
use pylon_identity::tokio_rustls::{server::TlsStream, TlsAcceptor};
use pylon_identity::IdentityWatcher;
use pylon_proxy_metrics::ProxyLabels;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::args::Cli;
use crate::mesh_tls::{Alpn, MeshTls};

const TRUST_DOMAIN: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

fn ca() -> Arc<Ca> {
    let window = ValidityWindow::starting_now(7 * 24 * HOUR).unwrap();
    Arc::new(Ca::generate(TRUST_DOMAIN, window).unwrap())
}

fn anchors(ca: &Ca) -> TrustAnchors {
    TrustAnchors::from_pem(ca.anchor_pem().as_bytes(), "test anchors").unwrap()
}

fn name(sa: &str, ns: &str) -> IdentityName {
    IdentityName::new(sa, ns, TRUST_DOMAIN).unwrap()
}

fn metrics() -> Arc<Metrics> {
    Metrics::new(ProxyLabels::default())
}

// --- schedule -----------------------------------------------------------------------------

#[test]
fn backoff_doubles_from_a_second_to_a_minute_with_up_to_half_taken_off() {
    let secs = |attempt, jitter| backoff(attempt, jitter).as_secs_f64();
    for (attempt, ceiling) in [
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (6, 32.0),
        (7, 60.0),
        (50, 60.0),
    ] {
        assert_eq!(secs(attempt, 0.0), ceiling, "attempt {attempt}");
        assert_eq!(secs(attempt, 1.0), ceiling / 2.0, "attempt {attempt}");
        let mid = secs(attempt, 0.5);
        assert!(
            mid > ceiling / 2.0 && mid < ceiling,
            "attempt {attempt}: {mid}"
        );
    }
    // Nonsense jitter stays in bounds; attempt 0 (never used) is the first step.
    assert_eq!(secs(1, 7.0), 0.5);
    assert_eq!(secs(1, -1.0), 1.0);
    assert_eq!(secs(0, 0.0), 1.0);
    assert_eq!(secs(u32::MAX, 0.0), 60.0);
}

#[test]
fn refresh_comes_at_70_percent_of_the_remaining_lifetime_within_bounds() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let at = |remaining: i64| refresh_in(1_000_000 + remaining, now);
    assert_eq!(at(1000), Duration::from_secs(700));
    assert_eq!(at(24 * 3600), Duration::from_secs(24 * 3600 * 7 / 10));
    // Short-lived or expired: not a busy loop.
    assert_eq!(at(5), MIN_REFRESH);
    assert_eq!(at(-5), MIN_REFRESH);
    // A year-long certificate is still renewed daily.
    assert_eq!(at(365 * 24 * 3600), MAX_REFRESH);
    assert_eq!(refresh_in(i64::MIN, now), MIN_REFRESH);
}

// --- configuration ------------------------------------------------------------------------

fn args(flags: &[&str]) -> ProxyArgs {
    let mut argv = vec!["pylon-proxy"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).unwrap().proxy
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| vars.get(name).cloned()
}

#[tokio::test]
async fn config_comes_from_flags_or_linkerds_variables() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let anchors_file = dir.path().join("anchors.pem");
    std::fs::write(&anchors_file, ca.anchor_pem()).unwrap();
    let web = "web.default.serviceaccount.identity.pylon.cluster.local";

    // Nothing asked for.
    assert!(Config::from_args(&args(&[]), env(&[])).unwrap().is_none());

    let config = Config::from_args(
        &args(&[
            "--identity-addr",
            "127.0.0.1:8080",
            "--identity-name",
            web,
            "--identity-token-file",
            "/tmp/token",
            "--identity-trust-anchors",
            anchors_file.to_str().unwrap(),
        ]),
        env(&[]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(config.addr, "127.0.0.1:8080");
    assert_eq!(config.uri(), "http://127.0.0.1:8080");
    assert_eq!(config.name.as_str(), web);
    assert_eq!(config.token, TokenSource::File("/tmp/token".into()));
    assert_eq!(config.anchors.certs().len(), 1);
    assert_eq!(config.anchors.source(), anchors_file.as_path());
    assert_eq!(config.svc_name, None);

    // A Linkerd-injected pod: everything from LINKERD2_PROXY_IDENTITY_*.
    let linkerd_name = "web.default.serviceaccount.identity.linkerd.cluster.local";
    let svc = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local";
    let linkerd_env = [
        (
            ENV_SVC_ADDR,
            "linkerd-identity-headless.linkerd.svc.cluster.local.:8080",
        ),
        (ENV_LOCAL_NAME, linkerd_name),
        (ENV_TRUST_ANCHORS, ca.anchor_pem()),
        (ENV_SVC_NAME, svc),
    ];
    let config = Config::from_args(&args(&[]), env(&linkerd_env))
        .unwrap()
        .unwrap();
    assert_eq!(
        config.addr,
        "linkerd-identity-headless.linkerd.svc.cluster.local.:8080"
    );
    assert!(config.name.is_linkerd_form());
    assert_eq!(config.token, TokenSource::Default);
    assert_eq!(config.anchors.source(), Path::new(ENV_TRUST_ANCHORS));
    assert_eq!(config.svc_name.as_deref(), Some(svc));
    assert!(config.channel().is_ok());

    // Flags win over Linkerd's variables; PEM text works for the flag too.
    let config = Config::from_args(
        &args(&[
            "--identity-name",
            web,
            "--identity-trust-anchors",
            ca.anchor_pem(),
            "--identity-token-file",
            "/tmp/token",
        ]),
        env(&linkerd_env),
    )
    .unwrap()
    .unwrap();
    assert_eq!(config.name.as_str(), web);
    assert_eq!(
        config.anchors.source(),
        Path::new("--identity-trust-anchors")
    );
    assert_eq!(config.token, TokenSource::File("/tmp/token".into()));

    // With --identity-dir, Linkerd's address does not turn the service on...
    let with_dir = args(&["--identity-dir", "/tmp/id"]);
    assert!(Config::from_args(&with_dir, env(&linkerd_env))
        .unwrap()
        .is_none());
    // ...and both flags together are refused (by clap, and by hand for the env twins).
    assert!(Cli::try_parse_from([
        "pylon-proxy",
        "--identity-dir",
        "/tmp/id",
        "--identity-addr",
        "127.0.0.1:8080"
    ])
    .is_err());
    let mut both = args(&["--identity-dir", "/tmp/id"]);
    both.identity_addr = Some("127.0.0.1:8080".into());
    assert!(matches!(
        Config::from_args(&both, env(&[])),
        Err(ConfigError::Conflict)
    ));
}

#[test]
fn config_errors_say_what_is_missing() {
    let ca = ca();
    let check = |flags: &[&str], vars: &[(&str, &str)]| {
        Config::from_args(&args(flags), env(vars))
            .unwrap_err()
            .to_string()
    };
    let addr = ["--identity-addr", "127.0.0.1:8080"];
    assert!(check(&addr, &[]).contains("--identity-name"));
    let err = check(
        &[&addr[..], &["--identity-name", "web.default.svc"]].concat(),
        &[],
    );
    assert!(err.contains("invalid identity name"), "{err}");
    let named = [
        &addr[..],
        &[
            "--identity-name",
            "web.default.serviceaccount.identity.pylon.cluster.local",
        ],
    ]
    .concat();
    assert!(check(&named, &[]).contains("--identity-trust-anchors"));
    let err = check(&named, &[(ENV_TRUST_ANCHORS, "garbage")]);
    assert!(err.contains(ENV_TRUST_ANCHORS), "{err}");
    let err = check(
        &[
            &named[..],
            &["--identity-trust-anchors", "/nonexistent/anchors.pem"],
        ]
        .concat(),
        &[],
    );
    assert!(err.contains("/nonexistent/anchors.pem"), "{err}");
    let err = check(
        &[&named[..], &["--identity-svc-name", "not a name!"]].concat(),
        &[(ENV_TRUST_ANCHORS, ca.anchor_pem())],
    );
    assert!(err.contains("not a DNS name"), "{err}");
}

// --- a scripted identity service ------------------------------------------------------------

/// One Certify call as the service saw it.
#[derive(Debug)]
struct Call {
    at: Instant,
    token: String,
    identity: String,
    /// The serial the client had installed when it called.
    current_serial: Option<String>,
}

/// What the scripted service does with a call.
enum Outcome {
    Sign,
    Fail(tonic::Status),
    /// Never answers (freezes the client where it is).
    Hang,
}

/// Signs with a real CA, or fails, as scripted (then signs).
struct ScriptedIdentity {
    ca: Arc<Ca>,
    lifetime: Duration,
    script: Mutex<VecDeque<Outcome>>,
    calls: mpsc::UnboundedSender<Call>,
    watcher: Option<IdentityWatcher>,
}

#[tonic::async_trait]
impl Identity for ScriptedIdentity {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        let req = request.into_inner();
        let _ = self.calls.send(Call {
            at: Instant::now(),
            token: String::from_utf8_lossy(&req.token).into_owned(),
            identity: req.identity.clone(),
            current_serial: self
                .watcher
                .as_ref()
                .and_then(|w| w.current())
                .map(|c| c.serial().to_owned()),
        });
        let outcome = self.script.lock().unwrap().pop_front();
        match outcome.unwrap_or(Outcome::Sign) {
            Outcome::Sign => {}
            Outcome::Fail(status) => return Err(status),
            Outcome::Hang => std::future::pending::<()>().await,
        }
        let identity = IdentityName::parse(&req.identity)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let leaf = self
            .ca
            .certify_csr(&req.certificate_signing_request, &identity, self.lifetime)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        Ok(tonic::Response::new(CertifyResponse {
            leaf_certificate: leaf.leaf_der.to_vec(),
            intermediate_certificates: leaf.intermediates_der.iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp {
                seconds: leaf.not_after,
                nanos: 0,
            }),
        }))
    }
}

fn scripted(
    ca: &Arc<Ca>,
    lifetime: Duration,
    script: Vec<Outcome>,
    watcher: Option<IdentityWatcher>,
) -> (ScriptedIdentity, mpsc::UnboundedReceiver<Call>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = ScriptedIdentity {
        ca: ca.clone(),
        lifetime,
        script: Mutex::new(script.into()),
        calls: tx,
        watcher,
    };
    (svc, rx)
}

fn token_file(contents: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), contents).unwrap();
    file
}

fn assert_between(gap: Duration, min: Duration, max: Duration, what: &str) {
    assert!(
        gap >= min && gap <= max,
        "{what}: {gap:?} not in [{min:?}, {max:?}]"
    );
}

/// The schedule in paused time, against the real tonic server code in process (no sockets, so
/// the clock only moves when everything waits): certified, renewed at 70% of the lifetime,
/// two failures retried with growing backoff while the first certificate stays installed,
/// then renewed again; the token re-read every time.
#[tokio::test(start_paused = true)]
async fn renews_at_70_percent_and_retries_failures_with_backoff_keeping_the_certificate() {
    let ca = ca();
    let web = name("web", "default");
    let token = token_file("token-1");
    let (watcher, publisher) = IdentityWatcher::published();
    let lifetime = Duration::from_secs(1000);
    let unavailable = || Outcome::Fail(tonic::Status::unavailable("issuer busy"));
    let (svc, mut calls) = scripted(
        &ca,
        lifetime,
        vec![
            Outcome::Sign,
            unavailable(),
            unavailable(),
            Outcome::Sign,
            // The client stays put while the test looks.
            Outcome::Hang,
        ],
        Some(watcher.clone()),
    );
    let metrics = metrics();
    let certifier = Certifier {
        key: IdentityKey::generate(&web).unwrap(),
        token: TokenSource::File(token.path().to_path_buf()),
        anchors: anchors(&ca),
        publisher,
        metrics: metrics.clone(),
    };
    let _task = AbortOnDrop(tokio::spawn(
        certifier.run(IdentityClient::new(IdentityServer::new(svc))),
    ));

    let first = calls.recv().await.unwrap();
    assert_eq!(
        (first.identity.as_str(), first.token.as_str()),
        (web.as_str(), "token-1")
    );
    assert_eq!(first.current_serial, None);
    let installed = watcher.wait_current().await;
    assert_eq!(installed.identity(), &web);
    let first_serial = installed.serial().to_owned();
    assert_eq!(metrics.identity_cert_refreshes().get(), 1);
    let mut text = String::new();
    metrics.encode(&mut text).unwrap();
    assert!(
        text.contains(&format!(
            "identity_cert_expiration_timestamp_seconds {}",
            installed.not_after()
        )),
        "{text}"
    );

    // The token is read afresh for every request (projected tokens rotate).
    std::fs::write(token.path(), "token-2").unwrap();

    let renewal = calls.recv().await.unwrap();
    // 70% of what was left of 1000 s when it came back (whole seconds, so a little less).
    assert_between(
        renewal.at - first.at,
        Duration::from_secs(695),
        Duration::from_secs(700),
        "renewal",
    );
    assert_eq!(renewal.token, "token-2");
    assert_eq!(
        renewal.current_serial.as_deref(),
        Some(first_serial.as_str())
    );

    let retry1 = calls.recv().await.unwrap();
    assert_between(
        retry1.at - renewal.at,
        Duration::from_millis(500),
        Duration::from_secs(1),
        "first retry",
    );
    assert_eq!(
        retry1.current_serial.as_deref(),
        Some(first_serial.as_str())
    );
    let error = watcher.last_error().expect("the failure is reported");
    assert!(error.contains("issuer busy"), "{error}");

    let retry2 = calls.recv().await.unwrap();
    assert_between(
        retry2.at - retry1.at,
        Duration::from_secs(1),
        Duration::from_secs(2),
        "second retry",
    );
    assert_eq!(
        retry2.current_serial.as_deref(),
        Some(first_serial.as_str())
    );
    assert_eq!(metrics.identity_certify_failures().get(), 2);

    // The second retry succeeded: a new certificate, the error gone, and the next renewal
    // scheduled from it.
    let next = calls.recv().await.unwrap();
    assert_between(
        next.at - retry2.at,
        Duration::from_secs(695),
        Duration::from_secs(700),
        "renewal after the retries",
    );
    let second_serial = next.current_serial.expect("installed");
    assert_ne!(second_serial, first_serial);
    assert!(watcher.last_error().is_none());
    assert_eq!(metrics.identity_cert_refreshes().get(), 2);
    assert_eq!(metrics.identity_certify_failures().get(), 2);
}

#[tokio::test(start_paused = true)]
async fn stays_without_credentials_until_the_first_success() {
    let ca = ca();
    let web = name("web", "default");
    let token = token_file("token");
    let (watcher, publisher) = IdentityWatcher::published();
    let (svc, mut calls) = scripted(
        &ca,
        HOUR,
        vec![Outcome::Fail(tonic::Status::unauthenticated(
            "token expired",
        ))],
        Some(watcher.clone()),
    );
    let metrics = metrics();
    let certifier = Certifier {
        key: IdentityKey::generate(&web).unwrap(),
        token: TokenSource::File(token.path().to_path_buf()),
        anchors: anchors(&ca),
        publisher,
        metrics: metrics.clone(),
    };
    let _task = AbortOnDrop(tokio::spawn(
        certifier.run(IdentityClient::new(IdentityServer::new(svc))),
    ));
    let refused = calls.recv().await.unwrap();
    let retried = calls.recv().await.unwrap();
    assert_eq!(
        retried.current_serial, None,
        "nothing installed after a refusal"
    );
    assert_between(
        retried.at - refused.at,
        Duration::from_millis(500),
        Duration::from_secs(1),
        "retry",
    );
    assert_eq!(watcher.wait_current().await.identity(), &web);
    assert_eq!(metrics.identity_certify_failures().get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_or_a_missing_token_is_a_failure() {
    let ca = ca();
    let web = name("web", "default");
    let (watcher, publisher) = IdentityWatcher::published();
    // The service signs whatever identity is asked; the client asks for `web` with a key
    // whose CSR is for `api`: the answer does not match the key's identity.
    let api_key = IdentityKey::generate(&name("api", "prod")).unwrap();
    let (svc, mut calls) = scripted(&ca, HOUR, vec![], None);
    let metrics = metrics();
    let missing = tempfile::tempdir().unwrap().path().join("token");
    let certifier = Certifier {
        key: api_key,
        token: TokenSource::File(missing.clone()),
        anchors: anchors(&ca),
        publisher,
        metrics: metrics.clone(),
    };
    let mut client = IdentityClient::new(IdentityServer::new(svc));
    match certifier.certify(&mut client).await {
        Err(e @ CertifyError::Token { .. }) => {
            assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(calls.try_recv().is_err(), "nothing sent without a token");

    let token = token_file("  \n");
    let certifier = Certifier {
        token: TokenSource::File(token.path().to_path_buf()),
        ..certifier
    };
    assert!(matches!(
        certifier.certify(&mut client).await,
        Err(CertifyError::EmptyToken { .. })
    ));
    std::fs::write(token.path(), "token").unwrap();
    let creds = certifier.certify(&mut client).await.unwrap();
    assert_eq!(
        creds.identity().as_str(),
        "api.prod.serviceaccount.identity.pylon.cluster.local"
    );
    let _ = (watcher, web);
}

// --- over loopback, with TLS to the service -------------------------------------------------

/// A server-side TLS stream tonic can serve (tonic's own TLS support is not compiled in).
struct Tls(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Tls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The scripted service on loopback over TLS, as `svc`'s identity.
async fn serve_tls(
    ca: &Arc<Ca>,
    svc: &IdentityName,
) -> (SocketAddr, mpsc::UnboundedReceiver<Call>) {
    let issued = ca
        .issue(
            svc.sa(),
            svc.namespace(),
            ValidityWindow::starting_now(HOUR).unwrap(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    issued.write(dir.path()).unwrap();
    let creds = Credentials::load(dir.path()).unwrap();
    let acceptor = TlsAcceptor::from(creds.server_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming =
        futures_util::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                // A client that fails its handshake is dropped; the next one is served.
                if let Ok(tls) = acceptor.accept(tcp).await {
                    return Some((Ok::<_, std::io::Error>(Tls(tls)), (listener, acceptor)));
                }
            }
        });
    let (identity, calls) = scripted(ca, HOUR, vec![], None);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .serve_with_incoming(incoming),
    );
    (addr, calls)
}

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// Two proxies' MeshTls certified by a (TLS-served) identity service on loopback, then mesh
/// TLS between them through MeshTls itself.
#[tokio::test]
async fn proxies_certified_over_tls_speak_mesh_tls() {
    let ca = ca();
    let svc_name = name("pylon-identity", "pylon");
    let (addr, mut calls) = serve_tls(&ca, &svc_name).await;
    let token = token_file("token");
    let config = |id: &IdentityName| Config {
        addr: addr.to_string(),
        name: id.clone(),
        token: TokenSource::File(token.path().to_path_buf()),
        anchors: anchors(&ca),
        svc_name: Some(svc_name.to_string()),
    };
    let (web, api) = (name("web", "default"), name("api", "prod"));
    let client = MeshTls::start_certifying(config(&web), metrics()).unwrap();
    let server = MeshTls::start_certifying(config(&api), metrics()).unwrap();
    assert!(
        eventually(|| client.is_ready() && server.is_ready()).await,
        "certified"
    );
    assert_eq!(calls.recv().await.unwrap().token, "token");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = listener.local_addr().unwrap();
    let accept = async {
        let (tcp, peer) = listener.accept().await.unwrap();
        server.accept(tcp, peer).await
    };
    let connect = async {
        let tcp = TcpStream::connect(tls_addr).await.unwrap();
        client.connect(tcp, api.as_str(), Alpn::H2).await
    };
    let (accepted, connected) = tokio::join!(accept, connect);
    let (_, accepted) = accepted.unwrap();
    assert_eq!(accepted.client_id.as_deref(), Some(web.as_str()));
    assert!(accepted.h2);
    let connected = connected.unwrap();
    assert_eq!(
        pylon_identity::peer_identity(connected.get_ref().1).as_ref(),
        Some(&api)
    );
}

#[tokio::test]
async fn an_identity_service_proving_another_name_is_refused() {
    let ca = ca();
    let (addr, mut calls) = serve_tls(&ca, &name("impostor", "default")).await;
    let token = token_file("token");
    let metrics = metrics();
    let tls = MeshTls::start_certifying(
        Config {
            addr: addr.to_string(),
            name: name("web", "default"),
            token: TokenSource::File(token.path().to_path_buf()),
            anchors: anchors(&ca),
            svc_name: Some(name("pylon-identity", "pylon").to_string()),
        },
        metrics.clone(),
    )
    .unwrap();
    assert!(eventually(|| metrics.identity_certify_failures().get() >= 1).await);
    assert!(!tls.is_ready());
    assert!(tls.last_error().is_some());
    assert!(
        calls.try_recv().is_err(),
        "the token never reached the impostor"
    );
}

#[tokio::test]
async fn plaintext_grpc_without_a_service_name() {
    let ca = ca();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (identity, mut calls) = scripted(&ca, HOUR, vec![], None);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .serve_with_incoming(tokio_stream_of(listener)),
    );
    let token = token_file("token");
    let web = name("web", "default");
    let tls = MeshTls::start_certifying(
        Config {
            addr: addr.to_string(),
            name: web.clone(),
            token: TokenSource::File(token.path().to_path_buf()),
            anchors: anchors(&ca),
            svc_name: None,
        },
        metrics(),
    )
    .unwrap();
    assert!(eventually(|| tls.is_ready()).await);
    assert_eq!(calls.recv().await.unwrap().identity, web.as_str());
}

fn tokio_stream_of(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(tcp, _)| tcp);
        Some((accepted, listener))
    })
}
