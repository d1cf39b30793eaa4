//! The results: rows with their ratio columns, rendered as markdown and JSON. Ratios are
//! computed here from the same run's numbers; a ratio whose denominator is zero or negative is
//! left out (`—`) rather than invented.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::chain::PathKind;
use crate::loadgen::Workload;
use crate::rounds::{spread, Rounds, Spread};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Percentiles of a nanosecond histogram; `None` when it is empty.
pub fn percentiles(h: &Histogram<u64>) -> Option<Percentiles> {
    if h.is_empty() {
        return None;
    }
    let us = |ns: u64| ns as f64 / 1_000.0;
    Some(Percentiles {
        p50_us: us(h.value_at_quantile(0.50)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    })
}

/// `a / b`, or `None` when `b` is not a positive finite number.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b.is_finite() && b > 0.0 && a.is_finite()).then(|| a / b)
}

/// The best of nginx's and HAProxy's values (`lower` = lower is better), if any were measured.
pub fn best_other(values: &[(PathKind, f64)], lower: bool) -> Option<f64> {
    values
        .iter()
        .filter(|(k, _)| matches!(k, PathKind::Nginx | PathKind::Haproxy))
        .map(|&(_, v)| v)
        .reduce(|a, b| if (a < b) == lower { a } else { b })
}

#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    pub count: u64,
    pub first: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub workload: Workload,
    pub path: PathKind,
    pub rate_per_s: u64,
    pub ok: u64,
    pub errors: Errors,
    /// Requests that found all slots busy (the path fell behind the rate).
    pub late: u64,
    pub unsent: u64,
    pub latency: Percentiles,
    /// Over direct at the same rate: p50, p99, p99.9 (µs).
    pub added_us: Option<[f64; 3]>,
    /// Added p99 over the best (lowest) added p99 of nginx and HAProxy.
    pub added_p99_vs_best_other: Option<f64>,
    pub proxy_cpu_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub workload: Workload,
    pub path: PathKind,
    pub hops: String,
    pub ok: u64,
    pub errors: Errors,
    pub seconds: f64,
    pub req_per_s: f64,
    pub vs_direct: Option<f64>,
    pub latency: Percentiles,
    pub proxy_cpu_s: f64,
    /// The user-space part of `proxy_cpu_s` (utime).
    pub proxy_user_cpu_s: f64,
    /// The kernel part of `proxy_cpu_s` (stime).
    pub proxy_system_cpu_s: f64,
    /// Proxies on the path (from `hops`): 2 for the HTTP chains, 1 for the TCP echo.
    pub proxies: usize,
    /// `proxy_user_cpu_s` per completed request per proxy, in µs.
    pub user_us_per_req_per_hop: Option<f64>,
    /// `proxy_system_cpu_s` per completed request per proxy, in µs.
    pub sys_us_per_req_per_hop: Option<f64>,
    pub req_per_proxy_cpu_s: Option<f64>,
    /// req/s per proxy CPU-second over the best of nginx and HAProxy.
    pub per_cpu_vs_best_other: Option<f64>,
    pub proxy_cpu_s_per_100k: Option<f64>,
    /// CPU of the load generator plus the app over wall time (100% = one core busy).
    pub load_side_cpu_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    pub connections: usize,
    pub opened: usize,
    pub errors: Errors,
    pub rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub path: PathKind,
    pub idle_rss_mib: f64,
    /// Of `idle_rss_mib`, the anonymous memory (heap, stacks); the rest is mapped files,
    /// mostly each process's code.
    pub idle_anon_mib: f64,
    /// Idle proportional set size: pages the processes share (their code) counted once.
    pub idle_pss_mib: f64,
    pub with_connections: Vec<MemoryPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotRun {
    pub path: PathKind,
    pub workload: Workload,
    pub reason: String,
}

/// One figure of Pylon's mTLS chain against the plaintext one, measured back to back.
#[derive(Debug, Clone, Serialize)]
pub struct MtlsFigure {
    pub workload: Workload,
    /// What is compared, with its unit (`req per proxy CPU-s (closed loop)`, `p99 µs at ...`).
    pub figure: String,
    pub plaintext: f64,
    pub mtls: f64,
    /// mTLS ÷ plaintext.
    pub ratio: Option<f64>,
    /// Failed requests over the runs behind each number: (plaintext, mTLS).
    pub errors: (u64, u64),
}

/// What mTLS between Pylon's proxies costs against plaintext on the same run.
#[derive(Debug, Clone, Serialize)]
pub struct MtlsCost {
    /// How it was measured and checked, or why it was not.
    pub summary: String,
    pub figures: Vec<MtlsFigure>,
}

