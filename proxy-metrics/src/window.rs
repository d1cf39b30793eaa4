//! Rolling windows: what each HTTP series counted over the last seconds or minutes, so the
//! CLI's `stat --window 1m` against a proxy answers at once instead of scraping twice a
//! minute apart, and a proxy's recent history is there to ask for.
//!
//! Every series of the windowed families (requests, responses and latency, per target and per
//! route, see [`WindowedFamily`]) is registered here when its handle first resolves it, which
//! is off the hot path; recording stays the same atomic adds. A sampler calls
//! [`WindowStore::tick`] about once a second. It reads each series' atomics and keeps how much
//! they grew in two rings: one slot per second for the last minute and one per ten seconds for
//! fifteen minutes. [`WindowStore::collector`] encodes, for a window of up to
//! [`MAX_WINDOW`], each series' increase over the window under its usual name and labels, plus
//! `window_seconds`, the time the increases cover. Increases since the last tick are read
//! live, so what a client sent right before asking is counted.
//!
//! Windows up to a minute are exact to the tick; longer ones are rounded up to ten seconds
//! (as a Prometheus scrape interval would round them); `window_seconds` says what was covered.
//!
//! Memory is bounded per series and nothing else grows: a counter keeps 60 + 91 `u32` slots
//! (604 bytes); a latency histogram the same per bucket that has ever counted (slots are
//! allocated on a bucket's first observation), plus 1,208 bytes of `u64` slots for its sum.
//! A series that counted in 8 of its 26 buckets costs about 7 KiB.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::histogram::MsHistogram;

/// The longest window a proxy answers for.
pub const MAX_WINDOW: Duration = Duration::from_secs(15 * 60);

/// One-second slots: the last minute.
const SECOND_SLOTS: usize = 60;
/// Seconds per block.
const BLOCK_SECS: u64 = 10;
/// Ten-second blocks: fifteen minutes of complete blocks, plus the one being filled (it shares
/// no slot with the oldest complete block a window may read).
const BLOCK_SLOTS: usize = 91;

/// The families kept in windows, in the order they are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WindowedFamily {
    Request,
    Response,
    Latency,
    RouteRequest,
    RouteResponse,
    RouteLatency,
    RouteActualRequest,
    RouteActualResponse,
    RouteActualLatency,
}

impl WindowedFamily {
    const ALL: [WindowedFamily; 9] = [
        Self::Request,
        Self::Response,
        Self::Latency,
        Self::RouteRequest,
        Self::RouteResponse,
        Self::RouteLatency,
        Self::RouteActualRequest,
        Self::RouteActualResponse,
        Self::RouteActualLatency,
    ];

    /// The name as registered: counters without `_total` (the encoder adds it).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Latency => "response_latency_ms",
            Self::RouteRequest => "route_request",
            Self::RouteResponse => "route_response",
            Self::RouteLatency => "route_response_latency_ms",
            Self::RouteActualRequest => "route_actual_request",
            Self::RouteActualResponse => "route_actual_response",
            Self::RouteActualLatency => "route_actual_response_latency_ms",
        }
    }

    /// The help text (`/metrics` and the window share it; the registry adds a final period).
    pub(crate) fn help(self) -> &'static str {
        match self {
            Self::Request => "Total count of HTTP requests",
            Self::Response => "Total count of HTTP responses",
            Self::Latency => "Elapsed times between a request's headers being received and its response stream completing, in milliseconds",
            Self::RouteRequest => "Total count of HTTP requests, per route",
            Self::RouteResponse => "Total count of HTTP responses, per route",
            Self::RouteLatency => "Elapsed times between a request's headers being received and its response stream completing, per route, in milliseconds",
            Self::RouteActualRequest => {
                "Total count of HTTP requests sent to backends (retries included), per route"
            }
            Self::RouteActualResponse => {
                "Total count of HTTP responses from backends (retries included), per route"
            }
            Self::RouteActualLatency => {
                "Elapsed times of each attempt sent to a backend, per route, in milliseconds"
            }
        }
    }
}

