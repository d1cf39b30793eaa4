//! `pylon install`: the control plane as YAML for `kubectl apply -f -`: the manifests of
//! `deploy/control-plane/` (embedded at build time), with the image and replicas asked for, and
//! what no repository can ship: a fresh trust anchor and issuer (the identity service's Secret
//! and the trust roots' ConfigMap) and the injection webhook's serving certificate (its Secret,
//! and its CA in the MutatingWebhookConfiguration). `--crds` prints `deploy/crds/` instead.
//!
//! The output is the same for the same flags, apart from the keys and certificates.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use clap::Args;
use pylon_identity::ca::{Ca, ValidityWindow};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

mod manifests {
    include!(concat!(env!("OUT_DIR"), "/manifests.rs"));
}

const NAMESPACE: &str = "pylon";
const CONTROLLER: &str = "pylon-controller";
/// The trust anchor outlives many issuers; the issuer is rotated by installing it again.
const ANCHOR_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const WEBHOOK_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Print the CustomResourceDefinitions only (apply them first).
    #[arg(long)]
    crds: bool,
    /// High availability: three controller replicas, spread over nodes.
    #[arg(long)]
    ha: bool,
    /// The image (controller and proxies).
    #[arg(long)]
    image: Option<String>,
    /// Trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

pub fn run(args: InstallArgs) -> ExitCode {
    match render(&args) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pylon install: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn documents(files: &[(&str, &str)]) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (name, text) in files {
        for de in serde_yaml_ng::Deserializer::from_str(text) {
            let doc = Value::deserialize(de).with_context(|| format!("embedded {name}"))?;
            if !doc.is_null() {
                docs.push(doc);
            }
        }
    }
    Ok(docs)
}