impl MtlsFigure {
    pub fn new(
        workload: Workload,
        figure: impl Into<String>,
        plaintext: f64,
        mtls: f64,
        errors: (u64, u64),
    ) -> MtlsFigure {
        MtlsFigure {
            workload,
            figure: figure.into(),
            plaintext,
            mtls,
            ratio: ratio(mtls, plaintext),
            errors,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date_utc: String,
    pub mode: String,
    pub machine: Vec<(String, String)>,
    pub pinning: String,
    pub settings: Vec<(String, String)>,
    pub notes: Vec<String>,
    pub latency: Vec<LatencyRow>,
    pub throughput: Vec<ThroughputRow>,
    pub syscalls: Vec<crate::syscalls::SyscallRow>,
    /// Why syscalls were not counted for some or all paths (strace missing, or a traced run
    /// that failed outside CI).
    pub syscalls_not_counted: Vec<String>,
    pub memory: Vec<MemoryRow>,
    pub not_run: Vec<NotRun>,
    pub tap_active_vs_idle: String,
    pub mtls_vs_plaintext: MtlsCost,
    /// Instructions per request per hop from the committed `benches/profile.py` reports.
    pub profiles: Vec<crate::profiles::HopCost>,
    /// The target workloads again in alternated rounds (`None`: not run).
    pub rounds: Option<Rounds>,
}

/// Fills the ratio columns of every row from the other rows of the same run.
pub fn fill_ratios(report: &mut Report) {
    let latency = report.latency.clone();
    for row in &mut report.latency {
        let same = |p: PathKind| {
            latency.iter().find(|r| {
                r.workload == row.workload && r.rate_per_s == row.rate_per_s && r.path == p
            })
        };
        let Some(direct) = same(PathKind::Direct) else {
            continue;
        };
        let added = |r: &LatencyRow| {
            [
                r.latency.p50_us - direct.latency.p50_us,
                r.latency.p99_us - direct.latency.p99_us,
                r.latency.p999_us - direct.latency.p999_us,
            ]
        };
        if row.path == PathKind::Direct {
            continue;
        }
        row.added_us = Some(added(row));
        let others: Vec<(PathKind, f64)> = [PathKind::Nginx, PathKind::Haproxy]
            .into_iter()
            .filter_map(|p| same(p).map(|r| (p, added(r)[1])))
            .collect();
        row.added_p99_vs_best_other =
            best_other(&others, true).and_then(|best| ratio(added(row)[1], best));
    }

    let throughput = report.throughput.clone();
    for row in &mut report.throughput {
        let same = |p: PathKind| {
            throughput
                .iter()
                .find(|r| r.workload == row.workload && r.path == p)
        };
        row.vs_direct = same(PathKind::Direct).and_then(|d| ratio(row.req_per_s, d.req_per_s));
        row.req_per_proxy_cpu_s = ratio(row.req_per_s * row.seconds, row.proxy_cpu_s);
        row.proxy_cpu_s_per_100k = (row.ok > 0 && row.proxy_cpu_s > 0.0)
            .then(|| row.proxy_cpu_s / row.ok as f64 * 100_000.0);
        row.proxies = proxies_on(&row.hops);
        let (user, system) = per_request_per_hop(row).unzip();
        row.user_us_per_req_per_hop = user;
        row.sys_us_per_req_per_hop = system;
    }
    let throughput = report.throughput.clone();
    for row in &mut report.throughput {
        let others: Vec<(PathKind, f64)> = throughput
            .iter()
            .filter(|r| r.workload == row.workload)
            .filter_map(|r| r.req_per_proxy_cpu_s.map(|v| (r.path, v)))
            .collect();
        row.per_cpu_vs_best_other = match (row.req_per_proxy_cpu_s, best_other(&others, false)) {
            (Some(v), Some(best)) if row.path != PathKind::Direct => ratio(v, best),
            _ => None,
        };
    }
}

pub(crate) fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(crate) fn signed(v: f64) -> String {
    if v >= 0.0 {
        format!("+{}", num(v))
    } else {
        num(v)
    }
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or_else(|| "—".to_owned(), f)
}

pub(crate) fn times(v: f64) -> String {
    format!("{v:.2}×")
}

pub(crate) fn errors_cell(e: &Errors) -> String {
    match &e.first {
        Some(first) if e.count > 0 => {
            let short: String = first.chars().take(80).collect();
            format!("{} ({})", e.count, short.replace('|', "/"))
        }
        _ => e.count.to_string(),
    }
}

/// A non-negative figure rounded to a whole number, with thousands separators.
pub fn whole(v: f64) -> String {
    thousands(v.round().max(0.0) as usize)
}

pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Pylon load bench ({}, {})\n", r.date_utc, r.mode);
    md.push_str("| | |\n|---|---|\n");
    for (k, v) in r.machine.iter().chain(r.settings.iter()) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "| pinning | {} |", r.pinning);
    md.push('\n');
    for note in &r.notes {
        let _ = writeln!(md, "- {note}");
    }

