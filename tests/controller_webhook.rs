//! The proxy injector end to end: a real AdmissionReview over HTTPS to the controller's
//! webhook returns a JSON patch that, applied with the json-patch crate, gives exactly the pod
//! `pylon inject` (the CLI binary) makes of the same pod; pods and namespaces that don't ask
//! for the proxy, and bodies that are not reviews, are answered as the API server expects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pylon_controller::mesh::MeshConfig;
use pylon_controller::policy::PolicyDefaults;
use pylon_controller::{Controller, ControllerConfig, MeshSource, WebhookConfig};
use pylon_identity::rustls;
use pylon_identity::tokio_rustls::TlsConnector;
use serde_json::{json, Value};

const ANCHORS: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
const IMAGE: &str = "ghcr.io/pylon-mesh/pylon:webhook-test";

/// `pylon`, built next to this test by `cargo build --workspace --bins`.
fn pylon_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("pylon"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p pylon-cli --bins`",
        bin.display()
    );
    bin
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "web-5d8f7-", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "5d8f7"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f7",
                                  "uid": "9a1", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}]}]
        }
    })
}

fn review(pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

struct Setup {
    _dir: tempfile::TempDir,
    controller: Controller,
    client_tls: TlsConnector,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_dir = dir.path().join("mesh");
    std::fs::create_dir(&config_dir).expect("mkdir");
    std::fs::write(
        config_dir.join("namespaces.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: {pylon.io/inject: enabled}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
    )
    .expect("write");
    // The webhook's serving certificate, as `pylon install` makes one.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).expect("mkdir");
    std::fs::write(tls_dir.join("tls.crt"), cert.cert.pem()).expect("write");
    std::fs::write(tls_dir.join("tls.key"), cert.signing_key.serialize_pem()).expect("write");
    let mut inject = pylon_inject::InjectConfig::new(env!("CARGO_PKG_VERSION"));
    inject.image = IMAGE.into();
    inject.trust_anchors_pem = Some(ANCHORS.into());
    let controller = Controller::start(ControllerConfig {
        source: MeshSource::ConfigDir(config_dir),
        cluster_domain: "cluster.local".into(),
        default_namespace: "default".into(),
        mesh: MeshConfig::default(),
        policy: PolicyDefaults::default(),
        destination_addr: "127.0.0.1:0".parse().expect("addr"),
        policy_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        identity: None,
        webhook: Some(WebhookConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls: pylon_controller::webhook::tls_acceptor(&tls_dir).expect("tls"),
            inject,
        }),
    })
    .await
    .expect("controller");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Setup {
        _dir: dir,
        controller,
        client_tls: TlsConnector::from(Arc::new(config)),
    }
}

/// POSTs `body` to the webhook over HTTPS (verifying its certificate): `(status, body)`.
async fn post(s: &Setup, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let addr: SocketAddr = s.controller.webhook_addr.expect("webhook address");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = s
        .client_tls
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let rsp = sender.send_request(req).await.expect("response");
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, body.to_vec())
}

/// The review's response: `(allowed, patch)`.
async fn admit(s: &Setup, pod: &Value, namespace: &str) -> (bool, Option<json_patch::Patch>) {
    let body = serde_json::to_vec(&review(pod, namespace)).expect("json");
    let (status, body) = post(s, "/inject", body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).expect("a JSON review");
    let rsp = &answer["response"];
    assert_eq!(rsp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let patch = rsp["patch"].as_str().map(|b64| {
        assert_eq!(rsp["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64 patch");
        serde_json::from_slice(&raw).expect("a JSON patch")
    });
    (rsp["allowed"].as_bool().unwrap_or(false), patch)
}

#[tokio::test]
async fn the_webhooks_patch_gives_the_pod_pylon_inject_makes() {
    let s = setup().await;
    let pod = pod();
    let (allowed, patch) = admit(&s, &pod, "shop").await;
    assert!(allowed);
    let mut patched = pod.clone();
    json_patch::patch(
        &mut patched,
        &patch.expect("a patch for a pod in an injected namespace"),
    )
    .expect("the patch applies");

    // The CLI on the same pod.
    let dir = tempfile::tempdir().expect("tempdir");
    let (pod_file, anchors) = (dir.path().join("pod.json"), dir.path().join("anchors.pem"));
    std::fs::write(&pod_file, serde_json::to_vec_pretty(&pod).expect("json")).expect("write");
    std::fs::write(&anchors, ANCHORS).expect("write");
    let out = std::process::Command::new(pylon_bin())
        .args(["inject", "--image", IMAGE, "--identity-trust-anchors"])
        .arg(&anchors)
        .arg(&pod_file)
        .output()
        .expect("pylon inject");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_yaml_ng::from_slice(&out.stdout).expect("YAML");
    assert_eq!(patched, cli);
    assert_eq!(
        patched["metadata"]["labels"]["pylon.io/proxy-deployment"],
        "web"
    );
}

#[tokio::test]
async fn pods_that_do_not_ask_are_admitted_unchanged() {
    let s = setup().await;
    // A namespace without the annotation.
    let mut plain = pod();
    plain["metadata"]["namespace"] = "plain".into();
    assert_eq!(admit(&s, &plain, "plain").await, (true, None));
    // The pod's own annotation wins over its namespace's.
    let mut opted_out = pod();
    opted_out["metadata"]["annotations"] = json!({"linkerd.io/inject": "disabled"});
    assert_eq!(admit(&s, &opted_out, "shop").await, (true, None));
    let mut opted_in = plain.clone();
    opted_in["metadata"]["annotations"] = json!({"pylon.io/inject": "enabled"});
    let (allowed, patch) = admit(&s, &opted_in, "plain").await;
    assert!(allowed && patch.is_some());
    // Not a review: 400, and the webhook keeps serving.
    let (status, _) = post(&s, "/inject", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    let (status, _) = post(&s, "/elsewhere", Vec::new()).await;
    assert_eq!(status, 404);
    assert_eq!(admit(&s, &plain, "plain").await, (true, None));
}
