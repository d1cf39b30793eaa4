//! Live tap over Linkerd's gRPC API (`io.linkerd.proxy.tap.Tap/Observe`), observed with a client
//! generated from the same `linkerd2-proxy-api` crate Linkerd's own tap uses.

mod support;

use linkerd2_proxy_api::tap::observe_request::r#match::{self as pb, http as pbhttp};
use linkerd2_proxy_api::tap::observe_request::Match;
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::tap_event::{self, http::Event as HttpEvent};
use linkerd2_proxy_api::tap::{ObserveRequest, TapEvent};
use support::*;

const AUTHORITY: &str = "web.default.svc.cluster.local:80";

fn path_prefix(p: &str) -> Option<Match> {
    Some(Match {
        r#match: Some(pb::Match::Http(pb::Http {
            r#match: Some(pbhttp::Match::Path(pbhttp::StringMatch {
                r#match: Some(pbhttp::string_match::Match::Prefix(p.into())),
            })),
        })),
    })
}

async fn client(proxy: &Proxy) -> TapClient<tonic::transport::Channel> {
    connect(proxy, None).await
}

/// `window`: the client's h2 flow-control window, small to make a stalled client fill up fast.
async fn connect(proxy: &Proxy, window: Option<u32>) -> TapClient<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.tap()))
        .expect("endpoint")
        .initial_stream_window_size(window)
        .initial_connection_window_size(window);
    let channel = within("tap connect", OP_TIMEOUT, endpoint.connect())
        .await
        .expect("tap client connects");
    TapClient::new(channel)
}

fn http(ev: &TapEvent) -> &HttpEvent {
    match &ev.event {
        Some(tap_event::Event::Http(tap_event::Http { event: Some(e) })) => e,
        other => panic!("not an http event: {other:?}"),
    }
}