/// The families one set of HTTP handles records into.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WindowedHttp {
    pub(crate) requests: WindowedFamily,
    pub(crate) responses: WindowedFamily,
    pub(crate) latency: WindowedFamily,
}

impl WindowedHttp {
    pub(crate) const TARGET: WindowedHttp = WindowedHttp {
        requests: WindowedFamily::Request,
        responses: WindowedFamily::Response,
        latency: WindowedFamily::Latency,
    };
    pub(crate) const ROUTE: WindowedHttp = WindowedHttp {
        requests: WindowedFamily::RouteRequest,
        responses: WindowedFamily::RouteResponse,
        latency: WindowedFamily::RouteLatency,
    };
    pub(crate) const ROUTE_ACTUAL: WindowedHttp = WindowedHttp {
        requests: WindowedFamily::RouteActualRequest,
        responses: WindowedFamily::RouteActualResponse,
        latency: WindowedFamily::RouteActualLatency,
    };
}

/// What a series reads its cumulative values from.
#[derive(Debug)]
pub(crate) enum Source {
    Counter(Counter),
    Histogram(MsHistogram),
}

impl Source {
    /// Identity of the underlying atomics: two handles on one label set share them.
    fn id(&self) -> usize {
        match self {
            Source::Counter(c) => std::ptr::from_ref(c.inner()) as usize,
            Source::Histogram(h) => h.id(),
        }
    }
}

type Labels = Arc<dyn EncodeLabelSet + Send + Sync>;

/// Every windowed series and its rings.
#[derive(Debug)]
pub struct WindowStore {
    start: Instant,
    /// Series registered since the last tick; the hot path's first occurrences only wait for
    /// this lock, never for a tick.
    pending: Mutex<Pending>,
    state: Mutex<State>,
}

#[derive(Default)]
struct Pending {
    seen: HashSet<usize>,
    new: Vec<Tracked>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("seen", &self.seen.len())
            .field("new", &self.new.len())
            .finish()
    }
}

#[derive(Debug)]
struct State {
    /// Whole seconds since `start` accounted for in the rings.
    completed: u64,
    last_tick: Instant,
    series: Vec<Tracked>,
}

struct Tracked {
    family: WindowedFamily,
    labels: Labels,
    source: Source,
    /// One per counter value: the counter's, or each bucket's.
    counts: Vec<Value<u32>>,
    /// A histogram's sum, in microseconds.
    sum: Option<Value<u64>>,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// One cumulative value: what it was at the last tick, and its increases.
#[derive(Debug, Default)]
struct Value<T> {
    last: u64,
    ring: Option<Box<Ring<T>>>,
}

#[derive(Debug)]
struct Ring<T> {
    seconds: [T; SECOND_SLOTS],
    blocks: [T; BLOCK_SLOTS],
}

/// The part of the past a window reads: whole seconds from the one-second ring, whole blocks
/// from the ten-second ring (absolute indexes, half-open).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    seconds: std::ops::Range<u64>,
    blocks: std::ops::Range<u64>,
}

impl Span {
    /// The span for `want` seconds when `completed` seconds are in the rings, and the whole
    /// seconds it covers.
    fn new(completed: u64, want: u64) -> (Span, u64) {
        let want = want.min(completed);
        if want <= SECOND_SLOTS as u64 {
            let span = Span {
                seconds: completed - want..completed,
                blocks: 0..0,
            };
            return (span, want);
        }
        // The seconds of the block being filled, then as many whole blocks as cover the rest.
        let partial = completed % BLOCK_SECS;
        let current_block = completed / BLOCK_SECS;
        let blocks = (want - partial)
            .div_ceil(BLOCK_SECS)
            .min(current_block)
            .min(BLOCK_SLOTS as u64 - 1);
        let span = Span {
            seconds: completed - partial..completed,
            blocks: current_block - blocks..current_block,
        };
        (span, partial + blocks * BLOCK_SECS)
    }
}

trait Slot: Copy + Default + std::ops::AddAssign + Into<u64> {
    fn from_delta(delta: u64) -> Self;
}

impl Slot for u32 {
    fn from_delta(delta: u64) -> Self {
        u32::try_from(delta).unwrap_or(u32::MAX)
    }
}

