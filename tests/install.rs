//! `pylon install`: the control plane it prints is `deploy/control-plane/` plus generated keys,
//! the same for the same flags apart from those keys (a golden file with them masked;
//! `PYLON_UPDATE_GOLDEN=1` rewrites it), and the keys work: the issuer Secret loads as the
//! controller loads it, and the webhook's CA bundle is the certificate its Secret serves, for
//! the webhook Service's name. `--crds` prints `deploy/crds/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde::Deserialize;
use serde_yaml_ng::Value;

fn pylon(args: &[&str]) -> String {
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

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|de| Value::deserialize(de).expect("YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'d>(docs: &'d [Value], kind: &str, name: &str) -> &'d Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The generated parts replaced by `<generated>`.
fn masked(yaml: &str) -> String {
    let mut docs = docs(yaml);
    for d in &mut docs {
        for field in ["stringData", "data"] {
            if let Some(Value::Mapping(m)) = d.get_mut(field) {
                for (k, v) in m.iter_mut() {
                    if k.as_str() != Some("trust-domain") {
                        *v = "<generated>".into();
                    }
                }
            }
        }
        if let Some(Value::Sequence(hooks)) = d.get_mut("webhooks") {
            for h in hooks {
                h["clientConfig"]["caBundle"] = "<generated>".into();
            }
        }
    }
    docs.iter()
        .map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).expect("YAML")))
        .collect()
}

fn golden(name: &str, actual: &str) {
    let path = repo().join("tests/golden/install").join(name);
    if std::env::var_os("PYLON_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (PYLON_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs (PYLON_UPDATE_GOLDEN=1 rewrites it):\n{actual}",
        path.display()
    );
}

#[test]
fn install_is_the_shipped_control_plane_with_fresh_keys() {
    let first = pylon(&["install"]);
    let second = pylon(&["install"]);
    assert_ne!(first, second, "fresh keys each time");
    assert_eq!(
        masked(&first),
        masked(&second),
        "deterministic apart from the keys"
    );
    golden("control-plane.yaml", &masked(&first));

    // Every object of deploy/control-plane is in it.
    let installed = docs(&first);
    let mut shipped = 0;
    for entry in std::fs::read_dir(repo().join("deploy/control-plane")).expect("deploy dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            for d in docs(&std::fs::read_to_string(&path).expect("read")) {
                shipped += 1;
                let name = d["metadata"]["name"].as_str().expect("named");
                find(&installed, d["kind"].as_str().expect("kind"), name);
            }
        }
    }
    assert_eq!(
        installed.len(),
        shipped + 3,
        "plus two Secrets and a ConfigMap"
    );

    // The issuer loads as the controller loads its --identity-issuer-dir.
    let issuer = find(&installed, "Secret", "pylon-identity-issuer");
    let dir = tempfile::tempdir().expect("tempdir");
    for (k, v) in issuer["stringData"].as_mapping().expect("stringData") {
        std::fs::write(
            dir.path().join(k.as_str().expect("key")),
            v.as_str().expect("value"),
        )
        .expect("write");
    }
    let ca = pylon_identity::ca::Ca::load(dir.path()).expect("the issuer Secret is a CA dir");
    assert_eq!(ca.trust_domain(), "cluster.local");
    let roots = find(&installed, "ConfigMap", "pylon-identity-trust-roots");
    assert_eq!(
        roots["data"]["ca-bundle.crt"].as_str(),
        Some(ca.anchor_pem())
    );
    assert!(
        !first.contains("ca.key"),
        "the root key stays out of the cluster"
    );

    // The webhook's CA bundle is its serving certificate, for its Service's name.
    let tls = find(&installed, "Secret", "pylon-webhook-tls");
    let crt = tls["stringData"]["tls.crt"].as_str().expect("tls.crt");
    let hook = find(
        &installed,
        "MutatingWebhookConfiguration",
        "pylon-proxy-injector",
    );
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .expect("caBundle"),
        )
        .expect("base64");
    assert_eq!(String::from_utf8(bundle).expect("PEM"), crt);
    let der = pylon_identity::rustls::pki_types::CertificateDer::from_pem_slice(crt.as_bytes())
        .expect("PEM certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("SANs")
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        sans.iter().any(|s| s.contains("pylon-webhook.pylon.svc")),
        "{sans:?}"
    );
}

use pylon_identity::rustls::pki_types::pem::PemObject;

#[test]
fn ha_and_image_flags_shape_the_controller() {
    let installed = docs(&pylon(&[
        "install",
        "--ha",
        "--image",
        "registry.example/pylon:9",
    ]));
    let controller = find(&installed, "Deployment", "pylon-controller");
    assert_eq!(controller["spec"]["replicas"].as_u64(), Some(3));
    let pod = &controller["spec"]["template"]["spec"];
    assert!(pod["affinity"]["podAntiAffinity"].is_mapping());
    assert_eq!(
        pod["containers"][0]["image"].as_str(),
        Some("registry.example/pylon:9")
    );
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--proxy-image=registry.example/pylon:9"),
        "{args:?}"
    );
    let plain = docs(&pylon(&["install"]));
    let controller = find(&plain, "Deployment", "pylon-controller");
    assert_eq!(controller["spec"]["replicas"].as_u64(), Some(2));
}

#[test]
fn crds_are_the_shipped_crds() {
    let printed = docs(&pylon(&["install", "--crds"]));
    let mut shipped = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/crds"))
        .expect("deploy/crds")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        shipped.extend(docs(&std::fs::read_to_string(f).expect("read")));
    }
    assert!(!shipped.is_empty());
    let names = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(names(&printed), names(&shipped));
    assert!(
        printed == shipped,
        "the printed CRDs differ from deploy/crds (rebuild?)"
    );
}
