//! `e2e_deploy_observability`: the Prometheus scrape config, alert rules and Grafana dashboards
//! under `deploy/`, checked with the real tools and against the real binaries.
//!
//! - `deploy/prometheus/`: `promtool check config`; the snippet holds the jobs of the full file.
//! - `deploy/alerts/`: `promtool check rules` on the rules file and on the PrometheusRule's
//!   `spec`, `promtool test rules` on `tests/*.yaml`, and the two files hold the same groups.
//! - `deploy/grafana/`: every dashboard is a Grafana dashboard model on a `datasource`
//!   variable.
//! - Every metric name any of them reads is one a real `pylon-proxy` or `pylon-controller`
//!   exports (scraped from running ones, with traffic through them).
//! - A real Prometheus runs the scrape jobs' relabelling on targets labelled as Kubernetes
//!   discovery labels pods, scrapes real proxies, evaluates the rules, answers every dashboard
//!   query, and `pylon stat|edges|routes --prometheus` find the series by the labels it gives.
//!
//! Prerequisites: `promtool` and `prometheus` (Debian's `prometheus`, which `./scripts/test`
//! installs), and the binaries `pylon-proxy` and `pylon-controller` next to `pylon` (`cargo
//! build -p pylon-proxy -p pylon-controller --bins`). Without a tool a test prints a notice and
//! passes, except under `CI=true`, where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod blocking;
use blocking::*;

/// The repository's `deploy/` dir (this crate is `cli/`).
fn deploy() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A YAML file as a JSON value (every key in these files is a string).
fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// The files in `dir` whose names end with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(suffix)))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *{suffix} files in {}", dir.display());
    out
}

fn prometheus_yml() -> PathBuf {
    deploy().join("prometheus/prometheus.yml")
}
fn scrape_snippet() -> PathBuf {
    deploy().join("prometheus/pylon-scrape-configs.yaml")
}
fn rules_file() -> PathBuf {
    deploy().join("alerts/pylon-rules.yaml")
}
fn prometheus_rule() -> PathBuf {
    deploy().join("alerts/pylon-prometheusrule.yaml")
}
fn rule_tests() -> Vec<PathBuf> {
    files(&deploy().join("alerts/tests"), ".yaml")
}
fn dashboards() -> Vec<PathBuf> {
    files(&deploy().join("grafana"), ".json")
}

/// Every rule of a `groups:` list.
fn rules(groups: &Value) -> Vec<&Value> {
    groups
        .as_array()
        .expect("groups is a list")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("a group's rules").iter())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The tool's path, or `None` with a notice (a failure under `CI=true`).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = format!(
            "`{name}` is not installed; as root: apt-get install -y prometheus (./scripts/test does)"
        );
        assert!(!in_ci(), "{msg} (failing because CI=true)");
        // Straight to the stream: libtest captures the output of passing tests.
        let _ = writeln!(std::io::stderr(), "NOTICE: skipping: {msg}");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn metrics(admin: SocketAddr) -> String {
    match http_get(admin, "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET http://{admin}/metrics: {other:?}"),
    }
}

/// Polls `cond` every 100 ms for up to `limit`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// A small mesh of real processes
// ---------------------------------------------------------------------------------------------

