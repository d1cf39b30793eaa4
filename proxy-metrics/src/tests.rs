//! Tests that record through the handles, encode, parse the text back and
//! check series, labels and values; plus `promtool check metrics`.

use super::*;
use std::collections::BTreeMap;
use std::time::Duration;

// ---------------------------------------------------------------------------
// The exposition read back, labels by name.

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an OpenMetrics text, read back with [`crate::exposition`].
fn parse(text: &str) -> Vec<Sample> {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    crate::exposition::parse(text)
        .unwrap_or_else(|e| panic!("{e} in:\n{text}"))
        .into_iter()
        .map(|s| {
            let mut labels = BTreeMap::new();
            for (k, v) in s.labels {
                assert!(
                    labels.insert(k, v).is_none(),
                    "duplicate label in {}",
                    s.name
                );
            }
            Sample {
                name: s.name,
                labels,
                value: s.value,
            }
        })
        .collect()
}

fn encode(m: &Metrics) -> String {
    let mut out = String::new();
    m.encode(&mut out).expect("encode");
    out
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The samples named `name` whose labels include all of `subset`.
fn find<'a>(samples: &'a [Sample], name: &str, subset: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && subset
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The value of the only sample named `name` with exactly `all` labels.
fn value_exact(samples: &[Sample], name: &str, all: &BTreeMap<String, String>) -> f64 {
    let found: Vec<_> = samples
        .iter()
        .filter(|s| s.name == name && &s.labels == all)
        .collect();
    assert_eq!(found.len(), 1, "{name}{all:?} in {samples:#?}");
    found[0].value
}

fn proxy_labels() -> ProxyLabels {
    ProxyLabels {
        namespace: Some("default".into()),
        deployment: Some("web".into()),
        pod: Some("web-5d8f-abcde".into()),
    }
}

const PROXY: &[(&str, &str)] = &[
    ("namespace", "default"),
    ("deployment", "web"),
    ("pod", "web-5d8f-abcde"),
];

fn outbound() -> TargetLabels {
    TargetLabels::new(
        Direction::Outbound,
        "books.default.svc.cluster.local:8080",
        "10.1.2.3:8080",
        Tls::NoIdentity("not_provided_by_service_discovery"),
    )
    .with_dst_service("books")
    .with_dst_namespace("default")
}

const OUTBOUND: &[(&str, &str)] = &[
    ("direction", "outbound"),
    ("authority", "books.default.svc.cluster.local:8080"),
    ("target_addr", "10.1.2.3:8080"),
    ("tls", "no_identity"),
    ("no_tls_reason", "not_provided_by_service_discovery"),
    ("dst_service", "books"),
    ("dst_namespace", "default"),
];

fn inbound() -> TargetLabels {
    TargetLabels::new(
        Direction::Inbound,
        "web.default.svc.cluster.local:80",
        "127.0.0.1:8080",
        Tls::Secured,
    )
    .with_srv_port(8080)
}

const INBOUND: &[(&str, &str)] = &[
    ("direction", "inbound"),
    ("authority", "web.default.svc.cluster.local:80"),
    ("target_addr", "127.0.0.1:8080"),
    ("tls", "true"),
    ("srv_port", "8080"),
];

fn with(base: &[&[(&str, &str)]], extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut all: Vec<(&str, &str)> = base.iter().flat_map(|b| b.iter().copied()).collect();
    all.extend_from_slice(extra);
    labels(&all)
}

// ---------------------------------------------------------------------------

#[test]
fn handles_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Metrics>();
    check::<HttpTarget>();
    check::<TcpTarget>();
    check::<TcpConnMetrics>();
}

