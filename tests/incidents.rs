//! The incidents of the 3 AM story (`shared/000_9425fc1ae493f183.txt`), each reproduced on
//! loopback with real Pylon proxies and real traffic, and diagnosed from Pylon's own output in
//! at most three commands typed as the story types them: `pylon` for `linkerd` and
//! `linkerd viz`, plus `--config-dir DIR` to say where the mesh is. Each test asserts that the
//! output names the cause.
//!
//! The mesh is `blocking/mesh.rs`'s config dir of real proxies; a serving Pod's proxy forwards
//! to a small app whose misbehaviour is the incident.

use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

mod blocking;
#[path = "blocking/mesh.rs"]
mod mesh;
use blocking::*;
use mesh::*;

fn text(out: &Output) -> String {
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{shown}");
    shown
}

/// The table's rows as header -> cell maps.
fn rows(table: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = table.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    lines
        .map(|l| {
            names
                .iter()
                .map(|n| n.to_string())
                .zip(l.split_whitespace().map(str::to_string))
                .collect()
        })
        .collect()
}

fn percent(cell: &str) -> f64 {
    cell.trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("not a percentage: {cell:?}"))
}

/// "This one command revealed the hidden retry storm": payment-service's calls to
/// order-service all succeed, because its proxy retries the one in seven that fails. The
/// retries show as RETRY% and as a retry-heavy edge.
#[test]
fn a_retry_storm_shows_as_retries_on_the_edge() {
    let mut mesh = Mesh::new();
    let payment = mesh.pod("payment-service", None);
    mesh.serving("order-service", &[App::FailEvery { n: 7, status: 503 }]);
    mesh.objects.push(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
         metadata:\n  name: order-service.default.svc.cluster.local\n  namespace: default\n\
         spec:\n  routes:\n  - name: GET /orders/{id}\n    condition: {method: GET, pathRegex: '/orders/[^/]+'}\n    isRetryable: true\n\
         \x20 retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 100, ttl: 10s}\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(payment, "order-service");
    let statuses = mesh.send(payment, "order-service", "/orders/42", 210);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "retries hide every failure from the app: {statuses:?}"
    );

    let out = mesh.pylon("stat deployment/payment-service --to deployment/order-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let r = rows(&shown);
    let retries = percent(&r[0]["RETRY%"]);
    assert!(
        (10.0..20.0).contains(&retries),
        "about one request in seven is a retry: {shown}"
    );
    // Every attempt counts: the app saw 100%, the mesh 6 in 7.
    let success = percent(&r[0]["SUCCESS"]);
    assert!((80.0..92.0).contains(&success), "{shown}");
    assert!(
        shown.contains("payment-service to deployment/order-service:")
            && shown.contains("were retries"),
        "the retries are called out: {shown}"
    );

    // The route the retries are on.
    let out = mesh.pylon("routes deployment/payment-service --to deployment/order-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.lines().any(|l| l.starts_with("GET /orders/{id}")),
        "{shown}"
    );

    let out = mesh.pylon("edges deployment");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let edge = shown
        .lines()
        .find(|l| l.contains("payment-service") && l.contains("order-service"))
        .unwrap_or_else(|| panic!("no payment-service -> order-service edge:\n{shown}"));
    assert!(edge.contains("retry-heavy"), "{shown}");
}