    md.push_str(
        "\n## Latency at fixed rates (open loop, from each request's intended send time; µs)\n\n\
         `+` columns: added over direct at the same rate. `÷ best` = this path's added p99 over \
         the lower added p99 of nginx and HAProxy (below 1 = better than both).\n\n\
         | workload | rate/s | path | p50 | p99 | p99.9 | +p50 | +p99 | +p99.9 | +p99 ÷ best | ok | errors | late |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for row in &r.latency {
        let added = row.added_us;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.workload.name(),
            thousands(row.rate_per_s as usize),
            row.path.name(),
            num(row.latency.p50_us),
            num(row.latency.p99_us),
            num(row.latency.p999_us),
            opt(added.map(|a| a[0]), signed),
            opt(added.map(|a| a[1]), signed),
            opt(added.map(|a| a[2]), signed),
            opt(row.added_p99_vs_best_other, times),
            row.ok,
            errors_cell(&row.errors),
            row.late + row.unsent,
        );
    }

    md.push_str(
        "\n## Maximum throughput (closed loop, 64 connections; h2c and gRPC: 64 streams over 4 connections)\n\n\
         proxy CPU = utime+stime of the path's proxy processes over the run (both proxies of the \
         chain; nginx master and workers). `÷ best` = req per proxy CPU-second over the better of \
         nginx and HAProxy (above 1 = better than both). load CPU = load generator + app (the \
         other core; near 100% means that core, not the proxy, was the limit). user and sys µs \
         per req per hop = the proxies' utime and stime over the run, per completed request, \
         divided by the proxies in `hops`.\n\n\
         | workload | path | hops | req/s | × direct | p50 µs | p99 µs | proxy CPU-s | req per proxy CPU-s | ÷ best | proxy CPU-s per 100k req | user µs per req per hop | sys µs per req per hop | load CPU | errors |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in &r.throughput {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% | {} |",
            row.workload.name(),
            row.path.name(),
            row.hops,
            row.req_per_s,
            opt(row.vs_direct, times),
            num(row.latency.p50_us),
            num(row.latency.p99_us),
            if row.path == PathKind::Direct {
                "—".to_owned()
            } else {
                format!("{:.2}", row.proxy_cpu_s)
            },
            opt(row.req_per_proxy_cpu_s, |v| format!("{v:.0}")),
            opt(row.per_cpu_vs_best_other, times),
            opt(row.proxy_cpu_s_per_100k, |v| format!("{v:.2}")),
            opt(row.user_us_per_req_per_hop, |v| format!("{v:.1}")),
            opt(row.sys_us_per_req_per_hop, |v| format!("{v:.1}")),
            row.load_side_cpu_pct,
            errors_cell(&row.errors),
        );
    }

    where_the_cpu_goes(&mut md, r);

    md.push_str(
        "\n## Memory (VmRSS of both proxies of the HTTP chain, MiB)\n\n\
         Idle: after setup and one request of each workload, no connections open. With N \
         connections: N HTTP/1.1 keep-alive connections to the outbound proxy, each of which \
         completed one `GET /small` and then sits idle; read 3 s after the last one opened (the same \
         method for every proxy). Idle anon: the part of idle that is anonymous memory (heap, \
         stacks); the rest is mapped files, mostly the proxies' own code, which RSS counts once \
         per process although processes of one binary share it. Idle PSS: the proportional set \
         size, each page split between the processes that map it, so shared code counts \
         once, and a shared library's pages count for little where every process maps it (nginx \
         and HAProxy map the system's C library; Pylon's is linked in, as its image ships it: the \
         header's `pylon` row says which).\n\n",
    );
    let counts: Vec<usize> = r
        .memory
        .first()
        .map(|m| m.with_connections.iter().map(|p| p.connections).collect())
        .unwrap_or_default();
    md.push_str("| path | idle | idle anon | idle PSS |");
    for c in &counts {
        let _ = write!(md, " {} conns |", thousands(*c));
    }
    md.push_str(" idle ÷ best |\n|---|---:|---:|---:|");
    for _ in &counts {
        md.push_str("---:|");
    }
    md.push_str("---:|\n");
    let idle: Vec<(PathKind, f64)> = r.memory.iter().map(|m| (m.path, m.idle_rss_mib)).collect();
    let best_idle = best_other(&idle, true);
    for m in &r.memory {
        let _ = write!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} |",
            m.path.name(),
            m.idle_rss_mib,
            m.idle_anon_mib,
            m.idle_pss_mib
        );
        for p in &m.with_connections {
            if p.errors.count > 0 || p.opened != p.connections {
                let _ = write!(
                    md,
                    " {:.1} (opened {}; errors {}) |",
                    p.rss_mib,
                    p.opened,
                    errors_cell(&p.errors)
                );
            } else {
                let _ = write!(md, " {:.1} |", p.rss_mib);
            }
        }
        let _ = writeln!(
            md,
            " {} |",
            opt(best_idle.and_then(|b| ratio(m.idle_rss_mib, b)), times)
        );
    }

    md.push_str("\n## Telemetry cost\n\n| row | value |\n|---|---|\n");
    let _ = writeln!(
        md,
        "| pylon, tap active vs idle | {} |",
        r.tap_active_vs_idle
    );

    md.push_str("\n## mTLS cost (Pylon: mTLS between the proxies ÷ plaintext, same run)\n\n");
    md.push_str(&r.mtls_vs_plaintext.summary);
    md.push('\n');
    if !r.mtls_vs_plaintext.figures.is_empty() {
        md.push_str(
            "\n| workload | figure | plaintext | mTLS | mTLS ÷ plaintext | errors (plaintext / mTLS) |\n\
             |---|---|---:|---:|---:|---|\n",
        );
        for f in &r.mtls_vs_plaintext.figures {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} / {} |",
                f.workload.name(),
                f.figure,
                num(f.plaintext),
                num(f.mtls),
                opt(f.ratio, times),
                f.errors.0,
                f.errors.1,
            );
        }
    }

    if let Some(rounds) = &r.rounds {
        rounds.markdown(&mut md);
    }
    md.push_str(
        "\n## Targets (performance pass 2)\n\n\
         The targets of the performance issue, judged on the medians of the run-to-run spread \
         above where the rounds measured them, else on this run's single figures.\n\n\
         | target | this run | met |\n|---|---|---|\n",
    );
    for (target, figure, met) in targets(r) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        let _ = writeln!(md, "| {target} | {figure} | {verdict} |");
    }
    if let Some(line) = as_deployed(r) {
        let _ = writeln!(md, "\n{line}");
    }
    md.push_str("\n## What stands in the way\n");
    md.push_str(&crate::profiles::markdown(&r.profiles));
    if let Some(m) = r.memory.iter().find(|m| m.path == PathKind::Pylon) {
        let _ = writeln!(
            md,
            "- Idle RSS: of the pair's {:.1} MiB, {:.1} MiB is anonymous memory (heap, stacks); \
             the rest is mapped files, mostly the proxy's code, which RSS counts in each \
             process although the two share it. Counted once (PSS), the pair takes {:.1} MiB.",
            m.idle_rss_mib, m.idle_anon_mib, m.idle_pss_mib
        );
    }

    if !r.not_run.is_empty() {
        md.push_str("\n## Not measured\n\n");
        for n in &r.not_run {
            let _ = writeln!(
                md,
                "- {} / {}: {}",
                n.path.name(),
                n.workload.name(),
                n.reason
            );
        }
    }
    md
}