#[test]
fn http_series_and_labels() {
    let m = Metrics::new(proxy_labels());
    let t = m.http_target(outbound());
    for _ in 0..6 {
        t.request();
    }
    t.response(Some(200), None, None, Duration::from_millis(3));
    t.response(Some(200), None, None, Duration::from_millis(7));
    t.response(Some(404), None, None, Duration::from_micros(500));
    t.response(Some(503), None, None, Duration::from_millis(40));
    t.response(
        Some(504),
        None,
        Some("response_timeout"),
        Duration::from_secs(10),
    );
    t.response(Some(200), Some(0), None, Duration::from_millis(2));
    t.response(Some(200), Some(14), None, Duration::from_millis(2));
    t.response(
        None,
        None,
        Some("connection_reset"),
        Duration::from_millis(1),
    );

    let s = parse(&encode(&m));
    let base: &[&[(&str, &str)]] = &[PROXY, OUTBOUND];

    assert_eq!(value_exact(&s, "request_total", &with(base, &[])), 6.0);

    let resp = |extra: &[(&str, &str)]| value_exact(&s, "response_total", &with(base, extra));
    assert_eq!(
        resp(&[("classification", "success"), ("status_code", "200")]),
        2.0
    );
    assert_eq!(
        resp(&[("classification", "success"), ("status_code", "404")]),
        1.0
    );
    assert_eq!(
        resp(&[("classification", "failure"), ("status_code", "503")]),
        1.0
    );
    assert_eq!(
        resp(&[
            ("classification", "failure"),
            ("status_code", "504"),
            ("error", "response_timeout")
        ]),
        1.0
    );
    assert_eq!(
        resp(&[
            ("classification", "success"),
            ("status_code", "200"),
            ("grpc_status", "0")
        ]),
        1.0
    );
    assert_eq!(
        resp(&[
            ("classification", "failure"),
            ("status_code", "200"),
            ("grpc_status", "14")
        ]),
        1.0
    );
    assert_eq!(
        resp(&[("classification", "failure"), ("error", "connection_reset")]),
        1.0
    );
    assert_eq!(find(&s, "response_total", &[]).len(), 7);

    // Latency: success/200 covers the two plain 200s and the grpc-status=0 one.
    let lat = |suffix: &str, extra: &[(&str, &str)]| {
        value_exact(
            &s,
            &format!("response_latency_ms_{suffix}"),
            &with(base, extra),
        )
    };
    let ok200 = [("classification", "success"), ("status_code", "200")];
    assert_eq!(lat("count", &ok200), 3.0);
    assert!((lat("sum", &ok200) - 12.0).abs() < 1e-9);
    let bucket = |le: &str| {
        let mut extra = ok200.to_vec();
        extra.push(("le", le));
        lat("bucket", &extra)
    };
    assert_eq!(bucket("1.0"), 0.0);
    assert_eq!(bucket("2.0"), 1.0);
    assert_eq!(bucket("3.0"), 2.0);
    assert_eq!(bucket("5.0"), 2.0);
    assert_eq!(bucket("10.0"), 3.0);
    assert_eq!(bucket("+Inf"), 3.0);
    // Latency series carry no grpc_status / error labels.
    for sample in find(&s, "response_latency_ms_count", &[]) {
        assert!(!sample.labels.contains_key("grpc_status"));
        assert!(!sample.labels.contains_key("error"));
    }
    assert_eq!(
        lat(
            "count",
            &[("classification", "failure"), ("status_code", "504")]
        ),
        1.0
    );
    assert_eq!(lat("count", &[("classification", "failure")]), 1.0);

    // Linkerd's bucket bounds, in order, then +Inf.
    let les: Vec<String> = find(&s, "response_latency_ms_bucket", &ok200)
        .iter()
        .map(|b| b.labels["le"].clone())
        .collect();
    let want: Vec<String> = LATENCY_MS_BUCKETS
        .iter()
        .map(|b| format!("{b:.1}"))
        .chain(["+Inf".to_string()])
        .collect();
    assert_eq!(les, want);
}

#[test]
fn handles_share_series() {
    let m = Metrics::new(ProxyLabels::default());
    let a = m.http_target(inbound());
    let b = m.http_target(inbound());
    let a2 = a.clone();
    a.request();
    b.request();
    a2.request();
    a.response(Some(200), None, None, Duration::from_millis(1));
    b.response(Some(200), None, None, Duration::from_millis(1));
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "request_total", &labels(INBOUND)), 3.0);
    let ok = with(
        &[INBOUND],
        &[("classification", "success"), ("status_code", "200")],
    );
    assert_eq!(value_exact(&s, "response_total", &ok), 2.0);
    assert_eq!(a.labels(), &inbound());
}

