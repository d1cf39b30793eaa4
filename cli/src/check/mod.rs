//! `pylon check [DIR]`: the monthly review of a config dir as one command.
//!
//! This module owns the command: its flags, loading the dir, the audits and the report. The
//! dir is loaded with the proxy's own [`Store`], so every file is parsed and validated exactly
//! as the proxy would (nothing here reads YAML); its errors and warnings are reported as they
//! are. What the Store cannot see, validating one object at a time, is checked here on the
//! [`Snapshot`] it publishes:
//!
//! - [`weights`]: split weights that look like percentages gone wrong (90 + 20);
//! - [`destinations`]: split backends, `dstOverrides` and profiles naming services that are
//!   missing or have no ready endpoints;
//! - [`routes`]: routes that can never match, retries of non-idempotent requests, timeouts and
//!   retry budgets that are probably mistakes;
//! - [`authz`]: Servers on ports no Service sends to, MeshTLSAuthentication identities no
//!   certificate carries, policies that authorize everyone, network exceptions outside their
//!   network (policies naming a missing Server or authentication are among the Store's
//!   warnings);
//! - [`report`]: the human list and the `-o json` document.
//!
//! Exit codes: 0 no errors (warnings allowed), 1 errors found, 2 the dir cannot be read or
//! the command line is wrong.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use pylon_proxy_policy::{ConfigError, MeshObject, ObjectKey, Snapshot, Store, StoreConfig};
use serde::Serialize;

mod authz;
mod destinations;
mod report;
mod routes;
mod weights;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The config dir to check: the proxy's `--config-dir` (default: the current directory).
    #[arg(value_name = "DIR", conflicts_with = "config_dir")]
    dir: Option<PathBuf>,

    /// The same as DIR, spelled as the proxy's flag.
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Namespace of objects without `metadata.namespace`, as the proxy's `--namespace`.
    #[arg(long, short = 'n', default_value_t = StoreConfig::default().default_namespace)]
    namespace: String,

    /// The cluster's DNS domain, as in `web.default.svc.<domain>`.
    #[arg(long, default_value_t = StoreConfig::default().cluster_domain)]
    cluster_domain: String,

    /// Output: a list for people, or a JSON document for machines.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The mesh does not do what the config says, or rejects it: exit 1.
    Error,
    /// Probably a mistake, or a risk; the config works as written.
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warning => "warning",
        }
    }
}

/// One problem, located precisely enough to fix it without searching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: String,
    /// `"TrafficSplit default/web-split"`, or `"document 2"` for a document without a name.
    pub object: String,
    /// `"spec.backends[1].weight"`.
    pub field: String,
    pub message: String,
}

impl Finding {
    fn from_config(severity: Severity, e: &ConfigError) -> Self {
        Self {
            severity,
            file: e.file.display().to_string(),
            object: e.object.clone(),
            field: e.field.clone(),
            message: e.message.clone(),
        }
    }
}

/// The counts that decide the exit code, and what was looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub errors: usize,
    pub warnings: usize,
    /// Valid objects checked (rejected ones are among the errors).
    pub objects: usize,
}

impl Summary {
    fn of(findings: &[Finding], objects: usize) -> Self {
        let errors = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        Self {
            errors,
            warnings: findings.len() - errors,
            objects,
        }
    }
}

pub fn run(args: CheckArgs) -> ExitCode {
    let dir = args
        .config_dir
        .or(args.dir)
        .unwrap_or_else(|| PathBuf::from("."));
    let cfg = StoreConfig {
        default_namespace: args.namespace,
        cluster_domain: args.cluster_domain,
    };
    let (findings, summary) = match check_dir(&dir, cfg) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("pylon check: error: {e}");
            return ExitCode::from(2);
        }
    };
    let text = match args.output {
        OutputFormat::Table => report::human(&dir, &findings, summary),
        OutputFormat::Json => match report::json(&dir, &findings, summary) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("pylon check: error: rendering JSON: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Err(e) = std::io::stdout().lock().write_all(text.as_bytes()) {
        eprintln!("pylon check: error: writing the report: {e}");
        return ExitCode::from(2);
    }
    if summary.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// What `pylon check DIR` reports: the findings and their counts (the dashboard's check
/// page shows the same), or why the dir could not be read.
pub fn check_dir(dir: &Path, cfg: StoreConfig) -> Result<(Vec<Finding>, Summary), String> {
    let store = Store::load_dir(dir, cfg).map_err(|e| e.to_string())?;
    let snapshot = store.snapshot();
    let findings = audit(&snapshot);
    let summary = Summary::of(&findings, snapshot.objects().count());
    Ok((findings, summary))
}

/// Everything wrong with a loaded config dir, grouped by file and object: the Store's errors
/// and warnings first, then what the audits find.
pub fn audit(snapshot: &Snapshot) -> Vec<Finding> {
    let mut findings: Vec<Finding> = snapshot
        .errors()
        .iter()
        .map(|e| Finding::from_config(Severity::Error, e))
        .chain(
            snapshot
                .warnings()
                .iter()
                .map(|w| Finding::from_config(Severity::Warning, w)),
        )
        .collect();
    for object in snapshot.objects() {
        let mut out = ObjectFindings::new(snapshot, object.key(), &mut findings);
        match object {
            MeshObject::Service(service) => {
                destinations::check_service(snapshot, service, &mut out)
            }
            MeshObject::TrafficSplit(split) => {
                destinations::check_split(snapshot, split, &mut out);
                weights::check_split(split, &mut out);
            }
            MeshObject::ServiceProfile(profile) => {
                destinations::check_profile(snapshot, profile, &mut out);
                weights::check_dst_overrides(&profile.table, &mut out);
                routes::check(&profile.table, &mut out);
            }
            MeshObject::Server(server) => authz::check_server(snapshot, server, &mut out),
            MeshObject::AuthorizationPolicy(policy) => authz::check_policy(policy, &mut out),
            MeshObject::MeshTlsAuthentication(authn) => authz::check_meshtls(authn, &mut out),
            MeshObject::NetworkAuthentication(authn) => authz::check_network(authn, &mut out),
            MeshObject::EndpointSlice(_) | MeshObject::Pod(_) | MeshObject::Namespace(_) => {}
        }
    }
    // Stable: within an object, the order the checks found things in (field order).
    findings.sort_by(|a, b| (&a.file, &a.object).cmp(&(&b.file, &b.object)));
    findings
}

/// Collects findings about one object in force, which knows its file and name.
pub(crate) struct ObjectFindings<'a> {
    file: String,
    object: String,
    out: &'a mut Vec<Finding>,
}