/// "Traffic split percentages: math errors that send 110% traffic to new versions": the
/// TrafficSplit's weights add to 110, which `pylon check` names with what each backend really
/// gets.
#[test]
fn a_traffic_split_adding_to_110_percent() {
    let mut mesh = Mesh::new();
    let checkout = mesh.pod("frontend", None);
    mesh.serving("checkout-service", &[App::Ok]);
    mesh.serving("checkout-service-v1", &[App::Ok]);
    mesh.serving("checkout-service-debug", &[App::Ok]);
    mesh.objects.push(
        "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\n\
         metadata:\n  name: debug-checkout-flow\n  namespace: default\n\
         spec:\n  service: checkout-service\n  backends:\n  - service: checkout-service-v1\n    weight: 100\n\
         \x20 - service: checkout-service-debug\n    weight: 10\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(checkout, "checkout-service");

    let out = Command::new(PYLON)
        .args(["check", mesh.dir()])
        .output()
        .expect("pylon check");
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "errors exit 1: {shown}");
    let finding = shown
        .lines()
        .position(|l| l.contains("TrafficSplit default/debug-checkout-flow"))
        .unwrap_or_else(|| panic!("the split is not named:\n{shown}"));
    assert!(
        shown.contains("weights sum to 110"),
        "the sum is named:\n{shown}"
    );
    assert!(
        shown.lines().skip(finding).any(|l| l.contains("90.9%")),
        "what v1 really gets (100/110) is named:\n{shown}"
    );
}

/// "exactly every 50th request was failing with a 503": recommendation-service's calls to
/// ml-inference fail at 2% (stat), and tap shows the 503s and the one pod they come from.
#[test]
fn every_50th_request_fails_with_503_from_one_pod() {
    let mut mesh = Mesh::new();
    let recommendation = mesh.pod("recommendation-service", None);
    // Two pods; the second fails every 50th request. The balancer (P2C over PeakEWMA) sends
    // one request at a time to the pod that has been quicker, and a pod's first answer decides
    // that, so which pod takes the traffic must not be left to chance: the healthy pod answers
    // in 40 ms, slower than the 30 ms a new endpoint is assumed to take, and the failing pod
    // gets the traffic.
    let pods = mesh.serving(
        "ml-inference",
        &[
            App::SlowEvery {
                n: 1,
                delay: Duration::from_millis(40),
            },
            App::FailEvery { n: 50, status: 503 },
        ],
    );
    mesh.write();
    mesh.until_routed(recommendation, "ml-inference");
    let statuses = mesh.send(recommendation, "ml-inference", "/predict", 300);
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert!(failed > 0, "{statuses:?}");

    let out = mesh
        .pylon("stat deployment/recommendation-service --to deployment/ml-inference --window 5m");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let success = percent(&rows(&shown)[0]["SUCCESS"]);
    assert!(
        success < 99.5 && success > 90.0,
        "a few percent fail: {shown}"
    );

    let tap = mesh.tap(
        "tap deployment/recommendation-service --to deployment/ml-inference",
        recommendation,
        &fqdn("ml-inference"),
    );
    // At the pace of a service, until the tap has shown a 503 (bounded: 1,000 requests).
    for _ in 0..100 {
        mesh.send(recommendation, "ml-inference", "/predict", 10);
        if tap.lines().iter().any(|l| l.contains(":status=503")) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let failing = tap.until(1, |l| l.contains(":status=503"));
    let bad_pod = &mesh.pods[pods[1]].name;
    for line in &failing {
        assert!(
            line.contains(bad_pod.as_str()),
            "the failing response names its pod {bad_pod}: {line}"
        );
    }
}

/// "Tap revealed that 504 Gateway Timeout errors were coming from the mesh proxy, not the
/// application": user-service's route has a timeout shorter than its slowest requests, and
/// tap shows the proxy making the 504.
#[test]
fn a_504_from_the_proxys_own_route_timeout() {
    let mut mesh = Mesh::new();
    let gateway = mesh.pod("api-gateway", None);
    mesh.serving(
        "user-service",
        &[App::SlowEvery {
            n: 3,
            delay: Duration::from_secs(2),
        }],
    );
    mesh.objects.push(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
         metadata:\n  name: user-service.default.svc.cluster.local\n  namespace: default\n\
         spec:\n  routes:\n  - name: GET /users/{id}\n    condition: {method: GET, pathRegex: '/users/[^/]+'}\n    timeout: 500ms\n"
            .into(),
    );
    mesh.write();
    mesh.until_routed(gateway, "user-service");

    let tap = mesh.tap(
        "tap deployment/api-gateway --to deployment/user-service --authority user-service:8080",
        gateway,
        "user-service:8080",
    );
    let statuses = mesh.send_to(gateway, "user-service:8080", "/users/7", 6);
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        2,
        "every third request outlasts the timeout: {statuses:?}"
    );
    // `| grep -E "(status=[45][0-9][0-9]|timeout)"`
    let grep = regex::Regex::new("(status=[45][0-9][0-9]|timeout)").expect("regex");
    let found = tap.until(2, |l| l.starts_with("rsp") && grep.is_match(l));
    for line in &found {
        assert!(line.contains(":status=504"), "{line}");
        assert!(
            line.contains("proxy_error=") && line.contains("timeout"),
            "the proxy says it made the 504 for a timeout: {line}"
        );
    }
}