#[test]
fn many_combinations_overflow_the_cache_correctly() {
    let m = Metrics::new(ProxyLabels::default());
    let t = m.http_target(inbound());
    const ERRORS: [&str; 3] = ["a", "b", "c"];
    // 3 errors x 20 statuses = 60 combinations > the cached slots; each
    // recorded twice, plus odd statuses outside 100..=599 and gRPC codes
    // outside 0..=16.
    for _ in 0..2 {
        for e in ERRORS {
            for status in 500..520 {
                t.response(Some(status), None, Some(e), Duration::from_millis(1));
            }
        }
        t.response(Some(999), None, None, Duration::from_millis(1));
        t.response(Some(42), None, None, Duration::from_millis(1));
        t.response(Some(200), Some(99), None, Duration::from_millis(1));
        t.response(Some(400), Some(3), None, Duration::from_millis(1));
    }
    let s = parse(&encode(&m));
    let responses = find(&s, "response_total", &[]);
    assert_eq!(responses.len(), 64);
    assert!(responses.iter().all(|r| r.value == 2.0), "{responses:#?}");
    assert_eq!(
        value_exact(
            &s,
            "response_total",
            &with(
                &[INBOUND],
                &[
                    ("classification", "failure"),
                    ("status_code", "519"),
                    ("error", "c")
                ]
            )
        ),
        2.0
    );
    assert_eq!(
        value_exact(
            &s,
            "response_total",
            &with(
                &[INBOUND],
                &[("classification", "failure"), ("status_code", "999")]
            )
        ),
        2.0
    );
}

#[test]
fn concurrent_recording_is_exact() {
    let m = Metrics::new(ProxyLabels::default());
    let t = m.http_target(inbound());
    let tcp = m.tcp_target(inbound());
    std::thread::scope(|scope| {
        for i in 0..8u16 {
            let t = t.clone();
            let tcp = tcp.clone();
            scope.spawn(move || {
                for j in 0..1000u16 {
                    t.request();
                    let status = if j % 2 == 0 { 200 } else { 500 + i };
                    t.response(Some(status), None, None, Duration::from_micros(100));
                    let conn = tcp.open();
                    conn.read_bytes(3);
                    conn.write_bytes(4);
                }
            });
        }
    });
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "request_total", &labels(INBOUND)), 8000.0);
    let total: f64 = find(&s, "response_total", &[])
        .iter()
        .map(|r| r.value)
        .sum();
    assert_eq!(total, 8000.0);
    let ok = with(
        &[INBOUND],
        &[("classification", "success"), ("status_code", "200")],
    );
    assert_eq!(value_exact(&s, "response_total", &ok), 4000.0);
    assert_eq!(
        value_exact(&s, "tcp_read_bytes_total", &labels(INBOUND)),
        24000.0
    );
    assert_eq!(
        value_exact(&s, "tcp_write_bytes_total", &labels(INBOUND)),
        32000.0
    );
    assert_eq!(
        value_exact(&s, "tcp_open_connections", &labels(INBOUND)),
        0.0
    );
    assert_eq!(
        value_exact(&s, "tcp_close_total", &with(&[INBOUND], &[("errno", "")])),
        8000.0
    );
}