impl Slot for u64 {
    fn from_delta(delta: u64) -> Self {
        delta
    }
}

impl<T: Slot> Value<T> {
    /// Seconds `from..to` start: their slots (and blocks starting among them) are cleared,
    /// then what `now` adds to `last` goes to the last of them.
    fn advance(&mut self, from: u64, to: u64, now: u64) {
        // A counter never goes down; if it did (it cannot here), count from it.
        let delta = now.saturating_sub(self.last);
        self.last = now;
        if self.ring.is_none() && delta == 0 {
            return;
        }
        let ring = self.ring.get_or_insert_with(|| {
            Box::new(Ring {
                seconds: [T::default(); SECOND_SLOTS],
                blocks: [T::default(); BLOCK_SLOTS],
            })
        });
        // After a long stall only the last fifteen minutes' slots matter.
        let from = from.max(to.saturating_sub(BLOCK_SLOTS as u64 * BLOCK_SECS));
        for s in from..to {
            ring.seconds[slot(s, SECOND_SLOTS)] = T::default();
            if s % BLOCK_SECS == 0 {
                ring.blocks[slot(s / BLOCK_SECS, BLOCK_SLOTS)] = T::default();
            }
        }
        if let Some(last) = to.checked_sub(1) {
            let d = T::from_delta(delta);
            ring.seconds[slot(last, SECOND_SLOTS)] = d;
            ring.blocks[slot(last / BLOCK_SECS, BLOCK_SLOTS)] += d;
        }
    }

    /// The increase over `span`, plus what happened since the last tick.
    fn increase(&self, span: &Span, now: u64) -> u64 {
        let mut sum = now.saturating_sub(self.last);
        if let Some(ring) = &self.ring {
            for s in span.seconds.clone() {
                sum += ring.seconds[slot(s, SECOND_SLOTS)].into();
            }
            for b in span.blocks.clone() {
                sum += ring.blocks[slot(b, BLOCK_SLOTS)].into();
            }
        }
        sum
    }

    fn bytes(&self) -> usize {
        self.ring
            .as_ref()
            .map_or(0, |_| std::mem::size_of::<Ring<T>>())
    }
}

fn slot(i: u64, len: usize) -> usize {
    // `len` is a small constant, so the remainder fits.
    (i % len as u64) as usize
}

/// The current cumulative values of a source: counts (one, or one per bucket) and a sum.
fn read(source: &Source, counts: &mut Vec<u64>) -> Option<u64> {
    counts.clear();
    match source {
        Source::Counter(c) => {
            counts.push(c.get());
            None
        }
        Source::Histogram(h) => Some(h.read(counts)),
    }
}

impl Tracked {
    fn new(family: WindowedFamily, labels: Labels, source: Source) -> Tracked {
        let (counts, sum) = match &source {
            Source::Counter(_) => (1, None),
            Source::Histogram(h) => (h.bounds().len() + 1, Some(Value::default())),
        };
        Tracked {
            family,
            labels,
            source,
            counts: (0..counts).map(|_| Value::default()).collect(),
            sum,
        }
    }

    fn advance(&mut self, from: u64, to: u64, scratch: &mut Vec<u64>) {
        let sum = read(&self.source, scratch);
        for (value, &now) in self.counts.iter_mut().zip(scratch.iter()) {
            value.advance(from, to, now);
        }
        if let (Some(value), Some(now)) = (self.sum.as_mut(), sum) {
            value.advance(from, to, now);
        }
    }
}

impl WindowStore {
    pub(crate) fn new(start: Instant) -> Arc<WindowStore> {
        Arc::new(WindowStore {
            start,
            pending: Mutex::new(Pending::default()),
            state: Mutex::new(State {
                completed: 0,
                last_tick: start,
                series: Vec::new(),
            }),
        })
    }

