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
    let linked = match has_interpreter(&std::fs::read(pylon_bin)?) {
        Some(true) => ", dynamically linked",
        Some(false) => ", C library linked in (scripts/build-release-proxy)",
        None => "",
    };
    // scripts/build-release-proxy leaves a line beside the binary saying whether it was
    // profile-guided.
    let mut build_note = std::path::PathBuf::from(pylon_bin).into_os_string();
    build_note.push(".build");
    let guided = std::fs::read_to_string(build_note)
        .map(|s| format!(", {}", s.trim()))
        .unwrap_or_default();
    Ok(format!(
        "{version}, git {sha}{}{linked}{guided}",
        if dirty {
            "-dirty (uncommitted changes in the tree)"
        } else {
            ""
        }
    ))
}

/// Whether a 64-bit little-endian ELF executable names a dynamic loader (a `PT_INTERP` program
/// header): the shared C library's code then counts in its RSS. None when it isn't one.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let (entry_size, entries) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    let mut types = (0..entries).map(|i| {
        let at = phoff + i * entry_size;
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    });
    types.try_fold(false, |found, t| Some(found || t? == PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_dynamically_linked_executable_from_a_static_one() {
        // This test's own executable is dynamically linked (cargo's default on Linux).
        let me = std::fs::read(std::env::current_exe().expect("current_exe")).expect("read");
        assert_eq!(has_interpreter(&me), Some(true));
        // Its program headers with PT_INTERP renamed: what a static-pie executable has.
        let phoff = u64::from_le_bytes(me[0x20..0x28].try_into().unwrap()) as usize;
        let (size, n) = (
            u16::from_le_bytes([me[0x36], me[0x37]]) as usize,
            u16::from_le_bytes([me[0x38], me[0x39]]) as usize,
        );
        let mut stripped = me[..phoff + size * n].to_vec();
        for i in 0..n {
            let at = phoff + i * size;
            if stripped[at..at + 4] == 3u32.to_le_bytes() {
                stripped[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        assert_eq!(has_interpreter(&stripped), Some(false));
        // Not an ELF executable, or one cut short: no answer.
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(has_interpreter(&me[..phoff + size]), None);
    }

    #[test]
    fn reads_the_cpu_model() {
        let info =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
