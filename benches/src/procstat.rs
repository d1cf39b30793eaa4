//! What the kernel says about a process: CPU time from `/proc/PID/stat` (utime and stime) and
//! resident memory from `/proc/PID/status` (VmRSS), summed over a process and its descendants
//! (nginx's workers are children of its master).

use std::collections::HashSet;
use std::fs;

use anyhow::{bail, Context, Result};

/// The fields of `/proc/PID/stat` the bench uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
    /// User time alone (the proxy's own code, its libraries and the allocator), in clock ticks.
    pub user_ticks: u64,
    /// System time alone (the kernel working for the process: sockets, epoll), in clock ticks.
    pub system_ticks: u64,
}

/// CPU time of a set of processes, split as the kernel accounts it, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// What was used between `earlier` and `self` (a process that exited in between takes its
    /// ticks with it, so neither part goes below zero).
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Parses one `/proc/PID/stat` line. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Result<Stat> {
    let close = line.rfind(')').context("no `)` closing the command name")?;
    // After the name: state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9)
    // minflt(10) cminflt(11) majflt(12) cmajflt(13) utime(14) stime(15).
    let fields: Vec<&str> = line[close + 1..].split_whitespace().collect();
    if fields.len() < 13 {
        bail!("only {} fields after the command name", fields.len());
    }
    let num = |i: usize, what: &str| -> Result<u64> {
        fields[i]
            .parse::<u64>()
            .with_context(|| format!("{what} {:?} is not a number", fields[i]))
    };
    let ppid = u32::try_from(num(1, "ppid")?).context("ppid out of range")?;
    let user_ticks = num(11, "utime")?;
    let system_ticks = num(12, "stime")?;
    Ok(Stat {
        ppid,
        cpu_ticks: user_ticks + system_ticks,
        user_ticks,
        system_ticks,
    })
}

/// A `/proc/PID/status` (or `smaps_rollup`) field in kB (`VmRSS`, `RssAnon`, `Pss`, ...).
fn parse_status_kib(status: &str, field: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .with_context(|| format!("no {field} line (a kernel thread or a zombie?)"))?;
    let mut parts = line[field.len() + 1..].split_whitespace();
    let value = parts
        .next()
        .with_context(|| format!("{field} has no value"))?;
    match parts.next() {
        Some("kB") => {}
        other => bail!("{field} unit is {other:?}, expected kB"),
    }
    value
        .parse()
        .with_context(|| format!("{field} value {value:?} is not a number"))
}

/// Kernel clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of utime and stime.
pub fn clock_ticks_per_second() -> Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) returned {hz}");
    }
    Ok(hz as u64)
}

pub fn stat(pid: u32) -> Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("parsing {path}"))
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    proc_kib(pid, "status", "VmRSS")
}

/// A kB field of `/proc/PID/FILE` (`status` or `smaps_rollup`).
fn proc_kib(pid: u32, file: &str, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("parsing {path}"))
}

/// Busy ticks of all CPUs from the first (`cpu `) line of `/proc/stat`: user, nice, system,
/// irq, softirq and steal (not idle or iowait).
pub fn parse_busy_ticks(proc_stat: &str) -> Result<u64> {
    let line = proc_stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            f.parse::<u64>()
                .with_context(|| format!("{f:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    if fields.len() < 8 {
        bail!("only {} fields on the cpu line", fields.len());
    }
    // user nice system idle iowait irq softirq steal
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

/// Busy ticks of the whole machine so far.
pub fn machine_busy_ticks() -> Result<u64> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_busy_ticks(&text).context("parsing /proc/stat")
}

/// `roots` and every live descendant of them.
pub fn with_descendants(roots: &[u32]) -> Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we look; skip it.
        if let Ok(s) = stat(pid) {
            parents.push((pid, s.ppid));
        }
    }
    Ok(descendants(roots, &parents))
}

/// Pure part of [`with_descendants`]: closes `roots` over a (pid, ppid) table.
pub fn descendants(roots: &[u32], table: &[(u32, u32)]) -> Vec<u32> {
    let mut found: Vec<u32> = roots.to_vec();
    let mut seen: HashSet<u32> = roots.iter().copied().collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(pid, ppid) in table {
            if ppid == parent && seen.insert(pid) {
                found.push(pid);
            }
        }
        i += 1;
    }
    found
}

/// CPU ticks used so far by `roots` and their descendants.
pub fn cpu_ticks(roots: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in with_descendants(roots)? {
        total += stat(pid)?.cpu_ticks;
    }
    Ok(total)
}

/// CPU ticks used so far by `roots` and their descendants, user and system apart.
pub fn cpu_split(roots: &[u32]) -> Result<CpuTicks> {
    let mut sum = CpuTicks::default();
    for pid in with_descendants(roots)? {
        let s = stat(pid)?;
        sum.user += s.user_ticks;
        sum.system += s.system_ticks;
    }
    Ok(sum)
}

/// CPU ticks used so far by exactly these processes (not their children).
pub fn own_cpu_ticks(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for &pid in pids {
        total += stat(pid)?.cpu_ticks;
    }
    Ok(total)
}

/// Resident memory of `roots` and their descendants, in KiB.
pub fn total_rss_kib(roots: &[u32]) -> Result<u64> {
    total_proc_kib(roots, "status", "VmRSS")
}

/// The anonymous part of [`total_rss_kib`] (`RssAnon`: heap, stacks): what the processes
/// allocated, without the file pages they map (their code, which processes of one binary
/// share, and RSS counts once per process).
pub fn total_anon_kib(roots: &[u32]) -> Result<u64> {
    total_proc_kib(roots, "status", "RssAnon")
}