/// "The service profile was outdated, causing Linkerd to only load balance between 2 of the 3
/// available pods. The third pod was receiving zero traffic": ml-inference runs three ready
/// pods and its endpoints name two.
#[test]
fn a_stale_endpoint_set_uses_2_of_3_pods() {
    let mut mesh = Mesh::new();
    let recommendation = mesh.pod("recommendation-service", None);
    let pods = mesh.serving("ml-inference", &[App::Ok, App::Ok, App::Ok]);
    mesh.services
        .last_mut()
        .expect("the service")
        .in_slices
        .truncate(2);
    mesh.write();
    mesh.until_routed(recommendation, "ml-inference");
    mesh.send(recommendation, "ml-inference", "/predict", 60);
    let missing = &mesh.pods[pods[2]].name;

    let out = mesh.pylon("stat deployment/ml-inference");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("2 of 3"), "{shown}");
    assert!(
        shown.contains(missing.as_str()),
        "the idle pod is named: {shown}"
    );

    let out = Command::new(PYLON)
        .args(["check", mesh.dir()])
        .output()
        .expect("pylon check");
    let shown = text(&out);
    assert!(shown.contains(missing.as_str()), "{shown}");
    assert!(shown.contains("Service default/ml-inference"), "{shown}");
}

/// "our new authentication service was returning invalid HTTP headers, causing the mesh to
/// classify successful responses as errors": the app answers 200 with a header no parser
/// accepts; stat shows the failures, tap shows the proxy's 502 and why, and the proxy's log
/// (`kubectl logs ... | jq 'select(.level == "ERROR")'`) names the header.
#[test]
fn successful_responses_made_errors_by_an_invalid_header() {
    let mut mesh = Mesh::new();
    let frontend = mesh.pod("frontend", None);
    mesh.serving("auth-service", &[App::InvalidHeader]);
    mesh.write();
    mesh.until_routed(frontend, "auth-service");
    let statuses = mesh.send(frontend, "auth-service", "/login", 20);
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");

    let out = mesh.pylon("stat deployment/frontend --to deployment/auth-service");
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        percent(&rows(&shown)[0]["SUCCESS"]) < 10.0,
        "the 200s are failures: {shown}"
    );

    let tap = mesh.tap(
        "tap deployment/frontend --to deployment/auth-service",
        frontend,
        &fqdn("auth-service"),
    );
    mesh.send(frontend, "auth-service", "/login", 3);
    let found = tap.until(1, |l| l.starts_with("rsp") && l.contains(":status=502"));
    assert!(found[0].contains("proxy_error="), "{}", found[0]);

    // The frontend's proxy made the 502s: its log says what was wrong with the response.
    let logged: Vec<serde_json::Value> = mesh.pods[frontend]
        .proxy
        .log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| matches!(v["level"].as_str(), Some("ERROR") | Some("WARN")))
        .collect();
    assert!(
        logged.iter().any(|v| {
            let line = v.to_string();
            line.contains("auth-service") && line.to_ascii_lowercase().contains("header")
        }),
        "no WARN/ERROR line names the endpoint and the header: {logged:#?}"
    );
}
