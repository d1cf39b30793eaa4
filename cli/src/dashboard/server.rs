//! The dashboard's HTTP server (axum): the pages, their assets (compiled into the binary),
//! and the JSON and event-stream API the pages read ([`super::api`], [`super::live`]).
//!
//! Every page is the same small HTML shell naming its page; the script fills it from the API.
//! Responses forbid anything not from this server (`Content-Security-Policy: default-src
//! 'self'`), and while the dashboard is for this machine only (a loopback address, no
//! `--allow-remote`), a request naming any other host is refused, so a web page elsewhere
//! cannot reach it through DNS rebinding.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::api::{self, ApiError};
use super::live::{self, TapQuery, TapSlots};
use crate::flags::{ProxyFlags, TapSource};
use crate::stat::data::{Source, PROXY_WINDOW_MAX};
use crate::stat::view::{FAILING_BELOW, RETRY_HEAVY_ABOVE};

const SHELL: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// What every handler reads: where the numbers and taps come from.
pub struct Dashboard {
    source: Source,
    /// The proxies to tap: `None` when the source is Prometheus.
    taps: Option<TapSource>,
    slots: Arc<TapSlots>,
    /// Answer requests for any host name (`--allow-remote`), not only this machine's.
    any_host: bool,
}

impl Dashboard {
    pub fn new(source: Source, any_host: bool) -> Dashboard {
        let taps = match &source {
            Source::Proxies { named, config_dir } => Some(TapSource {
                proxies: ProxyFlags {
                    proxies: named.clone(),
                    config_dir: config_dir.clone(),
                },
                taps: Vec::new(),
            }),
            Source::Prometheus(_) => None,
        };
        Dashboard {
            source,
            taps,
            slots: Arc::default(),
            any_host,
        }
    }
}

type Shared = State<Arc<Dashboard>>;

pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", page("overview", "Workloads"))
        .route("/topology", page("topology", "Topology"))
        .route("/tap", page("tap", "Tap"))
        .route("/check", page("check", "Check"))
        .route("/workloads/{ns}/{name}", get(workload_page))
        .route("/assets/app.js", get(|| asset("text/javascript", APP_JS)))
        .route("/assets/style.css", get(|| asset("text/css", STYLE_CSS)))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/overview", get(overview))
        .route("/api/topology", get(topology))
        .route("/api/workload/{ns}/{name}", get(workload))
        .route("/api/workload/{ns}/{name}/history", get(history))
        .route("/api/check", get(check))
        .route("/api/tap", get(tap))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            dashboard.clone(),
            guard_and_harden,
        ))
        .with_state(dashboard)
}

/// Refuses other hosts' names (unless `--allow-remote`), and adds the security headers.
async fn guard_and_harden(State(d): Shared, req: Request, next: Next) -> Response {
    if !d.any_host {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_local_host(host) {
            return (
                StatusCode::FORBIDDEN,
                format!("this dashboard answers for this machine only (Host {host:?}); start it with --allow-remote to serve other names\n"),
            )
                .into_response();
        }
    }
    let mut rsp = next.run(req).await;
    let headers = rsp.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    rsp
}

/// `localhost`, `127.0.0.1`, `[::1]`..., with or without a port.
fn is_local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn shell(d: &Dashboard, page: &str, title: &str) -> Response {
    let html = SHELL
        .replace("{{PAGE}}", page)
        .replace("{{TITLE}}", &html_escape(title))
        .replace("{{SOURCE}}", &html_escape(&d.source.describe()))
        .replace("{{FAILING_BELOW}}", &FAILING_BELOW.to_string())
        .replace("{{RETRY_HEAVY_ABOVE}}", &RETRY_HEAVY_ABOVE.to_string());
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// A page's handler: the shell naming `page`.
fn page(page: &'static str, title: &'static str) -> axum::routing::MethodRouter<Arc<Dashboard>> {
    get(move |State(d): Shared| async move { shell(&d, page, title) })
}

async fn workload_page(State(d): Shared, Path((ns, name)): Path<(String, String)>) -> Response {
    shell(&d, "workload", &format!("{name} ({ns})"))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path.starts_with("/api/") {
        return error(StatusCode::NOT_FOUND, format!("no API at {path}"));
    }
    (StatusCode::NOT_FOUND, format!("no page at {path}\n")).into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
            ApiError::Unavailable(m) => error(StatusCode::BAD_GATEWAY, m),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WindowQuery {
    window: Option<String>,
}

impl WindowQuery {
    /// `?window=` (default 1m); proxies keep 15 minutes, Prometheus any.
    fn window(&self, source: &Source) -> Result<Duration, ApiError> {
        let w = crate::stat::parse_window(self.window.as_deref().unwrap_or("1m"))
            .map_err(ApiError::BadRequest)?;
        if w > PROXY_WINDOW_MAX && !matches!(source, Source::Prometheus(_)) {
            return Err(ApiError::BadRequest(
                "bad window: the proxies keep the last 15m".into(),
            ));
        }
        Ok(w)
    }
}

async fn overview(State(d): Shared, Query(q): Query<WindowQuery>) -> Result<Response, ApiError> {
    let window = q.window(&d.source)?;
    Ok(Json(api::overview(&d.source, window).await?).into_response())
}

async fn topology(State(d): Shared, Query(q): Query<WindowQuery>) -> Result<Response, ApiError> {
    let window = q.window(&d.source)?;
    Ok(Json(api::topology(&d.source, window).await?).into_response())
}

async fn workload(
    State(d): Shared,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<WindowQuery>,
) -> Result<Response, ApiError> {
    let window = q.window(&d.source)?;
    Ok(Json(api::workload(&d.source, window, &ns, &name).await?).into_response())
}

async fn history(
    State(d): Shared,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(api::history(&d.source, &ns, &name).await?).into_response())
}

async fn check(State(d): Shared) -> Response {
    let source = d.source.clone();
    // Reading and auditing a config dir is file work: off the async threads.
    match tokio::task::spawn_blocking(move || api::check(&source)).await {
        Ok(found) => Json(found).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("check failed: {e}"),
        ),
    }
}

async fn tap(State(d): Shared, Query(q): Query<TapQuery>) -> Result<Response, ApiError> {
    let Some(source) = d.taps.clone() else {
        return Err(ApiError::BadRequest(format!(
            "tap reads the proxies' tap ports, and the dashboard reads {}: start it with --proxy or --config-dir",
            d.source.describe()
        )));
    };
    let plan = live::plan(&q).map_err(ApiError::BadRequest)?;
    let Some(slot) = d.slots.take() else {
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} pages are tapping already; close one and try again",
                live::MAX_TAPS
            ),
        ));
    };
    let events = live::stream(source, plan, slot);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machines_names_are_local() {
        for ok in [
            "localhost",
            "localhost:50750",
            "127.0.0.1:50750",
            "127.0.0.2",
            "[::1]:50750",
            "[::1]",
            "LOCALHOST:1",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:50750",
            "10.0.0.1:80",
            "localhost.evil.example",
            "[::2]:1",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
    }

    #[test]
    fn titles_are_escaped_into_the_shell() {
        assert_eq!(
            html_escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        for slot in [
            "{{PAGE}}",
            "{{TITLE}}",
            "{{SOURCE}}",
            "{{FAILING_BELOW}}",
            "{{RETRY_HEAVY_ABOVE}}",
        ] {
            assert!(SHELL.contains(slot), "{slot}");
        }
    }
}