#[test]
fn tcp_series_and_labels() {
    let m = Metrics::new(proxy_labels());
    let t = m.tcp_target(outbound());
    let a = t.open();
    let b = t.open();
    let c = t.open();
    a.read_bytes(100);
    b.read_bytes(23);
    a.write_bytes(7);
    let base: &[&[(&str, &str)]] = &[PROXY, OUTBOUND];

    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "tcp_open_total", &with(base, &[])), 3.0);
    assert_eq!(
        value_exact(&s, "tcp_open_connections", &with(base, &[])),
        3.0
    );
    assert!(find(&s, "tcp_close_total", &[]).is_empty());

    a.close(Some("ECONNRESET"));
    b.close(None);
    drop(c);
    let s = parse(&encode(&m));
    assert_eq!(
        value_exact(&s, "tcp_open_connections", &with(base, &[])),
        0.0
    );
    assert_eq!(
        value_exact(&s, "tcp_read_bytes_total", &with(base, &[])),
        123.0
    );
    assert_eq!(
        value_exact(&s, "tcp_write_bytes_total", &with(base, &[])),
        7.0
    );
    assert_eq!(
        value_exact(&s, "tcp_close_total", &with(base, &[("errno", "")])),
        2.0
    );
    assert_eq!(
        value_exact(
            &s,
            "tcp_close_total",
            &with(base, &[("errno", "ECONNRESET")])
        ),
        1.0
    );
    assert_eq!(
        value_exact(
            &s,
            "tcp_connection_duration_ms_count",
            &with(base, &[("errno", "")])
        ),
        2.0
    );
    let les: Vec<String> = find(
        &s,
        "tcp_connection_duration_ms_bucket",
        &[("errno", "ECONNRESET")],
    )
    .iter()
    .map(|b| b.labels["le"].clone())
    .collect();
    let want: Vec<String> = TCP_DURATION_MS_BUCKETS
        .iter()
        .map(|b| format!("{b:.1}"))
        .chain(["+Inf".to_string()])
        .collect();
    assert_eq!(les, want);
}

#[test]
fn tcp_peer_sides_are_separate_series() {
    let m = Metrics::new(proxy_labels());
    let src = m.tcp_target(outbound().with_peer(Peer::Src));
    let dst = m.tcp_target(outbound().with_peer(Peer::Dst));
    let _client = src.open();
    let _to_endpoint = dst.open();
    let _another_client = src.open();
    let base: &[&[(&str, &str)]] = &[PROXY, OUTBOUND];
    let s = parse(&encode(&m));
    assert_eq!(
        value_exact(&s, "tcp_open_total", &with(base, &[("peer", "src")])),
        2.0
    );
    assert_eq!(
        value_exact(&s, "tcp_open_total", &with(base, &[("peer", "dst")])),
        1.0
    );
    // HTTP targets carry no peer label.
    let http = m.http_target(outbound());
    http.request();
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "request_total", &with(base, &[])), 1.0);
}

#[test]
fn tcp_conn_drop_closes_once() {
    let m = Metrics::new(ProxyLabels::default());
    let t = m.tcp_target(inbound());
    {
        let _conn = t.open();
    }
    t.open().close(Some("ECONNREFUSED"));
    let many_errnos: Vec<&'static str> = (0..20)
        .map(|i| &*Box::leak(format!("E{i}").into_boxed_str()))
        .collect();
    for e in &many_errnos {
        t.open().close(Some(e));
    }
    let s = parse(&encode(&m));
    assert_eq!(
        value_exact(&s, "tcp_close_total", &with(&[INBOUND], &[("errno", "")])),
        1.0
    );
    assert_eq!(
        value_exact(
            &s,
            "tcp_close_total",
            &with(&[INBOUND], &[("errno", "ECONNREFUSED")])
        ),
        1.0
    );
    // Past the cached errno slots, the family fallback still counts.
    assert_eq!(
        value_exact(
            &s,
            "tcp_close_total",
            &with(&[INBOUND], &[("errno", "E19")])
        ),
        1.0
    );
    assert_eq!(value_exact(&s, "tcp_open_total", &labels(INBOUND)), 22.0);
    assert_eq!(
        value_exact(&s, "tcp_open_connections", &labels(INBOUND)),
        0.0
    );
}

