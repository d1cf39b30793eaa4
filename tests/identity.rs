//! End-to-end: `pylon identity init-ca` and `pylon identity issue` with the real binary. The
//! CA and identity dirs they write load with `pylon_identity::Credentials::load`, the leaf
//! carries the identity as DNS SAN and the SPIFFE id as URI SAN, and is valid for what
//! `--valid-for` asked; mistakes (a bad name, a missing CA, an existing CA) exit 1 with the
//! reason on stderr, bad flags exit 2.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use pylon_identity::rustls::pki_types::pem::PemObject;
use pylon_identity::rustls::pki_types::CertificateDer;
use pylon_identity::Credentials;
use x509_parser::extensions::GeneralName;

fn pylon_identity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pylon"))
        .arg("identity")
        .args(args)
        .output()
        .expect("run pylon identity")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The URI SANs of the first certificate in `pem`.
fn uri_sans(pem: &[u8]) -> Vec<String> {
    let der = CertificateDer::from_pem_slice(pem).expect("a certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("valid SAN extension")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn init_ca_then_issue_then_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let id_dir = tmp.path().join("web");

    let out = pylon_identity(&[
        "init-ca",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca_dir),
        "--valid-for",
        "30d",
    ]);
    assert!(out.status.success(), "init-ca: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for file in [
        "ca.crt",
        "ca.key",
        "issuer.crt",
        "issuer.key",
        "trust-domain",
    ] {
        assert!(ca_dir.join(file).is_file(), "{file} missing");
        assert!(
            stdout.contains(path(&ca_dir.join(file))),
            "{file} not printed:\n{stdout}"
        );
    }
    assert!(stdout.contains("cluster.local"), "{stdout}");

    let before = now();
    let out = pylon_identity(&[
        "issue",
        "--ca",
        path(&ca_dir),
        "--sa",
        "web",
        "--namespace",
        "default",
        "--out",
        path(&id_dir),
        "--valid-for",
        "24h",
    ]);
    assert!(out.status.success(), "issue: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let identity = "web.default.serviceaccount.identity.pylon.cluster.local";
    assert!(stdout.contains(identity), "{stdout}");
    assert!(
        stdout.contains("spiffe://cluster.local/ns/default/sa/web"),
        "{stdout}"
    );
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(
            stdout.contains(path(&id_dir.join(file))),
            "{file} not printed:\n{stdout}"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(id_dir.join("tls.key"))
            .expect("tls.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let creds = Credentials::load(&id_dir).expect("the issued identity dir loads");
    assert_eq!(creds.identity().as_str(), identity);
    assert_eq!(creds.identity().sa(), "web");
    assert_eq!(creds.identity().namespace(), "default");
    assert_eq!(creds.identity().trust_domain(), "cluster.local");
    // Valid now, for 24h from about now.
    let after = now();
    assert!(
        creds.not_before() <= before,
        "not_before {}",
        creds.not_before()
    );
    assert!(
        (before + 86_400..=after + 86_400).contains(&creds.not_after()),
        "not_after {} not 24h after {before}..{after}",
        creds.not_after()
    );

    let pem = std::fs::read(id_dir.join("tls.crt")).expect("tls.crt");
    assert_eq!(
        uri_sans(&pem),
        vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
    );
    assert_eq!(
        CertificateDer::pem_slice_iter(&pem).count(),
        2,
        "tls.crt holds leaf then issuer"
    );

    // Re-issuing rotates: a new serial in the same dir.
    let out = pylon_identity(&[
        "issue",
        "--ca",
        path(&ca_dir),
        "--sa",
        "web",
        "-n",
        "default",
        "--out",
        path(&id_dir),
    ]);
    assert!(out.status.success(), "re-issue: {}", text(&out.stderr));
    let rotated = Credentials::load(&id_dir).expect("the re-issued identity dir loads");
    assert_ne!(rotated.serial(), creds.serial());
}

#[test]
fn mistakes_exit_non_zero_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let id_dir = tmp.path().join("web");

    // No CA there yet.
    let out = pylon_identity(&[
        "issue",
        "--ca",
        path(&ca_dir),
        "--sa",
        "web",
        "--namespace",
        "default",
        "--out",
        path(&id_dir),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("init-ca") && stderr.contains(path(&ca_dir)),
        "{stderr}"
    );

    let out = pylon_identity(&[
        "init-ca",
        "--trust-domain",
        "Not_A_Domain",
        "--out",
        path(&ca_dir),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("trust domain"),
        "{}",
        text(&out.stderr)
    );

    let out = pylon_identity(&["init-ca", "--out", path(&ca_dir)]);
    assert!(out.status.success(), "init-ca: {}", text(&out.stderr));
    let anchor = std::fs::read(ca_dir.join("ca.crt")).expect("ca.crt");

    // An existing CA is not replaced by accident.
    let out = pylon_identity(&["init-ca", "--out", path(&ca_dir)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(ca_dir.join("ca.crt")).expect("ca.crt"),
        anchor
    );

    let out = pylon_identity(&[
        "issue",
        "--ca",
        path(&ca_dir),
        "--sa",
        "Web_App",
        "--namespace",
        "default",
        "--out",
        path(&id_dir),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("service account"),
        "{}",
        text(&out.stderr)
    );
    assert!(!id_dir.exists(), "nothing written on errors");

    // A bad duration is a bad command line.
    let out = pylon_identity(&[
        "issue",
        "--ca",
        path(&ca_dir),
        "--sa",
        "web",
        "--namespace",
        "default",
        "--out",
        path(&id_dir),
        "--valid-for",
        "forever",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("forever"),
        "{}",
        text(&out.stderr)
    );
}

/// `pylon proxy --identity-dir DIR` (the same proxy as `pylon-proxy`) with everything on
/// loopback port 0; bounded to 20 s.
fn proxy_with_identity(dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pylon"))
        .arg("proxy")
        .args([
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0", "--tap-addr", "127.0.0.1:0"])
        .arg("--identity-dir")
        .arg(dir)
        .env("PYLON_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pylon proxy");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_proxy_does_not_start_without_a_valid_identity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let out = pylon_identity(&[
        "init-ca",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca_dir),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Missing: the error names the file.
    let missing = tmp.path().join("nothing-here");
    let out = proxy_with_identity(&missing);
    assert!(!out.status.success(), "started without an identity");
    let err = text(&out.stderr);
    assert!(
        err.contains("--identity-dir") && err.contains("nothing-here"),
        "{err}"
    );

    // Expired: issued for a window that ended an hour ago.
    let expired = tmp.path().join("expired");
    let hour = std::time::Duration::from_secs(3600);
    let window = pylon_identity::ca::ValidityWindow {
        not_before: SystemTime::now() - 2 * hour,
        not_after: SystemTime::now() - hour,
    };
    pylon_identity::ca::issue_with_validity(&ca_dir, "web", "default", &expired, window)
        .expect("issue an expired certificate");
    let out = proxy_with_identity(&expired);
    assert!(!out.status.success(), "started with an expired identity");
    let err = text(&out.stderr).to_lowercase();
    assert!(err.contains("expired") && err.contains("tls.crt"), "{err}");

    // Unreadable key: garbage where the key should be.
    let broken = tmp.path().join("broken");
    pylon_identity::ca::issue(&ca_dir, "web", "default", &broken, hour).expect("issue");
    std::fs::write(broken.join("tls.key"), "not a key").expect("write");
    let out = proxy_with_identity(&broken);
    assert!(!out.status.success(), "started with a broken key");
    assert!(
        text(&out.stderr).contains("tls.key"),
        "{}",
        text(&out.stderr)
    );
}
