//! The proxy injector: an admission webhook over HTTPS. The API server posts each new pod as an
//! `AdmissionReview`; when the pod (or, failing that, its namespace) says `pylon.io/inject:
//! enabled` (or Linkerd's `linkerd.io/inject: enabled`), the answer carries a JSON patch made
//! by [`pylon_inject`], the code `pylon inject` runs, so both give the same pod.
//!
//! A pod the webhook cannot read is admitted unchanged with a warning: a broken injector must
//! not stop workloads from starting (the configuration's `failurePolicy: Ignore` says the same
//! for a controller that is down).

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use pylon_identity::rustls;
use pylon_identity::rustls::pki_types::pem::PemObject;
use pylon_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use pylon_identity::tokio_rustls::TlsAcceptor;
use pylon_inject::{InjectConfig, INJECT_ANNOTATIONS};
use pylon_proxy_policy::Store;
use serde_json::Value as Json;
use tokio::net::TcpListener;

/// Largest AdmissionReview accepted (a pod with a very large spec is still far below it).
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookTlsError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The webhook's TLS from `dir/tls.crt` and `dir/tls.key` (a Secret of type
/// `kubernetes.io/tls` mounted there).
pub fn tls_acceptor(dir: &Path) -> Result<TlsAcceptor, WebhookTlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| WebhookTlsError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    let (crt, key) = (read("tls.crt")?, read("tls.key")?);
    let bad = |name: &str, e: String| WebhookTlsError::Read {
        path: dir.join(name).display().to_string(),
        message: e,
    };
    let chain = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.crt", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad("tls.key", e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub struct Webhook {
    pub store: Arc<Store>,
    pub config: InjectConfig,
}

impl Webhook {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: TlsAcceptor) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (this, tls) = (self.clone(), tls.clone());
            tokio::spawn(async move {
                let stream = match tls.accept(tcp).await {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, %error, "webhook connection error");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if (req.method(), req.uri().path()) != (&Method::POST, "/inject") {
            return reply(
                StatusCode::NOT_FOUND,
                "POST an AdmissionReview to /inject\n".into(),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("bad body: {e}\n")),
        };
        match review(&body, self) {
            Ok(json) => {
                let mut rsp = reply(StatusCode::OK, json);
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            Err(message) => reply(StatusCode::BAD_REQUEST, format!("{message}\n")),
        }
    }

    /// Whether this pod is to be injected: its own annotation first, then its namespace's.
    fn wanted(&self, pod: &Json, namespace: &str) -> bool {
        let annotated = |annotations: Option<&Json>| {
            INJECT_ANNOTATIONS.iter().find_map(|key| {
                annotations
                    .and_then(|a| a.get(*key))
                    .and_then(Json::as_str)
                    .map(str::to_string)
            })
        };
        if let Some(value) = annotated(pod.pointer("/metadata/annotations")) {
            return value == "enabled";
        }
        let snapshot = self.store.snapshot();
        snapshot.namespace(namespace).is_some_and(|ns| {
            INJECT_ANNOTATIONS
                .iter()
                .find_map(|key| ns.meta.annotations.get(*key))
                .is_some_and(|v| v == "enabled")
        })
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp
}

/// Answers one AdmissionReview (JSON in, JSON out); `Err` only for a body that is not one.
fn review(body: &[u8], webhook: &Webhook) -> Result<String, String> {
    let parsed: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = parsed
        .try_into()
        .map_err(|e| format!("not an AdmissionReview request: {e}"))?;
    // The pod as sent, not as re-serialized, so the patch is against exactly what the API
    // server has.
    let raw: Json = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let pod = raw
        .pointer("/request/object")
        .cloned()
        .unwrap_or(Json::Null);
    let namespace = request.namespace.clone().unwrap_or_default();
    let response = AdmissionResponse::from(&request);
    let response = if request.kind.kind == "Pod" && webhook.wanted(&pod, &namespace) {
        match patch_for(&pod, &namespace, &webhook.config) {
            Ok(Some(patch)) => {
                tracing::info!(namespace, pod = %pod_name(&pod), "injecting the proxy");
                response
                    .with_patch(patch)
                    .unwrap_or_else(|e| warn(AdmissionResponse::from(&request), e.to_string()))
            }
            Ok(None) => response,
            Err(error) => {
                tracing::warn!(namespace, pod = %pod_name(&pod), %error, "not injected");
                warn(response, format!("pylon: not injected: {error}"))
            }
        }
    } else {
        response
    };
    let mut answer = serde_json::to_value(response.into_review()).map_err(|e| e.to_string())?;
    // The API server's `patch` is Go's []byte: a base64 string (kube-core writes a number array).
    if let Some(patch) = answer.pointer_mut("/response/patch") {
        if let Some(bytes) = patch.as_array() {
            let raw: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            *patch = base64::engine::general_purpose::STANDARD.encode(raw).into();
        }
    }
    serde_json::to_string(&answer).map_err(|e| e.to_string())
}

/// Admitted unchanged, with a warning `kubectl` shows.
fn warn(mut response: AdmissionResponse, message: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(message);
    response
}

fn pod_name(pod: &Json) -> String {
    pod.pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_string()
}

/// The JSON patch that injects `pod`; `None` when injection changes nothing (opted out, host
/// network).
pub fn patch_for(
    pod: &Json,
    namespace: &str,
    config: &InjectConfig,
) -> Result<Option<json_patch::Patch>, String> {
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::to_value(pod).map_err(|e| e.to_string())?;
    // The namespace names the workload's labels; a new pod's object often lacks it.
    let had_namespace = pod.pointer("/metadata/namespace").is_some();
    if let Some(meta) = yaml.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
        if !had_namespace && !namespace.is_empty() {
            meta.insert("namespace".into(), namespace.into());
        }
    }
    pylon_inject::inject(&mut yaml, config).map_err(|e| e.to_string())?;
    let mut injected: Json = serde_json::to_value(&yaml).map_err(|e| e.to_string())?;
    if !had_namespace {
        if let Some(meta) = injected.get_mut("metadata").and_then(Json::as_object_mut) {
            meta.remove("namespace");
        }
    }
    let patch = json_patch::diff(pod, &injected);
    Ok((!patch.0.is_empty()).then_some(patch))
}
