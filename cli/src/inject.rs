//! `pylon inject` and `pylon uninject`: the offline form of the controller's injection webhook
//! (the same [`pylon_inject`] transform) on YAML files, directories or stdin, written to stdout
//! as multi-document YAML; what happened to each object goes to stderr.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use pylon_inject::{InjectConfig, Note, Outcome};
use serde::Deserialize;
use serde_yaml_ng::Value;

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// YAML or JSON files, directories of them, or `-` for stdin.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// The image with `pylon-proxy` (default: this version's release image).
    #[arg(long)]
    image: Option<String>,
    /// The control plane's namespace.
    #[arg(long, default_value = "pylon")]
    control_plane_namespace: String,
    /// The mesh's trust anchors (PEM): without them proxies run without an identity. `pylon
    /// install` prints them in the `pylon-identity-trust-roots` ConfigMap.
    #[arg(long)]
    identity_trust_anchors: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The cluster's Kubernetes version: before 1.29 the proxy is a regular container rather
    /// than a native sidecar.
    #[arg(long, default_value = "1.29")]
    kubernetes_version: String,
}

#[derive(Args, Debug)]
pub struct UninjectArgs {
    /// YAML or JSON files, directories of them, or `-` for stdin.
    #[arg(required = true)]
    inputs: Vec<String>,
}

pub fn run_inject(args: InjectArgs) -> ExitCode {
    report(
        "inject",
        (|| {
            let mut config = InjectConfig::new(env!("CARGO_PKG_VERSION"));
            if let Some(image) = args.image {
                config.image = image;
            }
            config.control_plane_namespace = args.control_plane_namespace;
            config.cluster_domain = args.cluster_domain;
            config.trust_domain = args.trust_domain;
            config.native_sidecar =
                pylon_inject::supports_native_sidecars(&args.kubernetes_version);
            if let Some(path) = &args.identity_trust_anchors {
                config.trust_anchors_pem = Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                );
            } else {
                eprintln!("pylon inject: no --identity-trust-anchors: the proxies will run without a mesh identity (no mTLS)");
            }
            transform(&args.inputs, |doc| {
                pylon_inject::inject(doc, &config).map_err(Into::into)
            })
        })(),
    )
}

pub fn run_uninject(args: UninjectArgs) -> ExitCode {
    report(
        "uninject",
        transform(&args.inputs, |doc| {
            pylon_inject::uninject(doc).map_err(Into::into)
        }),
    )
}

fn report(command: &str, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pylon {command}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads every document, transforms it, prints them all (nothing is printed when any input is
/// unreadable, so a pipe into `kubectl apply` never applies half).
fn transform(inputs: &[String], mut f: impl FnMut(&mut Value) -> Result<Vec<Note>>) -> Result<()> {
    let mut out = Vec::new();
    for (source, text) in read_inputs(inputs)? {
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let mut doc = Value::deserialize(de)
                .with_context(|| format!("{source}: document {}: not YAML", i + 1))?;
            if doc.is_null() {
                continue;
            }
            let notes = f(&mut doc).with_context(|| format!("{source}: document {}", i + 1))?;
            for note in notes {
                if matches!(note.outcome, Outcome::Skipped(_)) {
                    eprintln!("{source}: {note}");
                }
            }
            out.push(serde_yaml_ng::to_string(&doc).context("writing YAML")?);
        }
    }
    print!("{}", out.join("---\n"));
    Ok(())
}

/// `(name, text)` of every input: files, the YAML/JSON files of directories (sorted), stdin.
fn read_inputs(inputs: &[String]) -> Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for input in inputs {
        if input == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            texts.push(("stdin".to_string(), text));
            continue;
        }
        let path = Path::new(input);
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {input}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(pylon_proxy_policy::is_config_file_name)
                })
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                texts.push((file.display().to_string(), text));
            }
        } else if path.exists() {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {input}"))?;
            texts.push((input.clone(), text));
        } else {
            bail!("{input}: no such file or directory");
        }
    }
    Ok(texts)
}