#[test]
fn proxy_labels_on_every_series() {
    let m = Metrics::new(proxy_labels());
    m.http_target(outbound())
        .response(Some(200), None, None, Duration::from_millis(1));
    m.tcp_target(inbound()).open().close(None);
    let text = encode(&m);
    let s = parse(&text);
    assert!(s.len() > 40, "{text}");
    for sample in &s {
        for (k, v) in PROXY {
            assert_eq!(
                sample.labels.get(*k).map(String::as_str),
                Some(*v),
                "{sample:?}"
            );
        }
    }

    // Unset proxy labels are left out, not empty.
    let m = Metrics::new(ProxyLabels {
        namespace: Some("ns".into()),
        ..Default::default()
    });
    for sample in parse(&encode(&m)) {
        assert_eq!(
            sample.labels.get("namespace").map(String::as_str),
            Some("ns")
        );
        assert!(!sample.labels.contains_key("deployment"), "{sample:?}");
        assert!(!sample.labels.contains_key("pod"), "{sample:?}");
    }
}

#[test]
fn optional_target_labels_are_omitted() {
    let m = Metrics::new(ProxyLabels::default());
    m.http_target(TargetLabels::new(
        Direction::Inbound,
        "a:80",
        "127.0.0.1:80",
        Tls::Secured,
    ))
    .request();
    let s = parse(&encode(&m));
    let want = labels(&[
        ("direction", "inbound"),
        ("authority", "a:80"),
        ("target_addr", "127.0.0.1:80"),
        ("tls", "true"),
    ]);
    assert_eq!(value_exact(&s, "request_total", &want), 1.0);
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new(ProxyLabels::default());
    let weird = "we\"ird\\host\nname:80";
    m.http_target(TargetLabels::new(
        Direction::Inbound,
        weird,
        "127.0.0.1:80",
        Tls::Secured,
    ))
    .request();
    let s = parse(&encode(&m));
    let found = find(&s, "request_total", &[("authority", weird)]);
    assert_eq!(found.len(), 1);
}

#[test]
fn process_metrics_present_and_sane() {
    let m = Metrics::new(proxy_labels());
    let s = parse(&encode(&m));
    let get = |name: &str| {
        let found = find(&s, name, PROXY);
        assert_eq!(found.len(), 1, "{name}");
        found[0].value
    };
    if cfg!(target_os = "linux") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        assert!(get("process_cpu_seconds_total") >= 0.0);
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
        assert!(get("process_open_fds") >= 3.0);
        assert!(get("process_max_fds") >= get("process_open_fds"));
        let start = get("process_start_time_seconds");
        assert!(start > 1_577_836_800.0 && start <= now + 1.0, "{start}");
        assert!(get("process_threads") >= 1.0);
    }
}

#[test]
fn config_errors_from_source() {
    let m = Metrics::new(ProxyLabels::default());
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "config_errors_total", &labels(&[])), 0.0);

    let src = Arc::new(AtomicU64::new(0));
    m.set_config_errors_source(src.clone());
    src.fetch_add(3, Ordering::Relaxed);
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "config_errors_total", &labels(&[])), 3.0);

    m.set_config_errors_source(Arc::new(AtomicU64::new(11)));
    let s = parse(&encode(&m));
    assert_eq!(value_exact(&s, "config_errors_total", &labels(&[])), 11.0);
}

#[test]
fn build_info() {
    let m = Metrics::new(proxy_labels());
    let s = parse(&encode(&m));
    assert_eq!(
        value_exact(
            &s,
            "proxy_build_info",
            &with(&[PROXY], &[("version", env!("CARGO_PKG_VERSION"))])
        ),
        1.0
    );
}

fn route(dst: &str, name: &str) -> RouteLabels {
    RouteLabels {
        direction: Direction::Outbound,
        dst: dst.into(),
        route: name.into(),
    }
}

