//! Warnings a peer can cause once per connection or request (a malformed request, a client that
//! never says where it goes, a proxy-made error response) would let one misbehaving client
//! flood the log: a slowloris run once wrote a thousand identical lines. Each such warning is an
//! event: every occurrence is counted in `proxy_warnings_total{event}`, and the log gets at most
//! [`BURST`] lines per event every [`WINDOW`], the first of the next window saying how many were
//! left out (`suppressed`).
//!
//! Use [`warn_limited!`](crate::warn_limited) at the call site; the event name is the metric
//! label, so keep it a short fixed word.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pylon_proxy_metrics::{EventCounter, Metrics};

use crate::balance::now_ns;

/// Lines logged per event and window.
pub const BURST: u32 = 10;
/// The window over which [`BURST`] applies.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Where events are counted; set once at start-up (unit tests run without it).
static REGISTRY: OnceLock<Arc<Metrics>> = OnceLock::new();

/// Counts every rate-limited warning in `metrics` from now on.
pub fn init(metrics: &Arc<Metrics>) {
    let _ = REGISTRY.set(metrics.clone());
}

/// One kind of warning, as a `static` at its call site.
pub struct Warning {
    event: &'static str,
    counter: OnceLock<Option<EventCounter>>,
    /// Which window (`now_ns() / WINDOW`) `logged` counts.
    window: AtomicU64,
    logged: AtomicU32,
    suppressed: AtomicU64,
}

impl Warning {
    pub const fn new(event: &'static str) -> Self {
        Self {
            event,
            counter: OnceLock::new(),
            window: AtomicU64::new(0),
            logged: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence. `Some(n)`: log it, saying `n` were left out since the last line.
    pub fn occurred(&self) -> Option<u64> {
        self.occurred_at(now_ns())
    }

    fn occurred_at(&self, now_ns: u64) -> Option<u64> {
        let counter = self.counter.get_or_init(|| {
            REGISTRY
                .get()
                .map(|metrics| metrics.warning_counter(self.event))
        });
        if let Some(counter) = counter {
            counter.inc();
        }
        // Window 0 is "never logged", so windows count from 1.
        let window = now_ns / WINDOW.as_nanos() as u64 + 1;
        let seen = self.window.load(Ordering::Acquire);
        if seen != window
            && self
                .window
                .compare_exchange(seen, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.logged.store(0, Ordering::Release);
        }
        if self.logged.fetch_add(1, Ordering::AcqRel) < BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// `tracing::warn!` for a warning a peer can repeat at will: counted as `event` in
/// `proxy_warnings_total`, logged at most [`BURST`] times per [`WINDOW`] with a `suppressed`
/// field.
#[macro_export]
macro_rules! warn_limited {
    ($event:literal, $($rest:tt)+) => {{
        static WARNING: $crate::warnings::Warning = $crate::warnings::Warning::new($event);
        if let Some(suppressed) = WARNING.occurred() {
            tracing::warn!(event = $event, suppressed, $($rest)+);
        }
    }};
}

/// [`warn_limited!`](crate::warn_limited) at error level: for a defect a peer repeats on every
/// request (an endpoint answering malformed responses), counted and limited the same way.
#[macro_export]
macro_rules! error_limited {
    ($event:literal, $($rest:tt)+) => {{
        static WARNING: $crate::warnings::Warning = $crate::warnings::Warning::new($event);
        if let Some(suppressed) = WARNING.occurred() {
            tracing::error!(event = $event, suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_is_logged_and_the_rest_counted() {
        let w = Warning::new("test");
        let window = WINDOW.as_nanos() as u64;
        let t0 = 5 * window;
        let logged: Vec<u64> = (0..100).filter_map(|_| w.occurred_at(t0)).collect();
        assert_eq!(logged, vec![0; BURST as usize]);
        // The next window's first line says how many were left out.
        assert_eq!(w.occurred_at(t0 + window), Some(100 - u64::from(BURST)));
        assert_eq!(w.occurred_at(t0 + window + 1), Some(0));
    }

    #[test]
    fn every_occurrence_is_counted() {
        let metrics = Metrics::new(Default::default());
        let w = Warning::new("counted");
        // Resolve the handle from this registry rather than the global one.
        let _ = w.counter.set(Some(metrics.warning_counter("counted")));
        for _ in 0..25 {
            w.occurred_at(0);
        }
        let mut text = String::new();
        metrics.encode(&mut text).unwrap();
        assert!(
            text.contains("proxy_warnings_total{event=\"counted\"} 25"),
            "{text}"
        );
    }
}
