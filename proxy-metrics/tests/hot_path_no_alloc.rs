//! The hot path allocates nothing: after the first occurrence of a response
//! combination, `HttpTarget::response`, `request` and the TCP byte counters
//! make no heap allocation (checked with a counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use pylon_proxy_metrics::{Direction, Metrics, ProxyLabels, TargetLabels, Tls};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|a| a.get())
}

#[test]
fn recording_does_not_allocate() {
    let metrics = Metrics::new(ProxyLabels::default());
    let http = metrics.http_target(TargetLabels::new(
        Direction::Outbound,
        "books.default.svc.cluster.local:8080",
        "10.1.2.3:8080",
        Tls::Secured,
    ));
    let tcp = metrics.tcp_target(TargetLabels::new(
        Direction::Inbound,
        "web:80",
        "127.0.0.1:8080",
        Tls::Secured,
    ));
    let record = || {
        http.request();
        http.response(Some(200), None, None, Duration::from_millis(3));
        http.response(Some(503), None, None, Duration::from_millis(3));
        http.response(Some(200), Some(0), None, Duration::from_millis(3));
        http.response(Some(200), Some(14), None, Duration::from_millis(3));
        http.response(
            Some(504),
            None,
            Some("response_timeout"),
            Duration::from_secs(10),
        );
        http.response(None, None, Some("connection_reset"), Duration::ZERO);
    };
    // First occurrences resolve (and allocate) once; this also shows the
    // counter sees this thread's allocations.
    let start = allocs();
    record();
    assert!(allocs() > start, "allocation counter not counting");
    let conn = tcp.open();

    let before = allocs();
    for _ in 0..1000 {
        record();
        conn.read_bytes(10);
        conn.write_bytes(10);
    }
    assert_eq!(allocs() - before, 0, "hot path allocated");
    drop(conn);
}
