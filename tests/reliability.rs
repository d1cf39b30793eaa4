//! Reliability and abuse: HTTP/1 request smuggling probes, HTTP/2 rapid reset and CONTINUATION
//! floods, endpoint churn and an endpoint killed under load, and a graceful drain under load.
//!
//! Every test is bounded (the whole test by `test_body`, every load loop in count and in time)
//! and asserts counts, never timings, so a loaded 2-core machine gives the same verdicts.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// 1. HTTP/1 request smuggling probes
// ---------------------------------------------------------------------------------------------

/// The request a mis-framing parser would see as a second request (`{id}`: the probe run). It
/// must never reach the app.
fn smuggled(id: usize) -> String {
    format!("GET /smuggled-{id} HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n")
}

/// What RFC 9112 lets a server (and an intermediary) do with a probe.
#[derive(Debug, Clone, Copy)]
enum Rfc {
    /// Invalid framing or syntax: 400 (or a close) and nothing forwarded. The RFC says MUST for
    /// framing it names (conflicting lengths, chunked not last, space before a colon); for
    /// other grammar violations it grants no leniency, and 9112 §2.2 says a server SHOULD answer
    /// such a request 400 and close. This test requires it of all of them.
    MustReject,
    /// The RFC lets the recipient either reject it or accept it with this body (the smuggled
    /// bytes, if any, inside it), forwarding it once with unambiguous framing.
    MayAccept { body: &'static str },
    /// As `MayAccept`, and when accepted the connection must be closed after the response
    /// (RFC 9112 §6.1 for Content-Length together with Transfer-Encoding).
    MayAcceptThenClose { body: &'static str },
}

/// One probe: a raw request (see [`render`] for the placeholders) and what the RFC expects. The
/// sentinel request follows it on the connection, unless it says `Connection: close` itself.
struct Probe {
    name: &'static str,
    rfc: Rfc,
    /// The RFC 9112 (or 9110) rule the expectation comes from.
    why: &'static str,
    raw: &'static str,
}

// Placeholders: {H} the Host line (no CRLF), {S} the smuggled request, {SL} its length in
// decimal, {SX} in hex, {SL5} its length + 5 (the bytes of "0\r\n\r\n" before it). Each run
// gets its own paths (`/probe-N`, `/smuggled-N`), so what the app saw is told apart per run.
#[rustfmt::skip]
const PROBES: &[Probe] = &[
    Probe { name: "CL.TE: Content-Length spans a smuggled request after the last chunk",
        rfc: Rfc::MayAcceptThenClose { body: "" },
        why: "9112 6.1/6.3: TE overrides CL; reject, or process by TE alone, drop CL before forwarding, and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: {SL5}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "TE.CL: chunked body holds a request, Content-Length short",
        rfc: Rfc::MayAcceptThenClose { body: "{S}" },
        why: "9112 6.1/6.3: TE overrides CL; reject, or process by TE alone, drop CL before forwarding, and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{SX}\r\n{S}\r\n0\r\n\r\n" },
    Probe { name: "duplicate Content-Length, same value",
        rfc: Rfc::MayAccept { body: "hello" },
        why: "9110 8.6: identical repeated values MAY be accepted as one, or rejected",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello" },
    Probe { name: "duplicate Content-Length, different values",
        rfc: Rfc::MustReject,
        why: "9112 6.3(5): invalid Content-Length: 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: 0\r\nContent-Length: {SL}\r\n\r\n{S}" },
    Probe { name: "Content-Length list with different values",
        rfc: Rfc::MustReject,
        why: "9112 6.3(5): invalid Content-Length: 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: 0, {SL}\r\n\r\n{S}" },
    Probe { name: "Content-Length with a sign",
        rfc: Rfc::MustReject,
        why: "9110 8.6: Content-Length = 1*DIGIT; 9112 6.3(5): invalid, 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: +{SL}\r\n\r\n{S}" },
    Probe { name: "chunk size not hex",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk-size = 1*HEXDIG; the body length cannot be determined",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{S}" },
    Probe { name: "chunk size overflowing 64 bits",
        rfc: Rfc::MustReject,
        why: "9112 7.1: a recipient MUST anticipate large sizes and prevent integer overflow",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n{S}" },
    Probe { name: "negative chunk size",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk-size = 1*HEXDIG",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n{S}" },
    Probe { name: "chunk size with a space inside",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk-size = 1*HEXDIG",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n1 0\r\nhello\r\n0\r\n\r\n{S}" },
    Probe { name: "chunk size with a leading space",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF, no whitespace before the size",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n{S}" },
    // Tolerated: hyper takes whitespace after a chunk size (9112 2.2 says SHOULD reject). The
    // proxy re-frames the body, so the app never sees the lenient bytes and can't read them
    // differently; what follows the body is then simply the connection's next request.
    Probe { name: "chunk size with a trailing space and no extension",
        rfc: Rfc::MayAccept { body: "hello" },
        why: "9112 7.1: BWS is allowed only before a chunk-ext's ';'; 2.2: SHOULD 400 (the proxy re-frames the body, so no desync)",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n" },
    Probe { name: "chunk data not followed by CRLF",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n{S}" },
    Probe { name: "obs-fold continuation line",
        rfc: Rfc::MayAccept { body: "" },
        why: "9112 5.2: reject with 400, or replace each obs-fold with SP before interpreting or forwarding",
        raw: "GET /probe HTTP/1.1\r\n{H}\r\nX-Folded: a\r\n b\r\n\r\n" },
    Probe { name: "obs-fold hiding a Content-Length",
        rfc: Rfc::MayAccept { body: "{S}" },
        why: "9112 5.2: reject with 400, or replace each obs-fold with SP (the fold is a value, not a field)",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: {SL}\r\nX-Folded: a\r\n Content-Length: 0\r\n\r\n{S}" },
    Probe { name: "bare LF ending the request line",
        rfc: Rfc::MayAccept { body: "" },
        why: "9112 2.2: a recipient MAY recognize a single LF as a line terminator",
        raw: "GET /probe HTTP/1.1\n{H}\r\n\r\n" },
    Probe { name: "bare LF ending a header line",
        rfc: Rfc::MayAccept { body: "{S}" },
        why: "9112 2.2: a recipient MAY recognize a single LF as a line terminator",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nX-A: 1\nContent-Length: {SL}\r\n\r\n{S}" },
    Probe { name: "bare LF everywhere in the head",
        rfc: Rfc::MayAccept { body: "" },
        why: "9112 2.2: a recipient MAY recognize a single LF as a line terminator",
        raw: "GET /probe HTTP/1.1\n{H}\n\n" },
    Probe { name: "bare LF everywhere, alone on its connection",
        rfc: Rfc::MayAccept { body: "" },
        why: "9112 2.2: a recipient MAY recognize a single LF as a line terminator",
        raw: "GET /probe HTTP/1.1\n{H}\nConnection: close\n\n" },
    Probe { name: "bare LF ending a chunk-size line",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk lines end in CRLF (2.2's LF leniency covers the start-line and fields)",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n{S}" },
    Probe { name: "bare LF after chunk data",
        rfc: Rfc::MustReject,
        why: "9112 7.1: chunk-data is followed by CRLF",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n{S}" },
    Probe { name: "bare LF ending the last chunk",
        rfc: Rfc::MustReject,
        why: "9112 7.1: last-chunk = 1*(\"0\") [ chunk-ext ] CRLF",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\r\n{S}" },
    Probe { name: "Transfer-Encoding: chunked, identity",
        rfc: Rfc::MustReject,
        why: "9112 6.3(4): chunked not the final coding in a request: 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "Transfer-Encoding: gzip (no chunked)",
        rfc: Rfc::MustReject,
        why: "9112 6.3(4): chunked not the final coding in a request: 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "Transfer-Encoding: chunked, gzip",
        rfc: Rfc::MustReject,
        why: "9112 6.3(4): chunked not the final coding in a request: 400 and close",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "Transfer-Encoding split over two lines, chunked not last",
        rfc: Rfc::MustReject,
        why: "9112 6.3(4): the codings of all lines form one list; chunked must be the final one",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "space before the colon of Transfer-Encoding",
        rfc: Rfc::MustReject,
        why: "9112 5.1: a server MUST reject whitespace between field name and colon with 400",
        raw: "POST /probe HTTP/1.1\r\n{H}\r\nContent-Length: {SL5}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{S}" },
    Probe { name: "request line with two spaces",
        rfc: Rfc::MayAccept { body: "" },
        why: "9112 3: recipients MAY parse on whitespace-delimited word boundaries (or reject)",
        raw: "GET  /probe HTTP/1.1\r\n{H}\r\n\r\n" },
];

fn render(template: &str, id: usize) -> String {
    let smuggled = smuggled(id);
    template
        .replace("{H}", &format!("Host: {WEB_FQDN}"))
        .replace("{SL5}", &(smuggled.len() + 5).to_string())
        .replace("{SL}", &smuggled.len().to_string())
        .replace("{SX}", &format!("{:x}", smuggled.len()))
        .replace("{S}", &smuggled)
        .replace("/probe ", &format!("/probe-{id} "))
}

/// What the recording app saw of one request, body included.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    /// The whole body, or the error that ended it.
    body: Result<Bytes, String>,
}

/// An app that reads every body to its end and records each request with its outcome;
/// it answers 200 with the request's path as the body (500 when the body broke off).
async fn recording_backend(name: &str) -> (Backend, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let handler: Handler = Arc::new(move |req, _st| {
        let log = log.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let headers = req.headers().clone();
            let body = match req.into_body().collect().await {
                Ok(c) => Ok(c.to_bytes()),
                Err(e) => Err(e.to_string()),
            };
            let status = if body.is_ok() { 200 } else { 500 };
            log.lock().unwrap().push(Seen {
                path: path.clone(),
                headers,
                body,
            });
            Response::builder().status(status).body(full(path)).unwrap()
        })
    });
    (Backend::start_with(name, handler).await, seen)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Listener {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Position {
    /// The probe is the connection's first request (the proxy's protocol detection sees it).
    First,
    /// After a well-formed request on the same kept-alive connection (hyper alone parses it).
    KeptAlive,
}

/// A response as the probing client read it.
#[derive(Debug)]
struct Answer {
    status: u16,
    proxy_error: Option<String>,
    /// `x-backend`: set when the app made the response.
    backend: Option<String>,
    body: String,
}

/// What the probing client saw of one run.
#[derive(Debug)]
struct Observed {
    answers: Vec<Answer>,
    /// The proxy closed the connection (EOF or reset) within the bound; otherwise it stalled.
    closed: bool,
    /// The proxy forwarded the bytes as opaque TCP instead of parsing them as HTTP.
    opaque: bool,
}

/// Follows every probe: if the proxy keeps the connection and parses what follows the probe as
/// a next request, this one closes the connection after its response, so reading to EOF is
/// deterministic and shows every request the proxy made of the bytes.
fn sentinel(id: usize) -> String {
    format!("GET /sentinel-{id} HTTP/1.1\r\nHost: {WEB_FQDN}\r\nConnection: close\r\n\r\n")
}

/// Bound for one probe's connection to end (only a proxy that neither answers nor closes waits
/// this long).
const PROBE_BOUND: Duration = Duration::from_secs(8);

fn opaque_to_app(proxy: &Proxy) -> f64 {
    proxy
        .metric_value(
            "tcp_open_total",
            &[("direction", "inbound"), ("peer", "dst")],
        )
        .unwrap_or(0.0)
}

async fn run_probe(
    proxy: &Proxy,
    listener: Listener,
    position: Position,
    raw: &str,
    id: usize,
) -> Observed {
    let addr = match listener {
        Listener::Outbound => proxy.outbound(),
        Listener::Inbound => proxy.inbound(),
    };
    let mut conn = RawConn::connect(addr).await;
    if position == Position::KeptAlive {
        conn.send(format!("GET /pre HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n"))
            .await;
        let pre = conn
            .response()
            .await
            .expect("response to the request before the probe");
        assert_eq!(pre.status, 200, "request before the probe: {pre:?}");
    }
    let opaque_before = opaque_to_app(proxy);

    // A probe that asks to close its connection itself goes alone.
    if raw.contains("Connection: close") {
        conn.send(raw).await;
    } else {
        conn.send(format!("{raw}{}", sentinel(id))).await;
    }
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + PROBE_BOUND;
    let closed = loop {
        match tokio::time::timeout_at(deadline, read_raw_response(&mut conn.reader, false)).await {
            Err(_) => break false,
            Ok(Err(_)) => break true,
            Ok(Ok(r)) => answers.push(Answer {
                status: r.status,
                proxy_error: r.header("pylon-proxy-error").map(str::to_string),
                backend: r.header("x-backend").map(str::to_string),
                body: r.text(),
            }),
        }
    };
    let opaque = listener == Listener::Inbound && opaque_to_app(proxy) > opaque_before;
    Observed {
        answers,
        closed,
        opaque,
    }
}

/// The requests of run `id` the app saw, in order.
fn forwarded_in_run(seen: &[Seen], id: usize) -> Vec<Seen> {
    let suffix = format!("-{id}");
    seen.iter()
        .filter(|s| s.path.ends_with(&suffix))
        .cloned()
        .collect()
}

fn fmt_answers(answers: &[Answer]) -> Vec<String> {
    answers
        .iter()
        .map(|a| match (&a.proxy_error, &a.backend) {
            (Some(e), _) => format!("{} ({e})", a.status),
            (None, Some(_)) => format!("{} app:{}", a.status, a.body),
            (None, None) => a.status.to_string(),
        })
        .collect()
}

fn fmt_forwarded(forwarded: &[Seen]) -> Vec<String> {
    forwarded
        .iter()
        .map(|s| match &s.body {
            Ok(b) => format!("{}:{}B", s.path, b.len()),
            Err(_) => format!("{}:body-error", s.path),
        })
        .collect()
}

/// Checks one observation against the probe's RFC expectation; `Err` says what is wrong.
/// Returns how the proxy handled it ("rejected" or "accepted").
fn judge(
    probe: &Probe,
    o: &Observed,
    forwarded: &[Seen],
    id: usize,
) -> Result<&'static str, String> {
    let smuggled = forwarded.iter().any(|s| s.path.starts_with("/smuggled"));
    if smuggled && !matches!(probe.rfc, Rfc::MustReject) {
        return Err(format!(
            "SMUGGLED: the app received `GET /smuggled` as a request of its own; answers {:?}",
            fmt_answers(&o.answers)
        ));
    }
    if o.opaque {
        return Err(
            "forwarded to the app as opaque TCP (raw bytes), not parsed as HTTP".to_string(),
        );
    }
    if !o.closed {
        return Err(format!(
            "the proxy neither closed the connection nor finished answering within \
             {PROBE_BOUND:?} (answers so far: {:?})",
            fmt_answers(&o.answers)
        ));
    }
    // Rejected: a 400 of the proxy's own (or no answer at all), and nothing complete reached the
    // app (a streaming proxy may have forwarded the head before the body's framing broke; the
    // app must then see the body fail, never end cleanly).
    let rejected = o.answers.len() <= 1
        && o.answers
            .first()
            .is_none_or(|a| a.status == 400 && a.backend.is_none())
        && forwarded.iter().all(|s| s.body.is_err());
    if rejected {
        return Ok("rejected");
    }
    let (body, must_close) = match probe.rfc {
        Rfc::MustReject => {
            return Err(format!(
                "not rejected{}: answers {:?}, the app saw {:?}",
                if smuggled {
                    ", so the `GET /smuggled` after it reached the app as a request of its own"
                } else {
                    ""
                },
                fmt_answers(&o.answers),
                fmt_forwarded(forwarded)
            ))
        }
        Rfc::MayAccept { body } => (render(body, id), false),
        Rfc::MayAcceptThenClose { body } => (render(body, id), true),
    };
    // Accepted: the probe went to the app once, with exactly the body the RFC's reading gives
    // and one unambiguous framing; then only the sentinel (unless the connection had to close).
    let Some(first) = forwarded.first() else {
        return Err(format!(
            "neither rejected nor forwarded: answers {:?}",
            fmt_answers(&o.answers)
        ));
    };
    if first.path != format!("/probe-{id}") {
        return Err(format!("the app's first request was {:?}", first.path));
    }
    match &first.body {
        Ok(b) if b[..] == *body.as_bytes() => {}
        Ok(b) => {
            return Err(format!(
                "the app got the probe with body {:?}, want {body:?}",
                String::from_utf8_lossy(b)
            ))
        }
        Err(e) => {
            return Err(format!(
                "the probe's body broke off at the app ({e}) yet was answered {:?}",
                fmt_answers(&o.answers)
            ))
        }
    }
    let cls = first.headers.get_all("content-length").iter().count();
    if cls > 1 || (cls == 1 && first.headers.contains_key("transfer-encoding")) {
        return Err(format!(
            "forwarded with ambiguous framing headers: {:?}",
            first.headers
        ));
    }
    let rest: Vec<&str> = forwarded[1..].iter().map(|s| s.path.as_str()).collect();
    let statuses: Vec<u16> = o.answers.iter().map(|a| a.status).collect();
    if must_close {
        if !rest.is_empty() || statuses != [200] {
            return Err(format!(
                "the connection was not closed after the response (RFC 9112 6.1): answers \
                 {statuses:?}, later requests at the app {rest:?}"
            ));
        }
    } else if !(rest.is_empty() || rest == [format!("/sentinel-{id}")])
        || statuses.len() != forwarded.len()
    {
        return Err(format!(
            "answers {:?} and requests at the app {:?} do not match",
            fmt_answers(&o.answers),
            fmt_forwarded(forwarded)
        ));
    }
    if statuses.first() != Some(&200) {
        return Err(format!("accepted but answered {statuses:?}"));
    }
    Ok("accepted")
}

/// Every probe of [`PROBES`], on the outbound and the inbound listener, as a connection's first
/// request and after a kept-alive one: the proxy rejects what RFC 9112 requires it to reject,
/// accepts the rest only with unambiguous framing, never delivers the smuggled request, and
/// keeps serving a well-formed request on a new connection afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smuggling_probes_are_rejected_and_never_reach_the_app() {
    test_body(async {
        let (app, seen) = recording_backend("app").await;
        let cfg = ConfigDir::web(&[app.addr]);
        // One proxy for both directions: `web` outbound, --inbound-forward to the same app. A
        // short detection timeout bounds the probes that never complete a CRLF line.
        let proxy = Proxy::with_config(
            &cfg,
            &[
                "--inbound-forward",
                &app.addr.to_string(),
                "--detect-timeout",
                "1s",
            ],
        );
        // Run every probe first, then judge them all from the app's complete record: a request
        // the proxy forwarded may still be on its way to the app when the client's connection
        // ends.
        let mut runs = Vec::new();
        for probe in PROBES {
            for listener in [Listener::Outbound, Listener::Inbound] {
                for position in [Position::First, Position::KeptAlive] {
                    let id = runs.len();
                    let raw = render(probe.raw, id);
                    let o = run_probe(&proxy, listener, position, &raw, id).await;
                    // The proxy keeps serving a well-formed request on a new connection.
                    let addr = match listener {
                        Listener::Outbound => proxy.outbound(),
                        Listener::Inbound => proxy.inbound(),
                    };
                    let after = get(addr, WEB_FQDN, "/after").await.unwrap_or_else(|e| {
                        panic!(
                            "{} [{listener:?}]: request after the probe: {e}",
                            probe.name
                        )
                    });
                    assert_eq!(
                        after.status, 200,
                        "{} [{listener:?}]: request after the probe: {after:?}",
                        probe.name
                    );
                    runs.push((probe, listener, position, o));
                }
            }
        }
        // Whatever reached the app has finished: its body was read to the end or broke off.
        assert!(
            wait_until(|| app.state.in_flight() == 0, OP_TIMEOUT).await,
            "the app still waits for {} request bodies: the proxy neither finished nor aborted \
             requests it forwarded",
            app.state.in_flight()
        );
        let seen = seen.lock().unwrap().clone();
        let mut failures = Vec::new();
        let mut table = Vec::new();
        for (id, (probe, listener, position, o)) in runs.iter().enumerate() {
            let forwarded = forwarded_in_run(&seen, id);
            let verdict = judge(probe, o, &forwarded, id);
            table.push(format!(
                "{:<60} {:<8} {:<9} {:<8} answers {:?} app {:?}{}",
                probe.name,
                format!("{listener:?}"),
                format!("{position:?}"),
                match &verdict {
                    Ok(v) => v,
                    Err(_) => "FAIL",
                },
                fmt_answers(&o.answers),
                fmt_forwarded(&forwarded),
                match (o.closed, o.opaque) {
                    (_, true) => " (forwarded as opaque TCP)",
                    (false, _) => " (stalled)",
                    _ => "",
                }
            ));
            if let Err(e) = verdict {
                failures.push(format!(
                    "{} [{listener:?}, {position:?}] (RFC: {:?}; {}): {e}",
                    probe.name, probe.rfc, probe.why
                ));
            }
        }
        eprintln!(
            "smuggling probes (listener, position, verdict, answers, requests at the app):\n{}",
            table.join("\n")
        );
        assert!(
            failures.is_empty(),
            "{} of {} probe runs failed:\n{}",
            failures.len(),
            table.len(),
            failures.join("\n")
        );
    })
    .await
}

// A client's malformed or aborted body is the client's fault (a 400, never the endpoint's
// failure): tested with its metrics in e2e_safety.

// ---------------------------------------------------------------------------------------------
// 2. HTTP/2 rapid reset (CVE-2023-44487)
// ---------------------------------------------------------------------------------------------

/// How much the proxy's RSS may grow over its start during a flood.
const FLOOD_RSS_GROWTH_KIB: u64 = 64 * 1024;

/// The proxy's RSS after it served one request (the baseline for a flood).
async fn warm_rss(proxy: &Proxy) -> u64 {
    let r = get(proxy.outbound(), WEB_FQDN, "/warm")
        .await
        .expect("warm-up request");
    assert_eq!(r.status, 200, "warm-up request: {r:?}");
    proxy.rss_kib().expect("the proxy's VmRSS")
}

/// One h2c connection opens up to 20,000 requests and resets each right after sending it. The
/// proxy either stops the connection (GOAWAY ENHANCE_YOUR_CALM: h2 allows 20 streams reset
/// before they were accepted) or keeps serving; either way its memory stays bounded, it serves
/// another client afterwards, each reset stream reaches the app at most once, and nothing of
/// the flood stays in flight at the app.
///
/// Observed (h2 0.4.20 under hyper 1.12, debug build, 2 cores): the proxy sends GOAWAY
/// ENHANCE_YOUR_CALM ("too_many_resets") after 400 to 1,750 streams; the app sees none of them;
/// RSS stays within 2 MiB of its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_rapid_reset_flood_is_bounded() {
    test_body(async {
        let app = Backend::start("app").await;
        let cfg = ConfigDir::web(&[app.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let rss_start = warm_rss(&proxy).await;
        let app_before = app.requests();

        const STREAMS: usize = 20_000;
        const FLOOD_TIME: Duration = Duration::from_secs(20);
        let stop = Arc::new(AtomicU64::new(0));
        let sampler = rss_sampler(proxy.pid(), stop.clone());

        let tcp = TcpStream::connect(proxy.outbound()).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let (client, connection) = within("h2 handshake", OP_TIMEOUT, h2::client::handshake(tcp))
            .await
            .expect("h2 handshake");
        let driver = tokio::spawn(connection);
        let deadline = Instant::now() + FLOOD_TIME;
        let mut client = Some(client);
        let mut sent = 0;
        let mut ended: Option<String> = None;
        while sent < STREAMS && Instant::now() < deadline {
            let ready = client.take().expect("client").ready();
            let mut c = match tokio::time::timeout(OP_TIMEOUT, ready).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    ended = Some(format!("ready: {e}"));
                    break;
                }
                Err(_) => {
                    ended = Some("no stream capacity within the op timeout".into());
                    break;
                }
            };
            let req = http::Request::get(format!("http://{WEB_FQDN}/flood"))
                .body(())
                .unwrap();
            match c.send_request(req, true) {
                Ok((response, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    drop(response);
                    sent += 1;
                    client = Some(c);
                }
                Err(e) => {
                    ended = Some(format!("send_request: {e}"));
                    break;
                }
            }
        }
        drop(client);
        // The connection's end: GOAWAY from the proxy, or our own close once the flood is over.
        let conn_result = match tokio::time::timeout(OP_TIMEOUT, driver).await {
            Ok(r) => Some(r.expect("h2 connection task")),
            Err(_) => None,
        };
        stop.store(1, Ordering::SeqCst);
        let rss_max = sampler.await.unwrap().max(proxy.rss_kib().unwrap_or(0));
        let goaway = match &conn_result {
            Some(Err(e)) if e.is_go_away() => Some(format!("{:?}", e.reason())),
            _ => None,
        };
        let app_saw = app.requests() - app_before;
        eprintln!(
            "rapid reset: sent {sent} reset streams; flood ended by {ended:?}; connection: \
             {conn_result:?}; RSS start {rss_start} KiB, max {rss_max} KiB; the app saw \
             {app_saw} requests"
        );

        let mut proxy = proxy;
        assert!(
            proxy.is_running(),
            "the proxy died during the rapid reset flood"
        );
        let r = get(proxy.outbound(), WEB_FQDN, "/after")
            .await
            .expect("request from another client after the flood");
        assert_eq!(r.status, 200, "request after the flood: {r:?}");
        assert!(
            rss_max <= rss_start + FLOOD_RSS_GROWTH_KIB,
            "the proxy's RSS grew from {rss_start} KiB to {rss_max} KiB during the flood \
             (bound: +{FLOOD_RSS_GROWTH_KIB} KiB)"
        );
        if let Some(reason) = &goaway {
            assert_eq!(
                reason, "Some(ENHANCE_YOUR_CALM)",
                "the proxy ended the flooding connection with an unexpected GOAWAY"
            );
        }
        // Each reset stream reaches the app at most once (a cancelled request is not retried),
        // and whatever reached it was cancelled or finished: nothing is left in flight.
        assert!(
            app_saw <= sent,
            "the app saw {app_saw} requests for {sent} reset streams"
        );
        assert!(
            wait_until(|| app.state.in_flight() == 0, OP_TIMEOUT).await,
            "{} requests of the flood are still in flight at the app",
            app.state.in_flight()
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 3. HTTP/2 CONTINUATION flood
// ---------------------------------------------------------------------------------------------

/// What the proxy has read from outbound clients so far (`tcp_read_bytes_total`, `peer="src"`).
fn outbound_client_bytes_read(proxy: &Proxy) -> f64 {
    proxy
        .metric_value(
            "tcp_read_bytes_total",
            &[("direction", "outbound"), ("peer", "src")],
        )
        .unwrap_or(0.0)
}

/// One HPACK header block fragment of about 16 KB: literal fields without indexing
/// (`x-flood: aaaa...`), each complete, so the block only ever grows.
fn hpack_fragment() -> Vec<u8> {
    let mut field = vec![0x00, 7];
    field.extend_from_slice(b"x-flood");
    field.push(100);
    field.extend_from_slice(&[b'a'; 100]);
    field.repeat(16_000 / field.len())
}

/// A HEADERS frame without END_HEADERS, then CONTINUATION frames that never set it, up to
/// 100 MiB (bounded in time too): the proxy must cut the connection off (GOAWAY or close) after
/// reading little of it, stay within its memory bound, and keep serving other clients. What the
/// proxy read is its own count (`tcp_read_bytes_total`), exact whatever the socket buffers held.
///
/// Observed: GOAWAY ENHANCE_YOUR_CALM after the HEADERS frame and 6 CONTINUATION frames (h2
/// allows 5 past a 16 KiB header list); the proxy read 111,755 bytes; the client could write
/// about 4 MB into the socket buffers before EPIPE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_continuation_flood_is_cut_off() {
    test_body(async {
        let app = Backend::start("app").await;
        let cfg = ConfigDir::web(&[app.addr]);
        let proxy = Proxy::with_config(&cfg, &[]);
        let rss_start = warm_rss(&proxy).await;
        let read_before = outbound_client_bytes_read(&proxy);
        let app_before = app.requests();

        const TOTAL: u64 = 100 << 20;
        const FLOOD_TIME: Duration = Duration::from_secs(20);
        /// The proxy may read this much of the flood before it closes the connection: h2
        /// gives up after a handful of CONTINUATION frames (16 KB each) past its 16 KiB header
        /// list limit; the rest is read-ahead slack.
        const READ_BOUND: f64 = (1 << 20) as f64;
        let stop = Arc::new(AtomicU64::new(0));
        let sampler = rss_sampler(proxy.pid(), stop.clone());

        let tcp = TcpStream::connect(proxy.outbound()).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let (mut rd, mut wr) = tcp.into_split();
        let mut hello = H2_CLIENT_PREFACE.to_vec();
        hello.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
        wr.write_all(&hello).await.expect("write preface");
        let settings = within("server SETTINGS", OP_TIMEOUT, read_h2_frame(&mut rd))
            .await
            .expect("the proxy's SETTINGS");
        assert_eq!(
            settings.kind, H2_SETTINGS,
            "first frame from the proxy: {settings:?}"
        );
        wr.write_all(&h2_frame(H2_SETTINGS, H2_FLAG_ACK, 0, &[]))
            .await
            .expect("write SETTINGS ack");

        // Reads the proxy's frames until it closes: the GOAWAY's code and how it ended.
        let closed = Arc::new(AtomicBool::new(false));
        let reader = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut goaway = None;
                let end = loop {
                    match read_h2_frame(&mut rd).await {
                        Ok(f) => {
                            if let Some(code) = f.goaway_code() {
                                goaway = Some(code);
                            }
                        }
                        Err(e) => break e.to_string(),
                    }
                };
                closed.store(true, Ordering::SeqCst);
                (goaway, end)
            })
        };

        let fragment = hpack_fragment();
        let first = h2_frame(H2_HEADERS, 0, 1, &fragment);
        let next = h2_frame(H2_CONTINUATION, 0, 1, &fragment);
        let deadline = tokio::time::Instant::now() + FLOOD_TIME;
        let mut written: u64 = 0;
        let mut frames = 0;
        let write_end = loop {
            if closed.load(Ordering::SeqCst) {
                break "the proxy closed the connection".to_string();
            }
            if written >= TOTAL {
                break "all 100 MiB written".to_string();
            }
            let frame = if frames == 0 { &first } else { &next };
            match tokio::time::timeout_at(deadline, wr.write_all(frame)).await {
                Ok(Ok(())) => {
                    written += frame.len() as u64;
                    frames += 1;
                }
                Ok(Err(e)) => break format!("write failed: {e}"),
                Err(_) => break format!("flood time ({FLOOD_TIME:?}) over"),
            }
        };
        let reader_result = tokio::time::timeout(OP_TIMEOUT, reader).await;
        stop.store(1, Ordering::SeqCst);
        let rss_max = sampler.await.unwrap().max(proxy.rss_kib().unwrap_or(0));
        let read = outbound_client_bytes_read(&proxy) - read_before;
        eprintln!(
            "CONTINUATION flood: wrote {written} bytes ({frames} frames) until: {write_end}; \
             the proxy read {read} bytes; its frames/close: {reader_result:?}; RSS start \
             {rss_start} KiB, max {rss_max} KiB"
        );

        let (goaway, end) = reader_result
            .unwrap_or_else(|_| {
                panic!(
                    "the proxy kept the flooding connection open {OP_TIMEOUT:?} after the flood \
                     ({written} bytes written, {write_end})"
                )
            })
            .expect("reader task");
        assert!(
            written < TOTAL,
            "the proxy accepted all {TOTAL} bytes of CONTINUATION frames without closing \
             (GOAWAY {goaway:?}, end {end})"
        );
        assert!(
            read <= READ_BOUND,
            "the proxy read {read} bytes of the CONTINUATION flood before closing (bound \
             {READ_BOUND}); GOAWAY {goaway:?}"
        );
        if let Some(code) = goaway {
            assert!(
                code == H2_ENHANCE_YOUR_CALM || code == 0x9 || code == 0x1,
                "unexpected GOAWAY code {code:#x} (want ENHANCE_YOUR_CALM, COMPRESSION_ERROR or \
                 PROTOCOL_ERROR)"
            );
        }
        let mut proxy = proxy;
        assert!(
            proxy.is_running(),
            "the proxy died during the CONTINUATION flood"
        );
        assert!(
            rss_max <= rss_start + FLOOD_RSS_GROWTH_KIB,
            "the proxy's RSS grew from {rss_start} KiB to {rss_max} KiB during the flood \
             (bound: +{FLOOD_RSS_GROWTH_KIB} KiB)"
        );
        let r = get(proxy.outbound(), WEB_FQDN, "/after")
            .await
            .expect("request from another client after the flood");
        assert_eq!(r.status, 200, "request after the flood: {r:?}");
        assert_eq!(
            app.requests() - app_before,
            1,
            "the app saw a request of the flood (only the one after it was expected)"
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. Endpoint churn under load
// ---------------------------------------------------------------------------------------------

/// Service `web` under a bounded load (4 kept-alive HTTP/1 clients) while its EndpointSlice is
/// rewritten 5 times, each time adding a new endpoint and removing the oldest; each change waits
/// until the previous new endpoint has had 100 requests. As in Kubernetes, a removed endpoint
/// keeps serving for a grace period (here: until the load ends), so no request may fail, and
/// every new endpoint must get traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoint_churn_under_load_fails_no_request() {
    test_body(async {
        const CLIENTS: usize = 4;
        const STEPS: usize = 5;
        /// Requests a new endpoint must receive before the next change.
        const NEW_ENDPOINT_REQUESTS: usize = 100;
        let mut backends = vec![Backend::start("web-0").await, Backend::start("web-1").await];
        // Indices (into `backends`) of the endpoints in the slice, oldest first.
        let mut in_slice: Vec<usize> = vec![0, 1];
        let cfg = ConfigDir::web(&[backends[0].addr, backends[1].addr]);
        let proxy = Proxy::with_config(&cfg, &[]);

        let load = ClosedLoad::start(
            proxy.outbound(),
            WEB_FQDN,
            "/churn",
            CLIENTS,
            20_000,
            Duration::from_secs(30),
        );
        assert!(
            wait_until(|| load.ok() >= 100, Duration::from_secs(10)).await,
            "the load did not get going: {} requests done, {} ok",
            load.done(),
            load.ok()
        );
        for step in 0..STEPS {
            let new = backends.len();
            backends.push(Backend::start(&format!("web-{new}")).await);
            in_slice.remove(0);
            in_slice.push(new);
            let addrs: Vec<_> = in_slice.iter().map(|&i| backends[i].addr).collect();
            cfg.set_endpoints("web", "http", &addrs);
            let b = &backends[new];
            assert!(
                wait_until(
                    || b.requests() >= NEW_ENDPOINT_REQUESTS,
                    Duration::from_secs(10)
                )
                .await,
                "step {step}: the new endpoint {} got {} requests within 10 s of joining \
                 the slice ({} requests done so far)",
                b.name(),
                b.requests(),
                load.done()
            );
        }
        // Some more traffic after the last change, then stop (the removed endpoints are still
        // up: their grace period lasts until here).
        let target = load.done() + 200;
        assert!(
            wait_until(|| load.done() >= target, Duration::from_secs(10)).await,
            "the load stalled after the last change ({} requests done)",
            load.done()
        );
        let report = load.finish().await;
        let per_backend: Vec<String> = backends
            .iter()
            .map(|b| format!("{}={}", b.name(), b.requests()))
            .collect();
        eprintln!(
            "churn: {} requests, {} failed; per endpoint: {}",
            report.total(),
            report.failures.len(),
            per_backend.join(" ")
        );
        assert!(
            report.failures.is_empty(),
            "{} of {} requests failed during endpoint churn:\n{}",
            report.failures.len(),
            report.total(),
            report.failures_text(20)
        );
        for b in &backends[2..] {
            assert!(
                b.requests() >= NEW_ENDPOINT_REQUESTS,
                "new endpoint {} got {} requests",
                b.name(),
                b.requests()
            );
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 5. kill -9 of one endpoint under load
// ---------------------------------------------------------------------------------------------

/// Three endpoints, each a real inbound `pylon-proxy` process in front of its own app, behind
/// one outbound proxy; under C concurrent clients one endpoint process is SIGKILLed and stays
/// in the slice (as a crashed pod does until its readiness probe fails). Only requests in flight
/// on it may fail (at most C, each a proxy-made error with `pylon-proxy-error`, none for a refused
/// connection); afterwards a dead endpoint refuses connections, and a request that never left
/// the proxy must go to a live endpoint instead of coming back as a 502, so 200 sequential
/// requests all succeed, through the same proxy and through a fresh one that still picks the
/// dead endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_endpoint_fails_only_in_flight_requests() {
    test_body(async {
        const C: usize = 4;
        const AFTER_KILL: usize = 300;
        const SEQUENTIAL: usize = 200;
        let mut apps = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..3 {
            let app = Backend::with_delay(&format!("app-{i}"), Duration::from_millis(5)).await;
            endpoints.push(Proxy::start(&["--inbound-forward", &app.addr.to_string()]));
            apps.push(app);
        }
        let addrs: Vec<_> = endpoints.iter().map(Proxy::inbound).collect();
        let cfg = ConfigDir::web(&addrs);
        let proxy = Proxy::with_config(&cfg, &[]);

        let load = ClosedLoad::start(
            proxy.outbound(),
            WEB_FQDN,
            "/kill",
            C,
            20_000,
            Duration::from_secs(30),
        );
        assert!(
            wait_until(
                || apps.iter().all(|a| a.requests() >= 20),
                Duration::from_secs(15)
            )
            .await,
            "the load did not reach every endpoint: {:?}",
            apps.iter().map(Backend::requests).collect::<Vec<_>>()
        );
        let victim = &mut endpoints[1];
        victim.signal(libc::SIGKILL);
        let status = victim
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("the killed endpoint process did not go away");
        assert!(!status.success(), "killed endpoint exit status {status:?}");
        let done_at_kill = load.done();
        assert!(
            wait_until(
                || load.done() >= done_at_kill + AFTER_KILL,
                Duration::from_secs(15)
            )
            .await,
            "the load stalled after the kill ({} requests since)",
            load.done() - done_at_kill
        );
        let report = load.finish().await;

        // After the kill is done: sequential requests on a kept-alive connection, through
        // this proxy and through a fresh one (a pod started after the crash), which has not
        // seen the dead endpoint fail and so still picks it: each time, its refused connection
        // means the request never left the proxy and must go to a live endpoint.
        let fresh = Proxy::with_config(&cfg, &[]);
        let mut late_failures = Vec::new();
        for (which, p) in [("same proxy", &proxy), ("fresh proxy", &fresh)] {
            let mut client = h1_client(p.outbound()).await;
            for i in 0..SEQUENTIAL {
                let req = h1_request("GET", WEB_FQDN, "/after-kill", empty());
                match send_h1(&mut client, req).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => late_failures.push(format!(
                        "{which}, request {i}: {} pylon-proxy-error {:?}",
                        r.status,
                        r.proxy_error()
                    )),
                    Err(e) => {
                        late_failures.push(format!("{which}, request {i}: {e}"));
                        client = h1_client(p.outbound()).await;
                    }
                }
            }
        }
        eprintln!(
            "kill -9: {} requests under load ({} after the kill), {} failed {:?}; then {} of \
             2 x {SEQUENTIAL} sequential requests failed; per app: {:?}",
            report.total(),
            report.total() - done_at_kill.min(report.total()),
            report.failures.len(),
            report
                .failures
                .iter()
                .map(|f| (f.status, f.proxy_error.clone()))
                .collect::<Vec<_>>(),
            late_failures.len(),
            apps.iter().map(Backend::requests).collect::<Vec<_>>()
        );
        let untagged: Vec<&LoadFailure> = report
            .failures
            .iter()
            .filter(|f| f.proxy_error.is_none())
            .collect();
        assert!(
            untagged.is_empty(),
            "failures without `pylon-proxy-error` (the client must get a proxy-made error, \
             not a broken connection): {untagged:?}"
        );
        let refused = report
            .failures
            .iter()
            .filter(|f| f.proxy_error.as_deref() == Some("endpoint connection refused"))
            .count();
        assert!(
            report.failures.len() <= C && refused == 0 && late_failures.is_empty(),
            "killing one of 3 endpoints under {C} concurrent clients: {} requests failed under \
             load (at most {C}, those in flight on it, may; {refused} of them for a refused \
             connection, which none may: such a request never left the proxy) and {} of \
             2 x {SEQUENTIAL} sequential requests after the kill failed (none may).\n\
             Under load:\n{}\nAfter:\n{}\nProxy log:\n{}\nFresh proxy log:\n{}",
            report.failures.len(),
            late_failures.len(),
            report.failures_text(20),
            late_failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            proxy.log_tail(10),
            fresh.log_tail(10)
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 6. SIGTERM drain under load
// ---------------------------------------------------------------------------------------------

/// Slow requests in flight (the app answers each after 1 s) on 4 HTTP/1 connections and 4
/// streams of one h2 connection when SIGTERM arrives: every one completes with 200, the proxy
/// exits 0 having drained (within its grace), and a new connection after the signal is refused,
/// answered or closed, never left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_slow_h1_and_h2_requests() {
    test_body(async {
        const H1: usize = 4;
        const H2: usize = 4;
        let app = Backend::with_delay("slow", Duration::from_secs(1)).await;
        let cfg = ConfigDir::web(&[app.addr]);
        let mut proxy = Proxy::with_config(&cfg, &["--shutdown-grace", "20s"]);
        let outbound = proxy.outbound();

        let mut inflight = Vec::new();
        for i in 0..H1 {
            inflight.push(tokio::spawn(async move {
                let path = format!("/h1-{i}");
                get(outbound, WEB_FQDN, &path)
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        let h2 = h2_client(outbound).await;
        for i in 0..H2 {
            let mut c = h2.clone();
            inflight.push(tokio::spawn(async move {
                let req = abs_request("GET", WEB_FQDN, &format!("/h2-{i}"), empty());
                send_h2(&mut c, req).await.map_err(|e| e.to_string())
            }));
        }
        assert!(
            wait_until(|| app.state.in_flight() == H1 + H2, Duration::from_secs(10)).await,
            "{} of {} slow requests reached the app",
            app.state.in_flight(),
            H1 + H2
        );

        proxy.signal(libc::SIGTERM);
        assert!(
            proxy
                .wait_for_log(Duration::from_secs(10), |l| l.contains("SIGTERM received"))
                .await
                .is_some(),
            "the proxy did not log the SIGTERM"
        );

        // A new connection now: refused (the listener is closed), or answered, or closed.
        let newcomer = tokio::time::timeout(OP_TIMEOUT, async {
            let mut tcp = match TcpStream::connect(outbound).await {
                Ok(t) => t,
                Err(e) => return format!("refused ({e})"),
            };
            let req = format!("GET /late HTTP/1.1\r\nHost: {WEB_FQDN}\r\n\r\n");
            if let Err(e) = tcp.write_all(req.as_bytes()).await {
                return format!("closed on write ({e})");
            }
            let mut buf = vec![0u8; 4096];
            match tcp.read(&mut buf).await {
                Ok(0) => "closed".to_string(),
                Ok(n) => format!(
                    "answered: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or("")
                ),
                Err(e) => format!("closed ({e})"),
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!("a new connection after SIGTERM hung for {OP_TIMEOUT:?} without an answer")
        });

        let mut results = Vec::new();
        for t in inflight {
            let r = within(
                "in-flight request during the drain",
                Duration::from_secs(25),
                t,
            )
            .await
            .expect("request task");
            results.push(r.map(|r| (r.status.as_u16(), r.proxy_error().map(str::to_string))));
        }
        let status = proxy.wait_exit(Duration::from_secs(25)).await;
        eprintln!(
            "drain: in-flight results {results:?}; new connection after SIGTERM: {newcomer}; \
             exit {status:?}"
        );
        assert!(
            results.iter().all(|r| matches!(r, Ok((200, None)))),
            "in-flight requests during the drain (HTTP/1 first, then h2): {results:?}"
        );
        let status = status.unwrap_or_else(|| {
            panic!(
                "the proxy still runs 25 s after SIGTERM (grace 20 s); logs:\n{}",
                proxy.log_tail(20)
            )
        });
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after the drain: {status:?}; logs:\n{}",
            proxy.log_tail(20)
        );
        assert!(
            proxy.logs().iter().any(|l| l.contains("drained; exiting")),
            "the proxy exited without draining everything (no \"drained; exiting\"); logs:\n{}",
            proxy.log_tail(20)
        );
    })
    .await
}