/// The proportional set size of `roots` and their descendants (`Pss` of
/// `/proc/PID/smaps_rollup`): each page counted once, split between the processes that map it.
/// Two proxies of one binary share its code; RSS counts those pages in both, PSS once.
pub fn total_pss_kib(roots: &[u32]) -> Result<u64> {
    total_proc_kib(roots, "smaps_rollup", "Pss")
}

fn total_proc_kib(roots: &[u32], file: &str, field: &str) -> Result<u64> {
    let mut total = 0;
    for pid in with_descendants(roots)? {
        total += proc_kib(pid, file, field)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_read_this_process() {
        let me = [std::process::id()];
        assert!(total_rss_kib(&me).expect("VmRSS") > 0);
        assert!(total_anon_kib(&me).expect("RssAnon") > 0);
        assert!(total_pss_kib(&me).expect("Pss") > 0);
        // How the three relate, from one snapshot: read one by one, each call in its own
        // instant, they can't be compared while other tests of this process allocate and free
        // (under load, Pss read after VmRSS came out 81,767 against 71,212 kB).
        let rollup = fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
        let field = |name| parse_status_kib(&rollup, name).expect(name);
        let (rss, pss, anon) = (field("Rss"), field("Pss"), field("Anonymous"));
        assert!(anon > 0 && anon <= rss, "anon {anon} rss {rss}");
        assert!(pss > 0 && pss <= rss, "pss {pss} rss {rss}");
    }

    #[test]
    fn reads_status_fields_by_exact_name() {
        let status =
            "Name:\tpylon-proxy\nVmRSSx:\t1 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    1100 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS").expect("VmRSS"), 10240);
        assert_eq!(parse_status_kib(status, "RssAnon").expect("RssAnon"), 1100);
        assert!(parse_status_kib(status, "RssFile").is_err());
        assert!(parse_status_kib("VmRSS:\t12 MB\n", "VmRSS").is_err());
        // smaps_rollup: `Pss` is its own line, not the start of `Pss_Anon`.
        let rollup = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  8784 kB\n\
                      Pss_Anon:  1400 kB\nPss:  5120 kB\n";
        assert_eq!(parse_status_kib(rollup, "Pss").expect("Pss"), 5120);
    }

    #[test]
    fn parses_stat_with_a_tricky_command_name() {
        let line = "4242 (nginx: worker (1) x) S 4240 4240 4240 0 -1 4194624 120 0 0 0 \
                    37 12 0 0 20 0 1 0 123 456 789";
        let s = parse_stat(line).expect("parses");
        assert_eq!(s.ppid, 4240);
        assert_eq!(s.cpu_ticks, 49);
        assert_eq!(s.user_ticks, 37, "utime alone");
        assert_eq!(s.system_ticks, 12, "stime alone");
    }

    #[test]
    fn splits_utime_and_stime_of_a_real_stat_line() {
        // A real /proc/PID/stat (python3 reading /dev/zero a byte at a time): utime (14) 7,
        // stime (15) 6, then cutime 5 of its exited children, which is not its own.
        let line = "32661 (python3) R 32659 32659 4389 0 -1 4194304 2842 6548 1 0 7 6 5 0 20 0 1 \
                    0 1035785 16977920 3349 18446744073709551615 94414744940544 94414744940885 \
                    140722429135936 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0 94414744952240 \
                    94414744952856 94414930669568 140722429139074 140722429139241 \
                    140722429139241 140722429140943 0\n";
        let s = parse_stat(line).expect("parses");
        assert_eq!((s.user_ticks, s.system_ticks, s.cpu_ticks), (7, 6, 13));
        assert_eq!(s.ppid, 32659);
        let before = CpuTicks {
            user: 10,
            system: 5,
        };
        let after = CpuTicks {
            user: 15,
            system: 4,
        };
        assert_eq!(
            after.since(before),
            CpuTicks { user: 5, system: 0 },
            "an exited process never makes a part negative"
        );
        assert_eq!(after.total(), 19);
    }

    #[test]
    fn rejects_a_truncated_stat_line() {
        assert!(parse_stat("1 (init) S 0 1").is_err());
        assert!(parse_stat("no parens here").is_err());
    }

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tpylon-proxy\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t2\n";
        assert_eq!(parse_status_kib(status, "VmRSS").expect("parses"), 5120);
        assert!(parse_status_kib("Name:\tkthreadd\n", "VmRSS").is_err());
        assert!(parse_status_kib("VmRSS:\t12 MB\n", "VmRSS").is_err());
    }

    #[test]
    fn parses_machine_busy_ticks() {
        let text = "cpu  100 5 20 900 7 1 2 3 0 0\ncpu0 50 0 10 450 3 0 1 1 0 0\n";
        assert_eq!(parse_busy_ticks(text).expect("parses"), 131);
        assert!(parse_busy_ticks("cpu0 1 2 3\n").is_err());
        assert!(machine_busy_ticks().is_ok());
    }

    #[test]
    fn closes_over_descendants() {
        let table = [(10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        let mut got = descendants(&[10], &table);
        got.sort_unstable();
        assert_eq!(got, vec![10, 11, 12, 13]);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("own rss") > 0);
        assert!(cpu_ticks(&[me]).is_ok());
        // This process runs (other tests' threads) between two reads, so its counter can only
        // grow: the split's total lies between a reading taken before it and one taken after.
        let before = stat(me).expect("own stat").cpu_ticks;
        let split = cpu_split(&[me]).expect("own split");
        let after = stat(me).expect("own stat").cpu_ticks;
        assert!(
            (before..=after).contains(&split.total()),
            "{before} <= {} <= {after}",
            split.total()
        );
        assert!(clock_ticks_per_second().expect("hz") > 0);
    }
}