    /// Registers a series; a second registration of the same atomics (another handle on the
    /// same label set) is ignored. `labels` is only called for a new series.
    pub(crate) fn track<L>(
        &self,
        family: WindowedFamily,
        source: Source,
        labels: impl FnOnce() -> L,
    ) where
        L: EncodeLabelSet + Send + Sync + 'static,
    {
        let mut pending = lock(&self.pending);
        if pending.seen.insert(source.id()) {
            let labels: Labels = Arc::new(labels());
            pending.new.push(Tracked::new(family, labels, source));
        }
    }

    /// Accounts for the seconds completed by `now`. Call it about once a second; a late call
    /// puts what happened meanwhile in its last second and nothing in the ones before.
    pub fn tick(&self, now: Instant) {
        let mut state = self.state_with_pending();
        let completed = now.saturating_duration_since(self.start).as_secs();
        if completed <= state.completed {
            return;
        }
        let from = state.completed;
        let mut scratch = Vec::new();
        for series in &mut state.series {
            series.advance(from, completed, &mut scratch);
        }
        state.completed = completed;
        state.last_tick = now;
    }

    /// The state, with the series registered since the last tick moved in.
    fn state_with_pending(&self) -> MutexGuard<'_, State> {
        let new = std::mem::take(&mut lock(&self.pending).new);
        let mut state = lock(&self.state);
        state.series.extend(new);
        state
    }

    /// A collector that encodes the increases over `window` (at most [`MAX_WINDOW`]) as of
    /// `now`, and `window_seconds`.
    pub fn collector(self: &Arc<Self>, window: Duration, now: Instant) -> Box<dyn Collector> {
        Box::new(WindowCollector {
            store: self.clone(),
            window: window.min(MAX_WINDOW),
            now,
        })
    }

    /// Bytes the rings take now.
    pub fn ring_bytes(&self) -> usize {
        let state = self.state_with_pending();
        state
            .series
            .iter()
            .map(|s| {
                s.counts.iter().map(Value::bytes).sum::<usize>()
                    + s.sum.as_ref().map_or(0, Value::bytes)
            })
            .sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
struct WindowCollector {
    store: Arc<WindowStore>,
    window: Duration,
    now: Instant,
}

/// A trait object's labels, for the encoder's generic `encode_family`.
struct DynLabels<'a>(&'a (dyn EncodeLabelSet + Send + Sync));

impl EncodeLabelSet for DynLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }
}

