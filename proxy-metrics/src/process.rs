//! The standard `process_*` metrics, read from `/proc/self` at scrape time.
//!
//! A value that can't be read (not Linux, a /proc quirk) is left out of that
//! scrape rather than failing it.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// A snapshot of the process' resource usage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_memory_bytes: Option<i64>,
    /// Virtual memory size, in bytes.
    pub virtual_memory_bytes: Option<i64>,
    /// Open file descriptors.
    pub open_fds: Option<i64>,
    /// Soft limit on open file descriptors (absent when unlimited).
    pub max_fds: Option<i64>,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    /// OS threads.
    pub threads: Option<i64>,
}

impl ProcessStats {
    /// Reads the current process' stats (all `None` off Linux).
    pub fn read() -> Self {
        #[cfg(target_os = "linux")]
        {
            linux::read()
        }
        #[cfg(not(target_os = "linux"))]
        {
            Self::default()
        }
    }
}

/// Collector emitting `process_*` at each scrape (the controller registers it too).
#[derive(Debug, Default)]
pub struct ProcessCollector;

fn gauge<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<V>,
) -> std::fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    if let Some(v) = value {
        let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(metric)?;
    }
    Ok(())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = ProcessStats::read();
        if let Some(cpu) = stats.cpu_seconds {
            // Counter names are given without `_total`; the encoder adds it.
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(metric)?;
        }
        let e = &mut encoder;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stats.resident_memory_bytes,
        )?;
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stats.virtual_memory_bytes,
        )?;
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            stats.open_fds,
        )?;
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            stats.max_fds,
        )?;
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stats.start_time_seconds,
        )?;
        gauge(
            e,
            "process_threads",
            "Number of OS threads in the process.",
            stats.threads,
        )?;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::ProcessStats;
    use std::sync::OnceLock;

    /// (clock ticks per second, page size in bytes), from sysconf.
    fn sysconf() -> Option<(f64, i64)> {
        static VALUES: OnceLock<Option<(f64, i64)>> = OnceLock::new();
        *VALUES.get_or_init(|| {
            // SAFETY: sysconf only reads a configuration value; it has no
            // preconditions and returns -1 on error, checked below.
            let (ticks, page) = unsafe {
                (
                    libc::sysconf(libc::_SC_CLK_TCK),
                    libc::sysconf(libc::_SC_PAGESIZE),
                )
            };
            // `c_long` is i32 on 32-bit targets, i64 elsewhere.
            #[allow(clippy::unnecessary_cast)]
            let page = page as i64;
            (ticks > 0 && page > 0).then_some((ticks as f64, page))
        })
    }

    /// Boot time (seconds since the epoch), from /proc/stat's `btime`.
    fn boot_time() -> Option<f64> {
        static BTIME: OnceLock<Option<f64>> = OnceLock::new();
        *BTIME.get_or_init(|| {
            let stat = std::fs::read_to_string("/proc/stat").ok()?;
            stat.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    }

    /// The fields of /proc/self/stat after the `(comm)` field, which may
    /// itself contain spaces and parentheses.
    pub(super) fn stat_fields(stat: &str) -> Option<Vec<&str>> {
        let after_comm = &stat[stat.rfind(')')? + 1..];
        Some(after_comm.split_whitespace().collect())
    }

    /// The soft `Max open files` limit from /proc/self/limits.
    pub(super) fn max_open_files(limits: &str) -> Option<i64> {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub(super) fn read() -> ProcessStats {
        let mut stats = ProcessStats::default();
        let sys = sysconf();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(f) = stat_fields(&stat) {
                // proc(5) numbers fields from 1 with pid=1, comm=2, state=3;
                // `f[0]` is state, so field n is `f[n - 3]`.
                let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
                if let (Some(utime), Some(stime), Some((ticks, _))) = (field(14), field(15), sys) {
                    stats.cpu_seconds = Some((utime + stime) as f64 / ticks);
                }
                stats.threads = field(20).and_then(|v| i64::try_from(v).ok());
                if let (Some(start), Some((ticks, _)), Some(btime)) = (field(22), sys, boot_time())
                {
                    stats.start_time_seconds = Some(btime + start as f64 / ticks);
                }
                stats.virtual_memory_bytes = field(23).and_then(|v| i64::try_from(v).ok());
                if let (Some(rss), Some((_, page))) = (field(24), sys) {
                    stats.resident_memory_bytes =
                        i64::try_from(rss).ok().and_then(|r| r.checked_mul(page));
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Includes the descriptor read_dir itself holds open, as the
            // standard collectors do.
            stats.open_fds = i64::try_from(dir.count()).ok();
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            stats.max_fds = max_open_files(&limits);
        }
        stats
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 1234 \
                    1000000 250 18446744073709551615";
        let f = linux::stat_fields(stat).unwrap_or_default();
        assert_eq!(f[0], "S");
        assert_eq!(f[14 - 3], "7"); // utime
        assert_eq!(f[20 - 3], "5"); // num_threads
        assert_eq!(f[24 - 3], "250"); // rss
    }

    #[test]
    fn parses_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(linux::max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(linux::max_open_files(unlimited), None);
    }

    #[test]
    fn reads_sane_values() {
        let s = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        assert!(s.resident_memory_bytes.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.virtual_memory_bytes.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.threads.is_some_and(|v| v >= 1), "{s:?}");
        assert!(s.open_fds.is_some_and(|v| v >= 3), "{s:?}");
        assert!(s.cpu_seconds.is_some_and(|v| v >= 0.0), "{s:?}");
        let start = s.start_time_seconds.unwrap_or(f64::NAN);
        // Started in the past, and not before 2020.
        assert!(start <= now + 1.0 && start > 1_577_836_800.0, "{s:?}");
    }
}
