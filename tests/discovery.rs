//! Discovery through `--config-dir` (Service + EndpointSlice YAML, watched live) and balancing.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::task::JoinHandle;

/// How quickly an EndpointSlice change must take effect: the brief's 1 s plus scheduling slack
/// for a loaded 2-core machine. The observed latency is printed either way.
const RELOAD_DEADLINE: Duration = Duration::from_millis(2000);

/// Closed-loop load: `conns` client connections each sending sequential GETs until stopped
/// (bounded by count and by the per-request timeout).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<(usize, Vec<String>)>>,
}

const MAX_REQUESTS_PER_CONN: usize = 5_000;

impl Load {
    fn start(proxy_addr: SocketAddr, authority: &'static str, conns: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..conns)
            .map(|c| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut ok = 0;
                    let mut failures = Vec::new();
                    let mut client = h1_client(proxy_addr).await;
                    for i in 0..MAX_REQUESTS_PER_CONN {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let req = h1_request("GET", authority, "/load", empty());
                        match send_h1(&mut client, req).await {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failures.push(format!(
                                "conn {c} request {i}: status {} pylon-proxy-error {:?} body {:?}",
                                r.status,
                                r.proxy_error(),
                                r.text()
                            )),
                            Err(e) => {
                                failures.push(format!("conn {c} request {i}: error {e}"));
                                client = h1_client(proxy_addr).await;
                            }
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut ok = 0;
        let mut failures = Vec::new();
        for t in self.tasks {
            let (o, f) = within("load task", Duration::from_secs(20), t)
                .await
                .expect("load task panicked");
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_name_forms_resolve() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &["--namespace", "default"]);

        for authority in [
            "web",
            "web:80",
            "web.default",
            "web.default:80",
            "web.default.svc.cluster.local",
            "web.default.svc.cluster.local:80",
        ] {
            let resp = get(proxy.outbound(), authority, "/")
                .await
                .unwrap_or_else(|e| panic!("Host: {authority}: {e}"));
            assert_eq!(
                resp.status, 200,
                "Host: {authority} did not resolve: {resp:?}"
            );
            assert_eq!(resp.backend(), Some("web-a"), "Host: {authority}");
        }
        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send("GET http://web.default/abs HTTP/1.1\r\nHost: web.default\r\n\r\n")
            .await;
        let resp = raw.response().await.expect("absolute-form response");
        assert_eq!(
            resp.status, 200,
            "absolute-form http://web.default/: {resp:?}"
        );
        assert_eq!(resp.text(), "web-a");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_port_maps_to_endpoint_port_by_name() {
    test_body(async {
        let web = Backend::start("multi-http").await;
        let admin = Backend::start("multi-admin").await;
        let cfg = ConfigDir::new();
        cfg.write_service(
            "multi",
            &[
                SvcPort {
                    name: "http",
                    port: 80,
                    target: "http",
                },
                SvcPort {
                    name: "admin",
                    port: 9990,
                    target: "admin",
                },
            ],
        );
        // Port list in the opposite order to the Service's: mapping must be by name.
        cfg.write(
            "multi-endpoints.yaml",
            &slice_yaml(
                "multi-1",
                "multi",
                "default",
                &[("admin", admin.addr.port()), ("http", web.addr.port())],
                &["127.0.0.1".parse().unwrap()],
                true,
            ),
        );
        let proxy = Proxy::with_config(&cfg, &[]);

        let resp = get(proxy.outbound(), "multi.default.svc.cluster.local:80", "/")
            .await
            .expect("port 80");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(
            resp.backend(),
            Some("multi-http"),
            "service port 80 (name http) must map to the slice port named http"
        );
        let resp = get(
            proxy.outbound(),
            "multi.default.svc.cluster.local:9990",
            "/",
        )
        .await
        .expect("port 9990");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(
            resp.backend(),
            Some("multi-admin"),
            "service port 9990 (name admin) must map to the slice port named admin"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn added_endpoint_takes_effect_under_load_without_errors() {
    test_body(async {
        let a = Backend::start("web-a").await;
        let b = Backend::start("web-b").await;
        let cfg = ConfigDir::web(&[a.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);

        let load = Load::start(proxy.outbound(), WEB_FQDN, 4);
        assert!(
            wait_until(|| a.requests() >= 20, Duration::from_secs(10)).await,
            "load did not reach the first endpoint"
        );
        cfg.set_endpoints("web", "http", &[a.addr, b.addr]);
        let changed = Instant::now();
        let reached = wait_until(|| b.requests() > 0, Duration::from_secs(10)).await;
        let latency = b
            .state
            .recorded()
            .first()
            .map(|r| r.at.saturating_duration_since(changed));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, failures) = load.finish().await;

        eprintln!(
            "endpoint added: first request after {latency:?}; {ok} ok, a={} b={}",
            a.requests(),
            b.requests()
        );
        assert!(
            failures.is_empty(),
            "{} of {} requests failed while an endpoint was added:\n{}",
            failures.len(),
            ok + failures.len(),
            failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            reached,
            "the added endpoint never received a request within 10 s"
        );
        let latency = latency.unwrap();
        assert!(
            latency <= RELOAD_DEADLINE,
            "the added endpoint got its first request {latency:?} after the EndpointSlice \
             file was rewritten (want <= 1 s; limit with slack {RELOAD_DEADLINE:?})"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_endpoint_drains_without_losing_requests() {
    test_body(async {
        let a = Backend::with_delay("web-a", Duration::from_millis(200)).await;
        let b = Backend::with_delay("web-b", Duration::from_millis(200)).await;
        let cfg = ConfigDir::web(&[a.addr, b.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);

        let load = Load::start(proxy.outbound(), WEB_FQDN, 6);
        // Remove B while it has requests in flight.
        assert!(
            wait_until(
                || b.state.in_flight() > 0 && a.requests() > 5,
                Duration::from_secs(10)
            )
            .await,
            "load did not reach both endpoints (a={}, b={})",
            a.requests(),
            b.requests()
        );
        cfg.set_endpoints("web", "http", &[a.addr]);
        let removed = Instant::now();
        let a_before = a.requests();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (ok, failures) = load.finish().await;

        assert!(
            failures.is_empty(),
            "{} of {} requests failed while an endpoint was removed (in-flight requests must \
             complete):\n{}",
            failures.len(),
            ok + failures.len(),
            failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let late: Vec<Duration> = b
            .state
            .recorded()
            .iter()
            .filter(|r| r.at > removed + RELOAD_DEADLINE)
            .map(|r| r.at - removed)
            .collect();
        assert!(
            late.is_empty(),
            "the removed endpoint still received {} new request(s) more than {RELOAD_DEADLINE:?} \
             after removal, at {:?}",
            late.len(),
            late.iter().take(10).collect::<Vec<_>>()
        );
        let last_b = b
            .state
            .recorded()
            .last()
            .map(|r| r.at.saturating_duration_since(removed));
        eprintln!("endpoint removed: last request to it started {last_b:?} after removal");
        assert_eq!(
            b.state.completed.load(Ordering::SeqCst),
            b.requests(),
            "requests in flight at the removed endpoint did not complete"
        );
        assert!(
            a.requests() > a_before,
            "the remaining endpoint got no requests after the removal"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p2c_peak_ewma_prefers_the_fast_endpoint() {
    test_body(async {
        let fast = Backend::with_delay("fast", Duration::from_millis(1)).await;
        let slow = Backend::with_delay("slow", Duration::from_millis(50)).await;
        let cfg = ConfigDir::web(&[fast.addr, slow.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);

        const N: usize = 300;
        let mut client = h1_client(proxy.outbound()).await;
        for i in 0..N {
            let resp = send_h1(&mut client, h1_request("GET", WEB_FQDN, "/", empty()))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        }
        let (f, s) = (fast.requests(), slow.requests());
        eprintln!("p2c: fast={f} slow={s}");
        assert_eq!(f + s, N);
        assert!(
            s * 3 < f,
            "over {N} sequential requests the 50 ms endpoint got {s} and the 1 ms endpoint \
             {f}: the balancer does not prefer the faster endpoint (P2C + PeakEWMA expected)"
        );
    })
    .await
}

/// An endpoint that refuses connections fails fast, which must not make it look fast: after a
/// refusal the balancer steers the traffic to the endpoint that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusing_endpoint_does_not_attract_traffic() {
    test_body(async {
        let healthy = Backend::start("healthy").await;
        let refusing = closed_port();
        let cfg = ConfigDir::web(&[healthy.addr, refusing]);
        let proxy = Proxy::with_config(&cfg, &[]);

        const N: usize = 200;
        let mut refused = 0;
        for i in 0..N {
            let resp = get(proxy.outbound(), WEB_FQDN, "/")
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            match resp.status.as_u16() {
                200 => {}
                502 => refused += 1,
                other => panic!("request {i}: unexpected {other}: {resp:?}"),
            }
        }
        eprintln!("refusing endpoint: {refused} of {N} requests got 502");
        assert_eq!(healthy.requests() + refused, N);
        assert!(
            refused <= 5,
            "{refused} of {N} requests went to the endpoint that refuses connections"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_endpoints_fails_fast_with_503() {
    test_body(async {
        let cfg = ConfigDir::web(&[]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let start = Instant::now();
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        let took = start.elapsed();
        assert_eq!(resp.status, 503, "no endpoints: {resp:?}");
        assert!(
            resp.proxy_error().is_some(),
            "503 lacks pylon-proxy-error: {resp:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "503 for a service without endpoints took {took:?}; it should fail fast"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ip_port_authority_without_service_is_forwarded() {
    test_body(async {
        let backend = Backend::start("direct").await;
        let cfg = ConfigDir::new();
        let proxy = Proxy::with_config(&cfg, &[]);
        let authority = backend.addr.to_string();

        let resp = get(proxy.outbound(), &authority, "/direct")
            .await
            .expect("response");
        assert_eq!(resp.status, 200, "Host: {authority}: {resp:?}");
        assert_eq!(resp.backend(), Some("direct"));

        let mut raw = RawConn::connect(proxy.outbound()).await;
        raw.send(format!(
            "GET http://{authority}/abs HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        ))
        .await;
        let resp = raw.response().await.expect("absolute-form response");
        assert_eq!(
            resp.status, 200,
            "absolute-form http://{authority}/: {resp:?}"
        );
        assert_eq!(resp.text(), "direct");
        assert_eq!(backend.requests(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_name_falls_back_to_dns() {
    test_body(async {
        let backend = Backend::start("dns").await;
        let cfg = ConfigDir::new();
        let proxy = Proxy::with_config(&cfg, &[]);
        // `localhost` is in /etc/hosts as 127.0.0.1 and has no Service.
        let authority = format!("localhost:{}", backend.addr.port());
        let resp = get(proxy.outbound(), &authority, "/")
            .await
            .expect("response");
        assert_eq!(
            resp.status, 200,
            "Host: {authority} (no Service) should resolve through DNS: {resp:?}"
        );
        assert_eq!(resp.backend(), Some("dns"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_yaml_keeps_last_good_endpoints_and_warns() {
    test_body(async {
        let a = Backend::start("web-a").await;
        let b = Backend::start("web-b").await;
        let cfg = ConfigDir::web(&[a.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let resp = get(proxy.outbound(), WEB_FQDN, "/")
            .await
            .expect("response");
        assert_eq!(resp.backend(), Some("web-a"), "{resp:?}");

        let file = ConfigDir::endpoints_file("web");
        cfg.write(
            &file,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: [unclosed\n  \
             endpoints: {{{\n",
        );
        let warn = proxy
            .wait_for_log(Duration::from_secs(5), |l| {
                l.contains(&file)
                    && serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("level").and_then(|l| l.as_str()).map(str::to_string))
                        .is_some_and(|lvl| lvl.eq_ignore_ascii_case("warn"))
            })
            .await;
        assert!(
            warn.is_some(),
            "no WARN log line naming {file:?} after invalid YAML was written; recent logs:\n{}",
            proxy.log_tail(20)
        );

        for i in 0..20 {
            let resp = get(proxy.outbound(), WEB_FQDN, "/")
                .await
                .unwrap_or_else(|e| panic!("request {i} after invalid YAML: {e}"));
            assert_eq!(
                resp.status, 200,
                "request {i} after invalid YAML: the last good endpoints must keep working: \
                 {resp:?}"
            );
            assert_eq!(resp.backend(), Some("web-a"));
        }

        // The watcher is still alive: a good file is picked up again.
        cfg.set_endpoints("web", "http", &[b.addr]);
        let mut switched = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let resp = get(proxy.outbound(), WEB_FQDN, "/")
                .await
                .expect("response");
            if resp.backend() == Some("web-b") {
                switched = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            switched,
            "a valid EndpointSlice written after an invalid one was not picked up within 5 s"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_endpoints_get_no_traffic() {
    test_body(async {
        let ready = Backend::start("ready").await;
        let not_ready = Backend::start("not-ready").await;
        let cfg = ConfigDir::new();
        cfg.write_service("web", &[HTTP_PORT]);
        let ip = ["127.0.0.1".parse().unwrap()];
        let slices = [
            slice_yaml(
                "web-r",
                "web",
                "default",
                &[("http", ready.addr.port())],
                &ip,
                true,
            ),
            slice_yaml(
                "web-n",
                "web",
                "default",
                &[("http", not_ready.addr.port())],
                &ip,
                false,
            ),
        ]
        .join("---\n");
        cfg.write("web-endpoints.yaml", &slices);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut client = h1_client(proxy.outbound()).await;
        for i in 0..30 {
            let resp = send_h1(&mut client, h1_request("GET", WEB_FQDN, "/", empty()))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        }
        assert_eq!(
            not_ready.requests(),
            0,
            "an endpoint with conditions.ready=false received traffic"
        );
        assert_eq!(ready.requests(), 30);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespaces_are_respected() {
    test_body(async {
        let in_default = Backend::start("web-default").await;
        let in_other = Backend::start("web-other").await;
        let cfg = ConfigDir::web(&[in_default.addr]);
        cfg.write(
            "web-other-service.yaml",
            &service_yaml("web", "other", &[HTTP_PORT]),
        );
        cfg.write(
            "web-other-endpoints.yaml",
            &endpoint_slices_yaml("web", "other", "http", &[in_other.addr]),
        );
        let proxy = Proxy::with_config(&cfg, &["--namespace", "default"]);
        for (authority, want) in [
            ("web", "web-default"),
            ("web.default", "web-default"),
            ("web.other", "web-other"),
            ("web.other.svc.cluster.local", "web-other"),
            ("web.default.svc.cluster.local", "web-default"),
        ] {
            let resp = get(proxy.outbound(), authority, "/")
                .await
                .unwrap_or_else(|e| panic!("Host: {authority}: {e}"));
            assert_eq!(resp.status, 200, "Host: {authority}: {resp:?}");
            assert_eq!(resp.backend(), Some(want), "Host: {authority}");
        }
        drop(proxy);

        // `web` alone resolves in the proxy's own namespace.
        let proxy = Proxy::with_config(&cfg, &["--namespace", "other"]);
        let resp = get(proxy.outbound(), "web", "/").await.expect("response");
        assert_eq!(
            resp.backend(),
            Some("web-other"),
            "with --namespace other, `web` must mean web.other: {resp:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_added_at_runtime_is_picked_up() {
    test_body(async {
        let backend = Backend::start("api").await;
        let cfg = ConfigDir::new();
        let proxy = Proxy::with_config(&cfg, &[]);
        tokio::time::sleep(Duration::from_millis(200)).await;

        cfg.write_service("api", &[HTTP_PORT]);
        cfg.set_endpoints("api", "http", &[backend.addr]);
        let written = Instant::now();
        let mut last = None;
        while written.elapsed() < Duration::from_secs(5) {
            if let Ok(r) = get(proxy.outbound(), "api.default.svc.cluster.local", "/").await {
                if r.status == 200 && r.backend() == Some("api") {
                    eprintln!("new service usable after {:?}", written.elapsed());
                    return;
                }
                last = Some(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "a Service + EndpointSlice written at runtime was not usable within 5 s; last {last:?}"
        );
    })
    .await
}