fn render(args: &InstallArgs) -> Result<String> {
    if args.crds {
        return to_yaml(&documents(manifests::CRDS)?);
    }
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| pylon_inject::InjectConfig::new(env!("CARGO_PKG_VERSION")).image);
    let secrets = Secrets::generate(&args.trust_domain)?;
    let mut docs = documents(manifests::CONTROL_PLANE)?;
    for doc in &mut docs {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let name = doc
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        match (kind, name) {
            ("Deployment", CONTROLLER) => shape_controller(doc, &image, args),
            ("MutatingWebhookConfiguration", _) => {
                let ca = base64::engine::general_purpose::STANDARD.encode(&secrets.webhook_crt);
                if let Some(Value::Sequence(hooks)) = doc.get_mut("webhooks") {
                    for hook in hooks {
                        if let Some(Value::Mapping(cc)) = hook.get_mut("clientConfig") {
                            cc.insert("caBundle".into(), ca.clone().into());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    // After the namespace, before the controller that mounts them.
    let at = docs
        .iter()
        .position(|d| d.get("kind").and_then(Value::as_str) == Some("Namespace"))
        .map_or(0, |i| i + 1);
    for (i, doc) in secrets.objects(&args.trust_domain).into_iter().enumerate() {
        docs.insert(at + i, doc);
    }
    to_yaml(&docs)
}

fn to_yaml(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(doc).context("writing YAML")?);
    }
    Ok(out)
}

/// The controller's image (and the proxies' it injects), and HA replicas.
fn shape_controller(doc: &mut Value, image: &str, args: &InstallArgs) {
    let Some(spec) = doc.get_mut("spec").and_then(Value::as_mapping_mut) else {
        return;
    };
    if args.ha {
        spec.insert("replicas".into(), 3u64.into());
    }
    let Some(pod) = spec
        .get_mut("template")
        .and_then(|t| t.get_mut("spec"))
        .and_then(Value::as_mapping_mut)
    else {
        return;
    };
    if args.ha {
        let affinity: Value = serde_yaml_ng::from_str(
            "podAntiAffinity:\n  requiredDuringSchedulingIgnoredDuringExecution:\n  - labelSelector:\n      matchLabels: {app.kubernetes.io/name: pylon-controller}\n    topologyKey: kubernetes.io/hostname\n",
        )
        .unwrap_or(Value::Null);
        pod.insert("affinity".into(), affinity);
    }
    if let Some(Value::Sequence(containers)) = pod.get_mut("containers") {
        for c in containers {
            let Some(c) = c.as_mapping_mut() else {
                continue;
            };
            c.insert("image".into(), image.into());
            if let Some(Value::Sequence(args)) = c.get_mut("args") {
                for a in args.iter_mut() {
                    if a.as_str().is_some_and(|s| s.starts_with("--proxy-image=")) {
                        *a = format!("--proxy-image={image}").into();
                    }
                }
            }
        }
    }
}

/// What `pylon install` generates.
struct Secrets {
    anchor_crt: String,
    issuer_crt: String,
    issuer_key: String,
    webhook_crt: String,
    webhook_key: String,
}

impl Secrets {
    fn generate(trust_domain: &str) -> Result<Secrets> {
        let ca = Ca::generate(trust_domain, ValidityWindow::starting_now(ANCHOR_VALIDITY)?)
            .context("making the trust anchor and issuer")?;
        // The CA's files, read back: the root key is not installed in the cluster.
        let dir = tempfile::tempdir().context("a temporary dir for the CA")?;
        ca.write(dir.path()).context("writing the CA")?;
        let read = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .with_context(|| format!("reading the CA's {name}"))
        };
        let host = format!("pylon-webhook.{NAMESPACE}.svc");
        let (webhook_crt, webhook_key) = pylon_identity::ca::self_signed_server_cert(
            &[host.clone(), format!("{host}.cluster.local")],
            ValidityWindow::starting_now(WEBHOOK_CERT_VALIDITY)?,
        )
        .context("making the webhook's certificate")?;
        Ok(Secrets {
            anchor_crt: read(pylon_identity::CA_CRT)?,
            issuer_crt: read(pylon_identity::ISSUER_CRT)?,
            issuer_key: read(pylon_identity::ISSUER_KEY)?,
            webhook_crt,
            webhook_key,
        })
    }

    fn objects(&self, trust_domain: &str) -> Vec<Value> {
        let meta = |name: &str| {
            let mut m = Mapping::new();
            m.insert("name".into(), name.into());
            m.insert("namespace".into(), NAMESPACE.into());
            Value::Mapping(m)
        };
        let object = |kind: &str, name: &str, extra: Vec<(&str, Value)>| {
            let mut m = Mapping::new();
            m.insert("apiVersion".into(), "v1".into());
            m.insert("kind".into(), kind.into());
            m.insert("metadata".into(), meta(name));
            for (k, v) in extra {
                m.insert(k.into(), v);
            }
            Value::Mapping(m)
        };
        let data = |entries: Vec<(&str, &str)>| {
            Value::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (Value::from(k), Value::from(v)))
                    .collect(),
            )
        };
        vec![
            // The controller's issuer (mounted as its --identity-issuer-dir).
            object(
                "Secret",
                "pylon-identity-issuer",
                vec![
                    ("type", "Opaque".into()),
                    (
                        "stringData",
                        data(vec![
                            (pylon_identity::CA_CRT, &self.anchor_crt),
                            (pylon_identity::ISSUER_CRT, &self.issuer_crt),
                            (pylon_identity::ISSUER_KEY, &self.issuer_key),
                            (pylon_identity::TRUST_DOMAIN_FILE, trust_domain),
                        ]),
                    ),
                ],
            ),
            // The trust anchors, for `pylon inject --identity-trust-anchors` and for anyone
            // verifying the mesh's certificates.
            object(
                "ConfigMap",
                "pylon-identity-trust-roots",
                vec![("data", data(vec![("ca-bundle.crt", &self.anchor_crt)]))],
            ),
            object(
                "Secret",
                "pylon-webhook-tls",
                vec![
                    ("type", "kubernetes.io/tls".into()),
                    (
                        "stringData",
                        data(vec![
                            ("tls.crt", &self.webhook_crt),
                            ("tls.key", &self.webhook_key),
                        ]),
                    ),
                ],
            ),
        ]
    }
}
