//! Micro-benches of metric recording, the per-request and per-read cost every proxied request
//! and connection pays.
//!
//! Recording goes through pre-resolved handles (`HttpTarget`, `TcpConnMetrics`): the proxy
//! resolves a label set once per (route, endpoint), so resolving is benched separately, for
//! contrast, and is not a per-request cost.
//!
//! Before the timed runs, each operation is also run under a counting allocator and its
//! allocations per call are printed (`allocs/op`): the handles promise none after the first
//! occurrence of a label combination.
//!
//! `cargo bench -p pylon-proxy-metrics --bench record`

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion};
use pylon_proxy_metrics::{
    Direction, HttpTarget, Metrics, ProxyLabels, TargetLabels, TcpTarget, Tls,
};

#[path = "../../benches/support/alloc_counter.rs"]
mod alloc_counter;
use alloc_counter::allocs_per_op;

/// A typical response latency: lands mid-way through Linkerd's bucket bounds.
const LATENCY: Duration = Duration::from_micros(1_500);

fn metrics() -> Arc<Metrics> {
    Metrics::new(ProxyLabels {
        namespace: Some("shop".into()),
        deployment: Some("web".into()),
        pod: Some("web-7c9f8d6b5-x2kqp".into()),
    })
}

/// The labels of one outbound endpoint, as the balancer resolves them.
fn endpoint_labels(i: usize) -> TargetLabels {
    TargetLabels::new(
        Direction::Outbound,
        "books.shop.svc.cluster.local:8080",
        format!("10.1.{}.{}:8080", i / 250, i % 250),
        Tls::NoIdentity("not_provided_by_service_discovery"),
    )
    .with_dst_service("books")
    .with_dst_namespace("shop")
}

fn http_target(metrics: &Metrics, i: usize) -> HttpTarget {
    let target = metrics.http_target(endpoint_labels(i));
    // Fill the slots the benches use, as the first requests of a real endpoint would.
    target.response(Some(200), None, None, LATENCY);
    target.response(Some(503), None, None, LATENCY);
    target.response(Some(200), Some(0), None, LATENCY);
    target.response(Some(504), None, Some("response_timeout"), LATENCY);
    target
}

