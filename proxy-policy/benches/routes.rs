//! Micro-benches of ServiceProfile route matching and response classification, what the
//! request path does per request once it knows the logical destination.
//!
//! A 20-route profile, and the 50-route one issue 5 asks for (a mix of method + pathRegex conditions, some nested, and response
//! classes) is loaded through a real Store from a temp dir, then:
//! - `RouteTable::route_for(method, path)` hitting the first route, the last route, and no
//!   route (the default, after trying them all);
//! - `Route::classify(status, grpc_status)` through response classes and the default rule;
//! - `Snapshot::route_table(fqdn)`, the lookup before matching.
//!
//! Before the timed runs, each operation is also run under a counting allocator and its
//! allocations per call are printed (`allocs/op`, expected 0).
//!
//! `cargo bench -p pylon-proxy-policy --bench routes`

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pylon_proxy_policy::{RouteTable, Store, StoreConfig};

#[path = "../../benches/support/alloc_counter.rs"]
mod alloc_counter;
use alloc_counter::allocs_per_op;

const FQDN: &str = "web.shop.svc.cluster.local";
const SIZES: [usize; 2] = [20, 50];
const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

/// Route `i` matches `METHODS[i % 4]` on `/api/v1/res<i>/<id>` (`\d+`); every fifth route
/// nests its condition in `all`/`any`, and every route declares two response classes.
fn profile_yaml(routes: usize) -> String {
    let mut yaml = format!(
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata:\n  name: {FQDN}\n  namespace: shop\nspec:\n  routes:\n"
    );
    for i in 0..routes {
        let method = METHODS[i % METHODS.len()];
        let condition = if i % 5 == 4 {
            format!(
                "      all:\n      - method: {method}\n      - any:\n        - pathRegex: '/api/v1/res{i}/\\d+'\n        - pathRegex: '/api/v2/res{i}/[a-f0-9]{{8}}'\n"
            )
        } else {
            format!("      method: {method}\n      pathRegex: '/api/v1/res{i}/\\d+'\n")
        };
        write!(
            yaml,
            "  - name: {method} /api/v1/res{i}/{{id}}\n    condition:\n{condition}    responseClasses:\n    - condition: {{status: {{min: 429, max: 429}}}}\n      isFailure: true\n    - condition: {{not: {{status: {{min: 500, max: 599}}}}}}\n      isFailure: false\n    isRetryable: {}\n    timeout: 300ms\n",
            method == "GET"
        )
        .expect("write to String");
    }
    yaml
}

fn loaded_table(routes: usize) -> (Arc<Store>, Arc<RouteTable>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("profile.yaml"), profile_yaml(routes)).expect("write profile");
    let store = Store::load_dir(dir.path(), StoreConfig::default()).expect("load_dir");
    let snapshot = store.snapshot();
    assert!(
        snapshot.errors().is_empty(),
        "config errors: {:?}",
        snapshot.errors()
    );
    let table = snapshot.route_table(FQDN).expect("profile loaded").clone();
    assert_eq!(table.routes().len(), routes);
    (store, table)
}

/// `(bench name, method, path, expected route name)` for a profile of `routes` routes.
fn requests(routes: usize) -> Vec<(&'static str, &'static str, String, String)> {
    let last = routes - 1;
    let method = METHODS[last % METHODS.len()];
    // The last route of both sizes (19, 49) has the nested condition with a v2 branch.
    assert_eq!(last % 5, 4);
    vec![
        (
            "first route",
            "GET",
            "/api/v1/res0/12345".to_string(),
            "GET /api/v1/res0/{id}".to_string(),
        ),
        (
            "last route",
            method,
            format!("/api/v2/res{last}/deadbeef"),
            format!("{method} /api/v1/res{last}/{{id}}"),
        ),
        (
            "default (no match)",
            "GET",
            "/api/v1/res0/12345/orders".to_string(),
            "[DEFAULT]".to_string(),
        ),
    ]
}

/// `(bench name, status, grpc-status, is_failure)` on the first route.
const RESPONSES: &[(&str, u16, Option<u32>, bool)] = &[
    ("200 (class: not 5xx)", 200, None, false),
    ("429 (class: failure)", 429, None, true),
    ("503 (default rule)", 503, None, true),
    ("200 grpc-status 14 (class wins)", 200, Some(14), false),
];

fn route_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("routes");
    for routes in SIZES {
        let (_store, table) = loaded_table(routes);
        let requests = requests(routes);
        for (name, method, path, expected) in &requests {
            assert_eq!(&**table.route_for(method, path).name(), expected, "{name}");
            let allocs = allocs_per_op(10_000, || {
                black_box(table.route_for(black_box(method), black_box(path)));
            });
            eprintln!("allocs/op  routes/route_for/{routes} routes, {name}: {allocs:.2}");
        }
        for (name, method, path, _) in &requests {
            g.bench_function(
                BenchmarkId::new("route_for", format!("{routes} routes, {name}")),
                |b| {
                    b.iter(|| {
                        table
                            .route_for(black_box(method), black_box(path))
                            .name()
                            .len()
                    })
                },
            );
        }
    }

    let (store, table) = loaded_table(SIZES[0]);
    let snapshot = store.snapshot();
    let first = &table.routes()[0];
    for &(name, status, grpc, failure) in RESPONSES {
        assert_eq!(first.classify(status, grpc), failure, "{name}");
    }

    for &(name, status, grpc, _) in RESPONSES {
        let allocs = allocs_per_op(10_000, || {
            black_box(first.classify(black_box(status), black_box(grpc)));
        });
        eprintln!("allocs/op  routes/classify/{name}: {allocs:.2}");
    }
    let allocs = allocs_per_op(10_000, || {
        black_box(snapshot.route_table(black_box(FQDN)));
    });
    eprintln!("allocs/op  routes/route_table: {allocs:.2}");

    for &(name, status, grpc, _) in RESPONSES {
        g.bench_function(BenchmarkId::new("classify", name), |b| {
            b.iter(|| first.classify(black_box(status), black_box(grpc)))
        });
    }
    g.bench_function("route_table", |b| {
        b.iter(|| snapshot.route_table(black_box(FQDN)).is_some())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = route_matching
}

criterion_main!(benches);
