//! Syscalls per request: `strace -c` attached to a path's proxies over a short closed-loop run.
//!
//! A separate run from the timed ones: strace stops each proxy at every syscall, so this run's
//! throughput means nothing; only the counts are kept. Together with the user/system split it
//! tells whether a proxy makes more calls per request or does more per call.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::chain::{Chain, PathKind};
use crate::loadgen::{self, Job, Workload};
use crate::procstat;

/// How long the traced run lasts (strace makes the proxies slow, so a few thousand requests).
const TRACED_RUN: Duration = Duration::from_secs(2);
/// Connections of the traced run (fewer than the timed runs': counts, not throughput).
const TRACED_SLOTS: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct SyscallRow {
    pub workload: Workload,
    pub path: PathKind,
    pub requests: u64,
    /// All syscalls of the path's proxies per request per proxy.
    pub per_request_per_hop: f64,
    /// The most frequent, per request per proxy.
    pub top: Vec<(String, f64)>,
}

/// One `strace -c` summary row: the syscall and its call count.
pub fn parse_summary(text: &str) -> Result<Vec<(String, u64)>> {
    let mut rows = Vec::new();
    let mut seen_header = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"%") {
            seen_header = true;
            continue;
        }
        if !seen_header || fields.is_empty() || fields[0].starts_with('-') {
            continue;
        }
        // % time, seconds, usecs/call, calls, [errors,] syscall: errors is blank when none.
        let (Some(name), Some(calls)) = (fields.last(), fields.get(3)) else {
            continue;
        };
        if *name == "total" {
            continue;
        }
        let calls = calls
            .parse::<u64>()
            .with_context(|| format!("strace summary line {line:?}: calls is not a number"))?;
        rows.push(((*name).to_owned(), calls));
    }
    if !seen_header {
        bail!("no strace -c summary header in {text:?}");
    }
    Ok(rows)
}

/// The path's proxies under `strace -c` over a short closed loop of `workload`.
pub async fn measure(chain: &Chain, workload: Workload, proxies: usize) -> Result<SyscallRow> {
    let target = chain.target(workload).map_err(anyhow::Error::msg)?;
    let job = Job::new(workload, target);
    let slots = loadgen::open_slots(&job, TRACED_SLOTS, 1).await?;
    let out = tempfile::NamedTempFile::new().context("a file for strace's summary")?;
    let mut cmd = tokio::process::Command::new("strace");
    cmd.args(["-c", "-f", "-q", "-o"]).arg(out.path());
    for pid in procstat::with_descendants(chain.pids(workload))? {
        cmd.arg("-p").arg(pid.to_string());
    }
    let mut strace = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting strace (apt-get install strace)")?;
    // Attaching is not instant; requests before it would go uncounted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stats, _) = loadgen::closed_loop(job, slots, TRACED_RUN).await;
    let pid = strace.id().context("strace exited early")?;
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), strace.wait())
        .await
        .context("strace did not stop within 20 s of SIGINT")??;
    let summary = std::fs::read_to_string(out.path()).context("reading strace's summary")?;
    if summary.trim().is_empty() {
        bail!("strace wrote no summary (exit {status})");
    }
    if stats.ok == 0 {
        bail!(
            "no request completed under strace: {}",
            stats.first_error.unwrap_or_default()
        );
    }
    let rows = parse_summary(&summary)?;
    let per = (stats.ok * proxies.max(1) as u64) as f64;
    let total: u64 = rows.iter().map(|(_, c)| c).sum();
    let mut top: Vec<(String, f64)> = rows
        .into_iter()
        .map(|(name, calls)| (name, calls as f64 / per))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(5);
    Ok(SyscallRow {
        workload,
        path: chain.kind,
        requests: stats.ok,
        per_request_per_hop: total as f64 / per,
        top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_strace_summary() {
        // `strace -c -f -q -o FILE curl -s http://127.0.0.1:1/` on this machine.
        let rows = parse_summary(include_str!("strace_c_sample.txt")).expect("parses");
        assert_eq!(rows.first(), Some(&("read".to_owned(), 41)));
        // A row with errors and one without both keep their call count.
        assert!(rows.contains(&("openat".to_owned(), 69)));
        assert!(rows.contains(&("execve".to_owned(), 1)));
        assert!(!rows.iter().any(|(n, _)| n == "total"));
        assert_eq!(rows.iter().map(|(_, c)| c).sum::<u64>(), 493);
        assert!(
            parse_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): No such process\n").is_err()
        );
    }
}
