//! End-to-end: `pylon check` with the real binary on real config dirs. A clean dir passes
//! (exit 0, "no problems"); a dir with the seed story's mistakes (a split adding up to 110%, a
//! backend with no ready endpoints, a broken route regex, retries on POST, a retry ratio of
//! 0.8) fails with exit 1 and names each one's file, object and field, in the list and in the
//! JSON document alike; a dir that cannot be read, or a bad command line, exits 2.

use std::path::Path;
use std::process::{Command, Output};

/// `web` and `web-v2` in `default`, port 80, each with one endpoint (ready or not).
fn services(web_v2_ready: bool) -> String {
    let mut yaml = String::new();
    for (name, ip, ready) in [
        ("web", "10.0.0.1", true),
        ("web-v2", "10.0.0.2", web_v2_ready),
        ("api", "10.0.0.3", true),
    ] {
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-a
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [\"{ip}\"]
  conditions:
    ready: {ready}
"
        ));
    }
    yaml
}

fn split(v2_weight: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: web-split
  namespace: default
spec:
  service: web
  backends:
  - service: web
    weight: 90
  - service: web-v2
    weight: {v2_weight}
"
    )
}

const WEB_PROFILE: &str = r"apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: web.default.svc.cluster.local
  namespace: default
spec:
  routes:
  - name: GET /api/users/{id}
    condition:
      method: GET
      pathRegex: /api/users/\d+
    isRetryable: true
    timeout: 300ms
  - name: POST /api/orders
    condition:
      method: POST
      pathRegex: /api/orders
    timeout: 2s
  retryBudget:
    retryRatio: 0.2
    minRetriesPerSecond: 10
    ttl: 10s
";

const API_PROFILE: &str = r"apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: api.default.svc.cluster.local
  namespace: default
spec:
  routes:
  - name: users
    condition:
      pathRegex: /api/users/\d+
";

fn write_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write config file");
    }
    dir
}

fn clean_dir() -> tempfile::TempDir {
    write_dir(&[
        ("services.yaml", services(true)),
        ("split.yaml", split(10)),
        ("web-profile.yaml", WEB_PROFILE.to_string()),
        ("api-profile.yaml", API_PROFILE.to_string()),
    ])
}

/// The seed story's mistakes.
fn seed_dir() -> tempfile::TempDir {
    write_dir(&[
        ("services.yaml", services(false)),
        ("split.yaml", split(20)),
        (
            "web-profile.yaml",
            WEB_PROFILE
                .replace(
                    "    timeout: 2s\n",
                    "    timeout: 2s\n    isRetryable: true\n",
                )
                .replace("retryRatio: 0.2", "retryRatio: 0.8"),
        ),
        (
            "api-profile.yaml",
            API_PROFILE.replace(r"/api/users/\d+", r"/api/(users/\d+"),
        ),
    ])
}

fn pylon_check(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pylon"));
    cmd.arg("check").args(args);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    cmd.output().expect("run pylon check")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// One finding, however it was printed.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Finding {
    file: String,
    severity: String,
    object: String,
    field: String,
    message: String,
}

/// Reads the human list back: a file line, then per finding `  SEVERITY  OBJECT  FIELD` and
/// the message indented under it.
fn parse_human(text: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut file = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some(rest) = line.strip_prefix("  ") else {
            file = line.to_string();
            continue;
        };
        let (severity, rest) = rest.split_once(' ').expect("severity");
        let (object, field) = rest.trim_start().rsplit_once("  ").expect("object  field");
        let message = lines.next().expect("message line").trim_start();
        findings.push(Finding {
            file: file.clone(),
            severity: severity.to_string(),
            object: object.to_string(),
            field: field.to_string(),
            message: message.to_string(),
        });
    }
    findings
}