/// A `pylon-controller` on `config_dir`, once ready: the process and its admin address.
fn start_controller(config_dir: &Path) -> (Proc, SocketAddr) {
    let admin = free_addr();
    let mut command = Command::new(sibling("pylon-controller"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PYLON_")) {
        command.env_remove(k);
    }
    let controller = Proc(
        command
            .env("PYLON_LOG", "warn")
            .arg("--config-dir")
            .arg(config_dir)
            .args(["--destination-addr", "127.0.0.1:0"])
            .args(["--policy-addr", "127.0.0.1:0"])
            .args(["--identity-addr", "127.0.0.1:0"])
            .arg("--admin-addr")
            .arg(admin.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pylon-controller"),
    );
    assert!(
        wait_for(Duration::from_secs(30), || {
            http_get(admin, "/ready").is_some_and(|(s, _)| s == 200)
        }),
        "pylon-controller on {} was not ready within 30 s",
        config_dir.display()
    );
    (controller, admin)
}

const WEB: &str = "web.default.svc.cluster.local";

/// `client` calls service `web`, whose endpoints are `web`'s inbound proxy (to a backend that
/// answers 200) and a `bad` endpoint that answers 500 to everything. Plus an idle `db` proxy (a
/// StatefulSet's) and a `pylon-controller` on an empty config dir.
struct Mesh {
    web: Proxy,
    client: Proxy,
    db: Proxy,
    controller_admin: SocketAddr,
    _controller: Proc,
    _dirs: Vec<tempfile::TempDir>,
}

impl Mesh {
    fn start() -> Mesh {
        let good = start_backend(200);
        let bad = start_backend(500);
        let web = start_proxy(&[
            "--workload",
            "deployment/web",
            "--namespace",
            "default",
            "--pod",
            "web-0",
            "--inbound-forward",
            &good.to_string(),
        ]);
        let cfg = tempfile::tempdir().expect("tempdir");
        let slice = |name: &str, port: u16| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
                 endpoints: [{{addresses: [\"127.0.0.1\"], conditions: {{ready: true}}}}]\n"
            )
        };
        let mesh_yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n{}---\n{}---\n\
             apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
             metadata: {{name: {WEB}, namespace: default}}\nspec:\n  routes:\n  \
             - name: GET /retry\n    condition: {{method: GET, pathRegex: /retry}}\n    isRetryable: true\n  \
             - name: POST /upload\n    condition: {{method: POST, pathRegex: /upload}}\n    isRetryable: true\n",
            slice("web-a", web.inbound.port()),
            slice("web-b", bad.port()),
        );
        std::fs::write(cfg.path().join("web.yaml"), mesh_yaml).expect("write the mesh config");
        // The policy API at a closed port: the client's proxy keeps a disconnected stream
        // (`control_plane_streams{state="disconnected"}`), as when the controller is away.
        let closed = free_addr().to_string();
        let client = start_proxy(&[
            "--workload",
            "deployment/client",
            "--namespace",
            "default",
            "--pod",
            "client-0",
            "--config-dir",
            cfg.path().to_str().expect("utf-8 path"),
            "--failure-accrual",
            "consecutive",
            "--policy-addr",
            &closed,
            "--inbound-ports",
            "8080",
        ]);
        let db = start_proxy(&["--workload", "statefulset/db", "--pod", "db-0"]);

        let empty = tempfile::tempdir().expect("tempdir");
        let (controller, controller_admin) = start_controller(empty.path());
        Mesh {
            web,
            client,
            db,
            controller_admin,
            _controller: controller,
            _dirs: vec![cfg, empty],
        }
    }

    /// `n` requests for `path` through the client's outbound proxy on one connection (closed
    /// after them), `extra` headers and a `body` on each; the statuses.
    fn send(&self, method: &str, path: &str, extra: &str, body: &[u8], n: usize) -> Vec<u16> {
        let conn = TcpStream::connect_timeout(&self.client.outbound, Duration::from_secs(2))
            .expect("connect to the client's outbound proxy");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut writer = conn;
        let mut statuses = Vec::new();
        for _ in 0..n {
            let mut req = format!(
                "{method} http://{WEB}{path} HTTP/1.1\r\nhost: {WEB}\r\n{extra}content-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(body);
            writer.write_all(&req).expect("send a request");
            statuses.push(read_response(&mut reader).expect("a response"));
        }
        statuses
    }

    /// Traffic that makes every family appear: inbound and outbound requests and connections
    /// (opened and closed), ServiceProfile routes with retries, a request body too large to
    /// retry, failures enough to eject the `bad` endpoint.
    fn traffic(&self) {
        for _ in 0..4 {
            self.send("GET", "/x", "", b"", 15);
        }
        self.send("GET", "/retry", "", b"", 10);
        self.send(
            "POST",
            "/upload",
            "x-status: 500\r\n",
            &vec![b'x'; 100_000],
            1,
        );
    }
}

/// The metric names an exposition offers: its samples' names, and from each `# TYPE` line the
/// names Prometheus stores for that family (`_total` for counters, `_bucket`, `_sum` and
/// `_count` for histograms), so a family with no sample yet still counts.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" if name.ends_with("_total") => &[""],
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// PromQL: the metric names an expression reads
// ---------------------------------------------------------------------------------------------

/// PromQL's functions and aggregations, and the few functions of Grafana's variable queries
/// (`label_values` is handled on its own). An identifier in this list is never a metric name.
#[rustfmt::skip]
const FUNCTIONS: &[&str] = &[
    // Aggregation operators.
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
    // Functions.
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn",
    "sin", "sinh", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp",
    "vector", "year", "start", "end",
    // Grafana's templating functions.
    "label_names", "metrics", "query_result",
];

/// Words of the language that are not metric names. The first six take a list of label names
/// in parentheses, skipped whole.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// The metric names `expr` reads, in order, or an error naming an unknown function.
///
/// A small tokenizer, not a parser; it knows what can stand where a metric name could:
/// - strings (`"..."`, `'...'`, `` `...` ``), label matchers (`{...}`), ranges and subqueries
///   (`[5m]`, `[1h:1m]`, Grafana's `[[var]]`), numbers and durations (`0.99`, `5m`, `1e3`) and
///   Grafana variables (`$namespace`, `${datasource}`, `$__rate_interval`) are skipped whole;
/// - an identifier (`[a-zA-Z_:][a-zA-Z0-9_:]*`) is then either a keyword (`and`, `or`,
///   `unless`, `bool`, `offset`, ...), the label list of `by`, `without`, `on`, `ignoring`,
///   `group_left` or `group_right` (skipped with its parentheses), a function or aggregation
///   (a known name; an unknown one before `(` is an error), or a metric name: whatever is left,
///   followed by `{`, `[`, `)`, `,`, an operator, whitespace or the end;
/// - Grafana's `label_values(EXPR, label)` reads the metric names of EXPR, not `label`.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i, '{', '}')?,
            '[' => i = skip_group(&chars, i, '[', ']')?,
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}')?;
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let lower = word.to_ascii_lowercase();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let before_paren = chars.get(next) == Some(&'(');
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if before_paren {
                        i = skip_group(&chars, next, '(', ')')?;
                    }
                } else if KEYWORDS.contains(&lower.as_str()) {
                    // An operator word; `offset`'s duration is a number.
                } else if word == "label_values" && before_paren {
                    // label_values(EXPR, LABEL) or label_values(LABEL).
                    let end = skip_group(&chars, next, '(', ')')?;
                    let inner: String = chars[next + 1..end - 1].iter().collect();
                    if let Some(comma) = last_top_level_comma(&inner) {
                        names.extend(metric_names(&inner[..comma])?);
                    }
                    i = end;
                } else if FUNCTIONS.contains(&word.as_str()) {
                    // Its arguments are read as the loop goes on.
                } else if before_paren {
                    return Err(format!("unknown function `{word}`"));
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    Ok(names)
}

/// The index after the string starting at `chars[i]` (a quote), escapes honoured.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The index after the group opening at `chars[i]` and its matching close (nested groups and
/// strings inside skipped).
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> Result<usize, String> {
    let mut depth = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!("unbalanced `{open}`"))
}

/// The byte index of the last comma outside parentheses, braces, brackets and strings.
fn last_top_level_comma(s: &str) -> Option<usize> {
    let (mut depth, mut quote, mut last) = (0i32, None::<char>, None);
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '{' | '[' => depth += 1,
            ')' | '}' | ']' => depth -= 1,
            ',' if depth == 0 => last = Some(i),
            _ => {}
        }
    }
    last
}

