//! `pylon inject` and `pylon uninject` on real files, against golden outputs in
//! `tests/golden/inject/` (regenerate with `PYLON_UPDATE_GOLDEN=1` and review the diff): the
//! proxy is added to the Deployment, the opted-out CronJob, the host-network DaemonSet and the
//! Service pass through with a note, injecting twice is injecting once, and uninjecting gives
//! the input back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pylon() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pylon"))
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/inject")
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(pylon())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pylon");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("pylon output");
    assert!(
        out.status.success(),
        "pylon {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// Compares with the golden file, or rewrites it with `PYLON_UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("PYLON_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (PYLON_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs from the output (PYLON_UPDATE_GOLDEN=1 rewrites it):\n--- output ---\n{actual}",
        path.display()
    );
}

fn inject_args(input: &str) -> Vec<String> {
    let anchors = golden_dir().join("anchors.pem");
    vec![
        "inject".into(),
        "--identity-trust-anchors".into(),
        anchors.display().to_string(),
        "--image".into(),
        "ghcr.io/pylon-mesh/pylon:test".into(),
        input.into(),
    ]
}

#[test]
fn inject_matches_the_golden_output_and_notes_what_it_skipped() {
    let input = golden_dir().join("app.yaml").display().to_string();
    let args = inject_args(&input);
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    let injected = stdout(&out);
    golden("app.injected.yaml", &injected);
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(
        notes.contains("CronJob shop/report: skipped: injection disabled by annotation"),
        "{notes}"
    );
    assert!(
        notes.contains("DaemonSet ops/node-agent: skipped: host-network"),
        "{notes}"
    );
    assert!(notes.contains("Service shop/web: skipped"), "{notes}");
    assert!(!notes.contains("Deployment"), "{notes}");

    // Idempotent: injecting the output again changes nothing (from stdin this time).
    let again = inject_args("-");
    let twice = run(
        &again.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&injected),
    );
    assert_eq!(stdout(&twice), injected);

    // Uninject gives the input back (its comments aside).
    let back = run(&["uninject", "-"], Some(&injected));
    golden("app.uninjected.yaml", &stdout(&back));
    let normalized = run(&["uninject", &input], None);
    assert_eq!(stdout(&back), stdout(&normalized));
}

#[test]
fn a_directory_is_read_in_file_order_and_bad_input_prints_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(golden_dir().join("app.yaml"), dir.path().join("b.yaml")).expect("copy");
    std::fs::write(
        dir.path().join("a.yml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: first}\nspec: {containers: [{name: c, image: i}]}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not YAML: [").expect("write");
    let out = run(&["inject", &dir.path().display().to_string()], None);
    let text = stdout(&out);
    let first = text.find("name: first").expect("the pod");
    let web = text.find("name: web").expect("the deployment");
    assert!(first < web, "a.yml before b.yaml");
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a mesh identity"));

    // A broken document: an error naming it, and no output at all.
    std::fs::write(dir.path().join("c.yaml"), "kind: Deployment\nspec: [\n").expect("write");
    let broken = Command::new(pylon())
        .args(["inject", &dir.path().display().to_string()])
        .output()
        .expect("run");
    assert!(!broken.status.success());
    assert!(broken.stdout.is_empty());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(err.contains("c.yaml: document 1"), "{err}");
}
