//! The admin server, process lifecycle (graceful shutdown, startup errors), env twins and logs.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_live_and_metrics() {
    test_body(async {
        let proxy = Proxy::start(&[]);
        for path in ["/ready", "/live"] {
            let (status, body) = proxy.admin_request("GET", path, "");
            assert_eq!(status, 200, "GET {path}: {status} {body:?}");
        }
        let text = proxy.metrics();
        let samples = parse_metrics(&text)
            .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text ({e}):\n{text}"));
        assert!(
            samples.iter().any(|s| s.name.starts_with("process_")),
            "/metrics has no process_* metrics:\n{text}"
        );
        let (status, _) = proxy.admin_request("GET", "/no-such-admin-path", "");
        assert_eq!(status, 404, "unknown admin path");
    })
    .await
}

/// `/metrics/window`: what the HTTP series counted lately, answered at once, for `pylon stat`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_window_counts_recent_requests() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        for _ in 0..3 {
            let r = get(proxy.outbound(), "web.default.svc.cluster.local", "/")
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        let (status, text) = proxy.admin_request("GET", "/metrics/window?window=1m", "");
        assert_eq!(status, 200, "{text}");
        let samples = parse_metrics(&text)
            .unwrap_or_else(|e| panic!("not valid Prometheus text ({e}):\n{text}"));
        let sum = |name: &str| -> f64 {
            samples
                .iter()
                .filter(|s| s.name == name && s.label("direction") == Some("outbound"))
                .map(|s| s.value)
                .sum()
        };
        assert_eq!(sum("request_total"), 3.0, "{text}");
        assert_eq!(sum("response_total"), 3.0, "{text}");
        assert_eq!(sum("route_request_total"), 3.0, "{text}");
        let covered = samples
            .iter()
            .find(|s| s.name == "window_seconds")
            .map(|s| s.value);
        assert!(covered.is_some_and(|c| (0.0..=61.0).contains(&c)), "{text}");
        // Only the windowed families and two gauges: not a second /metrics.
        assert!(
            !samples.iter().any(|s| s.name.starts_with("process_")),
            "{text}"
        );

        for bad in ["window=16m", "window=0s", "window=later"] {
            let (status, body) = proxy.admin_request("GET", &format!("/metrics/window?{bad}"), "");
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(body.contains("bad window"), "{bad}: {body}");
        }
    })
    .await
}