#[test]
fn the_tokenizer_finds_metric_names_and_nothing_else() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"sum by (namespace, deployment) (rate(response_total{direction="inbound", deployment!=""}[5m]))"#,
            &["response_total"],
        ),
        (
            "histogram_quantile(0.99, sum(rate(response_latency_ms_bucket[$__rate_interval])) by (le))",
            &["response_latency_ms_bucket"],
        ),
        (
            "a:b:rate5m / ignoring(le) group_left(x) other_total - 1 > 0.05 and on (pod) c offset 1d",
            &["a:b:rate5m", "other_total", "c"],
        ),
        (
            r#"(x > 0) - time() < 6 * 3600 or label_replace(y, "dst", "$1", "authority", "(.*)")"#,
            &["x", "y"],
        ),
        (
            r#"label_values(route_request_total{namespace="$namespace"}, dst)"#,
            &["route_request_total"],
        ),
        ("label_values(namespace)", &[]),
        (
            "group by (namespace) (proxy_build_info) # a comment naming not_a_metric",
            &["proxy_build_info"],
        ),
        (
            r#"max_over_time(up{job="x"}[1h:1m]) unless bool absent(ALERTS{a="}"})"#,
            &["up", "ALERTS"],
        ),
    ];
    for (expr, want) in cases {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), Ok(want), "{expr}");
    }
    assert_eq!(
        metric_names("histogram_quantil(0.99, x)"),
        Err("unknown function `histogram_quantil`".to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/prometheus
// ---------------------------------------------------------------------------------------------

const JOBS: &[&str] = &["pylon-proxy", "pylon-controller"];

/// The job named `name` of a `scrape_configs` list.
fn job<'a>(jobs: &'a Value, name: &str) -> &'a Value {
    jobs.as_array()
        .expect("scrape_configs is a list")
        .iter()
        .find(|j| j["job_name"] == name)
        .unwrap_or_else(|| panic!("no scrape job {name:?}"))
}

