//! The controller's admin server: `/metrics` (Prometheus text), `/ready` (every watched kind
//! listed once, so proxies are never told "no such service" by a controller that has not
//! looked yet) and `/live`.
//!
//! `/metrics` includes the `endpoints_*` gauges (see [`pylon_proxy_metrics::EndpointGauges`]):
//! each Service's endpoints against the ready pods its selector picks, from the cluster's own
//! Pods and EndpointSlices, kept current by [`keep_endpoint_gauges`].

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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
use pylon_proxy_metrics::EndpointGauges;
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
    /// `endpoints_*`, updated by [`keep_endpoint_gauges`].
    pub endpoints: Arc<EndpointGauges>,
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
            endpoints: EndpointGauges::new(),
        })
    }
}

/// Least time between two recomputations of the `endpoints_*` gauges. A cluster's snapshot
/// changes with every pod update, and each recomputation compares every Service with its
/// namespace's pods; the watch keeps only the latest snapshot, so a burst of changes costs
/// one pass a second.
const ENDPOINT_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Keeps `gauges` current with `store`'s snapshots (run it as a task).
pub async fn keep_endpoint_gauges(store: Arc<Store>, gauges: Arc<EndpointGauges>) {
    let mut rx = store.subscribe();
    loop {
        let snapshot = rx.borrow_and_update().clone();
        // A pass over a large cluster takes a while: off the threads that serve proxies.
        let g = gauges.clone();
        if tokio::task::spawn_blocking(move || g.update(&snapshot))
            .await
            .is_err()
        {
            tracing::warn!(
                "recomputing the endpoints_* gauges failed; they keep their last values"
            );
        }
        tokio::time::sleep(ENDPOINT_GAUGES_EVERY).await;
        if rx.changed().await.is_err() {
            return;
        }
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
        registry.register_collector(Box::new(metrics.endpoints.clone()));
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

    /// The `/metrics` body.
    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let body = match self.encode() {
                    Ok(body) => body,
                    Err(error) => {
                        return text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("encoding failed: {error}\n"),
                        )
                    }
                };
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

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proxy_policy::StoreConfig;

    const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], targetRef: {kind: Pod, name: web-a}}]
";

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: web}}}}\n\
             spec: {{containers: [{{name: app}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    }

    #[tokio::test]
    async fn metrics_say_which_ready_pods_the_endpoints_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mesh.yaml");
        let yaml = format!(
            "{MESH}{}{}",
            pod("web-a", "10.0.0.1"),
            pod("web-b", "10.0.0.2")
        );
        std::fs::write(&file, yaml).expect("write");
        let store = Store::load_dir(dir.path(), StoreConfig::default()).expect("load");
        let metrics = ControllerMetrics::new(store.clone(), None, None);
        let keeper = tokio::spawn(keep_endpoint_gauges(
            store.clone(),
            metrics.endpoints.clone(),
        ));
        let admin = Admin::new(metrics, None);
        let svc = "dst_namespace=\"shop\",dst_service=\"web\"";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let body = admin.encode().expect("encode");
            if body.contains(&format!("endpoints_missing_pods{{{svc}}} 1")) {
                assert!(
                    body.contains(&format!("endpoints_ready_pods{{{svc}}} 2")),
                    "{body}"
                );
                assert!(
                    body.contains(&format!(
                        "endpoints_missing_pod_info{{{svc},dst_pod=\"web-b\"}} 1"
                    )),
                    "{body}"
                );
                assert!(body.contains("controller_store_generation"), "{body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no endpoints_missing_pods within 10 s:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        keeper.abort();
    }
}
