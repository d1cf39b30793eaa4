//! Where the numbers come from: each proxy's own rolling window (`/metrics/window` on its
//! admin port: what every HTTP series counted over the last `--window`, up to 15 minutes,
//! answered at once), or Prometheus' samples at the window's two ends. Both give the same
//! thing, an [`Observed`] list of [`Series`]: how much each counter and histogram bucket grew
//! over the window, current values for gauges, each with its labels. The views in
//! [`super::view`] filter and sum them the same way whatever the source.
//!
//! Prometheus counts are differences of the counters' values at the window's ends, not
//! PromQL's `increase()`: `increase()` extrapolates (so a known number of requests comes back
//! as a few percent more or less) and misses everything a series counted before its first
//! scrape, which after a deploy is a new pod's whole first window. A series absent at the
//! start counts from zero; a counter that went down was reset (a restarted proxy) and counts
//! from zero too. A proxy's window needs neither rule: it counts from the series' start.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::resource::{service_of_authority, Matcher};
use crate::demo::admin_client;
use crate::demo::metrics::counter_increase;
use crate::flags::MetricsSource;

/// One series: a metric name as exposed (`response_total`, `response_latency_ms_bucket`...),
/// its labels (bucket bound in `le`), and its increase over the window (counters, buckets) or
/// the current value (gauges).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub metric: String,
    pub labels: BTreeMap<String, String>,
    pub le: Option<f64>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, k: &str) -> Option<String> {
        self.labels.get(k).cloned()
    }
}

/// The families the views read; everything else in an exposition is ignored.
const FAMILIES: &[&str] = &[
    "response_total",
    "response_latency_ms_bucket",
    "tcp_open_connections",
    "route_request_total",
    "route_actual_request_total",
    "route_response_total",
    "route_response_latency_ms_bucket",
    "proxy_build_info",
];

/// The series over a window, and the window's length (for rates).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub series: Vec<Series>,
    pub window: Duration,
}

fn is_gauge(metric: &str) -> bool {
    matches!(metric, "tcp_open_connections" | "proxy_build_info")
}

