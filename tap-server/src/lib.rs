//! Pylon's live tap: the proxy's side of Linkerd's `io.linkerd.proxy.tap.Tap/Observe` gRPC API
//! (the generated code of the `linkerd2-proxy-api` crate, so Linkerd's own tap clients work).
//!
//! This crate owns the registry of open taps ([`Taps`]), what each tap asked for (its compiled
//! match, limit and sampling rate), the events sent to it, and the gRPC service with its
//! authorization ([`serve`]). The data path asks [`Taps::is_tapping`] (one atomic load) and
//! only when someone is tapping calls [`Taps::observe_request`], which returns a [`TapHandle`]
//! for the response events. A slow tap client never slows traffic: each tap has a bounded
//! queue and events that don't fit are dropped and counted.
//!
//! It must not know the proxy's request path, its layers or its metrics: callers describe a
//! request with a [`RequestMeta`] and pass plain statuses, headers and byte counts.

mod matcher;
mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderMap, Method};
use linkerd2_proxy_api::http_types;
use linkerd2_proxy_api::tap::{self as pb, tap_event};
use tokio::sync::mpsc;

pub use matcher::{InvalidMatch, Matcher};
pub use service::{serve, Authz, PolicyCheck, TapService, MAX_RPS_HEADER};

/// Events a tap client may fall behind by before further events are dropped.
pub const QUEUE: usize = 1_000;
/// Requests sampled per second and tap when the client doesn't say.
pub const DEFAULT_MAX_RPS: u32 = 100;
/// Header values never leave the proxy through tap.
const REDACTED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];
/// The destination label naming the reason of a response the proxy made itself.
pub const PROXY_ERROR_LABEL: &str = "pylon-proxy-error";
/// The h2 CANCEL code: a stream the proxy or the client abandoned before its end.
const CANCEL: u32 = 0x8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What the data path knows of a request when it starts.
pub struct RequestMeta<'a> {
    pub direction: Direction,
    /// The client.
    pub source: Option<SocketAddr>,
    /// The endpoint the request goes to.
    pub destination: Option<SocketAddr>,
    /// Facts about the destination (`authority`, `pylon.io/retry-attempt`, `tls`...).
    pub destination_labels: &'a [(&'a str, &'a str)],
    /// Facts about the route (`route`).
    pub route_labels: &'a [(&'a str, &'a str)],
    pub method: &'a Method,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The open taps. Cheap to clone.
#[derive(Clone, Default)]
pub struct Taps(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Read by the data path without locking.
    taps: ArcSwap<Vec<Arc<Tap>>>,
    /// Serializes opening and pruning, so `active` always equals the number of taps.
    writer: Mutex<()>,
    active: AtomicUsize,
    dropped: Arc<AtomicU64>,
    next_stream: AtomicU64,
}

/// One open tap.
struct Tap {
    matcher: Matcher,
    /// Requests it may still observe.
    remaining: AtomicU64,
    rate: RateLimit,
    events: mpsc::Sender<pb::TapEvent>,
    dropped: Arc<AtomicU64>,
}

impl Tap {
    /// Queues an event for this tap's client; one that doesn't fit is dropped and counted.
    fn offer(&self, event: pb::TapEvent) {
        if self.events.try_send(event).is_err() && !self.events.is_closed() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Taps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether anyone is tapping: the only cost on the data path while no one is.
    #[inline]
    pub fn is_tapping(&self) -> bool {
        self.0.active.load(Ordering::Relaxed) > 0
    }

    /// Tap events dropped because a tap client fell behind (`tap_events_dropped_total`).
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.0.dropped.clone()
    }

    /// Opens a tap; its events arrive on the returned receiver. `limit` 0 means no limit. The
    /// gRPC service opens one per `Observe` call; tests of the data path open their own.
    pub fn open(&self, matcher: Matcher, limit: u64, max_rps: u32) -> mpsc::Receiver<pb::TapEvent> {
        let (events, rx) = mpsc::channel(QUEUE);
        let tap = Arc::new(Tap {
            matcher,
            remaining: AtomicU64::new(if limit == 0 { u64::MAX } else { limit }),
            rate: RateLimit::new(max_rps),
            events,
            dropped: self.0.dropped.clone(),
        });
        self.update(|taps| taps.push(tap));
        rx
    }