#[test]
fn route_series_and_classification_overrides() {
    let m = Metrics::new(proxy_labels());
    let effective = m.route_target(route("web.default.svc.cluster.local:80", "GET /users"));
    let actual = m.route_actual_target(route("web-v2.default.svc.cluster.local:80", "GET /users"));
    effective.request();
    actual.request();
    actual.request();
    // The route calls 429 a failure; the default rule would say success.
    actual.classified_response(
        Some(429),
        None,
        None,
        Classification::Failure,
        Duration::from_millis(2),
    );
    actual.response(Some(200), None, None, Duration::from_millis(2));
    effective.response(Some(200), None, None, Duration::from_millis(5));
    // The same status classified both ways is two series.
    effective.classified_response(
        Some(503),
        None,
        None,
        Classification::Success,
        Duration::from_millis(1),
    );
    effective.response(Some(503), None, None, Duration::from_millis(1));
    let skipped = m.route_retry_skipped(
        route("web.default.svc.cluster.local:80", "GET /users"),
        "budget_exhausted",
    );
    skipped.inc();
    assert_eq!(skipped.get(), 1);

    let samples = parse(&encode(&m));
    let rt: &[(&str, &str)] = &[
        ("direction", "outbound"),
        ("dst", "web.default.svc.cluster.local:80"),
        ("rt_route", "GET /users"),
    ];
    let rt_actual: &[(&str, &str)] = &[
        ("direction", "outbound"),
        ("dst", "web-v2.default.svc.cluster.local:80"),
        ("rt_route", "GET /users"),
    ];
    assert_eq!(
        value_exact(&samples, "route_request_total", &with(&[PROXY, rt], &[])),
        1.0
    );
    assert_eq!(
        value_exact(
            &samples,
            "route_actual_request_total",
            &with(&[PROXY, rt_actual], &[])
        ),
        2.0
    );
    let rsp = |base, status, class| {
        value_exact(
            &samples,
            "route_actual_response_total",
            &with(
                &[PROXY, base],
                &[("status_code", status), ("classification", class)],
            ),
        )
    };
    assert_eq!(rsp(rt_actual, "429", "failure"), 1.0);
    assert_eq!(rsp(rt_actual, "200", "success"), 1.0);
    for class in ["success", "failure"] {
        assert_eq!(
            value_exact(
                &samples,
                "route_response_total",
                &with(
                    &[PROXY, rt],
                    &[("status_code", "503"), ("classification", class)]
                ),
            ),
            1.0
        );
    }
    assert_eq!(
        find(&samples, "route_response_latency_ms_count", rt).len(),
        3,
        "one latency series per status and classification"
    );
    assert_eq!(
        value_exact(
            &samples,
            "route_retry_skipped_total",
            &with(&[PROXY, rt], &[("reason", "budget_exhausted")]),
        ),
        1.0
    );
}

