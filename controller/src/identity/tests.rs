use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use pylon_identity::ca::ValidityWindow;
use pylon_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use pylon_identity::tokio_rustls::{TlsAcceptor, TlsConnector};
use pylon_identity::{peer_identity, Credentials, IdentityKey, TrustAnchors, ALPN_H2};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

use super::*;

const TRUST_DOMAIN: &str = "cluster.local";

fn ca() -> Arc<Ca> {
    let window = ValidityWindow::starting_now(Duration::from_secs(7 * 86_400)).unwrap();
    Arc::new(Ca::generate(TRUST_DOMAIN, window).unwrap())
}

fn reviewer() -> StaticTokenReviewer {
    StaticTokenReviewer::default()
        .with_service_account("web-token", "default", "web")
        .with_service_account("api-token", "prod", "api")
        .with_user("node-token", "system:node:node-1", &[])
        .with_user(
            "other-audience-token",
            "system:serviceaccount:default:web",
            &["vault"],
        )
}

fn service(ca: &Arc<Ca>) -> IdentityService {
    IdentityService::new(ca.clone(), Arc::new(reviewer()))
}

fn name(sa: &str, ns: &str) -> IdentityName {
    IdentityName::new(sa, ns, TRUST_DOMAIN).unwrap()
}

fn request(identity: &str, token: &str, key: &IdentityKey) -> CertifyRequest {
    CertifyRequest {
        identity: identity.to_owned(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: key.csr_der().to_vec(),
    }
}

/// Certify through the service, without a network.
async fn certify(svc: &IdentityService, req: CertifyRequest) -> Result<CertifyResponse, Status> {
    svc.certify(Request::new(req))
        .await
        .map(Response::into_inner)
}

fn credentials(key: &IdentityKey, rsp: CertifyResponse, ca: &Ca) -> Credentials {
    let anchors = TrustAnchors::from_pem(ca.anchor_pem().as_bytes(), "test anchors").unwrap();
    key.credentials(
        CertificateDer::from(rsp.leaf_certificate),
        rsp.intermediate_certificates
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        &anchors,
    )
    .unwrap()
}

#[tokio::test]
async fn certifies_a_service_account_for_its_own_identity() {
    let ca = ca();
    let svc = service(&ca).with_lifetime(Duration::from_secs(3600));
    let web = name("web", "default");
    let key = IdentityKey::generate(&web).unwrap();
    let rsp = certify(&svc, request(web.as_str(), "web-token", &key))
        .await
        .unwrap();
    let valid_until = rsp.valid_until.unwrap();
    assert_eq!(valid_until.nanos, 0);
    let creds = credentials(&key, rsp, &ca);
    assert_eq!(creds.identity(), &web);
    assert_eq!(creds.not_after(), valid_until.seconds);
    let now = unix(SystemTime::now());
    assert!((3590..=3600).contains(&(creds.not_after() - now)));
    assert_eq!(svc.stats().issued(), 1);

    // A Linkerd proxy asks for Linkerd's form of its name (as its CSR does: a DNS SAN, no
    // subject). A PEM CSR, as the proto's comments have it, is fine too.
    let linkerd = IdentityName::new_linkerd("web", "default", TRUST_DOMAIN).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![linkerd.to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let rsp = certify(
        &svc,
        CertifyRequest {
            identity: linkerd.to_string(),
            token: b"web-token\n".to_vec(),
            certificate_signing_request: pem.into_bytes(),
        },
    )
    .await
    .unwrap();
    let anchors = TrustAnchors::from_pem(ca.anchor_pem().as_bytes(), "test anchors").unwrap();
    let creds = Credentials::from_parts(
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        CertificateDer::from(rsp.leaf_certificate),
        rsp.intermediate_certificates
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        &anchors,
    )
    .unwrap();
    assert_eq!(creds.identity(), &linkerd);
    assert_eq!((svc.stats().issued(), svc.stats().refused()), (2, 0));
}

#[tokio::test]
async fn refuses_with_the_right_codes() {
    let ca = ca();
    let svc = service(&ca);
    let web = name("web", "default");
    let api = name("api", "prod");
    let web_key = IdentityKey::generate(&web).unwrap();
    let api_key = IdentityKey::generate(&api).unwrap();
    let foreign = IdentityName::new("web", "default", "example.org").unwrap();
    let foreign_key = IdentityKey::generate(&foreign).unwrap();

    let cases: Vec<(&str, CertifyRequest, Code, &str)> = vec![
        (
            "no identity",
            request("", "web-token", &web_key),
            Code::InvalidArgument,
            "missing identity",
        ),
        (
            "not an identity name",
            request("web.default.svc.cluster.local", "web-token", &web_key),
            Code::InvalidArgument,
            "invalid identity name",
        ),
        (
            "no token",
            request(web.as_str(), " ", &web_key),
            Code::InvalidArgument,
            "missing token",
        ),
        (
            "no CSR",
            CertifyRequest {
                certificate_signing_request: Vec::new(),
                ..request(web.as_str(), "web-token", &web_key)
            },
            Code::InvalidArgument,
            "missing certificate_signing_request",
        ),
        (
            "unknown token",
            request(web.as_str(), "forged", &web_key),
            Code::Unauthenticated,
            "not authenticated",
        ),
        (
            "token for another audience",
            request(web.as_str(), "other-audience-token", &web_key),
            Code::Unauthenticated,
            "audiences",
        ),
        (
            "another ServiceAccount's token",
            request(web.as_str(), "api-token", &web_key),
            Code::PermissionDenied,
            "not the token's ServiceAccount prod/api",
        ),
        (
            "not a ServiceAccount",
            request(web.as_str(), "node-token", &web_key),
            Code::PermissionDenied,
            "not a ServiceAccount",
        ),
        (
            "another trust domain",
            request(foreign.as_str(), "web-token", &foreign_key),
            Code::PermissionDenied,
            "trust domain",
        ),
        (
            "a CSR for another identity",
            request(web.as_str(), "web-token", &api_key),
            Code::InvalidArgument,
            "certificate signing request is not for",
        ),
        (
            "a garbage CSR",
            CertifyRequest {
                certificate_signing_request: b"garbage".to_vec(),
                ..request(web.as_str(), "web-token", &web_key)
            },
            Code::InvalidArgument,
            "bad certificate signing request",
        ),
    ];
    let count = cases.len() as u64;
    for (what, req, code, message) in cases {
        match certify(&svc, req).await {
            Err(status) => {
                assert_eq!(status.code(), code, "{what}: {status:?}");
                assert!(
                    status.message().contains(message),
                    "{what}: {:?}",
                    status.message()
                );
            }
            Ok(_) => panic!("{what}: certified"),
        }
    }
    assert_eq!(
        (
            svc.stats().issued(),
            svc.stats().refused(),
            svc.stats().failed()
        ),
        (0, count, 0)
    );
}

struct Unreachable;

#[tonic::async_trait]
impl TokenReviewer for Unreachable {
    async fn review(&self, _: &str, _: &[String]) -> Result<String, ReviewError> {
        Err(ReviewError::Unavailable("connection refused".into()))
    }
}

#[tokio::test]
async fn a_failed_review_is_unavailable_and_counted_as_ours() {
    let svc = IdentityService::new(ca(), Arc::new(Unreachable));
    let web = name("web", "default");
    let key = IdentityKey::generate(&web).unwrap();
    let status = certify(&svc, request(web.as_str(), "web-token", &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("connection refused"));
    assert_eq!((svc.stats().refused(), svc.stats().failed()), (0, 1));
}

#[test]
fn service_account_usernames() {
    assert_eq!(
        service_account("system:serviceaccount:default:web"),
        Some(("default", "web"))
    );
    for bad in [
        "system:serviceaccount:default",
        "system:serviceaccount::web",
        "system:serviceaccount:default:",
        "system:serviceaccount:a:b:c",
        "system:node:web",
        "web",
    ] {
        assert_eq!(service_account(bad), None, "{bad}");
    }
}

async fn serve(svc: IdentityService) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// Over loopback: two workloads certified by the real service through a real gRPC client,
/// then mesh TLS between them with what they got.
#[tokio::test]
async fn workloads_certified_over_grpc_speak_mutual_tls() {
    let ca = ca();
    let svc = service(&ca);
    let stats = svc.stats();
    let addr = serve(svc).await;
    let mut client = IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let mut certified = Vec::new();
    for (sa, ns, token) in [
        ("web", "default", "web-token"),
        ("api", "prod", "api-token"),
    ] {
        let id = name(sa, ns);
        let key = IdentityKey::generate(&id).unwrap();
        let rsp = client
            .certify(request(id.as_str(), token, &key))
            .await
            .unwrap()
            .into_inner();
        certified.push(credentials(&key, rsp, &ca));
    }
    // Over the wire too, a wrong token is refused.
    let web = name("web", "default");
    let key = IdentityKey::generate(&web).unwrap();
    let status = client
        .certify(request(web.as_str(), "api-token", &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!((stats.issued(), stats.refused()), (2, 1));

    let (client_creds, server_creds) = (&certified[0], &certified[1]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_creds.server_config());
    let accept = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await
    };
    let connector = TlsConnector::from(client_creds.client_config_with_alpn(&[ALPN_H2]));
    let connect = async {
        let tcp = TcpStream::connect(tls_addr).await.unwrap();
        connector
            .connect(server_creds.identity().server_name(), tcp)
            .await
    };
    let (accepted, connected) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("handshake timed out");
    let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
    assert_eq!(
        peer_identity(accepted.get_ref().1).as_ref(),
        Some(client_creds.identity())
    );
    assert_eq!(
        peer_identity(connected.get_ref().1).as_ref(),
        Some(server_creds.identity())
    );
    assert_eq!(accepted.get_ref().1.alpn_protocol(), Some(ALPN_H2));
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
