//! Micro-benches of destination lookup: what the request path does today to find where a
//! request goes, against a Store holding 1,000 Services and their EndpointSlices.
//!
//! - `Snapshot::resolve_name(host, port)` for the four name forms a client may use (`NAME`,
//!   `NAME.NS`, `NAME.NS.svc`, `NAME.NS.svc.<cluster-domain>`), a mixed-case host, and a name
//!   that is not a Service (it falls back to DNS);
//! - `Snapshot::resolve_cluster_ip(addr)`, the transparent-mode lookup of an original
//!   destination.
//!
//! Route matching (ServiceProfile routes: methods, path regexes) and response
//! classification are benched in `routes.rs`.
//!
//! Before the timed runs, each lookup is also run under a counting allocator and its
//! allocations per call are printed (`allocs/op`).
//!
//! `cargo bench -p pylon-proxy-policy --bench resolve`

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pylon_proxy_policy::{Snapshot, Store, StoreConfig};

#[path = "../../benches/support/alloc_counter.rs"]
mod alloc_counter;
use alloc_counter::allocs_per_op;

const NAMESPACES: usize = 10;
const SERVICES_PER_NAMESPACE: usize = 100;
/// The client's own namespace, which bare `NAME` lookups use.
const DEFAULT_NAMESPACE: &str = "ns-04";

/// One namespace's Services and EndpointSlices as a multi-document YAML file. Service `s` of
/// namespace `ns` has cluster IP `10.96.<ns>.<s+1>`, ports `http` 80 (-> named port, 8080 in
/// the slice) and `grpc` 9090, and one slice with three ready endpoints.
fn namespace_yaml(ns: usize) -> String {
    let mut yaml = String::new();
    for s in 0..SERVICES_PER_NAMESPACE {
        let ip = s + 1;
        write!(
            yaml,
            "\
apiVersion: v1
kind: Service
metadata:
  name: svc-{s:03}
  namespace: ns-{ns:02}
spec:
  clusterIP: 10.96.{ns}.{ip}
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: grpc
    port: 9090
    targetPort: 9090
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{s:03}-abcde
  namespace: ns-{ns:02}
  labels:
    kubernetes.io/service-name: svc-{s:03}
addressType: IPv4
ports:
- name: http
  port: 8080
- name: grpc
  port: 9090
endpoints:
"
        )
        .expect("write to String");
        for e in 1..=3 {
            write!(
                yaml,
                "\
- addresses: [\"10.{}.{s}.{e}\"]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: svc-{s:03}-{e}, namespace: ns-{ns:02}}}
  zone: zone-{e}
",
                ns + 1
            )
            .expect("write to String");
        }
        yaml.push_str("---\n");
    }
    yaml
}

/// The Store loaded from a temp dir of 1,000 Services + 1,000 EndpointSlices.
fn loaded_snapshot() -> Arc<Snapshot> {
    let dir = tempfile::tempdir().expect("tempdir");
    for ns in 0..NAMESPACES {
        std::fs::write(
            dir.path().join(format!("ns-{ns:02}.yaml")),
            namespace_yaml(ns),
        )
        .expect("write config file");
    }
    let started = Instant::now();
    let store = Store::load_dir(
        dir.path(),
        StoreConfig {
            default_namespace: DEFAULT_NAMESPACE.into(),
            ..StoreConfig::default()
        },
    )
    .expect("load_dir");
    let snapshot = store.snapshot();
    assert!(
        snapshot.errors().is_empty(),
        "config errors: {:?}",
        snapshot.errors()
    );
    let services = NAMESPACES * SERVICES_PER_NAMESPACE;
    assert_eq!(snapshot.objects().count(), 2 * services);
    eprintln!(
        "loaded {services} Services + {services} EndpointSlices in {:.0?}",
        started.elapsed()
    );
    snapshot
}

/// `(bench name, host, port, resolves)`.
const NAMES: &[(&str, &str, u16, bool)] = &[
    ("NAME", "svc-042", 80, true),
    ("NAME.NS", "svc-042.ns-07", 80, true),
    ("NAME.NS.svc", "svc-042.ns-07.svc", 80, true),
    (
        "NAME.NS.svc.cluster.local",
        "svc-042.ns-07.svc.cluster.local",
        9090,
        true,
    ),
    (
        "NAME.NS.svc.cluster.local, mixed case",
        "Svc-042.NS-07.svc.Cluster.Local.",
        80,
        true,
    ),
    // Not a Service: the proxy resolves it through DNS instead.
    (
        "external name (miss)",
        "api.payments.example.com",
        443,
        false,
    ),
];

fn cluster_ip() -> SocketAddr {
    "10.96.7.43:80".parse().expect("socket address")
}

fn check(snapshot: &Snapshot) {
    for &(name, host, port, resolves) in NAMES {
        let resolved = snapshot.resolve_name(host, port);
        assert_eq!(resolved.is_some(), resolves, "{name}: {host}:{port}");
        if let Some(r) = resolved {
            assert_eq!(&*r.service.name, "svc-042", "{name}");
            assert_eq!(r.endpoints.len(), 3, "{name}");
        }
    }
    let r = snapshot
        .resolve_cluster_ip(cluster_ip())
        .expect("cluster IP resolves");
    assert_eq!(
        (&*r.service.namespace, &*r.service.name),
        ("ns-07", "svc-042")
    );
}

fn destination_lookup(c: &mut Criterion) {
    let snapshot = loaded_snapshot();
    check(&snapshot);

    for &(name, host, port, _) in NAMES {
        let allocs = allocs_per_op(10_000, || {
            drop(black_box(snapshot.resolve_name(black_box(host), port)))
        });
        eprintln!("allocs/op  destination lookup/resolve_name/{name}: {allocs:.2}");
    }
    let addr = cluster_ip();
    let allocs = allocs_per_op(10_000, || {
        drop(black_box(snapshot.resolve_cluster_ip(black_box(addr))))
    });
    eprintln!("allocs/op  destination lookup/resolve_cluster_ip: {allocs:.2}");

    let mut g = c.benchmark_group("destination lookup");
    for &(name, host, port, _) in NAMES {
        g.bench_function(BenchmarkId::new("resolve_name", name), |b| {
            b.iter(|| snapshot.resolve_name(black_box(host), black_box(port)))
        });
    }
    g.bench_function("resolve_cluster_ip", |b| {
        b.iter(|| snapshot.resolve_cluster_ip(black_box(addr)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = destination_lookup
}

criterion_main!(benches);