fn parse_json(text: &str) -> (Vec<Finding>, serde_json::Value) {
    let doc: serde_json::Value = serde_json::from_str(text).expect("-o json is JSON");
    let text_of = |v: &serde_json::Value, key: &str| {
        v[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is a string in {v}"))
            .to_string()
    };
    let findings = doc["findings"]
        .as_array()
        .expect("findings is a list")
        .iter()
        .map(|f| Finding {
            file: text_of(f, "file"),
            severity: text_of(f, "severity"),
            object: text_of(f, "object"),
            field: text_of(f, "field"),
            message: text_of(f, "message"),
        })
        .collect();
    (findings, doc["summary"].clone())
}

#[test]
fn a_clean_dir_passes() {
    let dir = clean_dir();
    let out = pylon_check(&[dir.path().to_str().expect("utf-8 path")], None);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no problems found in 9 objects"), "{text}");

    let out = pylon_check(&["-o", "json"], Some(dir.path()));
    assert_eq!(out.status.code(), Some(0));
    let (findings, summary) = parse_json(&stdout(&out));
    assert_eq!(findings, []);
    assert_eq!(summary["errors"], 0);
    assert_eq!(summary["warnings"], 0);
    assert_eq!(summary["objects"], 9);
}

#[test]
fn the_seed_storys_mistakes_are_each_found_with_file_object_and_field() {
    let dir = seed_dir();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let web_profile = "ServiceProfile default/web.default.svc.cluster.local";
    let split = "TrafficSplit default/web-split";
    // (file, severity, object, field, part of the message)
    let expected = [
        (
            path("api-profile.yaml"),
            "error",
            "ServiceProfile default/api.default.svc.cluster.local",
            "spec.routes[0].condition.pathRegex",
            "invalid regex",
        ),
        (
            path("split.yaml"),
            "error",
            split,
            "spec.backends[1].service",
            "Service default/web-v2 has no ready endpoints",
        ),
        (
            path("split.yaml"),
            "error",
            split,
            "spec.backends",
            "weights sum to 110 (110% of traffic if these are percentages); shares are \
             weight/sum so web gets 81.8%, web-v2 18.2%",
        ),
        (
            path("web-profile.yaml"),
            "warning",
            web_profile,
            "spec.routes[1].isRetryable",
            "retries may repeat non-idempotent requests",
        ),
        (
            path("web-profile.yaml"),
            "warning",
            web_profile,
            "spec.retryBudget.retryRatio",
            "up to 1.8x",
        ),
    ];
    let check = |findings: &[Finding], how: &str| {
        assert_eq!(findings.len(), expected.len(), "{how}: {findings:#?}");
        for (f, (file, severity, object, field, message)) in findings.iter().zip(&expected) {
            assert_eq!(
                (
                    &f.file,
                    f.severity.as_str(),
                    f.object.as_str(),
                    f.field.as_str()
                ),
                (file, *severity, *object, *field),
                "{how}: {f:#?}"
            );
            assert!(f.message.contains(message), "{how}: {f:#?}");
        }
    };

    let out = pylon_check(&[dir.path().to_str().expect("utf-8 path")], None);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let human = parse_human(&text);
    check(&human, "human list");
    assert!(
        text.ends_with(&format!(
            "3 errors, 2 warnings in 8 objects ({})\n",
            dir.path().display()
        )),
        "{text}"
    );

    let dir_arg = dir.path().to_str().expect("utf-8 path");
    let out = pylon_check(&["--config-dir", dir_arg, "-o", "json"], None);
    assert_eq!(out.status.code(), Some(1));
    let (json, summary) = parse_json(&stdout(&out));
    check(&json, "JSON");
    assert_eq!(json, human, "the list and the JSON say the same");
    assert_eq!(summary["errors"], 3);
    assert_eq!(summary["warnings"], 2);
    assert_eq!(summary["objects"], 8);
}

#[test]
fn an_unreadable_dir_or_a_bad_command_line_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let out = pylon_check(&[missing.to_str().expect("utf-8 path")], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read config dir"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = pylon_check(&["-o", "yaml"], Some(dir.path()));
    assert_eq!(out.status.code(), Some(2));
    let out = pylon_check(&["a", "--config-dir", "b"], Some(dir.path()));
    assert_eq!(out.status.code(), Some(2));

    // An empty dir is a clean one.
    let out = pylon_check(&[], Some(dir.path()));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "no problems found in 0 objects (.)\n");
}
