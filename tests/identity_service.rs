//! Certificates from an identity service, end to end: two real `pylon-proxy` processes get
//! their certificates from Linkerd's `Identity/Certify` API on loopback (one configured with
//! Pylon's flags, one the way Linkerd's injector configures a proxy: `LINKERD2_PROXY_IDENTITY_*`
//! and a `...identity.linkerd...` name), are not ready until they have one, and then talk mesh
//! TLS with them.
//!
//! The service here signs with `pylon_identity`'s CA and checks tokens against a table: the
//! controller's own service (with TokenReviews) is tested in `pylon-controller`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use pylon_identity::ca::{Ca, ValidityWindow};
use pylon_identity::IdentityName;
use support::*;
use tokio::net::TcpListener;

const NS: &str = "default";

/// Signs for the account a token names; refuses everything until opened.
struct TestIdentity {
    ca: Ca,
    /// token → the identity it entitles to (either form of the account).
    tokens: HashMap<String, IdentityName>,
    open: AtomicBool,
    calls: AtomicUsize,
    /// The last certificate's notAfter.
    last_not_after: AtomicI64,
}

#[tonic::async_trait]
impl Identity for TestIdentity {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.open.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("not yet"));
        }
        let req = request.into_inner();
        let requested = IdentityName::parse(&req.identity)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let token = String::from_utf8_lossy(&req.token);
        match self.tokens.get(token.trim()) {
            Some(entitled) if entitled.same_account(&requested) => {}
            _ => {
                return Err(tonic::Status::permission_denied(
                    "token is not for that identity",
                ))
            }
        }
        let leaf = self
            .ca
            .certify_csr(
                &req.certificate_signing_request,
                &requested,
                Duration::from_secs(3600),
            )
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.last_not_after.store(leaf.not_after, Ordering::SeqCst);
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

async fn serve(identity: Arc<TestIdentity>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(tcp, _)| tcp);
        Some((accepted, listener))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::from_arc(identity))
            .serve_with_incoming(incoming),
    );
    addr
}

fn ready(proxy: &Proxy) -> (u16, String) {
    proxy.admin_request("GET", "/ready", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_certified_by_the_identity_service_become_ready_and_speak_mesh_tls() {
    test_body(async {
        let window = ValidityWindow::starting_now(Duration::from_secs(7 * 24 * 3600))
            .expect("window");
        let ca = Ca::generate("cluster.local", window).expect("CA");
        let client_id = IdentityName::new("client", NS, "cluster.local").expect("name");
        let server_id = IdentityName::new_linkerd("server", NS, "cluster.local").expect("name");
        let identity = Arc::new(TestIdentity {
            tokens: HashMap::from([
                ("client-token".to_owned(), client_id.clone()),
                ("server-token".to_owned(), server_id.clone()),
            ]),
            ca,
            open: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            last_not_after: AtomicI64::new(0),
        });
        let addr = serve(identity.clone()).await;
        let files = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, contents: &str| {
            let path = files.path().join(name);
            std::fs::write(&path, contents).expect("write");
            path.to_str().expect("utf-8 path").to_owned()
        };
        let anchors = file("anchors.pem", identity.ca.anchor_pem());
        let server_token = file("server-token", "server-token");
        let client_token = file("client-token", "client-token\n");

        // The server proxy, configured as Linkerd's injector configures a proxy.
        let app = Backend::start("app").await;
        let server = Proxy::builder()
            .env("LINKERD2_PROXY_IDENTITY_SVC_ADDR", addr.to_string())
            .env("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", server_id.as_str())
            .env("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", &server_token)
            .env(
                "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
                identity.ca.anchor_pem(),
            )
            .arg("--inbound-forward")
            .arg(app.addr.to_string())
            .args(["--namespace", NS])
            .start();

        // While the service refuses, the proxy is up but not ready, and says why.
        assert!(
            wait_until(|| identity.calls.load(Ordering::SeqCst) >= 1, OP_TIMEOUT).await,
            "the proxy never called the identity service\n{}",
            server.log_tail(20)
        );
        let (status, body) = ready(&server);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("waiting for an identity certificate"), "{body}");
        // The service's answer shows once the proxy has handled it.
        assert!(
            wait_until(|| ready(&server).1.contains("not yet"), OP_TIMEOUT).await,
            "{:?}",
            ready(&server)
        );
        assert_eq!(server.admin_request("GET", "/live", "").0, 200);

        identity.open.store(true, Ordering::SeqCst);
        assert!(
            wait_until(|| ready(&server).0 == 200, OP_TIMEOUT).await,
            "not ready after the service opened\n{}",
            server.log_tail(20)
        );
        let not_after = identity.last_not_after.load(Ordering::SeqCst) as f64;
        assert_eq!(
            server.metric_value("identity_cert_expiration_timestamp_seconds", &[]),
            Some(not_after)
        );
        assert_eq!(server.metric_value("identity_cert_refresh_total", &[]), Some(1.0));
        assert!(
            server
                .metric_value("identity_certify_failures_total", &[])
                .unwrap_or(0.0)
                >= 1.0
        );

        // The client proxy, with Pylon's flags; discovery says the server proves its
        // (Linkerd-form) identity.
        let cfg = ConfigDir::new();
        cfg.write_service("web", &[HTTP_PORT]);
        cfg.write(
            &ConfigDir::endpoints_file("web"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
                 namespace: {NS}\n  labels:\n    kubernetes.io/service-name: web\n  annotations:\n    \
                 pylon.io/identity: {server_id}\naddressType: IPv4\nports:\n  - name: http\n    \
                 port: {port}\n    protocol: TCP\nendpoints:\n  - addresses: [\"{ip}\"]\n    \
                 conditions:\n      ready: true\n",
                port = server.inbound().port(),
                ip = server.inbound().ip(),
            ),
        );
        let client = Proxy::builder()
            .args(["--identity-addr", &addr.to_string()])
            .args(["--identity-name", client_id.as_str()])
            .args(["--identity-token-file", &client_token])
            .args(["--identity-trust-anchors", &anchors])
            .arg("--config-dir")
            .arg(cfg.path_str())
            .args(["--namespace", NS])
            .start();
        assert!(
            wait_until(|| ready(&client).0 == 200, OP_TIMEOUT).await,
            "client not ready\n{}",
            client.log_tail(20)
        );

        let rsp = get(client.outbound(), WEB_FQDN, "/hello")
            .await
            .expect("GET through the mesh");
        assert_eq!(
            rsp.status,
            200,
            "{}\n--- client ---\n{}\n--- server ---\n{}",
            rsp.text(),
            client.log_tail(20),
            server.log_tail(20)
        );
        assert_eq!(rsp.backend(), Some("app"));
        let meshed = server
            .wait_metric(
                "request_total",
                &[
                    ("direction", "inbound"),
                    ("tls", "true"),
                    ("client_id", client_id.as_str()),
                ],
                1.0,
                OP_TIMEOUT,
            )
            .await;
        assert_eq!(meshed, Some(1.0), "{}", server.metrics());
    })
    .await
}