impl<'a> ObjectFindings<'a> {
    fn new(snapshot: &Snapshot, key: ObjectKey, out: &'a mut Vec<Finding>) -> Self {
        Self {
            file: snapshot
                .source_file(&key)
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default(),
            object: key.to_string(),
            out,
        }
    }

    pub(crate) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, field.into(), message.into());
    }

    pub(crate) fn warning(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, field.into(), message.into());
    }

    fn push(&mut self, severity: Severity, field: String, message: String) {
        self.out.push(Finding {
            severity,
            file: self.file.clone(),
            object: self.object.clone(),
            field,
            message,
        });
    }
}

/// What the audits' unit tests share: real files in a temp dir, loaded by the real Store.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The findings for a config dir holding `files`.
    pub fn audit_files(files: &[(&str, &str)]) -> Vec<Finding> {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write test file");
        }
        let store = Store::load_dir(dir.path(), StoreConfig::default()).expect("load_dir");
        audit(&store.snapshot())
    }

    /// The findings on one field, as `(severity, message)`.
    pub fn on_field<'f>(findings: &'f [Finding], field: &str) -> Vec<(Severity, &'f str)> {
        findings
            .iter()
            .filter(|f| f.field == field)
            .map(|f| (f.severity, f.message.as_str()))
            .collect()
    }

    /// A Service `NAME` in `default` with port 80, and (when `ready` is `Some`) an
    /// EndpointSlice with one endpoint whose readiness is that.
    pub fn service(name: &str, ready: Option<bool>) -> String {
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        );
        if let Some(ready) = ready {
            yaml.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-a, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
                 endpoints: [{{addresses: [10.0.0.1], conditions: {{ready: {ready}}}}}]\n"
            ));
        }
        yaml
    }

    /// A ServiceProfile for `web.default` with `spec` (indented by two spaces).
    pub fn profile(spec: &str) -> String {
        format!(
            "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n\
             metadata: {{name: web.default.svc.cluster.local}}\nspec:\n{spec}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn store_errors_and_unknown_fields_are_reported_with_file_object_and_field() {
        let findings = audit_files(&[
            ("web.yaml", &service("web", Some(true))),
            (
                "bad.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 0}]}\n",
            ),
            (
                "extra.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: db, colour: red}\nspec: {ports: [{port: 5432}]}\n",
            ),
        ]);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        let error = &findings[0];
        assert_eq!(error.severity, Severity::Error);
        assert!(error.file.ends_with("bad.yaml"), "{error:?}");
        assert_eq!(error.object, "Service default/api");
        assert_eq!(error.field, "spec.ports[0].port");
        assert!(error.message.contains("invalid port 0"), "{error:?}");
        let warning = &findings[1];
        assert_eq!(warning.severity, Severity::Warning);
        assert!(warning.file.ends_with("extra.yaml"), "{warning:?}");
        assert_eq!(warning.object, "Service default/db");
        assert_eq!(warning.field, "metadata.colour");
        assert!(warning.message.contains("unknown field"), "{warning:?}");
        assert_eq!(
            Summary::of(&findings, 3),
            Summary {
                errors: 1,
                warnings: 1,
                objects: 3
            }
        );
    }

    #[test]
    fn the_demos_mesh_is_clean() {
        let yaml = crate::demo::mesh_config::render(
            "ml-inference",
            "default",
            80,
            &[crate::demo::mesh_config::EndpointObject {
                pod: "ml-inference-1",
                addr: "127.0.0.1:4001".parse().expect("addr"),
            }],
            Some("ml-inference.default.serviceaccount.identity.pylon.cluster.local"),
        );
        let findings = audit_files(&[("ml-inference.yaml", &yaml)]);
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn findings_are_grouped_by_file_then_object() {
        let split = "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\n\
                     metadata: {name: web-split}\nspec:\n  service: web\n  backends:\n  \
                     - {service: web, weight: 90}\n  - {service: gone, weight: 20}\n";
        let findings = audit_files(&[("a.yaml", split), ("b.yaml", &service("web", Some(true)))]);
        let fields: Vec<&str> = findings.iter().map(|f| f.field.as_str()).collect();
        // The backend (destinations) is checked before the weights.
        assert_eq!(fields, ["spec.backends[1].service", "spec.backends"]);
        assert!(findings.iter().all(|f| f.file.ends_with("a.yaml")));
    }
}
