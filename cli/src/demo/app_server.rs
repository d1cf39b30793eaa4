//! The demo's workloads: tiny in-process HTTP apps that stand in for `ml-inference` pods. Each
//! has a behaviour so the proxies' metrics have something to show: a healthy one, a flaky one
//! and a slow one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, SERVER};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// How an app answers `/predict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppBehaviour {
    /// 200 after 1–3 ms.
    Healthy,
    /// Like `Healthy`, but one request in `fail_one_in` gets a 503 (the first early on, so even
    /// short runs show it).
    Flaky { fail_one_in: u64 },
    /// 200 after 20–40 ms.
    Slow,
}

impl AppBehaviour {
    /// A one-word label for tables.
    pub fn label(self) -> &'static str {
        match self {
            AppBehaviour::Healthy => "healthy",
            AppBehaviour::Flaky { .. } => "flaky-503",
            AppBehaviour::Slow => "slow",
        }
    }

    /// A sentence for people.
    pub fn describe(self) -> String {
        match self {
            AppBehaviour::Healthy => "answers in 1-3 ms".to_owned(),
            AppBehaviour::Flaky { fail_one_in } => format!(
                "answers in 1-3 ms, 503 on 1 in {fail_one_in} requests ({:.0}%)",
                100.0 / fail_one_in as f64
            ),
            AppBehaviour::Slow => "answers in 20-40 ms".to_owned(),
        }
    }

    fn service_time(self) -> Duration {
        let micros = match self {
            AppBehaviour::Healthy | AppBehaviour::Flaky { .. } => {
                rand::rng().random_range(1_000..=3_000)
            }
            AppBehaviour::Slow => rand::rng().random_range(20_000..=40_000),
        };
        Duration::from_micros(micros)
    }

    /// Whether the `n`th request (from 0) fails.
    fn fails(self, n: u64) -> bool {
        match self {
            AppBehaviour::Flaky { fail_one_in } => fail_one_in > 0 && n % fail_one_in == 7,
            AppBehaviour::Healthy | AppBehaviour::Slow => false,
        }
    }
}

/// A running app. Dropping it stops the server and its connections.
pub struct AppServer {
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl AppServer {
    /// Starts an app on an ephemeral loopback port.
    pub async fn start(pod: &str, behaviour: AppBehaviour) -> Result<AppServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .with_context(|| format!("binding the {pod} app to 127.0.0.1"))?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            pod: pod.to_owned(),
            behaviour,
            requests: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, app));
        Ok(AppServer { addr, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

struct App {
    pod: String,
    behaviour: AppBehaviour,
    requests: AtomicU64,
}

async fn serve(listener: TcpListener, app: Arc<App>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let app = app.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            // A peer closing mid-request is not the app's problem.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/predict" {
            return self.json(
                StatusCode::NOT_FOUND,
                format!(r#"{{"error":"not found","pod":"{}"}}"#, self.pod),
            );
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let service_time = self.behaviour.service_time();
        tokio::time::sleep(service_time).await;
        if self.behaviour.fails(n) {
            return self.json(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    r#"{{"error":"model overloaded","pod":"{}","request":{n}}}"#,
                    self.pod
                ),
            );
        }
        let score = rand::rng().random_range(0.0..1.0_f64);
        self.json(
            StatusCode::OK,
            format!(
                r#"{{"model":"ml-inference","pod":"{}","label":"{}","score":{score:.3},"service_ms":{:.1}}}"#,
                self.pod,
                if score >= 0.5 { "cat" } else { "dog" },
                service_time.as_secs_f64() * 1000.0,
            ),
        )
    }

    fn json(&self, status: StatusCode, body: String) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            SERVER,
            hyper::header::HeaderValue::from_static("pylon-demo-app"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaky_fails_one_in_n_starting_early() {
        let flaky = AppBehaviour::Flaky { fail_one_in: 50 };
        let failures: Vec<u64> = (0..150).filter(|&n| flaky.fails(n)).collect();
        assert_eq!(failures, vec![7, 57, 107]);
        assert!(!(0..1000).any(|n| AppBehaviour::Healthy.fails(n)));
    }

    #[test]
    fn service_times_are_in_range() {
        for _ in 0..100 {
            let fast = AppBehaviour::Healthy.service_time();
            assert!((Duration::from_millis(1)..=Duration::from_millis(3)).contains(&fast));
            let slow = AppBehaviour::Slow.service_time();
            assert!((Duration::from_millis(20)..=Duration::from_millis(40)).contains(&slow));
        }
    }
}