/// Proxies on a path described as `load -> outbound -> inbound -> app`: the hops between the
/// first and the last.
pub fn proxies_on(hops: &str) -> usize {
    // `=mTLS=>` is a hop too.
    (hops.matches("->").count() + hops.matches("=>").count()).saturating_sub(1)
}

/// (user, system) CPU µs per request per proxy on the row's path; `None` without proxies or
/// requests.
fn per_request_per_hop(row: &ThroughputRow) -> Option<(f64, f64)> {
    let per = (row.ok as f64) * proxies_on(&row.hops) as f64;
    let user = ratio(row.proxy_user_cpu_s * 1e6, per)?;
    let system = ratio(row.proxy_system_cpu_s * 1e6, per)?;
    Some((user, system))
}

/// The section putting each path's user and system time per request per hop (from the closed
/// loop) beside its syscalls per request per hop (from the traced run): one row per path and
/// workload of the throughput table.
fn where_the_cpu_goes(md: &mut String, r: &Report) {
    let _ = write!(
        md,
        "\n## Where the CPU goes per request (user, system, syscalls)\n\n\
         Per completed request and per proxy on the path (2 for the HTTP chains, 1 for the TCP \
         echo). user and sys: utime and stime (/proc/PID/stat) of the path's proxy processes \
         (nginx: master and workers) over the closed-loop run of the throughput table; user is \
         the proxies' own code, their libraries and the allocator, sys the kernel working for \
         them (socket reads and writes, epoll). syscalls: a separate run of {} requests ({} \
         connections; h2c: {} streams of one connection) with `strace -c -f` attached to every \
         process and thread of the path's proxies after a warm-up, the calls of strace's summary \
         divided the same way. strace stops a proxy at every syscall, so that run is slow and \
         only its counts are used, never its times. Only HTTP/1.1 GET and h2c GET are traced.\n\n",
        thousands(crate::syscalls::TRACED_REQUESTS as usize),
        crate::syscalls::TRACED_SLOTS,
        crate::syscalls::TRACED_SLOTS,
    );
    for why in &r.syscalls_not_counted {
        let _ = writeln!(md, "- Syscalls not counted: {why}");
    }
    if !r.syscalls_not_counted.is_empty() {
        md.push('\n');
    }
    md.push_str(
        "| workload | path | proxies | user µs/req/hop | sys µs/req/hop | user ÷ nginx | syscalls/req/hop | most frequent syscalls (per req per hop) | traced requests |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for row in r.throughput.iter().filter(|t| t.path != PathKind::Direct) {
        let nginx = r
            .throughput
            .iter()
            .find(|t| t.workload == row.workload && t.path == PathKind::Nginx)
            .and_then(|t| t.user_us_per_req_per_hop);
        let traced = r
            .syscalls
            .iter()
            .find(|s| s.traced.workload == row.workload && s.traced.path == row.path);
        let top = traced.map_or_else(
            || "—".to_owned(),
            |s| {
                s.top
                    .iter()
                    .map(|c| format!("{} {:.2}", c.name, c.per_request_per_hop))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.workload.name(),
            row.path.name(),
            proxies_on(&row.hops),
            opt(row.user_us_per_req_per_hop, |v| format!("{v:.1}")),
            opt(row.sys_us_per_req_per_hop, |v| format!("{v:.1}")),
            opt(
                row.user_us_per_req_per_hop
                    .zip(nginx)
                    .and_then(|(u, n)| ratio(u, n)),
                times
            ),
            traced.map_or_else(
                || "—".to_owned(),
                |s| format!("{:.2}", s.per_request_per_hop)
            ),
            top,
            traced.map_or_else(|| "—".to_owned(), |s| s.traced.requests.to_string()),
        );
    }
}

const MB: f64 = 1_000_000.0 / (1024.0 * 1024.0);

/// Each target of the performance issue with this run's figure and whether it is met (`None`:
/// the run did not measure it).
/// The HTTP/1.1 target above is judged on the plaintext chain, where the two proxies treat each
/// other as unmeshed endpoints and keep HTTP/1.1 on pooled connections. Deployed, proxies are
/// meshed (the controller names every endpoint's identity): mTLS between them, and HTTP/1
/// carried over their h2 connection. This puts that chain beside the same baselines, as the
/// product of two ratios measured in this run (Pylon plaintext over the better baseline, and
/// the mTLS chain over the plaintext one, alternated): both are same-run ratios, their product
/// is not one measurement.
fn as_deployed(r: &Report) -> Option<String> {
    // The rounds' median where there is one, as the targets use.
    let in_rounds = r.rounds.as_ref().and_then(|x| {
        spread(&x.per_cpu_ratio(Workload::Http1Get, &[PathKind::Nginx, PathKind::Haproxy]))
    });
    let plain = match in_rounds {
        Some(s) => s.median,
        None => {
            r.throughput
                .iter()
                .find(|t| t.workload == Workload::Http1Get && t.path == PathKind::Pylon)?
                .per_cpu_vs_best_other?
        }
    };
    let mtls = r
        .mtls_vs_plaintext
        .figures
        .iter()
        .find(|f| f.workload == Workload::Http1Get && f.figure.starts_with("req per proxy CPU-s"))?
        .ratio?;
    Some(format!(
        "As deployed between meshed proxies (mTLS, HTTP/1 carried over the proxies' h2 \
         connection), Pylon's HTTP/1.1 GET chain comes to about {:.2}× the better of nginx and \
         HAProxy per proxy CPU-second: the plaintext chain's {plain:.2}× times the mTLS chain's \
         {mtls:.2}× over it (\"mTLS cost\" above). The targets are judged on the plaintext \
         chain, where the proxies treat each other as unmeshed and keep HTTP/1.1 pooled.",
        plain * mtls
    ))
}

/// A target's figure and verdict: judged on the median of the ratios taken within each round
/// when the rounds measured it (`at_least`: the ratio must be at least 1, else at most 1), with
/// the single run's figure beside it; on the single run's ratio otherwise.
fn judge(
    single: Option<(String, f64)>,
    rounds: Option<Spread>,
    at_least: bool,
) -> (String, Option<bool>) {
    let met = |v: f64| if at_least { v >= 1.0 } else { v <= 1.0 };
    match (rounds, single) {
        (Some(s), single) => (
            format!(
                "median {} over {} rounds (lowest {}, highest {}){}",
                times(s.median),
                s.n,
                times(s.min),
                times(s.max),
                single.map_or_else(String::new, |(text, _)| format!(
                    "; the single run above: {text}"
                ))
            ),
            Some(met(s.median)),
        ),
        (None, Some((text, v))) => (text, Some(met(v))),
        (None, None) => ("—".to_owned(), None),
    }
}

fn targets(r: &Report) -> Vec<(String, String, Option<bool>)> {
    let row =
        |w: Workload, p: PathKind| r.throughput.iter().find(|t| t.workload == w && t.path == p);
    let per_cpu = |w: Workload, p: PathKind| row(w, p).and_then(|t| t.req_per_proxy_cpu_s);
    let rounds = r.rounds.as_ref();
    let mut out = Vec::new();

    let both = [PathKind::Nginx, PathKind::Haproxy];
    let best = both
        .into_iter()
        .filter_map(|p| per_cpu(Workload::Http1Get, p))
        .fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v))));
    let h1 = per_cpu(Workload::Http1Get, PathKind::Pylon).zip(best);
    let (figure, met) = judge(
        h1.map(|(p, b)| (format!("{p:.0} against {b:.0}: {:.2}×", p / b), p / b)),
        rounds.and_then(|x| spread(&x.per_cpu_ratio(Workload::Http1Get, &both))),
        true,
    );
    out.push((
        "HTTP/1.1 GET: requests per proxy CPU-second at least 1.0× the better of nginx and HAProxy"
            .to_owned(),
        figure,
        met,
    ));

    let user = |p: PathKind| row(Workload::Http1Get, p).and_then(per_request_per_hop);
    let users = user(PathKind::Pylon).zip(user(PathKind::Nginx));
    let (figure, met) = judge(
        users.map(|((p, _), (n, _))| (format!("{p:.1} µs against {n:.1} µs"), p / n)),
        rounds.and_then(|x| spread(&x.user_ratio(Workload::Http1Get))),
        false,
    );
    out.push((
        "HTTP/1.1 GET: user CPU per request per hop at or below nginx's".to_owned(),
        figure,
        met,
    ));

    for w in [Workload::H2cGet, Workload::GrpcUnary] {
        let pair = per_cpu(w, PathKind::Pylon).zip(per_cpu(w, PathKind::Haproxy));
        let (figure, met) = judge(
            pair.map(|(p, h)| (format!("{p:.0} against {h:.0}: {:.2}×", p / h), p / h)),
            rounds.and_then(|x| spread(&x.per_cpu_ratio(w, &[PathKind::Haproxy]))),
            true,
        );
        out.push((
            format!(
                "{}: requests per proxy CPU-second at least 1.0× HAProxy's",
                w.name()
            ),
            figure,
            met,
        ));
    }

    // Reported, not judged: met when the rounds gave it a spread.
    let added: Vec<(Workload, Spread)> = crate::rounds::WORKLOADS
        .into_iter()
        .filter_map(|w| Some((w, spread(&rounds?.added_p99(w, PathKind::Pylon))?)))
        .collect();
    out.push((
        format!(
            "p99 added at {} req/s reported with its run-to-run spread",
            thousands(rounds.map_or(1_000, |x| x.rate_per_s) as usize)
        ),
        if added.is_empty() {
            "—".to_owned()
        } else {
            added
                .iter()
                .map(|(w, s)| format!("{}: {} µs", w.name(), s.text(signed)))
                .collect::<Vec<_>>()
                .join("; ")
        },
        added
            .iter()
            .find(|(w, _)| *w == Workload::Http1Get)
            .map(|(_, s)| s.n >= 2),
    ));

    let pylon = r.memory.iter().find(|m| m.path == PathKind::Pylon);
    let idle_mb = pylon.map(|m| m.idle_rss_mib / MB);
    out.push((
        "RSS of an idle proxy pair under 20 MB".to_owned(),
        // Two decimals: one would show 19.96 as 20.0 beside "met".
        idle_mb.map_or("—".to_owned(), |v| format!("{v:.2} MB")),
        idle_mb.map(|v| v < 20.0),
    ));
    let most = pylon.and_then(|m| m.with_connections.iter().max_by_key(|p| p.connections));
    out.push((
        "RSS with 10,000 idle connections under 60 MB (as many as the fd limit allows)".to_owned(),
        match (pylon, most) {
            (Some(m), Some(p)) => format!(
                "{:.1} MB with {}; {:.1} KiB per connection over idle",
                p.rss_mib / MB,
                thousands(p.connections),
                ratio((p.rss_mib - m.idle_rss_mib) * 1024.0, p.connections as f64).unwrap_or(0.0)
            ),
            _ => "—".to_owned(),
        },
        // A quick run's 1,000 connections say nothing about 10,000.
        most.filter(|p| p.connections >= 9_000)
            .map(|p| p.rss_mib / MB < 60.0),
    ));
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::new_histogram;

    #[test]
    fn percentiles_of_a_histogram() {
        let mut h = new_histogram();
        assert!(percentiles(&h).is_none());
        for us in 1..=1000u64 {
            h.record(us * 1_000).expect("in range");
        }
        let p = percentiles(&h).expect("non-empty");
        assert!((p.p50_us - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.p999_us - 999.0).abs() < 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn ratio_and_best_other() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(3.0, -1.0), None);
        let v = [
            (PathKind::Pylon, 1.0),
            (PathKind::Nginx, 5.0),
            (PathKind::Haproxy, 3.0),
        ];
        assert_eq!(best_other(&v, true), Some(3.0));
        assert_eq!(best_other(&v, false), Some(5.0));
        assert_eq!(best_other(&v[..1], true), None);
    }

    fn lat(path: PathKind, p50: f64, p99: f64) -> LatencyRow {
        LatencyRow {
            workload: Workload::Http1Get,
            path,
            rate_per_s: 1000,
            ok: 100,
            errors: Errors {
                count: 0,
                first: None,
            },
            late: 0,
            unsent: 0,
            latency: Percentiles {
                p50_us: p50,
                p99_us: p99,
                p999_us: p99 * 2.0,
                max_us: p99 * 3.0,
            },
            added_us: None,
            added_p99_vs_best_other: None,
            proxy_cpu_s: 0.1,
        }
    }

    fn thr(path: PathKind, rps: f64, cpu: f64) -> ThroughputRow {
        ThroughputRow {
            workload: Workload::Http1Get,
            path,
            hops: String::new(),
            ok: (rps * 2.0) as u64,
            errors: Errors {
                count: 0,
                first: None,
            },
            seconds: 2.0,
            req_per_s: rps,
            vs_direct: None,
            latency: Percentiles {
                p50_us: 1.0,
                p99_us: 2.0,
                p999_us: 3.0,
                max_us: 4.0,
            },
            proxy_cpu_s: cpu,
            proxy_user_cpu_s: cpu * 0.4,
            proxy_system_cpu_s: cpu * 0.6,
            proxies: 0,
            user_us_per_req_per_hop: None,
            sys_us_per_req_per_hop: None,
            req_per_proxy_cpu_s: None,
            per_cpu_vs_best_other: None,
            proxy_cpu_s_per_100k: None,
            load_side_cpu_pct: 50.0,
        }
    }

    fn report_with(throughput: Vec<ThroughputRow>) -> Report {
        Report {
            date_utc: String::new(),
            mode: String::new(),
            machine: vec![],
            pinning: String::new(),
            settings: vec![],
            notes: vec![],
            latency: vec![],
            throughput,
            syscalls: vec![],
            syscalls_not_counted: vec![],
            memory: vec![],
            not_run: vec![],
            tap_active_vs_idle: String::new(),
            profiles: Vec::new(),
            rounds: None,
            mtls_vs_plaintext: MtlsCost {
                summary: String::new(),
                figures: vec![],
            },
        }
    }

    #[test]
    fn splits_cpu_per_request_per_hop_and_judges_the_targets() {
        assert_eq!(proxies_on("load -> outbound -> inbound -> app"), 2);
        assert_eq!(proxies_on("load -> inbound -> echo"), 1);
        assert_eq!(proxies_on("load -> outbound =mTLS=> inbound -> app"), 2);
        let mut pylon = thr(PathKind::Pylon, 1000.0, 1.0);
        pylon.hops = "load -> outbound -> inbound -> app".into();
        // 2,000 requests over 2 proxies, 0.4 s of 1 s in user space.
        let (user, system) = per_request_per_hop(&pylon).expect("requests were made");
        assert!((user - 100.0).abs() < 1e-9 && (system - 150.0).abs() < 1e-9);

        let mut nginx = thr(PathKind::Nginx, 1000.0, 0.5);
        nginx.hops = pylon.hops.clone();
        let mut r = report_with(vec![pylon, nginx]);
        fill_ratios(&mut r);
        r.memory = vec![MemoryRow {
            path: PathKind::Pylon,
            idle_rss_mib: 18.0,
            idle_anon_mib: 2.0,
            idle_pss_mib: 10.0,
            with_connections: vec![MemoryPoint {
                connections: 9500,
                opened: 9500,
                errors: Errors {
                    count: 0,
                    first: None,
                },
                rss_mib: 60.0,
            }],
        }];
        let judged = targets(&r);
        let met: Vec<Option<bool>> = judged.iter().map(|t| t.2).collect();
        // Half nginx's requests per CPU-second and twice its user time; no h2 rows; no rounds,
        // so no p99 spread; 18 MiB is 18.9 MB; 60 MiB is 62.9 MB.
        assert_eq!(
            met,
            [
                Some(false),
                Some(false),
                None,
                None,
                None,
                Some(true),
                Some(false)
            ]
        );
        assert!(judged[0].1.ends_with("0.50×"), "{}", judged[0].1);
        assert!(as_deployed(&r).is_none(), "no mTLS figures, no line");
        r.mtls_vs_plaintext = MtlsCost {
            summary: String::new(),
            figures: vec![MtlsFigure::new(
                Workload::Http1Get,
                "req per proxy CPU-s (closed loop)",
                20_000.0,
                30_000.0,
                (0, 0),
            )],
        };
        let md = markdown(&r);
        assert!(
            md.contains(
                "Pylon's HTTP/1.1 GET chain comes to about 0.75× the better of nginx \
                         and HAProxy per proxy CPU-second: the plaintext chain's 0.50× times \
                         the mTLS chain's 1.50×"
            ),
            "{md}"
        );
        assert!(md.contains("| pylon | 18.0 | 2.0 | 10.0 |"), "{md}");
        assert!(
            md.contains("Counted once (PSS), the pair takes 10.0 MiB"),
            "{md}"
        );
        r.syscalls = vec![crate::syscalls::SyscallRow {
            traced: crate::syscalls::Traced {
                workload: Workload::Http1Get,
                path: PathKind::Pylon,
                proxies: 2,
                traced_processes: 2,
                requests: 3000,
                errors: 0,
                seconds: 1.5,
            },
            syscalls: 27_000,
            per_request_per_hop: 4.5,
            top: vec![
                crate::syscalls::SyscallCount {
                    name: "writev".into(),
                    per_request_per_hop: 2.0,
                },
                crate::syscalls::SyscallCount {
                    name: "recvfrom".into(),
                    per_request_per_hop: 2.0,
                },
            ],
        }];
        r.syscalls_not_counted = vec!["strace not found".into()];
        let md = markdown(&r);
        assert!(md.contains("## Targets"), "{md}");
        assert!(
            md.contains(
                "| HTTP/1.1 GET (64 B body) | pylon | 2 | 100.0 | 150.0 | 2.00× | 4.50 \
                 | writev 2.00, recvfrom 2.00 | 3000 |"
            ),
            "{md}"
        );
        // nginx was not traced: its row has the CPU split and no syscall figures.
        assert!(
            md.contains(
                "| HTTP/1.1 GET (64 B body) | nginx | 2 | 50.0 | 75.0 | 1.00× | — | — | — |"
            ),
            "{md}"
        );
        assert!(
            md.contains("- Syscalls not counted: strace not found"),
            "{md}"
        );
        // The two new columns of the throughput table.
        assert!(
            md.contains("| 0.50× | 50.00 | 100.0 | 150.0 | 50% | 0 |"),
            "{md}"
        );
        let (section, memory) = (
            md.find("## Where the CPU goes per request (user, system, syscalls)"),
            md.find("## Memory"),
        );
        assert!(section.is_some() && section < memory, "{md}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["throughput"][0]["proxies"].as_u64(), Some(2));
        let field = |name: &str| json["throughput"][0][name].as_f64().unwrap_or(f64::NAN);
        assert!((field("user_us_per_req_per_hop") - 100.0).abs() < 1e-9);
        assert!((field("sys_us_per_req_per_hop") - 150.0).abs() < 1e-9);
        assert_eq!(
            json["syscalls"][0]["top"][0]["name"].as_str(),
            Some("writev")
        );
    }

    #[test]
    fn targets_are_judged_on_the_medians_of_the_rounds() {
        let mut pylon = thr(PathKind::Pylon, 1000.0, 0.5);
        let mut nginx = thr(PathKind::Nginx, 1000.0, 1.0);
        pylon.hops = "load -> outbound -> inbound -> app".into();
        nginx.hops = pylon.hops.clone();
        let mut r = report_with(vec![pylon, nginx]);
        fill_ratios(&mut r);
        // The single run alone: twice nginx's requests per CPU-second, half its user time.
        let alone = targets(&r);
        assert_eq!((alone[0].2, alone[1].2), (Some(true), Some(true)));
        assert_eq!(alone[0].1, "4000 against 2000: 2.00×");

        // The rounds (0.90×, 0.90×, 1.12×; user 1.12× nginx's twice) overrule it.
        r.rounds = Some(crate::rounds::tests::drifting());
        let judged = targets(&r);
        assert_eq!(
            judged[0].1,
            "median 0.90× over 3 rounds (lowest 0.90×, highest 1.12×); the single run above: \
             4000 against 2000: 2.00×"
        );
        assert_eq!((judged[0].2, judged[1].2), (Some(false), Some(false)));
        assert!(
            judged[1].1.starts_with("median 1.12× over 2 rounds"),
            "{}",
            judged[1].1
        );
        // No h2 rounds and no h2 rows: not measured.
        assert_eq!((judged[2].2, judged[3].2), (None, None));
        assert_eq!(
            judged[4],
            (
                "p99 added at 1,000 req/s reported with its run-to-run spread".to_owned(),
                "HTTP/1.1 GET (64 B body): +300 (+200–+400) µs".to_owned(),
                Some(true)
            )
        );
        let md = markdown(&r);
        let (spread_at, targets_at) = (md.find("## Run-to-run spread"), md.find("## Targets"));
        assert!(spread_at.is_some() && spread_at < targets_at, "{md}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["rounds"]["samples"][1]["path"].as_str(), Some("pylon"));
    }

    #[test]
    fn fills_ratio_columns_from_the_same_run() {
        let mut r = report_with(vec![
            thr(PathKind::Direct, 40_000.0, 0.0),
            thr(PathKind::Pylon, 20_000.0, 2.0),
            thr(PathKind::Nginx, 10_000.0, 2.0),
            thr(PathKind::Haproxy, 16_000.0, 2.0),
        ]);
        r.latency = vec![
            lat(PathKind::Direct, 100.0, 200.0),
            lat(PathKind::Pylon, 150.0, 300.0),
            lat(PathKind::Nginx, 160.0, 400.0),
            lat(PathKind::Haproxy, 140.0, 250.0),
        ];
        r.mtls_vs_plaintext = MtlsCost {
            summary: "HTTP/1.1 travels as HTTP/2 between mTLS proxies.".into(),
            figures: vec![
                MtlsFigure::new(
                    Workload::Http1Get,
                    "req per proxy CPU-s (closed loop)",
                    20_000.0,
                    15_000.0,
                    (0, 2),
                ),
                MtlsFigure::new(Workload::Http1Get, "p99 µs", 0.0, 300.0, (0, 0)),
            ],
        };
        fill_ratios(&mut r);
        assert_eq!(r.latency[0].added_us, None);
        assert_eq!(r.latency[1].added_us, Some([50.0, 100.0, 200.0]));
        // Best other added p99 is HAProxy's 50 µs.
        assert_eq!(r.latency[1].added_p99_vs_best_other, Some(2.0));
        assert_eq!(r.latency[3].added_p99_vs_best_other, Some(1.0));

        let pylon = &r.throughput[1];
        assert_eq!(pylon.vs_direct, Some(0.5));
        assert_eq!(pylon.req_per_proxy_cpu_s, Some(20_000.0));
        assert_eq!(pylon.per_cpu_vs_best_other, Some(20_000.0 / 16_000.0));
        assert_eq!(pylon.proxy_cpu_s_per_100k, Some(5.0));
        assert_eq!(r.throughput[0].req_per_proxy_cpu_s, None);
        assert_eq!(r.throughput[0].per_cpu_vs_best_other, None);
        let md = markdown(&r);
        assert!(md.contains("| HTTP/1.1 GET (64 B body) | 1,000 | pylon | 150 | 300 | 600 | +50.0 | +100 | +200 | 2.00× |"), "{md}");

        let mtls = &r.mtls_vs_plaintext.figures;
        assert_eq!(mtls[0].ratio, Some(0.75));
        assert_eq!(mtls[1].ratio, None, "no ratio over a zero denominator");
        assert!(md.contains("## mTLS cost"), "{md}");
        assert!(md.contains("HTTP/1.1 travels as HTTP/2 between mTLS proxies."));
        assert!(
            md.contains(
                "| HTTP/1.1 GET (64 B body) | req per proxy CPU-s (closed loop) | 20000 | 15000 \
                 | 0.75× | 0 / 2 |"
            ),
            "{md}"
        );
        assert!(md.contains("| p99 µs | 0.00 | 300 | — | 0 / 0 |"), "{md}");
        // The mTLS section follows the telemetry one.
        let (tel, m) = (md.find("## Telemetry cost"), md.find("## mTLS cost"));
        assert!(tel < m, "{md}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(
            json["mtls_vs_plaintext"]["figures"][0]["ratio"].as_f64(),
            Some(0.75)
        );
        assert_eq!(
            json["mtls_vs_plaintext"]["figures"][0]["workload"].as_str(),
            Some("http1-get")
        );
    }

    #[test]
    fn formats_dates_and_numbers() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(signed(-1.5), "-1.50");
    }
}
