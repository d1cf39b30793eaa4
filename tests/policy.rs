//! Traffic policy end to end: ServiceProfile routes, classification, route timeouts, retries
//! within the retry budget, live profile changes, on real proxies and real backends. One test
//! per failure from the 3 AM story where it applies.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use support::*;

const AUTHORITY: &str = "web.default.svc.cluster.local:80";

/// A ServiceProfile for `web` with the given `spec:` body (indented by two spaces).
fn profile(spec: &str) -> String {
    format!(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata:\n  name: {WEB_FQDN}\n  namespace: default\nspec:\n{spec}"
    )
}

/// A config dir with Service `web` on `backends` and its ServiceProfile (`spec:` body).
fn web_with_profile(backends: &[SocketAddr], spec: &str) -> ConfigDir {
    let cfg = ConfigDir::web(backends);
    cfg.write("web-profile.yaml", &profile(spec));
    cfg
}

/// A backend answering `status` to every request after reading its body.
async fn backend_with(
    name: &str,
    status: impl Fn(usize) -> u16 + Send + Sync + 'static,
) -> Backend {
    let status = Arc::new(status);
    let seq = Arc::new(AtomicUsize::new(0));
    Backend::start_with(
        name,
        Arc::new(move |req, st| {
            let status = status.clone();
            let n = seq.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                use http_body_util::BodyExt;
                let body = req.into_body().collect().await.map(|c| c.to_bytes());
                let len = body.map(|b| b.len()).unwrap_or(0);
                st.bytes_received.fetch_add(len as u64, Ordering::SeqCst);
                Response::builder()
                    .status(StatusCode::from_u16(status(n)).unwrap())
                    .body(full(format!("{len}")))
                    .unwrap()
            })
        }),
    )
    .await
}

/// Turns failure accrual off for `web` (Linkerd's annotation), so a test sees retries and
/// budgets alone rather than the endpoint being ejected.
fn without_failure_accrual(cfg: &ConfigDir) {
    let yaml = service_yaml("web", "default", &[HTTP_PORT]).replacen(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    balancer.linkerd.io/failure-accrual: disabled\n",
        1,
    );
    cfg.write("web-service.yaml", &yaml);
}

/// A cheap deterministic "random" failure pattern: about half of the numbers.
fn coin(n: usize) -> bool {
    let mut x = n as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) & 1 == 1
}

fn route_metric(proxy: &Proxy, name: &str, route: &str, extra: &[(&str, &str)]) -> f64 {
    let text = proxy.metrics();
    metric_sum(&text, name, |s| {
        s.label("rt_route") == Some(route) && extra.iter().all(|(k, v)| s.label(k) == Some(*v))
    })
    .unwrap_or(0.0)
}