fn label<'a>(ev: &'a TapEvent, key: &str) -> Option<&'a str> {
    ev.destination_meta
        .as_ref()
        .and_then(|m| m.labels.get(key))
        .map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linkerds_tap_client_observes_matching_requests_up_to_its_limit() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {name: web.default.svc.cluster.local, namespace: default}\nspec:\n  routes:\n  - name: GET /tapped\n    condition: {method: GET, pathRegex: /tapped/.*}\n",
        );
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut tap = client(&proxy).await;
        let mut stream = tap
            .observe(ObserveRequest {
                limit: 3,
                r#match: path_prefix("/tapped"),
                extract: None,
            })
            .await
            .expect("observe accepted")
            .into_inner();
        // The proxy registers the tap before it answers Observe's headers: no wait needed.

        for i in 0..2 {
            get(proxy.outbound(), AUTHORITY, &format!("/other/{i}")).await.unwrap();
        }
        for i in 0..5 {
            let rsp = get_with(
                proxy.outbound(),
                AUTHORITY,
                &format!("/tapped/{i}"),
                &[("authorization", "Bearer s3cret"), ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            )
            .await
            .unwrap();
            assert_eq!(rsp.status, 200);
        }

        let mut events = Vec::new();
        while let Some(ev) = within("tap event", OP_TIMEOUT, stream.message())
            .await
            .expect("tap stream")
        {
            events.push(ev);
        }
        // The limit: 3 requests, 3 events each, then the stream ends.
        assert_eq!(events.len(), 9, "{events:#?}");
        let mut paths = Vec::new();
        for ev in &events {
            assert_eq!(ev.proxy_direction, tap_event::ProxyDirection::Outbound as i32);
            assert_eq!(
                std::net::SocketAddr::try_from(ev.destination.unwrap()).unwrap(),
                backend.addr
            );
            assert!(ev.source.is_some());
            assert_eq!(
                ev.route_meta.as_ref().unwrap().labels.get("route").map(String::as_str),
                Some("GET /tapped")
            );
            assert_eq!(label(ev, "pylon.io/trace-id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
            match http(ev) {
                HttpEvent::RequestInit(req) => {
                    assert_eq!(req.authority, AUTHORITY);
                    paths.push(req.path.clone());
                    let hs = &req.headers.as_ref().unwrap().headers;
                    let auth = hs.iter().find(|h| h.name == "authorization").unwrap();
                    assert_eq!(auth.value, b"REDACTED");
                }
                HttpEvent::ResponseInit(rsp) => assert_eq!(rsp.http_status, 200),
                HttpEvent::ResponseEnd(end) => {
                    assert!(end.response_bytes > 0);
                    assert!(end.since_request_init.is_some());
                }
            }
        }
        assert_eq!(paths, ["/tapped/0", "/tapped/1", "/tapped/2"]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_proxy_errors_show_in_the_events() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {name: web.default.svc.cluster.local, namespace: default}\nspec:\n  routes:\n  - name: GET /flaky\n    condition: {method: GET, pathRegex: /flaky}\n    isRetryable: true\n  retryBudget: {retryRatio: 0.0, minRetriesPerSecond: 1, ttl: 1s}\n",
        );
        // A service without endpoints, for a response the proxy makes itself.
        cfg.write_service("empty", &[HTTP_PORT]);
        cfg.set_endpoints("empty", "http", &[]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut tap = client(&proxy).await;
        let mut stream = tap
            .observe(ObserveRequest {
                limit: 0,
                r#match: None,
                extract: None,
            })
            .await
            .unwrap()
            .into_inner();
        // The proxy registers the tap before it answers Observe's headers: no wait needed.

        // Both attempts fail (the budget allows one retry): each appears, numbered.
        let rsp = get_with(proxy.outbound(), AUTHORITY, "/flaky", &[("x-status", "503")])
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);
        assert_eq!(backend.requests(), 2);
        // A destination with no endpoints: the proxy answers, and says so.
        let rsp = get(proxy.outbound(), "empty.default.svc.cluster.local:80", "/nothing")
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);

        let mut attempts = Vec::new();
        let mut proxy_error = None;
        while proxy_error.is_none() {
            let ev = within("tap event", OP_TIMEOUT, stream.message())
                .await
                .unwrap()
                .expect("stream open");
            if let HttpEvent::ResponseInit(rsp) = http(&ev) {
                if let Some(a) = label(&ev, "pylon.io/retry-attempt") {
                    attempts.push((a.to_string(), rsp.http_status));
                }
                if let Some(e) = label(&ev, "pylon-proxy-error") {
                    proxy_error = Some((e.to_string(), rsp.http_status));
                }
            }
        }
        assert_eq!(
            attempts,
            [("1".to_string(), 503), ("2".to_string(), 503)],
            "retries visible"
        );
        assert_eq!(proxy_error, Some(("no endpoints".to_string(), 503)));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_outside_the_allowed_networks_are_refused() {
    test_body(async {
        let proxy = Proxy::start(&["--tap-allow", "10.0.0.0/8"]);
        let mut tap = client(&proxy).await;
        let err = tap
            .observe(ObserveRequest::default())
            .await
            .expect_err("loopback is not in 10.0.0.0/8");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_tap_client_never_slows_traffic() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut tap = connect(&proxy, Some(16 * 1024)).await;
        let mut req = tonic::Request::new(ObserveRequest::default());
        req.metadata_mut()
            .insert("pylon-tap-max-rps", "100000".parse().unwrap());
        // Opened and never read.
        let _stalled = tap.observe(req).await.unwrap().into_inner();
        // The proxy registers the tap before it answers Observe's headers: no wait needed.

        let mut client = h1_client(proxy.outbound()).await;
        for i in 0..1_500 {
            let rsp = send_h1(&mut client, h1_request("GET", AUTHORITY, "/x", empty()))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(rsp.status, 200);
        }
        let dropped = proxy
            .metric_value("tap_events_dropped_total", &[])
            .unwrap_or(0.0);
        assert!(
            dropped > 0.0,
            "events beyond the queue are dropped and counted"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_taps_each_get_their_own_events() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let mut streams = Vec::new();
        for prefix in ["/a", "/b", "/"] {
            let mut tap = client(&proxy).await;
            streams.push(
                tap.observe(ObserveRequest {
                    limit: 2,
                    r#match: path_prefix(prefix),
                    extract: None,
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        for path in ["/a/1", "/b/1", "/a/2", "/b/2"] {
            get(proxy.outbound(), AUTHORITY, path).await.unwrap();
        }
        let mut seen = Vec::new();
        for stream in &mut streams {
            let mut paths = Vec::new();
            while let Some(ev) = within("tap event", OP_TIMEOUT, stream.message())
                .await
                .expect("tap stream")
            {
                if let HttpEvent::RequestInit(req) = http(&ev) {
                    paths.push(req.path.clone());
                }
            }
            seen.push(paths);
        }
        assert_eq!(seen[0], ["/a/1", "/a/2"]);
        assert_eq!(seen[1], ["/b/1", "/b/2"]);
        assert_eq!(seen[2], ["/a/1", "/b/1"], "limit 2 on the catch-all tap");
    })
    .await
}

/// One request's events, by the stream id they share.
#[derive(Default, Debug)]
struct Exchange {
    direction: i32,
    path: Option<String>,
    status: Option<u32>,
    /// `l5d-proxy-error` among the response headers, as Linkerd's proxy sets it.
    l5d_proxy_error: Option<String>,
    /// The `pylon-proxy-error` label on the response and on its end.
    rsp_label: Option<String>,
    end_label: Option<String>,
    reset: bool,
    ended: bool,
}

/// Every response the proxy makes itself (a route timeout, a refused connection, no endpoints,
/// an authorization denial) reaches a tap as a response with its status and reason, carried
/// as Linkerd's proxy carries it (`l5d-proxy-error` among the response headers), in both
/// directions; none ends as a bare reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_proxy_made_response_is_a_response_event_in_both_directions() {
    use linkerd2_proxy_api::tap::eos;
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        cfg.write(
            "web-profile.yaml",
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {name: web.default.svc.cluster.local, namespace: default}\nspec:\n  routes:\n  - name: GET /slow\n    condition: {method: GET, pathRegex: /slow}\n    timeout: 300ms\n",
        );
        cfg.write_service("refused", &[HTTP_PORT]);
        cfg.set_endpoints("refused", "http", &[closed_port()]);
        cfg.write_service("empty", &[HTTP_PORT]);
        cfg.set_endpoints("empty", "http", &[]);
        cfg.write("web-server.yaml", &identity_only_server_yaml(backend.addr.port()));
        let forward = backend.addr.to_string();
        let proxy = Proxy::with_config(
            &cfg,
            &["--inbound-forward", &forward, "--workload-labels", "app=web", "--namespace", "default"],
        );
        let mut tap = client(&proxy).await;
        let mut stream = tap
            .observe(ObserveRequest::default())
            .await
            .expect("observe accepted")
            .into_inner();

        // The backend would answer after 30 s; the route's timeout answers at 300 ms.
        let rsp = get_with(proxy.outbound(), AUTHORITY, "/slow", &[("x-delay-ms", "30000")])
            .await
            .unwrap();
        assert_eq!(rsp.status, 504, "{}", rsp.text());
        assert_eq!(rsp.proxy_error(), Some("route timeout"));
        assert_eq!(rsp.header("l5d-proxy-error"), Some("route timeout"));
        let rsp = get(proxy.outbound(), "refused.default.svc.cluster.local:80", "/refused")
            .await
            .unwrap();
        assert_eq!(rsp.status, 502, "{}", rsp.text());
        let rsp = get(proxy.outbound(), "empty.default.svc.cluster.local:80", "/empty")
            .await
            .unwrap();
        assert_eq!(rsp.status, 503);
        let rsp = get(proxy.inbound(), "web", "/denied").await.unwrap();
        assert_eq!(rsp.status, 403, "{}", rsp.text());
        assert_eq!(backend.requests(), 1, "only /slow reached the backend");

        let mut seen: std::collections::HashMap<u64, Exchange> = Default::default();
        while seen.values().filter(|x| x.ended).count() < 4 {
            let ev = within("tap event", OP_TIMEOUT, stream.message())
                .await
                .expect("tap stream")
                .expect("stream open");
            let label = label(&ev, "pylon-proxy-error").map(str::to_owned);
            let x = match http(&ev) {
                HttpEvent::RequestInit(req) => {
                    let id = req.id.unwrap().stream;
                    let x = seen.entry(id).or_default();
                    x.path = Some(req.path.clone());
                    x
                }
                HttpEvent::ResponseInit(rsp) => {
                    let id = rsp.id.unwrap().stream;
                    let x = seen.entry(id).or_default();
                    x.status = Some(rsp.http_status);
                    x.rsp_label = label;
                    x.l5d_proxy_error = rsp
                        .headers
                        .iter()
                        .flat_map(|h| &h.headers)
                        .find(|h| h.name == "l5d-proxy-error")
                        .map(|h| String::from_utf8_lossy(&h.value).into_owned());
                    x
                }
                HttpEvent::ResponseEnd(end) => {
                    let id = end.id.unwrap().stream;
                    let x = seen.entry(id).or_default();
                    x.ended = true;
                    x.end_label = label;
                    x.reset = matches!(
                        end.eos.as_ref().and_then(|e| e.end.as_ref()),
                        Some(eos::End::ResetErrorCode(_))
                    );
                    x
                }
            };
            x.direction = ev.proxy_direction;
        }
        drop(stream);
        let out = tap_event::ProxyDirection::Outbound as i32;
        let inb = tap_event::ProxyDirection::Inbound as i32;
        for (path, direction, status, reason) in [
            ("/slow", out, 504, "route timeout"),
            ("/refused", out, 502, "endpoint connection refused"),
            ("/empty", out, 503, "no endpoints"),
            ("/denied", inb, 403, "unauthorized connection"),
        ] {
            let x = seen
                .values()
                .find(|x| x.path.as_deref() == Some(path))
                .unwrap_or_else(|| panic!("no request event for {path}: {seen:#?}"));
            assert_eq!(x.direction, direction, "{path}: {x:?}");
            assert_eq!(x.status, Some(status), "{path}: {x:?}");
            assert_eq!(x.l5d_proxy_error.as_deref(), Some(reason), "{path}: {x:?}");
            assert_eq!(x.rsp_label.as_deref(), Some(reason), "{path}: {x:?}");
            assert_eq!(x.end_label.as_deref(), Some(reason), "{path}: {x:?}");
            assert!(!x.reset, "{path} ended as a reset: {x:?}");
        }
    })
    .await
}