#[test]
fn families_are_typed() {
    let m = Metrics::new(ProxyLabels::default());
    let t = m.http_target(outbound());
    t.request();
    t.response(Some(200), None, None, Duration::from_millis(1));
    let r = m.route_target(route("a:80", "r"));
    r.request();
    r.response(Some(200), None, None, Duration::from_millis(1));
    let a = m.route_actual_target(route("a:80", "r"));
    a.request();
    a.response(Some(200), None, None, Duration::from_millis(1));
    m.route_retry_skipped(route("a:80", "r"), "budget_exhausted")
        .inc();
    m.endpoint_ejections(outbound()).inc();
    m.endpoint_ejections_capped(outbound()).inc();
    m.balancer_panic(outbound()).inc();
    m.warning_counter("malformed_request").inc();
    m.tcp_target(inbound()).open().close(None);
    let text = encode(&m);
    for (name, ty) in [
        ("request", "counter"),
        ("response", "counter"),
        ("response_latency_ms", "histogram"),
        ("route_request", "counter"),
        ("route_response", "counter"),
        ("route_response_latency_ms", "histogram"),
        ("route_actual_request", "counter"),
        ("route_actual_response", "counter"),
        ("route_actual_response_latency_ms", "histogram"),
        ("route_retry_skipped", "counter"),
        ("endpoint_ejections", "counter"),
        ("endpoint_ejections_capped", "counter"),
        ("balancer_panic", "counter"),
        ("proxy_warnings", "counter"),
        ("tcp_open", "counter"),
        ("tcp_close", "counter"),
        ("tcp_open_connections", "gauge"),
        ("tcp_read_bytes", "counter"),
        ("tcp_write_bytes", "counter"),
        ("tcp_connection_duration_ms", "histogram"),
        ("config_errors", "counter"),
        ("identity_cert_expiration_timestamp_seconds", "gauge"),
        ("identity_cert_refresh", "counter"),
        ("identity_certify_failures", "counter"),
        ("proxy_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        let line = format!("# TYPE {name} {ty}\n");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(Metrics::CONTENT_TYPE.starts_with("application/openmetrics-text"));
}

// ---------------------------------------------------------------------------
// promtool

/// Whether one line of `promtool check metrics` output is one of the two
/// accepted lint notes for `text`:
/// (a) `<name> metric names should not contain abbreviated units` for
///     Linkerd's `*_ms` histograms (names kept for compatibility);
/// (b) `<name>_total no help text` for an OpenMetrics counter `<name>`: the
///     Prometheus text parser promtool uses reads the HELP of family `<name>`
///     as belonging to a different metric than the `<name>_total` samples.
fn accepted_promtool_note(line: &str, text: &str) -> bool {
    if let Some(name) = line.strip_suffix(" metric names should not contain abbreviated units") {
        return name.ends_with("_ms") && text.contains(&format!("# TYPE {name} histogram\n"));
    }
    if let Some(name) = line.strip_suffix("_total no help text") {
        return text.contains(&format!("# TYPE {name} counter\n"))
            && text.contains(&format!("# HELP {name} "));
    }
    false
}

#[test]
fn promtool_accepts_the_exposition() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let m = Metrics::new(proxy_labels());
    m.set_config_errors_source(Arc::new(AtomicU64::new(2)));
    let http = m.http_target(outbound());
    http.request();
    http.response(Some(200), None, None, Duration::from_millis(3));
    http.response(Some(200), Some(2), None, Duration::from_millis(3));
    http.response(
        Some(504),
        None,
        Some("response_timeout"),
        Duration::from_secs(10),
    );
    http.response(
        None,
        None,
        Some("connection_reset"),
        Duration::from_millis(1),
    );
    let tcp = m.tcp_target(inbound());
    let conn = tcp.open();
    conn.read_bytes(10);
    conn.write_bytes(20);
    conn.close(Some("ECONNRESET"));
    let _open = tcp.open();
    let text = encode(&m);

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let msg = "promtool not found: install it (Debian: `apt-get install -y prometheus`)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}; it is required when CI=true");
            }
            eprintln!("NOTICE: skipping promtool check: {msg}");
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "promtool exit: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );

    // 0: clean; 3: lint notes only. Anything else (1: parse error) fails.
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "promtool failed ({code:?}):\n{stdout}{stderr}\n--- input ---\n{text}"
    );
    let notes: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let unexpected: Vec<&&str> = notes
        .iter()
        .filter(|l| !accepted_promtool_note(l, &text))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected promtool output: {unexpected:#?}\n--- input ---\n{text}"
    );
    assert_eq!(code == Some(3), !notes.is_empty(), "exit code vs notes");
}

#[test]
fn promtool_allow_list_is_narrow() {
    let text = "# HELP request Total.\n# TYPE request counter\n\
                # HELP response_latency_ms L.\n# TYPE response_latency_ms histogram\n";
    assert!(accepted_promtool_note("request_total no help text", text));
    assert!(accepted_promtool_note(
        "response_latency_ms metric names should not contain abbreviated units",
        text
    ));
    assert!(!accepted_promtool_note("other_total no help text", text));
    assert!(!accepted_promtool_note("request no help text", text));
    assert!(!accepted_promtool_note(
        "request_total metric names should not contain abbreviated units",
        text
    ));
    assert!(!accepted_promtool_note(
        "error while linting: text format parsing error in line 2",
        text
    ));
    assert!(!accepted_promtool_note(
        "request_total counter metrics should have \"_total\" suffix",
        text
    ));
}

// ---------------------------------------------------------------------------
// Rolling windows.

fn encode_window(m: &Metrics, window: Duration, now: std::time::Instant) -> Vec<Sample> {
    let mut out = String::new();
    m.encode_window(&mut out, window, now).expect("encode");
    parse(&out)
}