async fn send_many(proxy: SocketAddr, path: &str, n: usize) -> Vec<Resp> {
    let mut client = h1_client(proxy).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = h1_request("GET", AUTHORITY, path, empty());
        let rsp = within("request", OP_TIMEOUT, send_h1(&mut client, req))
            .await
            .expect("request completes");
        out.push(rsp);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_behind_a_short_route_timeout_gets_504_from_the_proxy() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 300ms\n");
        let proxy = Proxy::with_config(&cfg, &[]);

        // The app would answer after 3 s with a 200: a 504 is the proxy's timeout. (Its
        // timing is tested beside `RouteTimeoutLayer`, with paused time.)
        let rsp = get_with(proxy.outbound(), AUTHORITY, "/slow", &[("x-delay-ms", "3000")])
            .await
            .expect("response");
        assert_eq!(rsp.status, 504, "{}", rsp.text());
        assert_eq!(rsp.proxy_error(), Some("route timeout"));
        // Unmatched paths have no timeout: the same delay passes on [DEFAULT].
        let rsp = get_with(proxy.outbound(), AUTHORITY, "/other", &[("x-delay-ms", "500")])
            .await
            .expect("response");
        assert_eq!(rsp.status, 200);

        // Metrics say the proxy timed out, not the app.
        assert_eq!(
            route_metric(
                &proxy,
                "route_response_total",
                "GET /slow",
                &[("status_code", "504"), ("error", "route timeout"), ("classification", "failure")]
            ),
            1.0,
            "{}",
            series_of(&proxy.metrics(), "route_response_total")
        );
        assert_eq!(route_metric(&proxy, "route_request_total", "GET /slow", &[("direction", "outbound"), ("dst", AUTHORITY)]), 1.0);
        assert_eq!(route_metric(&proxy, "route_request_total", "[DEFAULT]", &[]), 1.0);
        assert!(
            proxy
                .wait_for_log(Duration::from_secs(5), |l| l.contains("route timeout") && l.contains("GET /slow"))
                .await
                .is_some(),
            "a warn log names the route timeout: {}",
            proxy.log_tail(20)
        );
        // The upstream request was cancelled: the backend sees it end early.
        assert!(
            wait_until(|| backend.state.in_flight() == 0, Duration::from_secs(5)).await,
            "cancelled upstream request still in flight"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_a_retryable_route_raise_the_success_rate() {
    test_body(async {
        // Half of all requests fail, at random.
        let backend = backend_with("web-a", |n| if coin(n) { 503 } else { 200 }).await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: GET /retry\n    condition: {method: GET, pathRegex: /retry}\n    isRetryable: true\n  - name: GET /once\n    condition: {method: GET, pathRegex: /once}\n  retryBudget: {retryRatio: 1.0, minRetriesPerSecond: 10, ttl: 10s}\n");
        without_failure_accrual(&cfg);
        let proxy = Proxy::with_config(&cfg, &[]);
        const N: usize = 300;

        let once = send_many(proxy.outbound(), "/once", N).await;
        let once_ok = once.iter().filter(|r| r.status == 200).count();
        let retried = send_many(proxy.outbound(), "/retry", N).await;
        let retried_ok = retried.iter().filter(|r| r.status == 200).count();
        println!("success without retries {once_ok}/{N}, with retries {retried_ok}/{N}");
        assert!(once_ok < N * 7 / 10, "control route: {once_ok}/{N}");
        assert!(retried_ok >= N * 95 / 100, "retryable route: {retried_ok}/{N}");

        let requested = route_metric(&proxy, "route_request_total", "GET /retry", &[]);
        let actual = route_metric(&proxy, "route_actual_request_total", "GET /retry", &[]);
        assert_eq!(requested, N as f64);
        assert!(actual > requested * 1.3, "actual {actual} vs requested {requested}");
        // Every attempt reached the backend, and the discarded failures were counted.
        assert_eq!(
            route_metric(&proxy, "route_actual_response_total", "GET /retry", &[]),
            actual
        );
        assert_eq!(
            route_metric(&proxy, "route_response_total", "GET /retry", &[("classification", "success")]),
            retried_ok as f64
        );
        assert_eq!(backend.requests() as f64, actual + N as f64);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_holds_retries_to_the_ratio() {
    test_body(async {
        let backend = backend_with("web-a", |_| 503).await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: GET /always-fails\n    condition: {method: GET, pathRegex: /always-fails}\n    isRetryable: true\n  retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 1, ttl: 10s}\n");
        without_failure_accrual(&cfg);
        let proxy = Proxy::with_config(&cfg, &[]);
        const N: usize = 400;
        let rsps = send_many(proxy.outbound(), "/always-fails", N).await;
        assert!(rsps.iter().all(|r| r.status == 503));

        // Counted at the upstream: N originals + at most 20% + the reserve (1/s x 10 s).
        let seen = backend.requests();
        let retries = seen - N;
        println!("upstream saw {seen} requests for {N}: {retries} retries");
        let allowed = N / 5 + 10;
        assert!(retries <= allowed + 2, "{retries} retries, budget {allowed}");
        assert!(retries >= allowed - 10, "{retries} retries: the budget should be used, {allowed}");
        let exhausted = route_metric(
            &proxy,
            "route_retry_skipped_total",
            "GET /always-fails",
            &[("reason", "budget_exhausted")],
        );
        assert!(exhausted >= (N - allowed - 2) as f64, "exhausted counted {exhausted}");
        assert_eq!(
            route_metric(&proxy, "route_actual_request_total", "GET /always-fails", &[]),
            seen as f64
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_replayed_up_to_64k_and_larger_ones_are_not_retried() {
    test_body(async {
        // Every first attempt fails; the retry sees the same body.
        let backend = backend_with("web-a", |n| if n % 2 == 0 { 503 } else { 200 }).await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: POST /upload\n    condition: {method: POST, pathRegex: /upload}\n    isRetryable: true\n");
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut client = h1_client(proxy.outbound()).await;

        let small = vec![b'x'; 20_000];
        let req = h1_request("POST", AUTHORITY, "/upload", full(small.clone()));
        let rsp = send_h1(&mut client, req).await.expect("response");
        assert_eq!(rsp.status, 200, "retried");
        assert_eq!(rsp.text(), "20000", "the retry carried the whole body");
        assert_eq!(backend.requests(), 2);

        // A streamed (chunked) body over the limit is sent once; its failure stands.
        let big = RepeatBody::new(100_000, 8 * 1024).boxed_body();
        let req = h1_request("POST", AUTHORITY, "/upload", big);
        let rsp = send_h1(&mut client, req).await.expect("response");
        assert_eq!(rsp.status, 503);
        assert_eq!(rsp.text(), "100000", "the body went through whole");
        assert_eq!(backend.requests(), 3);
        assert_eq!(
            route_metric(&proxy, "route_retry_skipped_total", "POST /upload", &[("reason", "body_too_large")]),
            1.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_classes_decide_success_on_every_family() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: GET /health\n    condition: {method: GET, pathRegex: /health}\n    responseClasses:\n    - condition: {status: {min: 503, max: 503}}\n      isFailure: false\n  - name: GET /api\n    condition:\n      all:\n      - method: GET\n      - pathRegex: /api/.*\n    responseClasses:\n    - condition: {status: {min: 429, max: 429}}\n      isFailure: true\n");
        let proxy = Proxy::with_config(&cfg, &[]);
        let health = get_with(proxy.outbound(), AUTHORITY, "/health", &[("x-status", "503")])
            .await
            .unwrap();
        assert_eq!(health.status, 503);
        let limited = get_with(proxy.outbound(), AUTHORITY, "/api/users", &[("x-status", "429")])
            .await
            .unwrap();
        assert_eq!(limited.status, 429);
        let other = get_with(proxy.outbound(), AUTHORITY, "/nope", &[("x-status", "429")])
            .await
            .unwrap();
        assert_eq!(other.status, 429);

        let text = proxy.metrics();
        let class = |family: &str, route: Option<&str>, status: &str| {
            let found: Vec<String> = parse_metrics(&text)
                .unwrap()
                .into_iter()
                .filter(|s| {
                    s.name == family
                        && s.label("status_code") == Some(status)
                        && route.is_none_or(|r| s.label("rt_route") == Some(r))
                })
                .filter_map(|s| s.label("classification").map(str::to_string))
                .collect();
            found
        };
        assert_eq!(class("route_response_total", Some("GET /health"), "503"), ["success"]);
        assert_eq!(class("route_response_total", Some("GET /api"), "429"), ["failure"]);
        assert_eq!(class("route_response_total", Some("[DEFAULT]"), "429"), ["success"]);
        // The endpoint-level family uses the route's classes too.
        let mut endpoint_429 = class("response_total", None, "429");
        endpoint_429.sort();
        assert_eq!(endpoint_429, ["failure", "success"]);
        assert_eq!(class("response_total", None, "503"), ["success"]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_profile_leaves_the_previous_one_working() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let good = profile(
            "  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 200ms\n",
        );
        cfg.write("web-profile.yaml", &good);
        let proxy = Proxy::with_config(&cfg, &[]);
        let timed_out = || async {
            get_with(proxy.outbound(), AUTHORITY, "/slow", &[("x-delay-ms", "1500")])
                .await
                .unwrap()
                .proxy_error()
                .map(str::to_string)
        };
        assert_eq!(timed_out().await.as_deref(), Some("route timeout"));

        // An invalid regex: reported with file, object and field; the last good version stays.
        cfg.write(
            "web-profile.yaml",
            &profile(
                "  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: \"/slow(\"}\n    timeout: 5s\n",
            ),
        );
        assert!(
            proxy
                .wait_for_log(Duration::from_secs(5), |l| {
                    l.contains("web-profile.yaml") && l.contains("pathRegex")
                })
                .await
                .is_some(),
            "config error logged: {}",
            proxy.log_tail(10)
        );
        assert!(proxy.metric_value("config_errors_total", &[]).unwrap_or(0.0) >= 1.0);
        assert_eq!(timed_out().await.as_deref(), Some("route timeout"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_edited_under_load_changes_behaviour_with_no_request_lost() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let version = |name: &str| {
            profile(&format!(
                "  routes:\n  - name: {name}\n    condition: {{method: GET, pathRegex: /load}}\n    isRetryable: true\n    timeout: 5s\n"
            ))
        };
        cfg.write("web-profile.yaml", &version("load-v0"));
        let proxy = Proxy::with_config(&cfg, &[]);
        let addr = proxy.outbound();

        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = h1_client(addr).await;
                let (mut ok, mut failed) = (0usize, Vec::new());
                for _ in 0..20_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match send_h1(&mut client, h1_request("GET", AUTHORITY, "/load", empty())).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{} {:?}", r.status, r.proxy_error())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            }));
        }
        for v in 1..=5 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let name = format!("load-v{v}");
            cfg.write("web-profile.yaml", &version(&name));
            let seen = wait_until(
                || route_metric(&proxy, "route_request_total", &name, &[]) > 0.0,
                Duration::from_secs(3),
            )
            .await;
            assert!(seen, "route {name} in use within 3 s");
        }
        stop.store(true, Ordering::SeqCst);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        println!("{ok} requests during 5 profile edits");
        assert!(failed.is_empty(), "lost requests: {:?}", &failed[..failed.len().min(5)]);
        assert!(ok > 100);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_route_metrics_come_from_the_workloads_own_profile() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            &profile("  routes:\n  - name: GET /books/{id}\n    condition: {method: GET, pathRegex: '/books/\\d+'}\n"),
        );
        let proxy = Proxy::with_config(&cfg, &["--inbound-forward", &backend.addr.to_string()]);
        for path in ["/books/1", "/books/22", "/authors"] {
            let rsp = get(proxy.inbound(), "web.default.svc.cluster.local", path).await.unwrap();
            assert_eq!(rsp.status, 200);
        }
        let inbound = [("direction", "inbound")];
        assert_eq!(route_metric(&proxy, "route_request_total", "GET /books/{id}", &inbound), 2.0);
        assert_eq!(route_metric(&proxy, "route_request_total", "[DEFAULT]", &inbound), 1.0);
        assert_eq!(
            route_metric(&proxy, "route_response_total", "GET /books/{id}", &[("direction", "inbound"), ("status_code", "200"), ("classification", "success")]),
            2.0
        );
        // A short Host names the same service, so the same profile applies.
        get(proxy.inbound(), "web", "/books/3").await.unwrap();
        assert_eq!(
            route_metric(&proxy, "route_request_total", "GET /books/{id}", &[("direction", "inbound"), ("dst", "web")]),
            1.0
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Traffic splits and failure accrual
// ---------------------------------------------------------------------------------------------

fn traffic_split(version: &str, weights: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: split.smi-spec.io/{version}\nkind: TrafficSplit\nmetadata:\n  name: web-split\n  namespace: default\nspec:\n  service: web\n  backends:\n"
    );
    for (svc, w) in weights {
        y.push_str(&format!("  - service: {svc}\n    weight: {w}\n"));
    }
    y
}

/// `web` (apex, one backend "web-v1") and `web-v2` (one backend "web-v2").
async fn two_versions() -> (Backend, Backend, ConfigDir) {
    let v1 = Backend::start("web-v1").await;
    let v2 = Backend::start("web-v2").await;
    let cfg = ConfigDir::web(&[v1.addr]);
    cfg.write_service("web-v2", &[HTTP_PORT]);
    cfg.set_endpoints("web-v2", "http", &[v2.addr]);
    (v1, v2, cfg)
}

/// Sends `n` GETs over `conns` connections; returns how many each backend (`x-backend`) served
/// and the failures.
async fn spread(
    proxy: SocketAddr,
    n: usize,
    conns: usize,
) -> (std::collections::HashMap<String, usize>, Vec<String>) {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let count = n / conns + usize::from(c < n % conns);
        tasks.push(tokio::spawn(async move {
            let mut client = h1_client(proxy).await;
            let mut seen = std::collections::HashMap::<String, usize>::new();
            let mut failed = Vec::new();
            for _ in 0..count {
                match send_h1(&mut client, h1_request("GET", AUTHORITY, "/split", empty())).await {
                    Ok(r) if r.status == 200 => {
                        *seen
                            .entry(r.backend().unwrap_or("?").to_string())
                            .or_default() += 1
                    }
                    Ok(r) => failed.push(format!("{} {:?}", r.status, r.proxy_error())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (seen, failed)
        }));
    }
    let mut seen = std::collections::HashMap::new();
    let mut failed = Vec::new();
    for t in tasks {
        let (s, f) = within("split load", Duration::from_secs(45), t)
            .await
            .unwrap();
        for (k, v) in s {
            *seen.entry(k).or_default() += v;
        }
        failed.extend(f);
    }
    (seen, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_90_10_split_lands_within_2_percent_over_10000_requests() {
    test_body(async {
        let (_v1, _v2, cfg) = two_versions().await;
        cfg.write(
            "split.yaml",
            &traffic_split("v1alpha2", &[("web", "90"), ("web-v2", "10")]),
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        const N: usize = 10_000;
        let (seen, failed) = spread(proxy.outbound(), N, 4).await;
        assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
        let v2 = seen.get("web-v2").copied().unwrap_or(0) as f64 / N as f64;
        println!("web-v2 share {:.2}% ({seen:?})", v2 * 100.0);
        assert!((v2 - 0.10).abs() <= 0.02, "web-v2 got {:.2}%", v2 * 100.0);
        // route_actual_* names the backend each attempt went to.
        let text = proxy.metrics();
        let actual = |dst: &str| {
            metric_sum(&text, "route_actual_request_total", |s| {
                s.label("dst") == Some(dst)
            })
            .unwrap_or(0.0)
        };
        assert_eq!(actual(AUTHORITY) as usize, seen["web-v1"]);
        assert_eq!(
            actual("web-v2.default.svc.cluster.local:80") as usize,
            seen["web-v2"]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_shares_of_their_sum_even_when_they_add_to_110() {
    test_body(async {
        let (_v1, _v2, cfg) = two_versions().await;
        // v1alpha1 quantities: 900m + 200m, "percentages" adding to 110.
        cfg.write(
            "split.yaml",
            &traffic_split("v1alpha1", &[("web", "900m"), ("web-v2", "200m")]),
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        const N: usize = 3_000;
        let (seen, failed) = spread(proxy.outbound(), N, 2).await;
        assert!(failed.is_empty(), "{failed:?}");
        let v2 = seen.get("web-v2").copied().unwrap_or(0) as f64 / N as f64;
        println!("web-v2 share {:.2}%", v2 * 100.0);
        assert!(
            (v2 - 2.0 / 11.0).abs() <= 0.03,
            "web-v2 got {:.2}%, expected 18.2%",
            v2 * 100.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_a_split_applies_within_a_second_with_no_request_lost() {
    test_body(async {
        let (v1, v2, cfg) = two_versions().await;
        cfg.write(
            "split.yaml",
            &traffic_split("v1alpha4", &[("web", "100"), ("web-v2", "0")]),
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        let addr = proxy.outbound();
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = h1_client(addr).await;
                let mut failed = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 50_000 {
                    n += 1;
                    match send_h1(&mut client, h1_request("GET", AUTHORITY, "/split", empty()))
                        .await
                    {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failed.push(format!("{} {:?}", r.status, r.proxy_error())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (n, failed)
            })
        };
        assert!(wait_until(|| v1.requests() > 50, Duration::from_secs(10)).await);
        assert_eq!(v2.requests(), 0, "weight 0 gets nothing");

        let changed = Instant::now();
        cfg.write(
            "split.yaml",
            &traffic_split("v1alpha4", &[("web", "0"), ("web-v2", "100")]),
        );
        let v1_before = v1.requests();
        assert!(
            wait_until(|| v2.requests() > 0, OP_TIMEOUT).await,
            "the new split never applied"
        );
        let took = changed.elapsed();
        // Once it applied, v1 stops getting new requests.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v1_settled = v1.requests();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        let (n, failed) = load.await.unwrap();
        println!("split change applied after {took:?}; {n} requests, v1 {v1_before}->{v1_settled}");
        assert_eq!(v1.requests(), v1_settled, "v1 still getting traffic");
        assert!(
            failed.is_empty(),
            "lost requests: {:?}",
            &failed[..failed.len().min(5)]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dst_overrides_send_traffic_to_another_authority() {
    test_body(async {
        let (v1, v2, cfg) = two_versions().await;
        cfg.write(
            "web-profile.yaml",
            &profile("  dstOverrides:\n  - authority: web-v2.default.svc.cluster.local:80\n    weight: 1\n"),
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        let (seen, failed) = spread(proxy.outbound(), 100, 1).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(seen.get("web-v2"), Some(&100), "{seen:?}");
        assert_eq!(v1.requests(), 0);
        assert_eq!(v2.requests(), 100);
    })
    .await
}

/// The wiring of failure accrual (`--failure-accrual consecutive`): a failing endpoint is
/// ejected, logged and counted, and comes back once it answers again. Its timing (backoff,
/// probes, the cap) is tested beside `accrual` with paused time; nothing here races a clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_returns_after_it_recovers() {
    test_body(async {
        let good = Backend::start("good").await;
        let broken = Arc::new(AtomicBool::new(true));
        let flag = broken.clone();
        let bad = backend_with("bad", move |_| {
            if flag.load(Ordering::SeqCst) {
                500
            } else {
                200
            }
        })
        .await;
        let cfg = ConfigDir::web(&[good.addr, bad.addr]);
        let proxy = Proxy::with_config(&cfg, &["--failure-accrual", "consecutive"]);

        // P2C spreads load; the bad endpoint answers fast, so it gets its share until ejected.
        let mut failures = 0;
        for _ in 0..20 {
            let rsps = send_many(proxy.outbound(), "/x", 20).await;
            failures += rsps.iter().filter(|r| r.status == 500).count();
            if bad.requests() >= 7 && proxy.logs_joined().contains("endpoint ejected") {
                break;
            }
        }
        assert!(
            failures >= 7,
            "fewer failures than the accrual threshold: {failures}"
        );
        let ejected = proxy
            .wait_for_log(Duration::from_secs(5), |l| l.contains("endpoint ejected"))
            .await
            .expect("ejection logged");
        assert!(ejected.contains(&bad.addr.to_string()), "{ejected}");
        let ejections = |addr: SocketAddr| {
            proxy
                .metric_sum("endpoint_ejections_total", |s| {
                    s.label("target_addr") == Some(&addr.to_string())
                })
                .unwrap_or(0.0)
        };
        assert!(ejections(bad.addr) >= 1.0);
        // Two endpoints: at most one may be out, and the good one never failed.
        assert_eq!(ejections(good.addr), 0.0);

        // It recovers; after its backoff a probe finds it well and it is back in balancing.
        broken.store(false, Ordering::SeqCst);
        let mut back = false;
        for _ in 0..100 {
            let rsp = get(proxy.outbound(), AUTHORITY, "/x").await.unwrap();
            assert_eq!(rsp.status, 200, "{rsp:?}");
            if rsp.backend() == Some("bad") {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "recovered endpoint never got traffic again");
        assert!(proxy
            .wait_for_log(Duration::from_secs(5), |l| l.contains("endpoint recovered"))
            .await
            .is_some());
    })
    .await
}

/// The story's outage, fixed: failures of one path of a one-endpoint service used to eject the
/// endpoint, and every route of the service answered 503 for a while. Ejecting the last
/// endpoint is never done: the would-be ejections are counted and logged instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_failing_endpoint_is_never_ejected_into_an_outage() {
    test_body(async {
        let backend = Backend::start_with(
            "only",
            Arc::new(|req, _st| {
                let status = if req.uri().path() == "/broken" {
                    500
                } else {
                    200
                };
                Box::pin(async move {
                    Response::builder()
                        .status(StatusCode::from_u16(status).unwrap())
                        .body(empty())
                        .unwrap()
                })
            }),
        )
        .await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &["--failure-accrual", "consecutive"]);
        let broken = send_many(proxy.outbound(), "/broken", 28).await;
        assert!(
            broken
                .iter()
                .all(|r| r.status == 500 && r.proxy_error().is_none()),
            "every request reached the endpoint"
        );
        // Every other route of the service still works, at once.
        let fine = send_many(proxy.outbound(), "/fine", 10).await;
        assert!(fine.iter().all(|r| r.status == 200), "{fine:?}");
        assert_eq!(
            backend.requests(),
            38,
            "no request was refused by the proxy"
        );
        let metric = |name| proxy.metric_sum(name, |_| true).unwrap_or(0.0);
        assert_eq!(metric("endpoint_ejections_total"), 0.0);
        assert_eq!(
            metric("endpoint_ejections_capped_total"),
            4.0,
            "28 failures, 7 at a time"
        );
        assert!(proxy
            .wait_for_log(Duration::from_secs(5), |l| l
                .contains("endpoint not ejected"))
            .await
            .is_some());
    })
    .await
}

/// Failure accrual is off unless asked for, as in Linkerd: a failing endpoint keeps its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_accrual_is_off_by_default() {
    test_body(async {
        let bad = backend_with("bad", |_| 503).await;
        let cfg = ConfigDir::web(&[bad.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let rsps = send_many(proxy.outbound(), "/x", 20).await;
        assert!(rsps
            .iter()
            .all(|r| r.status == 503 && r.proxy_error().is_none()));
        assert_eq!(bad.requests(), 20);
        let counted = proxy
            .metric_sum("endpoint_ejections_capped_total", |_| true)
            .unwrap_or(0.0);
        assert_eq!(counted, 0.0, "accrual ran");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_are_retried_with_their_body_over_the_endpoints_h2_connection() {
    test_body(async {
        let backend = backend_with("web-a", |n| if n % 2 == 0 { 503 } else { 200 }).await;
        let cfg = web_with_profile(&[backend.addr], "  routes:\n  - name: PUT /items\n    condition: {method: PUT, pathRegex: /items/.*}\n    isRetryable: true\n");
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut client = h2_client(proxy.outbound()).await;
        for i in 0..5 {
            let req = Request::builder()
                .method("PUT")
                .uri(format!("http://{AUTHORITY}/items/{i}"))
                .body(full(vec![b'z'; 1000 + i]))
                .unwrap();
            let rsp = send_h2(&mut client, req).await.expect("response");
            assert_eq!(rsp.status, 200, "request {i} retried");
            assert_eq!(rsp.text(), (1000 + i).to_string(), "whole body replayed");
        }
        assert_eq!(backend.requests(), 10);
        assert_eq!(
            route_metric(&proxy, "route_actual_request_total", "PUT /items", &[]),
            10.0
        );
        assert_eq!(route_metric(&proxy, "route_request_total", "PUT /items", &[]), 5.0);
    })
    .await
}