fn tcp_target(metrics: &Metrics) -> TcpTarget {
    metrics.tcp_target(TargetLabels::new(
        Direction::Inbound,
        "web.shop.svc.cluster.local:80",
        "127.0.0.1:8080",
        Tls::Secured,
    ))
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

fn report_allocations() {
    let metrics = metrics();
    let target = http_target(&metrics, 0);
    let tcp = tcp_target(&metrics);
    let conn = tcp.open();
    let labels = endpoint_labels(1);
    let rows: [(&str, f64); 7] = [
        (
            "request() + response(200)",
            allocs_per_op(10_000, || {
                target.request();
                target.response(Some(200), None, None, LATENCY);
            }),
        ),
        (
            "response(503)",
            allocs_per_op(10_000, || target.response(Some(503), None, None, LATENCY)),
        ),
        (
            "response(200, grpc 0)",
            allocs_per_op(10_000, || {
                target.response(Some(200), Some(0), None, LATENCY)
            }),
        ),
        (
            "response(504, error)",
            allocs_per_op(10_000, || {
                target.response(Some(504), None, Some("response_timeout"), LATENCY)
            }),
        ),
        (
            "tcp read_bytes",
            allocs_per_op(10_000, || conn.read_bytes(black_box(1_460))),
        ),
        (
            "tcp open + close",
            allocs_per_op(10_000, || drop(tcp.open())),
        ),
        (
            "http_target(labels), existing series",
            allocs_per_op(1_000, || drop(metrics.http_target(labels.clone()))),
        ),
    ];
    for (name, allocs) in rows {
        eprintln!("allocs/op  metric recording/{name}: {allocs:.2}");
    }
}

fn recording(c: &mut Criterion) {
    let metrics = metrics();
    let target = http_target(&metrics, 0);
    let mut g = c.benchmark_group("metric recording");

    g.bench_function("request()", |b| b.iter(|| black_box(&target).request()));
    g.bench_function("request() + response(200)", |b| {
        b.iter(|| {
            let t = black_box(&target);
            t.request();
            t.response(black_box(Some(200)), None, None, black_box(LATENCY));
        })
    });
    g.bench_function("response(503)", |b| {
        b.iter(|| black_box(&target).response(black_box(Some(503)), None, None, black_box(LATENCY)))
    });
    g.bench_function("response(200, grpc_status 0)", |b| {
        b.iter(|| {
            black_box(&target).response(
                black_box(Some(200)),
                black_box(Some(0)),
                None,
                black_box(LATENCY),
            )
        })
    });
    // A proxy-made error goes through the small per-target table of other combinations.
    g.bench_function("response(504, error)", |b| {
        b.iter(|| {
            black_box(&target).response(
                black_box(Some(504)),
                None,
                black_box(Some("response_timeout")),
                black_box(LATENCY),
            )
        })
    });

    let tcp = tcp_target(&metrics);
    let conn = tcp.open();
    g.bench_function("tcp read_bytes", |b| {
        b.iter(|| black_box(&conn).read_bytes(black_box(1_460)))
    });
    // Per connection: tcp_open_total, tcp_open_connections, and on drop the clean close.
    g.bench_function("tcp open + close", |b| {
        b.iter(|| drop(black_box(&tcp).open()))
    });

    // Once per endpoint, not per request: hashes the labels and takes the families' locks.
    let labels = endpoint_labels(1);
    g.bench_function("http_target(labels), existing series (per endpoint)", |b| {
        b.iter_batched(
            || labels.clone(),
            |l| metrics.http_target(l),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Runs `op` `iters` times on each of two threads started together; returns the slower
/// thread's time, so the figure is the time per op on one thread while the other thread
/// records too. Thread start-up is outside the timed part.
fn two_threads<T: Sync>(iters: u64, state: [&T; 2], op: impl Fn(&T) + Sync) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles = state.map(|st| {
            let (barrier, op) = (&barrier, &op);
            s.spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    op(black_box(st));
                }
                start.elapsed()
            })
        });
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn contention(c: &mut Criterion) {
    let metrics = metrics();
    let shared = http_target(&metrics, 0);
    let other = http_target(&metrics, 2);
    let record = |t: &HttpTarget| {
        t.request();
        t.response(Some(200), None, None, LATENCY);
    };
    let mut g = c.benchmark_group("metric recording, 2 threads");
    // Both threads on one endpoint's handle: its counters' cache lines bounce between cores.
    g.bench_function("request() + response(200), same target", |b| {
        b.iter_custom(|iters| two_threads(iters, [&shared, &shared], record))
    });
    // Each thread on its own endpoint: the baseline without sharing.
    g.bench_function("request() + response(200), distinct targets", |b| {
        b.iter_custom(|iters| two_threads(iters, [&shared, &other], record))
    });
    g.finish();
}

/// The rolling windows' once-a-second work and an answer to `/metrics/window`, for a proxy
/// with 1,000 busy endpoints (each with a request series and four response and latency series:
/// 9,000 series). Not a per-request cost: requests record exactly as without windows.
fn windows(c: &mut Criterion) {
    let metrics = metrics();
    let targets: Vec<HttpTarget> = (0..1_000).map(|i| http_target(&metrics, i)).collect();
    let start = Instant::now();
    let mut second = 0u64;
    let mut g = c.benchmark_group("rolling windows, 1,000 endpoints");
    g.bench_function("tick (every series moved on one second)", |b| {
        b.iter_batched(
            || {
                for t in &targets {
                    t.request();
                    t.response(Some(200), None, None, LATENCY);
                }
                second += 1;
                start + Duration::from_secs(second)
            },
            |now| metrics.window_tick(now),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("encode a 15m window", |b| {
        let now = start + Duration::from_secs(second);
        b.iter(|| {
            let mut out = String::with_capacity(1 << 20);
            metrics
                .encode_window(&mut out, Duration::from_secs(900), now)
                .expect("encode");
            black_box(out.len())
        })
    });
    g.finish();
    println!(
        "rolling windows, 1,000 endpoints after {second} s: {} KiB of rings",
        metrics.window_bytes() / 1024
    );
}

criterion_group! {
    name = benches;
    config = config();
    targets = recording, contention, windows
}

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