#[test]
fn windows_count_what_each_series_did_lately() {
    let m = Metrics::new(proxy_labels());
    let t0 = std::time::Instant::now();
    let target = m.http_target(outbound());
    // A second handle on the same labels shares the series: counted once, kept once.
    let twin = m.http_target(outbound());
    let ok = |n: usize| {
        for _ in 0..n {
            target.request();
            target.response(Some(200), None, None, Duration::from_millis(3));
        }
    };
    ok(5);
    m.window_tick(t0 + Duration::from_secs(1));
    ok(3);
    twin.request();
    twin.response(Some(503), None, None, Duration::from_millis(40));
    m.window_tick(t0 + Duration::from_secs(2));
    // Since the last tick: read live.
    ok(2);

    let now = t0 + Duration::from_millis(2_500);
    let last_second = encode_window(&m, Duration::from_secs(1), now);
    let mut ok_labels = labels(PROXY);
    ok_labels.extend(labels(OUTBOUND));
    ok_labels.extend(labels(&[
        ("classification", "success"),
        ("status_code", "200"),
    ]));
    assert_eq!(value_exact(&last_second, "response_total", &ok_labels), 5.0);
    let mut req = labels(PROXY);
    req.extend(labels(OUTBOUND));
    assert_eq!(value_exact(&last_second, "request_total", &req), 6.0);

    let minute = encode_window(&m, Duration::from_secs(60), now);
    assert_eq!(value_exact(&minute, "request_total", &req), 11.0);
    assert_eq!(value_exact(&minute, "response_total", &ok_labels), 10.0);
    let covered = find(&minute, "window_seconds", PROXY);
    assert_eq!(covered.len(), 1);
    assert!((covered[0].value - 2.5).abs() < 0.01, "{covered:?}");
    // Latency buckets of the window: ten successes within 3 ms, one failure within 40 ms.
    let bucket = |le: &str, class: &str| {
        find(
            &minute,
            "response_latency_ms_bucket",
            &[("le", le), ("classification", class)],
        )
        .iter()
        .map(|s| s.value)
        .sum::<f64>()
    };
    assert_eq!(bucket("3.0", "success"), 10.0);
    assert_eq!(bucket("2.0", "success"), 0.0);
    assert_eq!(bucket("+Inf", "failure"), 1.0);
    assert_eq!(bucket("30.0", "failure"), 0.0);
    let sum = find(
        &minute,
        "response_latency_ms_sum",
        &[("classification", "failure")],
    );
    assert_eq!(sum.len(), 1);
    assert!((sum[0].value - 40.0).abs() < 1e-6, "{sum:?}");
    // Route families are windowed too; gauges are current.
    let route = m.route_target(route(
        "books.default.svc.cluster.local:8080",
        "GET /books/{id}",
    ));
    route.request();
    let tcp = m.tcp_target(outbound());
    let _conn = tcp.open();
    let minute = encode_window(&m, Duration::from_secs(60), now);
    assert_eq!(
        find(
            &minute,
            "route_request_total",
            &[("rt_route", "GET /books/{id}")]
        )
        .len(),
        1
    );
    assert_eq!(find(&minute, "tcp_open_connections", PROXY)[0].value, 1.0);
    assert_eq!(find(&minute, "proxy_build_info", PROXY).len(), 1);
    // Nothing else from /metrics.
    assert!(find(&minute, "tcp_open_total", &[]).is_empty());
}

#[test]
fn window_memory_is_bounded_per_series() {
    let m = Metrics::new(proxy_labels());
    let t0 = std::time::Instant::now();
    let target = m.http_target(outbound());
    for s in 1..=1_000u64 {
        target.request();
        target.response(Some(200), None, None, Duration::from_millis(3));
        m.window_tick(t0 + Duration::from_secs(s));
    }
    // request_total and response_total: one ring each; the histogram: its one bucket and
    // its sum. However long it runs.
    let counter_ring = 4 * (60 + 91);
    assert_eq!(m.window_bytes(), 3 * counter_ring + 2 * counter_ring);
    let samples = encode_window(
        &m,
        Duration::from_secs(900),
        t0 + Duration::from_secs(1_000),
    );
    let mut req = labels(PROXY);
    req.extend(labels(OUTBOUND));
    assert_eq!(value_exact(&samples, "request_total", &req), 900.0);
}
