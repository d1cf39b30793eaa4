//! The controller's admin server: `/metrics` (Prometheus text), `/ready` (every watched kind
//! listed once, so proxies are never told "no such service" by a controller that has not
//! looked yet) and `/live`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use pylon_proxy_policy::Store;
use tokio::net::TcpListener;

use crate::destination::DestinationStats;
use crate::identity::CertifyStats;
use crate::kubernetes::WatchStatus;

/// Everything the controller counts, read at scrape time.
#[derive(Debug)]
pub struct ControllerMetrics {
    store: Arc<Store>,
    watches: Option<Arc<WatchStatus>>,
    identity: Option<Arc<CertifyStats>>,
    pub destination: Arc<DestinationStats>,
}

impl ControllerMetrics {
    pub fn new(
        store: Arc<Store>,
        watches: Option<Arc<WatchStatus>>,
        identity: Option<Arc<CertifyStats>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            watches,
            identity,
            destination: Arc::default(),
        })
    }
}

#[derive(Debug)]
struct Scrape(Arc<ControllerMetrics>);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    // Counter names are given without `_total`; the encoder adds it.
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let snapshot = m.store.snapshot();
        gauge(
            &mut e,
            "controller_store_generation",
            "Snapshots of the mesh published so far.",
            snapshot.generation() as i64,
        )?;
        gauge(
            &mut e,
            "controller_store_objects",
            "Mesh objects in force.",
            snapshot.objects().count() as i64,
        )?;
        gauge(
            &mut e,
            "controller_store_errors",
            "Objects rejected as invalid (their last good version stays).",
            snapshot.errors().len() as i64,
        )?;
        counter(
            &mut e,
            "controller_config_errors",
            "Invalid objects seen, each once per appearance.",
            m.store.config_errors_total(),
        )?;
        let d = &m.destination;
        gauge(
            &mut e,
            "destination_get_streams",
            "Open Destination.Get subscriptions.",
            d.get_streams.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            "destination_profile_streams",
            "Open Destination.GetProfile subscriptions.",
            d.profile_streams.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "destination_updates",
            "Updates sent to proxies.",
            d.updates_sent.load(Ordering::Relaxed),
        )?;
        if let Some(i) = &m.identity {
            counter(
                &mut e,
                "identity_certify_issued",
                "Certificates issued.",
                i.issued(),
            )?;
            counter(
                &mut e,
                "identity_certify_refused",
                "Certify requests refused (token, identity or CSR).",
                i.refused(),
            )?;
            counter(&mut e, "identity_certify_failed", "Certify requests that failed on the controller's side (token review unavailable, issuer expired).", i.failed())?;
        }
        if let Some(w) = &m.watches {
            counter(
                &mut e,
                "controller_api_events",
                "Watch events received from the API server.",
                w.events_total.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "controller_api_watch_errors",
                "Watch failures (retried with backoff; the last state stays).",
                w.errors_total.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "controller_api_relists",
                "Relists after the first (410 Gone, lost watches).",
                w.relists_total.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut e,
                "controller_api_synced",
                "1 once every watched kind has been listed.",
                i64::from(w.is_synced()),
            )?;
        }
        Ok(())
    }
}

pub struct Admin {
    registry: Registry,
    watches: Option<Arc<WatchStatus>>,
}

impl Admin {
    pub fn new(metrics: Arc<ControllerMetrics>, watches: Option<Arc<WatchStatus>>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(metrics)));
        registry.register_collector(Box::new(pylon_proxy_metrics::ProcessCollector));
        Self { registry, watches }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(&req)) }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%error, "admin connection error");
                }
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut body = String::with_capacity(8 * 1024);
                if let Err(error) =
                    prometheus_client::encoding::text::encode(&mut body, &self.registry)
                {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding failed: {error}\n"),
                    );
                }
                let mut rsp = Response::new(Full::new(Bytes::from(body)));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            (&Method::GET, "/ready") => match &self.watches {
                Some(w) if !w.is_synced() => {
                    let waiting: Vec<_> = w
                        .kinds()
                        .into_iter()
                        .filter(|(_, s)| !s.listed)
                        .map(|(k, _)| k)
                        .collect();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: waiting for the first list of {}\n",
                            waiting.join(", ")
                        ),
                    )
                }
                _ => text(StatusCode::OK, "ready\n"),
            },
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready or /live\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.into())));
    *rsp.status_mut() = status;
    rsp
}
