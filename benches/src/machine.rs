//! What the run happened on: CPU model, cores, kernel, and the versions of every tool measured.

use std::path::Path;

use anyhow::{Context, Result};

use crate::procs::output_of;

/// `model name` of the first CPU in `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_owned()
}

/// Name/value pairs for the report header. A fact that cannot be read says why.
pub fn describe(
    nginx: Option<&Path>,
    haproxy: Option<&Path>,
    pylon_bin: &Path,
) -> Vec<(String, String)> {
    let or_why = |r: Result<String>| r.unwrap_or_else(|e| format!("unknown ({e:#})"));
    let mut out = vec![(
        "CPU".into(),
        or_why(
            std::fs::read_to_string("/proc/cpuinfo")
                .context("reading /proc/cpuinfo")
                .and_then(|t| cpu_model(&t).context("no model name in /proc/cpuinfo")),
        ),
    )];
    out.push(("cores".into(), or_why(online_cpus().map(|n| n.to_string()))));
    out.push((
        "kernel".into(),
        or_why(
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .context("reading /proc/sys/kernel/osrelease"),
        ),
    ));
    out.push(("pylon".into(), or_why(pylon_version(pylon_bin))));
    if let Some(nginx) = nginx {
        out.push((
            "nginx".into(),
            or_why(output_of(nginx, &["-v"]).map(|s| first_line(&s))),
        ));
    }
    if let Some(haproxy) = haproxy {
        out.push((
            "haproxy".into(),
            or_why(output_of(haproxy, &["-v"]).map(|s| first_line(&s))),
        ));
    }
    out.push((
        "rustc".into(),
        or_why(output_of(Path::new("rustc"), &["-V"]).map(|s| first_line(&s))),
    ));
    out
}

/// CPUs online (not this process's affinity mask, which the bench narrows to core 0).
fn online_cpus() -> Result<i64> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    anyhow::ensure!(n > 0, "sysconf(_SC_NPROCESSORS_ONLN) returned {n}");
    Ok(n)
}

/// The git commit the proxy was built from, `-dirty` when the tree has uncommitted changes.
fn pylon_version(pylon_bin: &Path) -> Result<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate has no parent dir")?;
    let repo_s = repo.display().to_string();
    let sha = first_line(&output_of(
        Path::new("git"),
        &["-C", &repo_s, "rev-parse", "--short=12", "HEAD"],
    )?);
    let dirty = !output_of(
        Path::new("git"),
        &[
            "-C",
            &repo_s,
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )?
    .trim()
    .is_empty();
    let version = first_line(&output_of(pylon_bin, &["--version"])?);
    Ok(format!(
        "{version}, git {sha}{}",
        if dirty {
            "-dirty (uncommitted changes in the tree)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_model() {
        let info =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
