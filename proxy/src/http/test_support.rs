//! Test support for the HTTP stages, in the manner of linkerd2-proxy's `http/logical/tests`:
//! a stage under test wraps a scripted mock service, and its timing runs on tokio's paused
//! clock, so a 10 s backoff takes no time and no assertion races a real clock.
//!
//! Requests are real `Request<Incoming>` (hyper offers no other way to make an `Incoming`):
//! a hyper client sends them over an in-memory pipe to a hyper server that hands them over.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pylon_proxy_metrics::{Direction, Metrics};
use pylon_proxy_policy::{Store, StoreConfig};

use super::ctx::WithCtx;
use super::request_body::RequestBody;
use super::{BoxFuture, ProxyError, ProxyResponse, ResponseBody};
use crate::profiles::{Profiles, RouteState};

pub const DST: &str = "web.default.svc.cluster.local";

/// `req` as the proxy's server would hand it to a stack: with an `Incoming` body.
pub async fn incoming(req: Request<Full<Bytes>>) -> Request<Incoming> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req);
            }
            // Never answers: the body stays readable for as long as the test wants it.
            std::future::pending::<Result<Response<Full<Bytes>>, std::convert::Infallible>>()
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), svc)
            .await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("in-memory handshake");
    tokio::spawn(conn);
    tokio::spawn(async move {
        let _ = sender.send_request(req).await;
    });
    rx.await.expect("the request arrives")
}

/// The route `method path` takes under a ServiceProfile for [`DST`] with `spec` (the YAML under
/// `spec:`), with its metric handles in `metrics`.
pub fn route(spec: &str, method: &str, path: &str) -> (Arc<RouteState>, Arc<Metrics>) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("profile.yaml"),
        format!(
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata:\n  name: {DST}\n  \
             namespace: default\nspec:\n{spec}"
        ),
    )
    .expect("write profile");
    let store = Store::load_dir(dir.path(), StoreConfig::default()).expect("load");
    let metrics = Metrics::new(Default::default());
    let profiles = Profiles::new(store, metrics.clone());
    let dest = profiles.destination(
        Direction::Outbound,
        format!("{DST}:80").into(),
        Some(DST.to_owned()),
    );
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap();
    let route = dest.load().route_for(&req).clone();
    (route, metrics)
}

/// A request on `route` with `body`, as the stages above the one under test leave it.
pub async fn routed(
    route: &Arc<RouteState>,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> Request<RequestBody> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", DST)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let mut req = incoming(req).await.map(RequestBody::streaming);
    req.ctx_mut().route = Some(route.clone());
    req
}

/// What the mock endpoint does with one attempt.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Responds with this status after the delay.
    Status(u16, Duration),
    /// Fails with this error after the delay.
    Fail(ProxyError, Duration),
}

/// One attempt as the mock saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub attempt: Option<u32>,
    pub body: Bytes,
    pub at: tokio::time::Instant,
}

/// A mock endpoint that answers attempts from a script (the last answer repeats) and records
/// them.
#[derive(Clone, Default)]
pub struct Mock {
    script: Arc<Mutex<VecDeque<Answer>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    pub fn new(script: impl IntoIterator<Item = Answer>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            seen: Arc::default(),
        }
    }

    pub fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn next(&self) -> Answer {
        let mut script = self.script.lock().unwrap();
        match script.len() {
            0 => Answer::Status(200, Duration::ZERO),
            1 => script[0].clone(),
            _ => script.pop_front().expect("non-empty"),
        }
    }
}

impl tower::Service<Request<RequestBody>> for Mock {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let answer = self.next();
        let seen = self.seen.clone();
        Box::pin(async move {
            let attempt = req.ctx().attempt.map(|a| a.0);
            let at = tokio::time::Instant::now();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            seen.lock().unwrap().push(Seen { attempt, body, at });
            let (result, delay) = match answer {
                Answer::Status(status, delay) => (Ok(status), delay),
                Answer::Fail(err, delay) => (Err(err), delay),
            };
            tokio::time::sleep(delay).await;
            result.map(|status| {
                let mut rsp = Response::new(ResponseBody::empty());
                *rsp.status_mut() = StatusCode::from_u16(status).expect("a status");
                rsp
            })
        })
    }
}