/// Prometheus on deploy/prometheus/prometheus.yml with the repo's rules, scraping and
/// evaluating every second, its file_sd targets (`job` -> JSON target groups) written under
/// `dir/targets`: the process and its address.
fn start_repo_prometheus(
    prometheus: &Path,
    dir: &Path,
    targets: &[(&str, &Value)],
) -> (Proc, SocketAddr) {
    for (job, groups) in targets {
        std::fs::write(
            dir.join(format!("targets/{job}.json")),
            serde_json::to_string_pretty(groups).expect("JSON"),
        )
        .expect("write targets");
    }
    let full = yaml(&prometheus_yml());
    let mut config = full.clone();
    config["global"] =
        json!({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"});
    config["rule_files"] = json!([rules_file()]);
    config["scrape_configs"] = with_file_sd(&full["scrape_configs"], dir);
    let config_file = dir.join("prometheus.yml");
    std::fs::write(
        &config_file,
        serde_yaml_ng::to_string(&config).expect("YAML"),
    )
    .expect("write");
    start_prometheus(prometheus, &config_file, &dir.join("data"))
}

/// The jobs with their Kubernetes discovery replaced by file discovery of `targets/<job>.json`
/// under `dir`: same relabelling, the targets given by the test.
fn with_file_sd(jobs: &Value, dir: &Path) -> Value {
    let mut jobs = jobs.clone();
    for j in jobs.as_array_mut().expect("a list") {
        let name = j["job_name"].as_str().expect("job_name").to_string();
        let obj = j.as_object_mut().expect("a job is a mapping");
        assert!(
            obj.remove("kubernetes_sd_configs").is_some(),
            "job {name} has no kubernetes_sd_configs"
        );
        let file = dir.join(format!("targets/{name}.json"));
        obj.insert("file_sd_configs".into(), json!([{"files": [file]}]));
    }
    jobs
}

#[test]
fn the_scrape_config_passes_promtool() {
    let full = yaml(&prometheus_yml());
    let snippet = yaml(&scrape_snippet());
    assert_eq!(
        full["scrape_configs"],
        snippet,
        "{} must hold exactly the jobs of {}",
        prometheus_yml().display(),
        scrape_snippet().display()
    );
    for name in JOBS {
        let j = job(&snippet, name);
        // Kubernetes pod discovery, in the shape Prometheus takes it (this promtool may not
        // know the field: see below).
        let sd = j["kubernetes_sd_configs"]
            .as_array()
            .unwrap_or_else(|| panic!("job {name}: kubernetes_sd_configs is a list"));
        for c in sd {
            assert_eq!(c["role"], "pod", "job {name}: {c}");
            for key in c.as_object().expect("a mapping").keys() {
                assert!(
                    [
                        "role",
                        "namespaces",
                        "selectors",
                        "attach_metadata",
                        "api_server",
                        "kubeconfig_file"
                    ]
                    .contains(&key.as_str()),
                    "job {name}: unknown kubernetes_sd_configs field {key:?}"
                );
            }
            if let Some(ns) = c.get("namespaces") {
                assert!(
                    ns["names"]
                        .as_array()
                        .is_some_and(|n| n.iter().all(Value::is_string)),
                    "job {name}: namespaces.names is a list of names: {ns}"
                );
            }
        }
    }
    // Only the admin ports.
    let keep = |name: &str| -> String {
        job(&snippet, name)["relabel_configs"][0]["regex"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(keep("pylon-proxy"), "pylon-admin|linkerd-admin");
    assert_eq!(keep("pylon-controller"), "admin-http");

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(prometheus_yml()));
    println!(
        "$ promtool check config deploy/prometheus/prometheus.yml\n{}",
        show(&out)
    );
    if out.status.success() {
        return;
    }
    // Debian builds Prometheus without Kubernetes discovery (its client library is not
    // packaged): that promtool rejects the field itself. Check everything else: the same
    // file with file discovery in its place, its rule files found from where it lies.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("field kubernetes_sd_configs not found"),
        "promtool check config failed:\n{}",
        show(&out)
    );
    println!(
        "NOTE: this promtool has no Kubernetes discovery (Debian's build); checking the same \
         config with file discovery in its place"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = full.clone();
    let here = prometheus_yml().parent().expect("dir").to_path_buf();
    config["rule_files"] = Value::Array(
        full["rule_files"]
            .as_array()
            .expect("rule_files")
            .iter()
            .map(|p| json!(here.join(p.as_str().expect("a path"))))
            .collect(),
    );
    config["scrape_configs"] = with_file_sd(&full["scrape_configs"], dir.path());
    std::fs::create_dir(dir.path().join("targets")).expect("mkdir");
    for name in JOBS {
        std::fs::write(dir.path().join(format!("targets/{name}.json")), "[]").expect("write");
    }
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, serde_yaml_ng::to_string(&config).expect("YAML")).expect("write");
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(&file));
    println!(
        "$ promtool check config <the same, file discovery>\n{}",
        show(&out)
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pylon-rules.yaml") && text.contains("SUCCESS"),
        "rule_files should find deploy/alerts/pylon-rules.yaml:\n{}",
        show(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/alerts
// ---------------------------------------------------------------------------------------------

#[test]
fn the_rules_file_and_the_prometheusrule_hold_the_same_groups() {
    let file = yaml(&rules_file());
    let object = yaml(&prometheus_rule());
    assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(object["kind"], "PrometheusRule");
    assert!(
        object["metadata"]["name"].is_string(),
        "{}",
        object["metadata"]
    );
    assert_eq!(
        object["spec"]["groups"],
        file["groups"],
        "{} and {} must hold identical groups",
        rules_file().display(),
        prometheus_rule().display()
    );
    assert_eq!(
        object["spec"].as_object().map(|s| s.len()),
        Some(1),
        "spec holds the groups only"
    );

    // Every alert says how bad, what, where, and what to run next.
    let mut alerts = 0;
    for rule in rules(&file["groups"]) {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description", "runbook"] {
            let text = rule["annotations"][key].as_str().unwrap_or_default();
            assert!(!text.is_empty(), "{name}: no {key} annotation");
            if key != "runbook" {
                assert!(
                    text.contains("$labels."),
                    "{name}: the {key} names no labels: {text}"
                );
            }
        }
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        assert!(
            [
                "pylon stat",
                "pylon edges",
                "pylon routes",
                "pylon tap",
                "pylon check"
            ]
            .iter()
            .any(|c| runbook.contains(c)),
            "{name}: the runbook names no pylon command: {runbook}"
        );
    }
    assert!(alerts >= 11, "{alerts} alerts");
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(rules_file()));
    println!(
        "$ promtool check rules deploy/alerts/pylon-rules.yaml\n{}",
        show(&out)
    );
    assert!(out.status.success(), "{}", show(&out));

    // The PrometheusRule's spec is a rules file.
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("prometheusrule-spec.yaml");
    let object = yaml(&prometheus_rule());
    std::fs::write(
        &spec,
        serde_yaml_ng::to_string(&object["spec"]).expect("YAML"),
    )
    .expect("write");
    let out = run(Command::new(&promtool).arg("check").arg("rules").arg(&spec));
    println!(
        "$ promtool check rules <spec of deploy/alerts/pylon-prometheusrule.yaml>\n{}",
        show(&out)
    );
    assert!(out.status.success(), "{}", show(&out));

    let tests = rule_tests();
    let out = run(Command::new(&promtool).args(["test", "rules"]).args(&tests));
    println!(
        "$ promtool test rules deploy/alerts/tests/*.yaml\n{}",
        show(&out)
    );
    assert!(out.status.success(), "{}", show(&out));

    // Every alert has a case where it fires and one where it stays quiet; the healthy series
    // beside the firing ones stay quiet too, since exp_alerts lists exactly what fires.
    let alerts: BTreeSet<String> = rules(&yaml(&rules_file())["groups"])
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for file in &tests {
        let doc = yaml(file);
        for group in doc["tests"].as_array().expect("tests") {
            for case in group["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_string();
                assert!(
                    alerts.contains(&name),
                    "{}: no alert {name}",
                    file.display()
                );
                let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
                (if expected > 0 { &mut fires } else { &mut quiet }).insert(name);
            }
        }
    }
    for name in &alerts {
        assert!(fires.contains(name), "no test where {name} fires");
        assert!(quiet.contains(name), "no test where {name} stays quiet");
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/grafana
// ---------------------------------------------------------------------------------------------

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// A variable's query: a string, or `{"query": "..."}` in newer Grafana.
fn variable_query(v: &Value) -> Option<&str> {
    v["query"].as_str().or_else(|| v["query"]["query"].as_str())
}

/// `(where, PromQL)` of every query a dashboard runs: its panels' and its query variables'.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let title = p["title"].as_str().unwrap_or("?");
                let ref_id = t["refId"].as_str().unwrap_or("?");
                out.push((format!("panel {title:?} query {ref_id}"), expr.to_string()));
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            if let Some(q) = variable_query(v) {
                out.push((
                    format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                    q.to_string(),
                ));
            }
        }
    }
    out
}

/// Grafana's own variables.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__range",
    "__interval_ms",
    "__range_s",
];