    /// Forgets taps whose client went away or whose limit is used up.
    fn prune(&self) {
        self.update(|taps| {
            taps.retain(|t| !t.events.is_closed() && t.remaining.load(Ordering::Relaxed) > 0)
        });
    }

    fn update(&self, change: impl FnOnce(&mut Vec<Arc<Tap>>)) {
        let _writer = self.0.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut taps = Vec::clone(&self.0.taps.load());
        change(&mut taps);
        self.0.active.store(taps.len(), Ordering::Relaxed);
        self.0.taps.store(Arc::new(taps));
    }

    /// The taps that want this request get its request-init event; the handle sends the rest.
    pub fn observe_request(&self, req: &RequestMeta<'_>) -> Option<TapHandle> {
        let taps = self.0.taps.load();
        let mut matched = Vec::new();
        let mut stale = false;
        for tap in taps.iter() {
            if tap.events.is_closed() {
                stale = true;
                continue;
            }
            if !tap.matcher.matches(req) {
                continue;
            }
            // A client that fell a whole queue behind loses this request (counted) before
            // any of its events is built: a stalled tap costs the data path next to nothing,
            // and the client never sees a response without its request.
            if tap.events.capacity() == 0 {
                tap.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !tap.rate.allow() {
                continue;
            }
            match tap
                .remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            {
                Ok(1) => {
                    stale = true;
                    matched.push(tap.clone());
                }
                Ok(_) => matched.push(tap.clone()),
                Err(_) => stale = true,
            }
        }
        if stale {
            self.prune();
        }
        if matched.is_empty() {
            return None;
        }
        let handle = TapHandle {
            taps: matched,
            id: tap_event::http::StreamId {
                base: stream_base(),
                stream: self.0.next_stream.fetch_add(1, Ordering::Relaxed),
            },
            common: Common::new(req),
            request_at: Instant::now(),
            response_at: None,
            bytes: 0,
            proxy_error: None,
            done: false,
        };
        let init = tap_event::http::RequestInit {
            id: Some(handle.id),
            method: Some(http_types::HttpMethod::from(req.method.clone())),
            scheme: Some(http_types::Scheme::from(req.scheme)),
            authority: req.authority.to_owned(),
            path: req.path.to_owned(),
            headers: Some(headers(req.headers)),
        };
        handle.send(tap_event::http::Event::RequestInit(init), &[]);
        Some(handle)
    }
}

/// A process-wide random base for stream ids, as Linkerd's proxy does.
fn stream_base() -> u32 {
    static BASE: OnceLock<u32> = OnceLock::new();
    *BASE.get_or_init(rand::random)
}

fn headers(h: &HeaderMap) -> http_types::Headers {
    http_types::Headers {
        headers: h
            .iter()
            .map(|(name, value)| http_types::headers::Header {
                name: name.as_str().to_owned(),
                value: if REDACTED_HEADERS.contains(&name.as_str()) {
                    b"REDACTED".to_vec()
                } else {
                    value.as_bytes().to_vec()
                },
            })
            .collect(),
    }
}

/// What every event of one request carries.
struct Common {
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    destination_labels: HashMap<String, String>,
    route_labels: HashMap<String, String>,
    direction: tap_event::ProxyDirection,
}

impl Common {
    fn new(req: &RequestMeta<'_>) -> Self {
        let map = |labels: &[(&str, &str)]| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        Self {
            source: req.source,
            destination: req.destination,
            destination_labels: map(req.destination_labels),
            route_labels: map(req.route_labels),
            direction: match req.direction {
                Direction::Inbound => tap_event::ProxyDirection::Inbound,
                Direction::Outbound => tap_event::ProxyDirection::Outbound,
            },
        }
    }
}

/// One observed request: sends its response events to the taps that matched it.
pub struct TapHandle {
    taps: Vec<Arc<Tap>>,
    id: tap_event::http::StreamId,
    common: Common,
    request_at: Instant,
    response_at: Option<Instant>,
    bytes: u64,
    /// The reason, when the proxy made the response: its end event carries it too.
    proxy_error: Option<Box<str>>,
    done: bool,
}

impl TapHandle {
    fn send(&self, event: tap_event::http::Event, extra: &[(&str, &str)]) {
        if self.taps.iter().all(|t| t.events.capacity() == 0) {
            for tap in &self.taps {
                if !tap.events.is_closed() {
                    tap.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let mut destination_labels = self.common.destination_labels.clone();
        for (k, v) in extra {
            destination_labels.insert((*k).to_owned(), (*v).to_owned());
        }
        let event = pb::TapEvent {
            source: self.common.source.map(Into::into),
            source_meta: None,
            route_meta: Some(tap_event::RouteMeta {
                labels: self.common.route_labels.clone(),
            }),
            destination: self.common.destination.map(Into::into),
            destination_meta: Some(tap_event::EndpointMeta {
                labels: destination_labels,
            }),
            proxy_direction: self.common.direction as i32,
            event: Some(tap_event::Event::Http(tap_event::Http {
                event: Some(event),
            })),
        };
        // The last tap gets the event itself; only the others need a copy.
        let Some((last, others)) = self.taps.split_last() else {
            return;
        };
        for tap in others {
            tap.offer(event.clone());
        }
        last.offer(event);
    }

    /// The response's head. `proxy_error`: the proxy made this response. Its headers carry the
    /// reason as Linkerd's proxy does (`l5d-proxy-error`, which stock tap clients show with the
    /// other response headers); the `pylon-proxy-error` label repeats it, on this event and on
    /// the response's end.
    pub fn response_init(&mut self, status: u16, headers_: &HeaderMap, proxy_error: Option<&str>) {
        let now = Instant::now();
        self.response_at = Some(now);
        let init = tap_event::http::ResponseInit {
            id: Some(self.id),
            since_request_init: duration(now - self.request_at),
            http_status: u32::from(status),
            headers: Some(headers(headers_)),
        };
        self.proxy_error = proxy_error.map(Into::into);
        let extra = self.proxy_error_label();
        self.send(tap_event::http::Event::ResponseInit(init), extra.as_slice());
    }

    fn proxy_error_label(&self) -> Option<(&'static str, &str)> {
        self.proxy_error.as_deref().map(|e| (PROXY_ERROR_LABEL, e))
    }

    /// Response body bytes seen so far.
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The response stream ended: `grpc_status` from its trailers (or head), if any.
    pub fn response_end(mut self, grpc_status: Option<u32>, trailers: Option<&HeaderMap>) {
        let eos = grpc_status.map(pb::Eos::from_grpc_status);
        self.end(eos, trailers);
    }

    fn end(&mut self, eos: Option<pb::Eos>, trailers: Option<&HeaderMap>) {
        self.done = true;
        let now = Instant::now();
        let end = tap_event::http::ResponseEnd {
            id: Some(self.id),
            since_request_init: duration(now - self.request_at),
            since_response_init: self.response_at.and_then(|at| duration(now - at)),
            response_bytes: self.bytes,
            eos,
            trailers: trailers.map(headers),
        };
        let extra = self.proxy_error_label();
        self.send(tap_event::http::Event::ResponseEnd(end), extra.as_slice());
    }
}

impl Drop for TapHandle {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled or reset before its end.
            self.end(
                Some(pb::Eos {
                    end: Some(pb::eos::End::ResetErrorCode(CANCEL)),
                }),
                None,
            );
        }
    }
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

/// At most `max` requests per second, in one-second windows.
struct RateLimit {
    max: u32,
    epoch: Instant,
    second: AtomicU64,
    count: AtomicU32,
}

impl RateLimit {
    fn new(max: u32) -> Self {
        Self {
            max,
            epoch: Instant::now(),
            second: AtomicU64::new(0),
            count: AtomicU32::new(0),
        }
    }

    fn allow(&self) -> bool {
        let now = self.epoch.elapsed().as_secs();
        let seen = self.second.load(Ordering::Acquire);
        if seen != now
            && self
                .second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.count.store(0, Ordering::Release);
        }
        self.count.fetch_add(1, Ordering::AcqRel) < self.max
    }
}

#[cfg(test)]
mod tests;
