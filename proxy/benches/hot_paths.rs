//! Micro-benches of two per-request / per-connection hot paths of the data plane:
//!
//! - **balancer pick**: `EndpointSet::pick()` (P2C over PeakEWMA) over 1, 3, 10 and 100
//!   endpoints carrying some recorded load, and the whole per-request cycle: pick, mark the
//!   request in flight (`PeakEwma::start`), drop the guard (records the RTT, ends pending);
//! - **protocol detection**: `detect::classify` on what a connection's first read typically
//!   holds.
//!
//! Before the timed runs, each operation is also run under a counting allocator and its
//! allocations per call are printed (`allocs/op`).
//!
//! `cargo bench -p pylon-proxy --bench hot_paths`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use pylon_proxy::balance::{Balanced, EndpointSet, InFlight, PeakEwma};
use pylon_proxy::detect::{classify, Protocol};

#[path = "../../benches/support/alloc_counter.rs"]
mod alloc_counter;
use alloc_counter::allocs_per_op;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

// ---------------------------------------------------------------------------------------------
// Balancer pick

const SET_SIZES: [usize; 4] = [1, 3, 10, 100];

/// An endpoint as the balancer sees it: something with a load.
struct Ep {
    load: Arc<PeakEwma>,
}

impl Balanced for Ep {
    fn load(&self) -> &PeakEwma {
        &self.load
    }
}

/// `n` endpoints with some recorded load: each has completed a request, every third one has
/// failed a connection (charged the 1 s penalty), and endpoint `i` has `i % 4` requests still in
/// flight. The returned guards keep those requests pending; hold them for the bench's duration.
fn loaded_set(n: usize) -> (EndpointSet<Ep>, Vec<InFlight>) {
    let mut pending = Vec::new();
    let endpoints: Vec<Arc<Ep>> = (0..n)
        .map(|id| {
            let load = Arc::new(PeakEwma::new());
            let mut done = load.start();
            done.response_received();
            drop(done);
            if id % 3 == 2 {
                let mut refused = load.start();
                refused.failed(true);
            }
            for _ in 0..id % 4 {
                pending.push(load.start());
            }
            Arc::new(Ep { load })
        })
        .collect();
    (EndpointSet::new(endpoints), pending)
}

/// One request's balancer work: pick, in flight, done (the guard's drop records the RTT).
fn pick_start_drop(set: &EndpointSet<Ep>) {
    let ep = set.pick().expect("non-empty set");
    let in_flight = ep.load.start();
    drop(black_box(in_flight));
}

fn balancer(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer pick");
    for n in SET_SIZES {
        let (set, _pending) = loaded_set(n);
        g.bench_with_input(BenchmarkId::new("pick", n), &set, |b, set| {
            b.iter(|| set.pick())
        });
        g.bench_with_input(
            BenchmarkId::new("pick + start + drop", n),
            &set,
            |b, set| b.iter(|| pick_start_drop(black_box(set))),
        );
    }
    // For scale: PeakEWMA reads the clock in `cost()` (twice per P2C pick), in `start()` and
    // twice when the guard drops.
    g.bench_function("reference: Instant::now()", |b| b.iter(Instant::now));
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Protocol detection

/// A typical HTTP/1.1 GET head from a service client (~300 bytes).
fn http1_get() -> Vec<u8> {
    b"GET /api/v1/books/9781593278281?include=reviews&lang=en HTTP/1.1\r\n\
Host: books.shop.svc.cluster.local:8080\r\n\
User-Agent: okhttp/4.12.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip\r\n\
Connection: keep-alive\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
X-Request-Id: 7f3c2a9e-1b4d-4c8a-9e2f-6d5b8a1c3e70\r\n\
\r\n"
        .to_vec()
}

/// A browser-forwarded request whose head is 4 KiB: a JWT, a large cookie and the usual
/// forwarding headers.
fn http1_4k_head() -> Vec<u8> {
    let mut head = String::from(
        "POST /checkout/v2/orders HTTP/1.1\r\n\
Host: orders.shop.svc.cluster.local\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-GB,en;q=0.9,de;q=0.8\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Content-Type: application/json\r\n\
Content-Length: 0\r\n\
Origin: https://shop.example.com\r\n\
Referer: https://shop.example.com/cart\r\n\
X-Forwarded-For: 203.0.113.7, 10.0.4.12\r\n\
X-Forwarded-Proto: https\r\n\
X-Request-Id: 7f3c2a9e-1b4d-4c8a-9e2f-6d5b8a1c3e70\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
tracestate: vendor=t61rcWkgMzE\r\n\
Authorization: Bearer ",
    );
    // A JWT-shaped token: three base64url segments.
    for (i, len) in [36usize, 560, 86].into_iter().enumerate() {
        if i > 0 {
            head.push('.');
        }
        head.extend((0..len).map(|j| char::from(b'A' + ((i + j * 7) % 26) as u8)));
    }
    head.push_str("\r\nCookie: ");
    // Cookies fill the head to exactly 4 KiB, blank line included.
    let end = 4096 - "\r\n\r\n".len();
    let mut i = 0u64;
    loop {
        let pair = format!(
            "pref_{i:02}=v{:08x}; ",
            i.wrapping_mul(2_654_435_761) as u32
        );
        if head.len() + pair.len() + "session=".len() + 16 > end {
            break;
        }
        head.push_str(&pair);
        i += 1;
    }
    head.push_str("session=");
    while head.len() < end {
        head.push(char::from(b'a' + (head.len() % 26) as u8));
    }
    head.push_str("\r\n\r\n");
    assert_eq!(head.len(), 4096);
    head.into_bytes()
}

/// What an h2 prior-knowledge client sends first: the preface and its SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: length 18, type 4, flags 0, stream 0; three settings.
    b.extend_from_slice(&[0, 0, 18, 4, 0, 0, 0, 0, 0]);
    for (id, value) in [(0x2u16, 0u32), (0x3, 100), (0x4, 4_194_304)] {
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&value.to_be_bytes());
    }
    b
}