#[test]
fn the_dashboards_are_grafana_models_on_a_datasource_variable() {
    let var = regex::Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)").expect("regex");
    let mut uids = BTreeSet::new();
    for file in dashboards() {
        let f = file.display();
        let d: Value =
            serde_json::from_str(&read(&file)).unwrap_or_else(|e| panic!("{f} is not JSON: {e}"));
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{f}: no title"
        );
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{f}: no uid"));
        assert!(uids.insert(uid.to_string()), "{f}: uid {uid} used twice");
        assert!(
            d["schemaVersion"].as_u64().is_some(),
            "{f}: no schemaVersion"
        );

        let vars = d["templating"]["list"]
            .as_array()
            .unwrap_or_else(|| panic!("{f}: no templating"));
        assert!(
            vars.iter().any(|v| v["type"] == "datasource"
                && v["name"] == "datasource"
                && v["query"] == "prometheus"),
            "{f}: no `datasource` variable of Prometheus data sources"
        );
        let defined: BTreeSet<&str> = vars
            .iter()
            .filter_map(|v| v["name"].as_str())
            .chain(GRAFANA_VARIABLES.iter().copied())
            .collect();
        let ours = json!({"type": "prometheus", "uid": "${datasource}"});
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert_eq!(v["datasource"], ours, "{f}: variable {}", v["name"]);
        }

        let all = panels(&d);
        assert!(all.iter().any(|p| p["type"] != "row"), "{f}: no panels");
        for p in all {
            let title = p["title"].as_str().unwrap_or("?");
            for k in ["h", "w", "x", "y"] {
                assert!(
                    p["gridPos"][k].is_u64(),
                    "{f}: panel {title:?} has no gridPos.{k}"
                );
            }
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"], ours, "{f}: panel {title:?}");
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{f}: panel {title:?} has no targets"));
            assert!(!targets.is_empty(), "{f}: panel {title:?} has no queries");
            for t in targets {
                assert_eq!(t["datasource"], ours, "{f}: panel {title:?}");
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{f}: panel {title:?} has a query without expr"
                );
            }
        }
        // Every `$var` a query uses is defined, and the queries read the proxies' own series
        // (Linkerd's names), not the alert rules' recordings (`level:metric:operation`), so
        // they work on any Prometheus that scrapes the proxies.
        for (place, expr) in dashboard_queries(&d) {
            for m in var.captures_iter(&expr) {
                assert!(
                    defined.contains(&m[1]),
                    "{f}: {place}: undefined variable ${}: {expr}",
                    &m[1]
                );
            }
            let names = metric_names(&expr).unwrap_or_else(|e| panic!("{f}: {place}: {e}"));
            for name in names {
                assert!(
                    !name.contains(':'),
                    "{f}: {place}: reads the recording {name}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------------------------

/// Series Prometheus makes itself, per target.
const PROMETHEUS_MADE: &[&str] = &["up"];

/// `(file, where, PromQL)` of everything under deploy/ that reads metrics.
fn every_query() -> Vec<(PathBuf, String, String)> {
    let mut out = Vec::new();
    for file in [rules_file(), prometheus_rule()] {
        let doc = yaml(&file);
        let groups = if doc.get("spec").is_some() {
            &doc["spec"]["groups"]
        } else {
            &doc["groups"]
        };
        for rule in rules(groups) {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("?");
            out.push((
                file.clone(),
                format!("rule {name}"),
                rule["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for file in rule_tests() {
        let doc = yaml(&file);
        for group in doc["tests"].as_array().expect("tests") {
            for s in group["input_series"].as_array().into_iter().flatten() {
                let series = s["series"].as_str().expect("series");
                out.push((file.clone(), "input series".into(), series.to_string()));
            }
            for t in group["promql_expr_test"].as_array().into_iter().flatten() {
                out.push((
                    file.clone(),
                    "promql_expr_test".into(),
                    t["expr"].as_str().expect("expr").to_string(),
                ));
                for s in t["exp_samples"].as_array().into_iter().flatten() {
                    let labels = s["labels"].as_str().unwrap_or_default();
                    out.push((file.clone(), "exp_samples".into(), labels.to_string()));
                }
            }
        }
    }
    for file in dashboards() {
        let d: Value = serde_json::from_str(&read(&file)).expect("JSON");
        for (place, expr) in dashboard_queries(&d) {
            out.push((file.clone(), place, expr));
        }
    }
    // metric_relabel_configs that pick series by name (`source_labels: [__name__]`): the names
    // their regex lists.
    let scrape = yaml(&prometheus_yml());
    for j in scrape["scrape_configs"].as_array().expect("jobs") {
        for r in j["metric_relabel_configs"].as_array().into_iter().flatten() {
            let by_name = r["source_labels"]
                .as_array()
                .is_some_and(|s| s.iter().any(|l| l == "__name__"));
            if let (true, Some(regex)) = (by_name, r["regex"].as_str()) {
                for alt in regex.split('|') {
                    out.push((
                        prometheus_yml(),
                        format!("job {} metric_relabel_configs", j["job_name"]),
                        alt.to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// Recording rules' names: metrics the rules make.
fn recorded_names() -> BTreeSet<String> {
    rules(&yaml(&rules_file())["groups"])
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_metric_name_is_one_pylon_exports() {
    let queries = every_query();
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut errors = Vec::new();
    for (file, place, expr) in &queries {
        match metric_names(expr) {
            Ok(names) => {
                for n in names {
                    wanted
                        .entry(n)
                        .or_default()
                        .push(format!("{}: {place}: {expr}", file.display()));
                }
            }
            Err(e) => errors.push(format!("{}: {place}: {e}: {expr}", file.display())),
        }
    }
    assert!(
        errors.is_empty(),
        "unreadable PromQL:\n{}",
        errors.join("\n")
    );
    let made: BTreeSet<String> = recorded_names()
        .into_iter()
        .chain(PROMETHEUS_MADE.iter().map(|s| s.to_string()))
        .collect();

    // What the real binaries export, with traffic through them. Families appear with their
    // first series, so poll (bounded) until every wanted name is there.
    let mesh = Mesh::start();
    mesh.traffic();
    let scrape = |m: &Mesh| -> BTreeSet<String> {
        [m.web.admin, m.client.admin, m.db.admin, m.controller_admin]
            .into_iter()
            .flat_map(|a| exported_names(&metrics(a)))
            .collect()
    };
    let mut exported = BTreeSet::new();
    let missing = |exported: &BTreeSet<String>| -> Vec<String> {
        wanted
            .keys()
            .filter(|n| !exported.contains(*n) && !made.contains(*n))
            .cloned()
            .collect()
    };
    wait_for(Duration::from_secs(10), || {
        exported = scrape(&mesh);
        missing(&exported).is_empty()
    });
    let unknown = missing(&exported);
    let report: Vec<String> = unknown
        .iter()
        .map(|n| format!("`{n}`, in:\n  {}", wanted[n].join("\n  ")))
        .collect();
    assert!(
        unknown.is_empty(),
        "metric names that neither pylon-proxy nor pylon-controller exports (nor a recording \
         rule makes):\n{}\n\nexported: {exported:?}",
        report.join("\n")
    );
    println!(
        "{} queries read {} metric names, all exported or recorded: {:?}",
        queries.len(),
        wanted.len(),
        wanted.keys().collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus
// ---------------------------------------------------------------------------------------------

/// `/api/v1/query` at Prometheus: the `data.result` list, or the error.
fn prom_query(prometheus: SocketAddr, query: &str) -> Result<Vec<Value>, String> {
    let (status, body) = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(query)),
    )
    .ok_or_else(|| "no answer".to_string())?;
    let doc: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if doc["status"] != "success" {
        return Err(format!("{status}: {}", doc["error"]));
    }
    Ok(doc["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A target as Kubernetes pod discovery lists it: one per container port.
fn pod_target(
    addr: SocketAddr,
    ns: &str,
    pod: &str,
    container: &str,
    port: &str,
    meta: &[(&str, &str)],
) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in [
        ("__meta_kubernetes_namespace", ns),
        ("__meta_kubernetes_pod_name", pod),
        ("__meta_kubernetes_pod_container_name", container),
        ("__meta_kubernetes_pod_container_port_name", port),
        ("__meta_kubernetes_pod_phase", "Running"),
    ]
    .into_iter()
    .chain(meta.iter().copied())
    {
        labels.insert(k.to_string(), json!(v));
    }
    json!({"targets": [addr.to_string()], "labels": labels})
}

fn pylon(args: &[&str]) -> Output {
    run(Command::new(PYLON).args(args))
}

#[test]
fn prometheus_relabels_scrapes_and_evaluates_as_pylon_stat_and_the_dashboards_expect() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let mesh = Mesh::start();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("targets")).expect("mkdir");

    // The pods, with the meta labels Kubernetes discovery gives them. Their proxies say
    // namespace "default" and pods web-0, client-0, db-0 (their flags): the API's names win.
    const WEB_POD: &str = "web-5c9d8f7b6-x2x4z";
    const CLIENT_POD: &str = "client-8a7b6c5d4-q9w8e";
    let rs = |name: &'static str, hash: &'static str| {
        vec![
            ("__meta_kubernetes_pod_controller_kind", "ReplicaSet"),
            ("__meta_kubernetes_pod_controller_name", name),
            ("__meta_kubernetes_pod_label_pod_template_hash", hash),
        ]
    };
    // web: no injector labels, its Deployment read off its ReplicaSet.
    let web = rs("web-5c9d8f7b6", "5c9d8f7b6");
    // client: Linkerd's and Pylon's injector labels (Pylon's win) on a Linkerd-named port.
    let mut client = rs("client-8a7b6c5d4", "8a7b6c5d4");
    client.extend([
        (
            "__meta_kubernetes_pod_label_linkerd_io_proxy_deployment",
            "client-by-linkerd",
        ),
        (
            "__meta_kubernetes_pod_label_pylon_io_proxy_deployment",
            "client",
        ),
        ("__meta_kubernetes_pod_label_pylon_io_workload_ns", "shop"),
        (
            "__meta_kubernetes_pod_label_pylon_io_control_plane_ns",
            "pylon",
        ),
    ]);
    let db = [
        ("__meta_kubernetes_pod_controller_kind", "StatefulSet"),
        ("__meta_kubernetes_pod_controller_name", "db"),
    ];
    let mut finished_job = pod_target(
        mesh.db.admin,
        "shop",
        "migrate-7x8y9",
        "pylon-proxy",
        "pylon-admin",
        &[
            ("__meta_kubernetes_pod_controller_kind", "Job"),
            ("__meta_kubernetes_pod_controller_name", "migrate"),
        ],
    );
    finished_job["labels"]["__meta_kubernetes_pod_phase"] = json!("Succeeded");
    let proxies = json!([
        pod_target(
            mesh.web.admin,
            "shop",
            WEB_POD,
            "pylon-proxy",
            "pylon-admin",
            &web
        ),
        // The application's own port of the same pod: not scraped.
        pod_target(mesh.web.inbound, "shop", WEB_POD, "web", "http", &web),
        pod_target(
            mesh.client.admin,
            "shop",
            CLIENT_POD,
            "linkerd-proxy",
            "linkerd-admin",
            &client
        ),
        pod_target(
            mesh.db.admin,
            "shop",
            "db-0",
            "pylon-proxy",
            "pylon-admin",
            &db
        ),
        // A finished Job's pod: not scraped.
        finished_job,
    ]);
    let controller_meta = rs("pylon-controller-6d5c4b3a2", "6d5c4b3a2");
    let controllers = json!([
        pod_target(
            mesh.controller_admin,
            "pylon",
            "pylon-controller-6d5c4b3a2-zzzzz",
            "pylon-controller",
            "admin-http",
            &controller_meta
        ),
        pod_target(
            mesh.controller_admin,
            "pylon",
            "pylon-controller-6d5c4b3a2-zzzzz",
            "pylon-controller",
            "grpc",
            &controller_meta
        ),
    ]);
    let (_prometheus, listen) = start_repo_prometheus(
        &prometheus,
        dir.path(),
        &[
            ("pylon-proxy", &proxies),
            ("pylon-controller", &controllers),
        ],
    );
    let url = format!("http://{listen}");

    // The targets: the admin ports only, labelled from the API.
    let mut targets = Vec::new();
    let scraped = wait_for(Duration::from_secs(30), || {
        targets = prom_query(listen, "up == 1").unwrap_or_default();
        targets.len() == 4
    });
    let labels_of = |pod: &str| -> Value {
        let mut l = targets
            .iter()
            .find(|t| t["metric"]["pod"] == pod)
            .map(|t| t["metric"].clone())
            .unwrap_or_else(|| panic!("no target for pod {pod}: {targets:?}"));
        let obj = l.as_object_mut().expect("labels");
        obj.remove("__name__");
        obj.remove("instance");
        l
    };
    assert!(
        scraped,
        "Prometheus did not scrape the 4 admin ports within 30 s: {targets:?}"
    );
    assert_eq!(
        labels_of(WEB_POD),
        json!({"job": "pylon-proxy", "namespace": "shop", "pod": WEB_POD, "container": "pylon-proxy", "deployment": "web"})
    );
    assert_eq!(
        labels_of(CLIENT_POD),
        json!({"job": "pylon-proxy", "namespace": "shop", "pod": CLIENT_POD, "container": "linkerd-proxy",
               "deployment": "client", "workload_ns": "shop", "control_plane_ns": "pylon"})
    );
    assert_eq!(
        labels_of("db-0"),
        json!({"job": "pylon-proxy", "namespace": "shop", "pod": "db-0", "container": "pylon-proxy", "statefulset": "db"})
    );
    assert_eq!(
        labels_of("pylon-controller-6d5c4b3a2-zzzzz"),
        json!({"job": "pylon-controller", "namespace": "pylon", "pod": "pylon-controller-6d5c4b3a2-zzzzz",
               "container": "pylon-controller", "deployment": "pylon-controller"})
    );
    // The series: the proxy's own namespace/deployment/pod gave way (no `exported_*` copies),
    // and db's `deployment="statefulset/db"` is gone.
    let exported = prom_query(
        listen,
        r#"{job="pylon-proxy", __name__=~".+", exported_namespace=~".+"}"#,
    )
    .expect("query");
    assert!(
        exported.is_empty(),
        "exported_* labels left: {:?}",
        &exported[..exported.len().min(3)]
    );
    let db_info = prom_query(listen, r#"proxy_build_info{pod="db-0"}"#).expect("query");
    assert_eq!(db_info.len(), 1, "{db_info:?}");
    assert!(
        db_info[0]["metric"].get("deployment").is_none(),
        "{db_info:?}"
    );
    assert_eq!(db_info[0]["metric"]["statefulset"], "db", "{db_info:?}");

    // Traffic; then Prometheus has what the proxies counted: web's inbound responses, and the
    // client's outbound responses and route requests (its scrapes come at other moments).
    mesh.traffic();
    let sum = |text: &str, metric: &str, direction: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut direct = 0.0;
    for (admin, deployment, metric, direction) in [
        (mesh.client.admin, "client", "response_total", "outbound"),
        (
            mesh.client.admin,
            "client",
            "route_request_total",
            "outbound",
        ),
        (mesh.web.admin, "web", "response_total", "inbound"),
    ] {
        let query = format!(
            r#"sum({metric}{{namespace="shop", deployment="{deployment}", direction="{direction}"}})"#
        );
        let mut seen = None;
        // The proxy counts a response as its body ends, a moment after the client read it:
        // read the count again on every try.
        let caught_up = wait_for(Duration::from_secs(20), || {
            direct = sum(&metrics(admin), metric, direction);
            seen = prom_query(listen, &query)
                .ok()
                .and_then(|r| r.first()?["value"][1].as_str()?.parse::<f64>().ok());
            direct > 0.0 && seen == Some(direct)
        });
        assert!(
            caught_up,
            "Prometheus has {seen:?} for {query}, the proxy {direct}"
        );
    }
    let web_inbound = direct; // the last of the three

    // `pylon stat|edges|routes --prometheus` find the series by namespace and deployment.
    let json_of = |args: &[&str]| -> Value {
        let out = pylon(args);
        println!(
            "$ pylon {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.status.success(), "pylon {args:?}\n{}", show(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let stat = json_of(&[
        "stat",
        "deploy/web",
        "-n",
        "shop",
        "--prometheus",
        &url,
        "--window",
        "1m",
        "-o",
        "json",
    ]);
    let rows = stat["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{stat}");
    assert_eq!(rows[0]["requests"].as_f64(), Some(web_inbound), "{stat}");
    let edges = json_of(&[
        "edges",
        "deployment",
        "-n",
        "shop",
        "--prometheus",
        &url,
        "--window",
        "1m",
        "-o",
        "json",
    ]);
    assert!(
        edges["edges"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["src"] == "client" && e["dst"] == "web")),
        "no edge client -> web: {edges}"
    );
    // The service is in another namespace than its caller (`default`, as the client's proxy
    // names it): by its authority, as the alerts' runbooks name it then.
    let routes = json_of(&[
        "routes",
        "deploy/client",
        "-n",
        "shop",
        "--to",
        &format!("authority/{WEB}"),
        "--prometheus",
        &url,
        "--window",
        "1m",
        "-o",
        "json",
    ]);
    assert!(
        routes["rows"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["name"] == "GET /retry")),
        "no route GET /retry: {routes}"
    );

    // The rules run on these series: recorded per deployment and edge, and the client's
    // disconnected policy stream has its alert pending.
    for (what, q) in [
        (
            "the deployment's rate",
            r#"namespace_deployment:inbound_response:rate5m{namespace="shop", deployment="web"}"#,
        ),
        (
            "the edge's rate",
            r#"namespace_deployment_dst_service:outbound_response:rate5m{namespace="shop", deployment="client", dst_service="web"}"#,
        ),
        (
            "the edge's requests",
            r#"namespace_deployment_dst:outbound_route_request:rate5m{namespace="shop", deployment="client"}"#,
        ),
        (
            "the deployment's p99",
            r#"namespace_deployment:inbound_response_latency_ms:p99_5m{namespace="shop", deployment="web"}"#,
        ),
        (
            "the stream alert",
            r#"ALERTS{alertname="PylonControlPlaneStreamsDisconnected", pod="client-8a7b6c5d4-q9w8e", api="policy"}"#,
        ),
    ] {
        let mut last = Ok(Vec::new());
        let found = wait_for(Duration::from_secs(20), || {
            last = prom_query(listen, q);
            last.as_ref().is_ok_and(|r| !r.is_empty())
        });
        assert!(found, "no {what} from the rules: {q} -> {last:?}");
    }

    // Every dashboard query runs (valid PromQL once Grafana's variables are filled in), and the
    // main panels show this traffic.
    let fill = |expr: &str, dashboard: &str| -> String {
        let (deployment, direction) = if dashboard == "pylon-deployment" {
            ("web", "inbound")
        } else {
            ("client", "outbound")
        };
        expr.replace("$__rate_interval", "1m")
            .replace("$namespace", "shop")
            .replace("$deployment", deployment)
            .replace("$direction", direction)
            .replace("$dst", &format!("{WEB}:80"))
    };
    let must_show = [
        ("pylon-top-line", "panel \"Deployments\" query B"),
        ("pylon-top-line", "panel \"Requests/s\" query A"),
        ("pylon-top-line", "variable $namespace"),
        (
            "pylon-deployment",
            "panel \"Requests/s by authority\" query A",
        ),
        ("pylon-deployment", "panel \"Latency\" query C"),
        ("pylon-route", "panel \"Requests/s\" query A"),
        ("pylon-route", "panel \"Retries\" query A"),
        ("pylon-route", "variable $dst"),
    ];
    let mut shown = BTreeSet::new();
    for file in dashboards() {
        let d: Value = serde_json::from_str(&read(&file)).expect("JSON");
        let uid = d["uid"].as_str().expect("uid").to_string();
        for (place, expr) in dashboard_queries(&d) {
            // label_values(EXPR, label) is Grafana's: run EXPR (label_values(label) reads none).
            let expr = match expr
                .strip_prefix("label_values(")
                .and_then(|e| e.strip_suffix(')'))
            {
                Some(inner) => match last_top_level_comma(inner) {
                    Some(comma) => inner[..comma].to_string(),
                    None => continue,
                },
                None => expr,
            };
            let q = fill(&expr, &uid);
            let result = prom_query(listen, &q).unwrap_or_else(|e| {
                panic!(
                    "{}: {place}: Prometheus rejects it: {e}\n{q}",
                    file.display()
                )
            });
            if !result.is_empty() {
                shown.insert((uid.clone(), place));
            }
        }
    }
    for (uid, place) in must_show {
        assert!(
            shown.contains(&(uid.to_string(), place.to_string())),
            "{uid}: {place} shows nothing for the traffic sent; shown: {shown:?}"
        );
    }
}

/// The story's stale endpoint set as Prometheus sees it: pylon-controller, on a config dir
/// where Service `web`'s slices name 2 of its 3 ready pods, exports the `endpoints_*` gauges;
/// the real Prometheus scrapes them through the controller's scrape job, the alert rule goes
/// pending on them, and `pylon stat --prometheus` names the missing pod.
#[test]
fn prometheus_alerts_on_a_stale_endpoint_set_and_pylon_stat_names_the_pod() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    const MISSING: &str = "web-7c9f5-c";
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut docs = vec![
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n"
            .to_string(),
    ];
    for (i, pod) in ["web-7c9f5-a", "web-7c9f5-b", MISSING].iter().enumerate() {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: shop\n  \
             labels: {{app: web, pod-template-hash: 7c9f5}}\n  \
             ownerReferences: [{{kind: ReplicaSet, name: web-7c9f5, controller: true}}]\n\
             spec: {{containers: [{{name: web}}]}}\n\
             status: {{phase: Running, podIP: 10.42.1.{i}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        ));
    }
    docs.push(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\n\
         endpoints: [{addresses: [10.42.1.0]}, {addresses: [10.42.1.1]}]\n"
            .to_string(),
    );
    std::fs::write(cfg.path().join("mesh.yaml"), docs.join("---\n")).expect("write the mesh");
    let (_controller, controller_admin) = start_controller(cfg.path());
    // A proxy, so that Prometheus has Pylon's proxies (`pylon stat` checks it scrapes some).
    let proxy = start_proxy(&["--workload", "deployment/client", "--namespace", "shop"]);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("targets")).expect("mkdir");
    let controller_meta = [
        ("__meta_kubernetes_pod_controller_kind", "ReplicaSet"),
        (
            "__meta_kubernetes_pod_controller_name",
            "pylon-controller-6d5c4b3a2",
        ),
        ("__meta_kubernetes_pod_label_pod_template_hash", "6d5c4b3a2"),
    ];
    let targets = [
        (
            "pylon-controller",
            json!([pod_target(
                controller_admin,
                "pylon",
                "pylon-controller-6d5c4b3a2-zzzzz",
                "pylon-controller",
                "admin-http",
                &controller_meta
            )]),
        ),
        (
            "pylon-proxy",
            json!([pod_target(
                proxy.admin,
                "shop",
                "client-0",
                "pylon-proxy",
                "pylon-admin",
                &[]
            )]),
        ),
    ];
    let targets: Vec<(&str, &Value)> = targets.iter().map(|(job, t)| (*job, t)).collect();
    let (_prometheus, listen) = start_repo_prometheus(&prometheus, dir.path(), &targets);

    // The gauges as scraped (the info family included), the alert pending on them, and the
    // proxy (what `pylon stat` looks for first).
    for (what, q) in [
        ("the proxy", r#"proxy_build_info{job="pylon-proxy"}"#),
        (
            "the missing pods",
            r#"endpoints_missing_pods{job="pylon-controller", dst_namespace="shop", dst_service="web"} == 1"#,
        ),
        (
            "the ready pods",
            r#"endpoints_ready_pods{job="pylon-controller", dst_namespace="shop", dst_service="web"} == 3"#,
        ),
        (
            "the missing pod's name",
            r#"endpoints_missing_pod_info{dst_service="web", dst_pod="web-7c9f5-c", dst_deployment="web"}"#,
        ),
        (
            "the alert",
            r#"ALERTS{alertname="PylonServiceEndpointsMissingPods", alertstate="pending", dst_namespace="shop", dst_service="web"}"#,
        ),
    ] {
        let mut last = Ok(Vec::new());
        let found = wait_for(Duration::from_secs(30), || {
            last = prom_query(listen, q);
            last.as_ref().is_ok_and(|r| !r.is_empty())
        });
        assert!(found, "no {what} in Prometheus: {q} -> {last:?}");
    }

    // Nobody calls web, so stat has no traffic to show; it says why there may be none.
    let url = format!("http://{listen}");
    let out = pylon(&["stat", "svc/web", "-n", "shop", "--prometheus", &url]);
    let shown = show(&out);
    println!("{shown}");
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains(&format!(
            "endpoints 2 of 3 ready pods of svc/web (namespace shop): {MISSING} (deployment/web) \
             is ready but not among its endpoints"
        )),
        "{shown}"
    );
}