impl Collector for WindowCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let state = self.store.state_with_pending();
        // Whole seconds from the rings (a window is asked for in whole seconds; round up so
        // `--window 1500ms` reads two), plus the time since the last tick.
        let want = self.window.as_secs() + u64::from(self.window.subsec_nanos() > 0);
        let (span, whole) = Span::new(state.completed, want);
        let live = self.now.saturating_duration_since(state.last_tick);
        let covered = Duration::from_secs(whole) + live;

        let metric = encoder.encode_descriptor(
            "window_seconds",
            "Seconds the increases of this window cover (the window asked for, rounded up to the rings' slots, or the proxy's uptime when shorter)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(covered.as_secs_f64()).encode(metric)?;

        let mut now = Vec::new();
        let mut increases = Vec::new();
        for family in WindowedFamily::ALL {
            let mut series = state
                .series
                .iter()
                .filter(|s| s.family == family)
                .peekable();
            let Some(first) = series.peek() else {
                continue;
            };
            let kind = match first.source {
                Source::Counter(_) => MetricType::Counter,
                Source::Histogram(_) => MetricType::Histogram,
            };
            let mut descriptor =
                encoder.encode_descriptor(family.name(), family.help(), None, kind)?;
            for s in series {
                let sum_now = read(&s.source, &mut now);
                increases.clear();
                increases.extend(
                    s.counts
                        .iter()
                        .zip(&now)
                        .map(|(value, &n)| value.increase(&span, n)),
                );
                let labels = DynLabels(&*s.labels);
                let metric = descriptor.encode_family(&labels)?;
                match &s.source {
                    Source::Counter(_) => {
                        ConstCounter::new(increases.first().copied().unwrap_or(0))
                            .encode(metric)?;
                    }
                    Source::Histogram(h) => {
                        let sum_us = match (&s.sum, sum_now) {
                            (Some(value), Some(n)) => value.increase(&span, n),
                            _ => 0,
                        };
                        let buckets: Vec<(f64, u64)> = h
                            .bounds()
                            .iter()
                            .copied()
                            .chain([f64::INFINITY])
                            .zip(increases.iter().copied())
                            .collect();
                        let count = increases.iter().sum();
                        let mut metric = metric;
                        metric.encode_histogram::<NoLabelSet>(
                            sum_us as f64 / 1_000.0,
                            count,
                            &buckets,
                            None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_seconds_then_blocks() {
        // Up to a minute: seconds only, exact.
        assert_eq!(
            Span::new(125, 30),
            (
                Span {
                    seconds: 95..125,
                    blocks: 0..0
                },
                30
            )
        );
        // Less uptime than asked: what there is.
        assert_eq!(Span::new(20, 60).1, 20);
        assert_eq!(Span::new(0, 60).1, 0);
        // Longer: the five seconds of block 12, then ten whole blocks.
        assert_eq!(
            Span::new(125, 100),
            (
                Span {
                    seconds: 120..125,
                    blocks: 2..12
                },
                105
            )
        );
        // Fifteen minutes after an hour: 90 whole blocks plus the partial one's seconds.
        let (span, covered) = Span::new(3_605, 900);
        assert_eq!(span.blocks, 270..360);
        assert_eq!(covered, 905);
        // Never a block whose slot the block being filled reuses.
        let (span, _) = Span::new(3_605, 10_000);
        assert_eq!(span.blocks.end - span.blocks.start, 90);
    }

    fn value_after(ticks: &[(u64, u64)]) -> Value<u32> {
        let mut v = Value::<u32>::default();
        let mut completed = 0;
        for &(to, cumulative) in ticks {
            v.advance(completed, to, cumulative);
            completed = to;
        }
        v
    }

    #[test]
    fn increases_over_windows() {
        // 1 request per second for 200 seconds.
        let ticks: Vec<(u64, u64)> = (1..=200).map(|s| (s, s)).collect();
        let v = value_after(&ticks);
        let inc = |want| v.increase(&Span::new(200, want).0, 200);
        assert_eq!(inc(1), 1);
        assert_eq!(inc(60), 60);
        assert_eq!(inc(61), 70, "rounded up to whole blocks");
        assert_eq!(inc(900), 200, "the whole uptime");
        // What happened since the last tick counts too.
        assert_eq!(v.increase(&Span::new(200, 10).0, 203), 13);
    }

    #[test]
    fn a_late_tick_puts_the_gap_in_its_last_second() {
        // 10 at second 5, then nothing ticked until 70 with 50 more.
        let v = value_after(&[(5, 10), (70, 60)]);
        assert_eq!(v.increase(&Span::new(70, 1).0, 60), 50);
        assert_eq!(v.increase(&Span::new(70, 60).0, 60), 50);
        assert_eq!(v.increase(&Span::new(70, 70).0, 60), 60);
        // Stale slots from before the gap were cleared.
        let v = value_after(&[(1, 7), (61, 7)]);
        assert_eq!(v.increase(&Span::new(61, 60).0, 7), 0);
    }

    #[test]
    fn fifteen_minutes_roll_over() {
        // 2 per second for an hour; the window never holds more than 15 minutes.
        let ticks: Vec<(u64, u64)> = (1..=3_600).map(|s| (s, 2 * s)).collect();
        let v = value_after(&ticks);
        let (span, covered) = Span::new(3_600, 900);
        assert_eq!(covered, 900);
        assert_eq!(v.increase(&span, 7_200), 1_800);
        let (span, covered) = Span::new(3_600, 300);
        assert_eq!(covered, 300);
        assert_eq!(v.increase(&span, 7_200), 600);
    }

    #[test]
    fn an_idle_value_allocates_nothing() {
        let v = value_after(&[(1, 0), (2, 0)]);
        assert_eq!(v.bytes(), 0);
        let v = value_after(&[(1, 1)]);
        assert_eq!(v.bytes(), 4 * (SECOND_SLOTS + BLOCK_SLOTS));
    }
}