/// A TLS 1.3 ClientHello as a client's first flight carries it: 517 bytes (clients pad to
/// 512 + the 5-byte record header), SNI, ALPN h2/http1.1, an x25519 key share.
fn tls_client_hello() -> Vec<u8> {
    // Deterministic filler for the random, session id and key share.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut filler = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    };
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    fn with_len16(data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    let mut body = vec![0x03, 0x03];
    body.extend(filler(32));
    body.push(32);
    body.extend(filler(32));
    let suites: [u16; 16] = [
        0x0a0a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
        0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
    ];
    let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
    body.extend(with_len16(&suites));
    body.extend_from_slice(&[1, 0]);

    let mut exts = Vec::new();
    let host = b"books.shop.svc.cluster.local";
    let mut sni = vec![0];
    sni.extend(with_len16(host));
    ext(&mut exts, 0x0000, &with_len16(&sni));
    ext(&mut exts, 0x0017, &[]);
    ext(&mut exts, 0xff01, &[0]);
    ext(
        &mut exts,
        0x000a,
        &with_len16(&[0x00, 0x1d, 0x00, 0x17, 0x00, 0x18]),
    );
    ext(&mut exts, 0x000b, &[1, 0]);
    ext(&mut exts, 0x0023, &[]);
    let alpn = [&[2u8][..], b"h2", &[8], b"http/1.1"].concat();
    ext(&mut exts, 0x0010, &with_len16(&alpn));
    ext(&mut exts, 0x0005, &[1, 0, 0, 0, 0]);
    let sigalgs: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];
    let sigalgs: Vec<u8> = sigalgs.iter().flat_map(|s| s.to_be_bytes()).collect();
    ext(&mut exts, 0x000d, &with_len16(&sigalgs));
    let mut share = vec![0x00, 0x1d, 0x00, 0x20];
    share.extend(filler(32));
    ext(&mut exts, 0x0033, &with_len16(&share));
    ext(&mut exts, 0x002d, &[1, 1]);
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    // Padding extension up to a 512-byte handshake message.
    let used = 4 + body.len() + 2 + exts.len() + 4;
    ext(&mut exts, 0x0015, &vec![0; 512usize.saturating_sub(used)]);
    body.extend(with_len16(&exts));

    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(with_len16(&handshake));
    record
}

fn detection_inputs() -> Vec<(String, Vec<u8>, Protocol)> {
    let http1 = http1_get();
    let big = http1_4k_head();
    let h2 = h2_preface();
    let tls = tls_client_hello();
    assert!(
        !tls.windows(2).any(|w| w == b"\r\n"),
        "the ClientHello must not contain CRLF, or it would exercise a different path"
    );
    vec![
        (
            format!("HTTP/1.1 GET head ({} B)", http1.len()),
            http1,
            Protocol::Http1,
        ),
        (
            format!("HTTP/1.1 head ({} B)", big.len()),
            big,
            Protocol::Http1,
        ),
        (
            format!("h2 preface + SETTINGS ({} B)", h2.len()),
            h2,
            Protocol::H2,
        ),
        (
            format!("TLS ClientHello ({} B)", tls.len()),
            tls.clone(),
            Protocol::Tcp,
        ),
        (
            "TLS record header (5 B)".to_string(),
            tls[..5].to_vec(),
            Protocol::Tcp,
        ),
    ]
}

fn detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol detection");
    for (name, input, expected) in detection_inputs() {
        assert_eq!(classify(&input), Some(expected), "{name}");
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(BenchmarkId::new("classify", &name), |b| {
            b.iter(|| classify(black_box(&input)))
        });
    }
    g.finish();
}

fn report_allocations() {
    for n in SET_SIZES {
        let (set, _pending) = loaded_set(n);
        let pick = allocs_per_op(10_000, || drop(black_box(set.pick())));
        let cycle = allocs_per_op(10_000, || pick_start_drop(&set));
        eprintln!("allocs/op  balancer pick/pick/{n}: {pick:.2}");
        eprintln!("allocs/op  balancer pick/pick + start + drop/{n}: {cycle:.2}");
    }
    for (name, input, _) in detection_inputs() {
        let allocs = allocs_per_op(10_000, || {
            black_box(classify(black_box(&input)));
        });
        eprintln!("allocs/op  protocol detection/classify/{name}: {allocs:.2}");
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = balancer, detection
}

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