/// Route series name their destination by authority (`dst`); give them the labels the other
/// series use (`authority`, `dst_service`, `dst_namespace`) so one matcher selects both.
fn normalize(mut s: Series) -> Series {
    if s.metric.starts_with("route_") {
        if let Some(dst) = s.labels.get("dst").cloned() {
            if let Some((svc, ns)) = service_of_authority(&dst) {
                s.labels.entry("dst_service".into()).or_insert(svc);
                s.labels.entry("dst_namespace".into()).or_insert(ns);
            }
            s.labels.entry("authority".into()).or_insert(dst);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Direct scrapes
// ---------------------------------------------------------------------------------------------

/// One scrape, flattened: `(metric, labels, le) -> value`.
type Flat = HashMap<(String, Vec<(String, String)>, Option<u64>), f64>;

/// Flattens an exposition's samples into the families the views read.
fn flatten(samples: Vec<pylon_proxy_metrics::exposition::Sample>) -> Flat {
    let mut out = Flat::new();
    for sample in samples {
        if !FAMILIES.contains(&sample.name.as_str()) {
            continue;
        }
        let mut le = None;
        let mut labels: Vec<(String, String)> = sample
            .labels
            .into_iter()
            .filter(|(k, v)| {
                if k == "le" {
                    le = crate::demo::metrics::bucket_bound(v);
                    false
                } else {
                    true
                }
            })
            .collect();
        labels.sort();
        *out.entry((sample.name, labels, le.map(f64::to_bits)))
            .or_default() += sample.value;
    }
    out
}

/// Increases between two readings (gauges: the later value). Series that appeared in between
/// counted everything since; a counter that went down was reset. A proxy's window is read
/// against an empty `before`: its counters are increases already.
pub fn increases(before: &Flat, after: &Flat) -> Vec<Series> {
    let mut out: Vec<Series> = after
        .iter()
        .map(|((metric, labels, le), &now)| {
            let value = if is_gauge(metric) {
                now
            } else {
                let then = before
                    .get(&(metric.clone(), labels.clone(), *le))
                    .copied()
                    .unwrap_or(0.0);
                counter_increase(now, then)
            };
            normalize(Series {
                metric: metric.clone(),
                labels: labels.iter().cloned().collect(),
                le: le.map(f64::from_bits),
                value,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.metric, &a.labels).cmp(&(&b.metric, &b.labels)));
    out
}

/// The longest window a proxy keeps.
pub const PROXY_WINDOW_MAX: Duration = Duration::from_secs(15 * 60);

/// One proxy's window: its series and the time they cover (`window_seconds`: the window asked
/// for, or the proxy's uptime when shorter).
async fn proxy_window(addr: SocketAddr, secs: u64) -> Result<(Flat, Duration)> {
    let path = format!("/metrics/window?window={secs}s");
    let (status, body) = admin_client::request(addr, Method::GET, &path, Duration::from_secs(5))
        .await
        .with_context(|| {
            format!("proxy admin address {addr} is unreachable (is the proxy running, and is this its --admin-addr?)")
        })?;
    if status == StatusCode::NOT_FOUND {
        bail!("the proxy at {addr} keeps no windows (GET {path} answered 404: not a Pylon proxy of this version?); read it through --prometheus URL instead");
    }
    if !status.is_success() {
        bail!(
            "GET http://{addr}{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let text = std::str::from_utf8(&body)
        .with_context(|| format!("GET http://{addr}{path} is not UTF-8"))?;
    let samples = pylon_proxy_metrics::exposition::parse(text)
        .with_context(|| format!("parsing the Prometheus exposition of http://{addr}{path}"))?;
    let covered = samples
        .iter()
        .find(|s| s.name == "window_seconds")
        .map(|s| s.value)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| anyhow!("GET http://{addr}{path} has no window_seconds"))?;
    Ok((flatten(samples), Duration::from_secs_f64(covered)))
}

/// Asks every proxy what its series counted over the last `window` (at most 15 minutes: what
/// proxies keep), at once. The window reported is the longest any proxy covered: shorter than
/// asked when every proxy started within it.
pub async fn from_proxies(proxies: &[SocketAddr], window: Duration) -> Result<Observed> {
    if window > PROXY_WINDOW_MAX {
        bail!(
            "proxies keep the last 15m; for a longer --window read from Prometheus (--prometheus URL)"
        );
    }
    // Proxies keep whole seconds.
    let secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
    let answers = futures_join(proxies.iter().map(|&a| proxy_window(a, secs))).await?;
    let mut out = Observed::default();
    let none = Flat::new();
    for (flat, covered) in &answers {
        out.series.extend(increases(&none, flat));
        out.window = out.window.max(*covered);
    }
    // Rates divide by it: a proxy that just started still covered some time.
    out.window = out.window.max(Duration::from_millis(1));
    route_destinations(&mut out.series);
    Ok(out)
}

/// Destination labels the route series lack: a route's series name its destination by
/// authority only, but the same proxy's target series for that authority carry the
/// destination's workload (`dst_deployment`...) from discovery. Each label they all agree on
/// is copied, so `--to deployment/web` selects web's routes (and their retries) too; one that
/// differs between endpoints (`dst_pod`) is not.
pub fn route_destinations(series: &mut [Series]) {
    const COPIED: [&str; 2] = ["dst_deployment", "dst_pod"];
    // (proxy pod, authority) -> label -> the one value seen, or None once two differ.
    type Seen = HashMap<(Option<String>, String), HashMap<&'static str, Option<String>>>;
    let mut seen: Seen = HashMap::new();
    // Only what counted: a series from before discovery knew the pods has no labels.
    for s in series
        .iter()
        .filter(|s| s.metric == "response_total" && s.value > 0.0)
    {
        let Some(authority) = s.label("authority") else {
            continue;
        };
        let labels = seen.entry((s.label("pod"), authority)).or_default();
        for k in COPIED {
            let v = s.label(k);
            labels
                .entry(k)
                .and_modify(|known| {
                    if *known != v {
                        *known = None;
                    }
                })
                .or_insert(v);
        }
    }
    for s in series.iter_mut().filter(|s| s.metric.starts_with("route_")) {
        let Some(dst) = s.label("dst") else { continue };
        let Some(labels) = seen.get(&(s.label("pod"), dst)) else {
            continue;
        };
        for (k, v) in labels {
            if let Some(v) = v {
                s.labels
                    .entry((*k).to_string())
                    .or_insert_with(|| v.clone());
            }
        }
    }
}

/// Runs the futures concurrently; the first error wins.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.map_err(|e| anyhow!("scrape task failed: {e}"))??);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// The labels kept on HTTP and TCP series (everything a view filters or groups by).
const TARGET_BY: &str =
    "namespace, deployment, pod, direction, authority, dst_service, dst_namespace, dst_deployment, dst_pod, tls, server_id, client_id";
/// The labels kept on route series.
const ROUTE_BY: &str = "namespace, deployment, pod, direction, dst, rt_route";

/// `90s` -> `"90s"`, `1500ms` -> `"1500ms"`: a PromQL range.
pub fn promql_range(window: Duration) -> String {
    let ms = window.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `{a="b",c="d"}` of the matchers on labels in `allowed` (the rest are applied afterwards,
/// on the answer).
fn selector(matchers: &[Matcher], allowed: &[&str]) -> String {
    let m: Vec<String> = matchers
        .iter()
        .filter(|m| match m {
            Matcher::Eq(k, _) => allowed.contains(k),
            Matcher::Host(_) => allowed.contains(&"authority"),
        })
        .map(Matcher::promql)
        .collect();
    if m.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", m.join(","))
    }
}

/// One question to Prometheus, answered as series named `metric`: `expr` at the window's end
/// and, for counters, `start` (the same sums `offset` by the window) at its start.
#[derive(Clone, Debug, PartialEq)]
pub struct PromQuery {
    pub metric: &'static str,
    pub expr: String,
    pub start: Option<String>,
}

impl PromQuery {
    /// A counter (or histogram buckets): summed `by`, read at both ends of the window.
    fn counter(metric: &'static str, by: &str, selector: &str, window: &str) -> PromQuery {
        PromQuery {
            metric,
            expr: format!("sum by ({by}) ({metric}{selector})"),
            start: Some(format!(
                "sum by ({by}) ({metric}{selector} offset {window})"
            )),
        }
    }

    fn gauge(metric: &'static str, expr: String) -> PromQuery {
        PromQuery {
            metric,
            expr,
            start: None,
        }
    }
}

/// The queries. `matchers` narrow every query to the series they can apply to. Sums keep
/// `pod`, so a restarted proxy's counters go down together and read as a reset.
pub fn promql_queries(window: Duration, matchers: &[Matcher]) -> Vec<PromQuery> {
    let w = promql_range(window);
    let workload = ["namespace", "deployment", "pod"];
    let route = ["namespace", "deployment", "pod", "direction"];
    let target = [
        "namespace",
        "deployment",
        "pod",
        "direction",
        "authority",
        "dst_service",
        "dst_namespace",
        "dst_deployment",
        "dst_pod",
    ];
    let t = selector(matchers, &target);
    let r = selector(matchers, &route);
    let b = selector(matchers, &workload);
    let target_by = format!("{TARGET_BY}, classification");
    let buckets_by = format!("{TARGET_BY}, le");
    let route_by = format!("{ROUTE_BY}, classification");
    let route_buckets_by = format!("{ROUTE_BY}, le");
    vec![
        PromQuery::counter("response_total", &target_by, &t, &w),
        PromQuery::counter("response_latency_ms_bucket", &buckets_by, &t, &w),
        PromQuery::gauge(
            "tcp_open_connections",
            format!("sum by ({TARGET_BY}, peer) (tcp_open_connections{t})"),
        ),
        PromQuery::counter("route_request_total", ROUTE_BY, &r, &w),
        PromQuery::counter("route_actual_request_total", ROUTE_BY, &r, &w),
        PromQuery::counter("route_response_total", &route_by, &r, &w),
        PromQuery::counter(
            "route_response_latency_ms_bucket",
            &route_buckets_by,
            &r,
            &w,
        ),
        PromQuery::gauge(
            "proxy_build_info",
            format!("group by (namespace, deployment, pod) (proxy_build_info{b})"),
        ),
    ]
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses an `/api/v1/query` answer (an instant vector) into series named `metric`.
pub fn parse_vector(metric: &str, body: &[u8]) -> Result<Vec<Series>> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).context("Prometheus answered something other than JSON")?;
    if doc["status"] != "success" {
        bail!(
            "Prometheus answered {}: {}",
            doc["errorType"].as_str().unwrap_or("an error"),
            doc["error"].as_str().unwrap_or("(no message)")
        );
    }
    let Some(result) = doc["data"]["result"].as_array() else {
        bail!("Prometheus answered without data.result");
    };
    let mut out = Vec::with_capacity(result.len());
    for r in result {
        let mut labels: BTreeMap<String, String> = r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let le = match labels.remove("le") {
            Some(le) => match le.parse::<f64>() {
                Ok(le) => Some(le),
                Err(_) => continue,
            },
            None => None,
        };
        let Some(value) = r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if value.is_nan() {
            continue;
        }
        out.push(normalize(Series {
            metric: metric.to_string(),
            labels,
            le,
            value,
        }));
    }
    Ok(out)
}

/// Asks Prometheus at `base` (`http://host:port[/prefix]`) for the window that ended `ago`
/// (zero: now). Every query is evaluated at the same instant, so the counts of all families cover the same
/// samples.
async fn from_prometheus(
    base: &str,
    window: Duration,
    matchers: &[Matcher],
    ago: Duration,
) -> Result<Observed> {
    let base = base.trim_end_matches('/');
    let at = std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(std::time::UNIX_EPOCH)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let vector = |metric: &'static str, expr: String| async move {
        let url = format!(
            "{base}/api/v1/query?query={}&time={at:.3}",
            url_encode(&expr)
        );
        let body = http_get(&url)
            .await
            .with_context(|| format!("querying Prometheus at {base}"))?;
        parse_vector(metric, &body).with_context(|| format!("query {expr}"))
    };
    let mut out = Observed {
        series: Vec::new(),
        window,
    };
    for q in promql_queries(window, matchers) {
        let now = vector(q.metric, q.expr).await?;
        match q.start {
            None => out.series.extend(now),
            Some(start) => {
                let start: HashMap<_, f64> = vector(q.metric, start)
                    .await?
                    .into_iter()
                    .map(|s| ((s.labels, s.le.map(f64::to_bits)), s.value))
                    .collect();
                out.series.extend(now.into_iter().map(|mut s| {
                    let then = start
                        .get(&(s.labels.clone(), s.le.map(f64::to_bits)))
                        .copied()
                        .unwrap_or(0.0);
                    s.value = counter_increase(s.value, then);
                    s
                }));
            }
        }
    }
    route_destinations(&mut out.series);
    if out.series.is_empty() && ago.is_zero() {
        // Nothing for this selection: is there anything from Pylon at all? (A past window
        // may well be from before the proxies.)
        if vector("count", "count(proxy_build_info)".into())
            .await?
            .is_empty()
        {
            bail!(
                "Prometheus at {base} has no series from Pylon proxies (no proxy_build_info): is it scraping their admin /metrics?"
            );
        }
    }
    Ok(out)
}

/// A plain-HTTP GET, bounded to 10 s; the body of a 2xx answer (or of a 400/422 with a
/// Prometheus error document).
pub(super) async fn http_get(url: &str) -> Result<Bytes> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// Prometheus URLs are supported, not {url:?}");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("no host in {url:?}"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let fut = async {
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(HOST, format!("{host}:{port}"))
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 64 * 1024 * 1024)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer: {e}"))?
            .to_bytes();
        conn.abort();
        if !(status.is_success() || status.as_u16() == 400 || status.as_u16() == 422) {
            bail!("GET {url} answered {status}");
        }
        Ok::<_, anyhow::Error>(body)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("GET {url} timed out after 10s"))?
}

// ---------------------------------------------------------------------------------------------
// The source the flags name
// ---------------------------------------------------------------------------------------------

/// Where the numbers come from, as `--proxy`, `--config-dir` or `--prometheus` said: what
/// `stat`, `routes`, `edges` and the dashboard all read through.
#[derive(Clone, Debug)]
pub enum Source {
    /// The proxies named, and those of the config dir's meshed pods (the dir is read at every
    /// [`Source::observe`], so a long-lived reader such as the dashboard sees new pods).
    Proxies {
        named: Vec<SocketAddr>,
        config_dir: Option<PathBuf>,
    },
    /// A Prometheus server scraping the proxies.
    Prometheus(String),
}

impl Source {
    /// The source the flags name, or why there is none.
    pub fn from_flags(flags: &MetricsSource) -> Result<Source, String> {
        let named = &flags.proxies;
        match &flags.prometheus {
            Some(url) => Ok(Source::Prometheus(url.clone())),
            None if named.proxies.is_empty() && named.config_dir.is_none() => Err(
                "no data source: give --proxy ADMIN_ADDR (repeatable, e.g. --proxy 127.0.0.1:4191), --config-dir DIR or --prometheus URL".into(),
            ),
            None => Ok(Source::Proxies {
                named: named.proxies.clone(),
                config_dir: named.config_dir.clone(),
            }),
        }
    }

    /// `config dir /x`, `Prometheus at http://...`, `2 proxies`, for people.
    pub fn describe(&self) -> String {
        match self {
            Source::Prometheus(url) => format!("Prometheus at {url}"),
            Source::Proxies {
                config_dir: Some(dir),
                ..
            } => format!("config dir {}", dir.display()),
            Source::Proxies { named, .. } => match named.len() {
                1 => "1 proxy".to_string(),
                n => format!("{n} proxies"),
            },
        }
    }

    /// The config dir, when the source has one.
    pub fn config_dir(&self) -> Option<&Path> {
        match self {
            Source::Proxies { config_dir, .. } => config_dir.as_deref(),
            Source::Prometheus(_) => None,
        }
    }

    /// What the series counted over the last `window` (`matchers` narrow what Prometheus
    /// is asked; the proxies answer with everything they keep).
    pub async fn observe(&self, window: Duration, matchers: &[Matcher]) -> Result<Observed> {
        self.observe_ending(window, matchers, Duration::ZERO).await
    }

    /// What they counted in each of the `points` windows of `step` up to now, oldest first.
    /// Proxies answer for the last 15 minutes only: each window is the difference of two of
    /// theirs (the last `k` steps less the last `k - 1`).
    pub async fn history(
        &self,
        step: Duration,
        points: u32,
        matchers: &[Matcher],
    ) -> Result<Vec<Observed>> {
        let mut out = Vec::with_capacity(points as usize);
        match self {
            Source::Prometheus(_) => {
                for k in (0..points).rev() {
                    out.push(self.observe_ending(step, matchers, step * k).await?);
                }
            }
            Source::Proxies { named, config_dir } => {
                if step * points > PROXY_WINDOW_MAX {
                    bail!("proxies keep the last 15m; read longer histories from Prometheus");
                }
                // The config dir is read once for all the windows.
                let proxies = crate::proxies::resolve(named, config_dir.as_deref())?;
                // The last k steps, for k = 0..=points (k = 0: nothing).
                let mut last = vec![Observed::default()];
                for k in 1..=points {
                    last.push(from_proxies(&proxies, step * k).await?);
                }
                for k in (1..=points as usize).rev() {
                    // Proxies younger than the point's start cover it not at all: their k and
                    // k - 1 windows both cover their whole uptime, and differ only by the
                    // milliseconds between the two reads (a covered point adds at least one of
                    // the windows' one-second ticks).
                    let uncovered = k > 1
                        && last[k].window.saturating_sub(last[k - 1].window)
                            < Duration::from_secs(1);
                    out.push(if uncovered {
                        Observed::default()
                    } else {
                        difference(&last[k], &last[k - 1])
                    });
                }
            }
        }
        Ok(out)
    }

    async fn observe_ending(
        &self,
        window: Duration,
        matchers: &[Matcher],
        ago: Duration,
    ) -> Result<Observed> {
        match self {
            Source::Prometheus(url) => from_prometheus(url, window, matchers, ago).await,
            Source::Proxies { named, config_dir } => {
                if !ago.is_zero() {
                    bail!("proxies answer for windows ending now");
                }
                let proxies = crate::proxies::resolve(named, config_dir.as_deref())?;
                from_proxies(&proxies, window).await
            }
        }
    }
}

/// What `later` counted that `earlier` (a shorter window ending at the same time) did not:
/// the counts of the time between their starts. Gauges are left out.
fn difference(later: &Observed, earlier: &Observed) -> Observed {
    type Key<'a> = (&'a str, &'a BTreeMap<String, String>, Option<u64>);
    let before: HashMap<Key, f64> = earlier
        .series
        .iter()
        .map(|s| {
            (
                (s.metric.as_str(), &s.labels, s.le.map(f64::to_bits)),
                s.value,
            )
        })
        .collect();
    let series = later
        .series
        .iter()
        .filter(|s| !is_gauge(&s.metric))
        .map(|s| {
            let then = before
                .get(&(s.metric.as_str(), &s.labels, s.le.map(f64::to_bits)))
                .copied()
                .unwrap_or(0.0);
            Series {
                value: (s.value - then).max(0.0),
                ..s.clone()
            }
        })
        .collect();
    Observed {
        series,
        window: later.window.saturating_sub(earlier.window),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE response counter
response_total{direction="inbound",classification="success",status_code="200",deployment="web"} 10
response_total{direction="inbound",classification="failure",status_code="500",deployment="web"} 1
# TYPE tcp_open_connections gauge
tcp_open_connections{direction="inbound",peer="src",deployment="web"} 3
# TYPE response_latency_ms histogram
response_latency_ms_bucket{le="1.0",direction="inbound",deployment="web"} 5
response_latency_ms_bucket{le="+Inf",direction="inbound",deployment="web"} 11
response_latency_ms_sum{direction="inbound",deployment="web"} 20.0
response_latency_ms_count{direction="inbound",deployment="web"} 11
# TYPE route_request counter
route_request_total{direction="outbound",dst="web.default.svc.cluster.local:80",rt_route="[DEFAULT]",deployment="client"} 4
# EOF
"#;

    fn flat(text: &str) -> Flat {
        flatten(pylon_proxy_metrics::exposition::parse(text).expect("parses"))
    }

    fn value(series: &[Series], metric: &str, pred: impl Fn(&Series) -> bool) -> f64 {
        series
            .iter()
            .filter(|s| s.metric == metric && pred(s))
            .map(|s| s.value)
            .sum()
    }

    #[test]
    fn a_history_point_is_the_difference_of_two_windows() {
        let series = |metric: &str, value: f64| Series {
            metric: metric.into(),
            labels: [("direction".to_string(), "inbound".to_string())].into(),
            le: None,
            value,
        };
        let two_minutes = Observed {
            series: vec![
                series("response_total", 30.0),
                series("tcp_open_connections", 3.0),
            ],
            window: Duration::from_secs(120),
        };
        let one_minute = Observed {
            series: vec![series("response_total", 12.0)],
            window: Duration::from_secs(60),
        };
        let point = difference(&two_minutes, &one_minute);
        assert_eq!(point.window, Duration::from_secs(60));
        // Counters are what the older minute counted; gauges are not history.
        assert_eq!(point.series, vec![series("response_total", 18.0)]);
        // A series the shorter window lacks counted it all then; none goes below zero.
        let point = difference(&one_minute, &two_minutes);
        assert_eq!(point.series, vec![series("response_total", 0.0)]);
        assert_eq!(point.window, Duration::ZERO);
    }

    #[test]
    fn rates_from_two_scrapes() {
        let after_text = BEFORE
            .replace(
                "status_code=\"200\",deployment=\"web\"} 10",
                "status_code=\"200\",deployment=\"web\"} 30",
            )
            .replace(
                "peer=\"src\",deployment=\"web\"} 3",
                "peer=\"src\",deployment=\"web\"} 2",
            )
            .replace(
                "le=\"+Inf\",direction=\"inbound\",deployment=\"web\"} 11",
                "le=\"+Inf\",direction=\"inbound\",deployment=\"web\"} 31",
            );
        let before = flat(BEFORE);
        let after = flat(&after_text);
        let series = increases(&before, &after);
        let ok = value(&series, "response_total", |s| {
            s.labels.get("classification").map(String::as_str) == Some("success")
        });
        assert_eq!(ok, 20.0, "20 more successes");
        let failed = value(&series, "response_total", |s| {
            s.labels.get("classification").map(String::as_str) == Some("failure")
        });
        assert_eq!(failed, 0.0);
        // Gauges are the later value, not a rate.
        assert_eq!(value(&series, "tcp_open_connections", |_| true), 2.0);
        assert_eq!(
            value(&series, "response_latency_ms_bucket", |s| s.le
                == Some(f64::INFINITY)),
            20.0
        );
        assert_eq!(
            value(&series, "response_latency_ms_bucket", |s| s.le == Some(1.0)),
            0.0
        );
        // Route series get the destination labels of the other series.
        let route = series
            .iter()
            .find(|s| s.metric == "route_request_total")
            .expect("route series");
        assert_eq!(route.label("dst_service").as_deref(), Some("web"));
        assert_eq!(route.label("dst_namespace").as_deref(), Some("default"));
        assert_eq!(
            route.label("authority").as_deref(),
            Some("web.default.svc.cluster.local:80")
        );
    }

    #[test]
    fn route_series_take_the_destination_workload_of_their_authority() {
        let series = |metric: &str, labels: &[(&str, &str)]| Series {
            metric: metric.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            le: None,
            value: 1.0,
        };
        let web = "web.default.svc.cluster.local:80";
        let mut all = vec![
            series(
                "response_total",
                &[
                    ("pod", "c-0"),
                    ("authority", web),
                    ("dst_deployment", "web"),
                    ("dst_pod", "web-a"),
                ],
            ),
            series(
                "response_total",
                &[
                    ("pod", "c-0"),
                    ("authority", web),
                    ("dst_deployment", "web"),
                    ("dst_pod", "web-b"),
                ],
            ),
            series("route_request_total", &[("pod", "c-0"), ("dst", web)]),
            // Another proxy's routes learn nothing from c-0's endpoints.
            series("route_request_total", &[("pod", "d-0"), ("dst", web)]),
        ];
        route_destinations(&mut all);
        assert_eq!(all[2].label("dst_deployment").as_deref(), Some("web"));
        assert_eq!(all[2].label("dst_pod"), None, "two pods: not one");
        assert_eq!(all[3].label("dst_deployment"), None);
    }

    #[test]
    fn a_counter_reset_counts_from_zero() {
        let before = flat(BEFORE);
        let after = flat(&BEFORE.replace("} 10\n", "} 4\n"));
        let series = increases(&before, &after);
        let ok = value(&series, "response_total", |s| {
            s.labels.get("classification").map(String::as_str) == Some("success")
        });
        assert_eq!(ok, 4.0);
    }

    #[test]
    fn promql_counters_are_read_at_both_ends_of_the_window() {
        assert_eq!(promql_range(Duration::from_secs(60)), "60s");
        assert_eq!(promql_range(Duration::from_millis(1500)), "1500ms");
        let queries = promql_queries(Duration::from_secs(30), &[]);
        let q = &queries[0];
        assert_eq!(q.metric, "response_total");
        let by = "namespace, deployment, pod, direction, authority, dst_service, dst_namespace, dst_deployment, dst_pod, tls, server_id, client_id, classification";
        assert_eq!(q.expr, format!("sum by ({by}) (response_total)"));
        assert_eq!(
            q.start.as_deref(),
            Some(format!("sum by ({by}) (response_total offset 30s)").as_str())
        );
        assert!(queries
            .iter()
            .any(|q| q.metric == "response_latency_ms_bucket"
                && q.expr.contains(", le)")
                && q.start
                    .as_deref()
                    .is_some_and(|s| s.ends_with("offset 30s)"))));
        // Gauges are read once, at the end.
        assert!(queries
            .iter()
            .any(|q| q.metric == "tcp_open_connections" && q.start.is_none()));
    }

    #[test]
    fn promql_queries_are_narrowed_by_the_matchers() {
        let m = [
            Matcher::eq("direction", "outbound"),
            Matcher::eq("deployment", "client"),
            Matcher::eq("dst_service", "web"),
        ];
        let q = promql_queries(Duration::from_secs(60), &m);
        let get = |name: &str| {
            q.iter()
                .find(|q| q.metric == name)
                .map(|q| q.expr.clone())
                .unwrap_or_default()
        };
        assert!(get("response_total").contains(
            r#"(response_total{direction="outbound",deployment="client",dst_service="web"})"#
        ));
        // Route series name the destination in `dst`: that part is filtered afterwards.
        assert!(get("route_request_total")
            .contains(r#"(route_request_total{direction="outbound",deployment="client"})"#));
        assert_eq!(
            get("proxy_build_info"),
            r#"group by (namespace, deployment, pod) (proxy_build_info{deployment="client"})"#
        );
    }

    #[test]
    fn url_encoding() {
        assert_eq!(
            url_encode("sum by (a) (x{b=\"c\"})"),
            "sum%20by%20%28a%29%20%28x%7Bb%3D%22c%22%7D%29"
        );
    }

    #[test]
    fn parses_a_prometheus_vector() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"deployment":"web","le":"+Inf"},"value":[1700000000.1,"2.5"]},
            {"metric":{"deployment":"web","le":"10"},"value":[1700000000.1,"1"]},
            {"metric":{"deployment":"web"},"value":[1700000000.1,"NaN"]}]}}"#;
        let s = parse_vector("response_latency_ms_bucket", body).expect("parses");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].le, Some(f64::INFINITY));
        assert_eq!(s[0].value, 2.5);
        assert_eq!(s[1].le, Some(10.0));
        let err = parse_vector(
            "x",
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .expect_err("error");
        assert!(err.to_string().contains("bad_data: parse error"), "{err}");
    }
}
