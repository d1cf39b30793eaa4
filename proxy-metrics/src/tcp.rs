//! TCP families (`tcp_open_total`, `tcp_close_total`, `tcp_open_connections`,
//! `tcp_read_bytes_total`, `tcp_write_bytes_total`,
//! `tcp_connection_duration_ms`), the per-target [`TcpTarget`] handle and the
//! per-connection [`TcpConnMetrics`].

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::histogram::{MsHistogram, TCP_DURATION_MS_BUCKETS};
use crate::labels::{CloseLabels, TargetKey, TargetLabels};
use crate::slots::SlotTable;

type HistCtor = fn() -> MsHistogram;

fn duration_histogram() -> MsHistogram {
    MsHistogram::new(TCP_DURATION_MS_BUCKETS)
}

/// The TCP families, shared by every [`TcpTarget`].
#[derive(Clone, Debug)]
pub(crate) struct TcpFamilies {
    pub(crate) open_total: Family<TargetKey, Counter>,
    pub(crate) open_connections: Family<TargetKey, Gauge>,
    pub(crate) read_bytes: Family<TargetKey, Counter>,
    pub(crate) write_bytes: Family<TargetKey, Counter>,
    pub(crate) close_total: Family<CloseLabels, Counter>,
    pub(crate) duration: Family<CloseLabels, MsHistogram, HistCtor>,
}

impl TcpFamilies {
    pub(crate) fn new() -> Self {
        Self {
            open_total: Family::default(),
            open_connections: Family::default(),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            close_total: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as HistCtor),
        }
    }
}

#[derive(Debug)]
struct CloseSlot {
    total: Counter,
    duration: MsHistogram,
}

/// Distinct errno values cached per target before falling back to the
/// family lookup.
const ERRNO_SLOTS: usize = 16;

/// A resolved TCP label set. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TcpTarget(Arc<TcpInner>);

#[derive(Debug)]
struct TcpInner {
    labels: Arc<TargetLabels>,
    families: TcpFamilies,
    open_total: Counter,
    open_connections: Gauge,
    read_bytes: Counter,
    write_bytes: Counter,
    clean_close: OnceLock<CloseSlot>,
    errno_close: SlotTable<&'static str, CloseSlot, ERRNO_SLOTS>,
}

impl TcpTarget {
    pub(crate) fn new(families: &TcpFamilies, labels: TargetLabels) -> Self {
        let key = TargetKey(Arc::new(labels));
        Self(Arc::new(TcpInner {
            open_total: families.open_total.get_or_create_owned(&key),
            open_connections: families.open_connections.get_or_create_owned(&key),
            read_bytes: families.read_bytes.get_or_create_owned(&key),
            write_bytes: families.write_bytes.get_or_create_owned(&key),
            labels: key.0,
            families: families.clone(),
            clean_close: OnceLock::new(),
            errno_close: SlotTable::default(),
        }))
    }

    /// The labels this handle records under.
    pub fn labels(&self) -> &TargetLabels {
        &self.0.labels
    }

    /// A connection opened: increments `tcp_open_total` and
    /// `tcp_open_connections`. The returned value records the connection's
    /// bytes and, when closed or dropped, its close.
    pub fn open(&self) -> TcpConnMetrics {
        self.0.open_total.inc();
        self.0.open_connections.inc();
        TcpConnMetrics {
            target: self.clone(),
            opened: Instant::now(),
            closed: false,
        }
    }
}

impl TcpInner {
    fn resolve_close(&self, errno: Option<&'static str>) -> CloseSlot {
        let labels = CloseLabels {
            target: self.labels.clone(),
            errno,
        };
        CloseSlot {
            total: self.families.close_total.get_or_create_owned(&labels),
            duration: self.families.duration.get_or_create_owned(&labels),
        }
    }

    fn close(&self, errno: Option<&'static str>, opened: Instant) {
        let elapsed = opened.elapsed();
        self.open_connections.dec();
        let record = |slot: &CloseSlot| {
            slot.total.inc();
            slot.duration.observe(elapsed);
        };
        match errno {
            None => record(self.clean_close.get_or_init(|| self.resolve_close(None))),
            Some(e) => match self
                .errno_close
                .get_or_init(e, || self.resolve_close(Some(e)))
            {
                Some(slot) => record(slot),
                None => record(&self.resolve_close(Some(e))),
            },
        }
    }
}

/// One open connection's metrics. Byte counts are plain atomic adds.
/// Dropping it without [`TcpConnMetrics::close`] records a clean close
/// (`errno=""`).
#[derive(Debug)]
pub struct TcpConnMetrics {
    target: TcpTarget,
    opened: Instant,
    closed: bool,
}

impl TcpConnMetrics {
    /// Bytes read from the peer (`tcp_read_bytes_total`).
    pub fn read_bytes(&self, n: u64) {
        self.target.0.read_bytes.inc_by(n);
    }

    /// Bytes written to the peer (`tcp_write_bytes_total`).
    pub fn write_bytes(&self, n: u64) {
        self.target.0.write_bytes.inc_by(n);
    }

    /// The connection closed, with `errno` the error name (e.g.
    /// `"ECONNRESET"`) when it closed on an error: increments
    /// `tcp_close_total`, decrements `tcp_open_connections`, records
    /// `tcp_connection_duration_ms`.
    pub fn close(mut self, errno: Option<&'static str>) {
        self.finish(errno);
    }

    fn finish(&mut self, errno: Option<&'static str>) {
        if !self.closed {
            self.closed = true;
            self.target.0.close(errno, self.opened);
        }
    }
}

impl Drop for TcpConnMetrics {
    fn drop(&mut self) {
        self.finish(None);
    }
}