fn level_of(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(v.get("level")?.as_str()?.to_ascii_uppercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_level_changes_at_runtime() {
    test_body(async {
        let backend = Backend::start("app").await;
        let proxy = Proxy::start(&[]);

        let (status, body) = proxy.admin_request("GET", "/proxy-log-level", "");
        assert_eq!(status, 200, "GET /proxy-log-level: {body:?}");
        assert_eq!(body.trim(), "info", "initial level (PYLON_LOG=info)");
        // Some traffic at info: no DEBUG lines.
        let r = get(proxy.outbound(), &backend.addr.to_string(), "/")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let debug_before = proxy
            .logs()
            .iter()
            .filter(|l| level_of(l).as_deref() == Some("DEBUG"))
            .count();
        assert_eq!(debug_before, 0, "DEBUG lines logged at level info");

        let (status, body) = proxy.admin_request("PUT", "/proxy-log-level", "debug");
        assert!(
            (200..300).contains(&status),
            "PUT /proxy-log-level debug: {status} {body:?}"
        );
        let (status, body) = proxy.admin_request("GET", "/proxy-log-level", "");
        assert_eq!(status, 200);
        assert_eq!(body.trim(), "debug", "level after PUT");

        let r = get(proxy.outbound(), &backend.addr.to_string(), "/")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let _ = proxy.admin_request("GET", "/ready", "");
        let line = proxy
            .wait_for_log(Duration::from_secs(5), |l| {
                level_of(l).as_deref() == Some("DEBUG")
            })
            .await;
        assert!(
            line.is_some(),
            "no DEBUG line after PUT /proxy-log-level debug and some traffic; recent logs:\n{}",
            proxy.log_tail(20)
        );

        let (status, _) = proxy.admin_request("PUT", "/proxy-log-level", "info");
        assert!((200..300).contains(&status));
    })
    .await
}

/// Starts a slow request through the proxy, triggers shutdown with `trigger`, and checks the
/// request completes and the process exits 0.
async fn drains_inflight_then_exits_zero(trigger: impl FnOnce(&Proxy)) {
    let backend = Backend::with_delay("slow", Duration::from_secs(2)).await;
    let mut proxy = Proxy::start(&["--shutdown-grace", "20s"]);
    let outbound = proxy.outbound();
    let authority = backend.addr.to_string();
    let inflight = tokio::spawn(async move { get(outbound, &authority, "/slow").await });
    assert!(
        wait_until(|| backend.state.in_flight() == 1, Duration::from_secs(10)).await,
        "the slow request never reached the backend"
    );

    trigger(&proxy);

    let resp = within(
        "in-flight request during drain",
        Duration::from_secs(20),
        inflight,
    )
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("in-flight request failed during graceful shutdown: {e}"));
    assert_eq!(
        resp.status, 200,
        "in-flight request during graceful shutdown: {resp:?}"
    );
    assert_eq!(resp.text(), "slow");

    let status = proxy.wait_exit(Duration::from_secs(25)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "proxy still running 25 s after shutdown began; logs:\n{}",
            proxy.log_tail(20)
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after graceful shutdown: {status:?}; logs:\n{}",
        proxy.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_shutdown_drains_and_exits_zero() {
    test_body(drains_inflight_then_exits_zero(|proxy| {
        let (status, body) = proxy.admin_request("POST", "/shutdown", "");
        assert!(
            (200..300).contains(&status),
            "POST /shutdown: {status} {body:?}"
        );
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_exits_zero() {
    test_body(drains_inflight_then_exits_zero(|proxy| {
        proxy.signal(libc::SIGTERM);
    }))
    .await
}

fn assert_exits_nonzero(builder: ProxyBuilder, what: &str, must_mention: &[&str]) -> String {
    let (status, out) = run_to_exit(builder, Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("{what}: proxy did not exit within 15 s:\n{out}"));
    assert!(
        !status.success(),
        "{what}: proxy exited {status:?}, want non-zero; output:\n{out}"
    );
    let lower = out.to_ascii_lowercase();
    for m in must_mention {
        assert!(
            lower.contains(&m.to_ascii_lowercase()),
            "{what}: the error output does not mention {m:?}:\n{out}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_flag_exits_nonzero_with_message() {
    assert_exits_nonzero(
        Proxy::builder().arg("--no-such-flag"),
        "unknown flag",
        &["--no-such-flag"],
    );
    assert_exits_nonzero(
        Proxy::builder().args(["--detect-timeout", "soon"]),
        "bad duration",
        &["detect-timeout"],
    );
    assert_exits_nonzero(
        Proxy::builder().args(["--opaque-ports", "http"]),
        "bad port list",
        &["opaque-ports"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn address_in_use_exits_nonzero_with_message() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    for flag in ["--inbound-addr", "--outbound-addr", "--admin-addr"] {
        assert_exits_nonzero(
            Proxy::builder().args([flag, addr.as_str()]),
            &format!("{flag} {addr} already bound"),
            &["in use", &addr],
        );
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_config_dir_exits_nonzero_with_message() {
    let missing = "/nonexistent/pylon-e2e-config-dir";
    assert_exits_nonzero(
        Proxy::builder().args(["--config-dir", missing]),
        "missing --config-dir",
        &[missing],
    );
    // A regular file is not a config dir (running as root, permission bits would not stop us).
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap().to_string();
    assert_exits_nonzero(
        Proxy::builder().args(["--config-dir", path.as_str()]),
        "--config-dir is a file",
        &[&path],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn env_twin_is_honoured_and_flag_wins() {
    test_body(async {
        // PYLON_ADMIN_ADDR alone.
        let proxy = Proxy::builder()
            .no_default_addrs()
            .args([
                "--inbound-addr",
                "127.0.0.1:0",
                "--outbound-addr",
                "127.0.0.1:0",
                "--tap-addr",
                "127.0.0.1:0",
            ])
            .env("PYLON_ADMIN_ADDR", "127.0.0.1:0")
            .start();
        let admin = proxy.admin();
        assert!(
            admin.ip().is_loopback() && admin.port() != 4191,
            "PYLON_ADMIN_ADDR=127.0.0.1:0 not honoured: admin listening on {admin}"
        );
        let (status, _) = proxy.admin_request("GET", "/live", "");
        assert_eq!(status, 200);
        drop(proxy);

        // Flag beats env: the env address is taken, so using it would fail.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        let proxy = Proxy::builder()
            .env("PYLON_ADMIN_ADDR", taken.to_string())
            .args(["--admin-addr", "127.0.0.1:0"])
            .start();
        assert_ne!(proxy.admin(), taken, "the env twin won over the flag");
        let (status, _) = proxy.admin_request("GET", "/live", "");
        assert_eq!(status, 200);

        // Another twin: PYLON_INBOUND_FORWARD routes inbound traffic.
        let backend = Backend::start("app").await;
        let proxy = Proxy::builder()
            .env("PYLON_INBOUND_FORWARD", backend.addr.to_string())
            .start();
        let resp = get(proxy.inbound(), "app.example", "/")
            .await
            .expect("inbound");
        assert_eq!(
            resp.status, 200,
            "PYLON_INBOUND_FORWARD not honoured: {resp:?}"
        );
        assert_eq!(resp.backend(), Some("app"));
    })
    .await
}

/// Every line the proxy writes to stderr is a JSON log line: jq-able, and nothing else is said
/// there (jemalloc reports an option of the proxy's `malloc_conf` it can't take as a line of its
/// own, which fails this too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_lines_are_json_with_level_target_message() {
    test_body(async {
        let backend = Backend::start("app").await;
        let proxy = Proxy::start(&[]);
        let _ = get(proxy.outbound(), &backend.addr.to_string(), "/").await;
        let _ = get(proxy.outbound(), "127.0.0.1:1", "/").await; // a 502: a warn line
        tokio::time::sleep(Duration::from_millis(300)).await;

        let logs = proxy.logs();
        assert!(logs.len() >= 4, "expected at least the 4 listening lines");
        for line in &logs {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            for key in ["level", "target", "message", "timestamp"] {
                assert!(
                    v.get(key).is_some_and(|x| x.is_string()),
                    "log line lacks a top-level string {key:?}: {line}"
                );
            }
        }
        let listening: Vec<_> = logs
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "listening")
            .collect();
        assert_eq!(
            listening.len(),
            4,
            "one listening line per listener (admin, inbound, outbound, tap)"
        );
        for v in &listening {
            assert_eq!(v["level"], "INFO", "{v}");
            assert!(v["listener"].is_string() && v["addr"].is_string(), "{v}");
        }
    })
    .await
}

/// The live `/metrics` of a proxy that carried real traffic (successes, a proxy-made 502 and
/// 503, inbound requests, TCP) passes Prometheus' own `promtool check metrics`. The only notes
/// allowed are the two purpose-made ones: Linkerd's abbreviated `_ms` unit, and promtool's HELP
/// quirk on OpenMetrics counters (it reads `# HELP request` as not covering `request_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_metrics_pass_promtool() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::with_config(&cfg, &["--inbound-forward", &backend.addr.to_string()]);
        for _ in 0..3 {
            let r = get(proxy.outbound(), "web.default.svc.cluster.local", "/")
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            let r = get(proxy.inbound(), "app.local", "/").await.unwrap();
            assert_eq!(r.status, 200);
        }
        let r = get(proxy.outbound(), "127.0.0.1:1", "/").await.unwrap();
        assert_eq!(r.status, 502);
        let text = proxy.metrics();

        let out = match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(mut child) => {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("promtool stdin")
                    .write_all(text.as_bytes())
                    .expect("write to promtool");
                child.wait_with_output().expect("promtool output")
            }
            Err(e) => {
                let msg = format!("promtool not runnable ({e}); install Debian's `prometheus`");
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
                eprintln!("NOTICE: skipping: {msg}");
                return;
            }
        };
        // promtool exits 3 for lint notes only, 1 for parse errors.
        let code = out.status.code();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            matches!(code, Some(0) | Some(3)),
            "promtool failed ({code:?}):\n{report}\n--- /metrics ---\n{text}"
        );
        let unexpected: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                let abbreviated_ms = l
                    .strip_suffix(" metric names should not contain abbreviated units")
                    .is_some_and(|n| n.ends_with("_ms"));
                let counter_help = l
                    .strip_suffix("_total no help text")
                    .is_some_and(|n| text.contains(&format!("# TYPE {n} counter\n")));
                !(abbreviated_ms || counter_help)
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "promtool complained: {unexpected:#?}\n--- /metrics ---\n{text}"
        );
    })
    .await
}

/// `PYLON_ACCESS_LOG=json` adds one JSON line per request with what an operator needs to find
/// it again: method, authority, path, status, latency, endpoint and the trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_has_one_json_line_per_request() {
    test_body(async {
        let backend = Backend::start("web-a").await;
        let cfg = ConfigDir::web(&[backend.addr]);
        let proxy = Proxy::builder()
            .arg("--config-dir")
            .arg(cfg.path_str())
            .env("PYLON_ACCESS_LOG", "json")
            .env("PYLON_LOG", "warn,pylon_proxy::listener=info")
            .start();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let r = get_with(
            proxy.outbound(),
            "web.default.svc.cluster.local",
            "/orders/42",
            &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let r = get_with(
            proxy.outbound(),
            "web",
            "/b3",
            &[("x-b3-traceid", "80f198ee56343ba8")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);

        let is_access = |l: &str| l.contains("\"message\":\"access\"");
        let line = proxy
            .wait_for_log(Duration::from_secs(5), |l| {
                is_access(l) && l.contains("/orders/42")
            })
            .await
            .unwrap_or_else(|| panic!("no access log line; logs:\n{}", proxy.log_tail(20)));
        let v: serde_json::Value = serde_json::from_str(&line).expect("access line is JSON");
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["authority"], "web.default.svc.cluster.local:80", "{line}");
        assert_eq!(v["path"], "/orders/42", "{line}");
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["direction"], "outbound", "{line}");
        assert_eq!(v["endpoint"], backend.addr.to_string(), "{line}");
        assert_eq!(v["trace_id"], trace, "{line}");
        assert!(
            v["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );

        let b3 = proxy
            .wait_for_log(Duration::from_secs(5), |l| {
                is_access(l) && l.contains("/b3")
            })
            .await
            .expect("access line for the B3 request");
        let v: serde_json::Value = serde_json::from_str(&b3).expect("JSON");
        assert_eq!(v["trace_id"], "80f198ee56343ba8", "{b3}");
        // Exactly one line per request, whatever the log level.
        assert_eq!(proxy.logs().iter().filter(|l| is_access(l)).count(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_names_the_tap_port() {
    test_body(async {
        let proxy = Proxy::start(&[]);
        let (status, body) = proxy.admin_request("GET", "/tap-addr", "");
        assert_eq!(status, 200);
        assert_eq!(
            body.trim().parse::<std::net::SocketAddr>().ok(),
            Some(proxy.tap())
        );
        let (status, _) = proxy.admin_request("POST", "/tap-addr", "");
        assert_eq!(status, 405);
    })
    .await
}
