//! One tap event as `pylon tap` prints it: Linkerd's tap lines (`req`, `rsp`, `end`) or a JSON
//! object with the same facts, from the proxy's `TapEvent` (Pylon's own facts come from its
//! metadata label maps).

use std::fmt::Write as _;
use std::net::SocketAddr;

use linkerd2_proxy_api::http_types;
use linkerd2_proxy_api::tap::{eos, tap_event, TapEvent};
use serde::Serialize;

/// Pylon's labels in the event metadata.
pub const ROUTE_LABEL: &str = "route";
pub const ATTEMPT_LABEL: &str = "pylon.io/retry-attempt";
pub const TRACE_LABEL: &str = "pylon.io/trace-id";
pub const PROXY_ERROR_LABEL: &str = "pylon-proxy-error";
/// The response headers that say the proxy made the response, and why: Linkerd's (which a
/// Linkerd proxy sets too) and Pylon's own.
pub const PROXY_ERROR_HEADERS: [&str; 2] = ["l5d-proxy-error", "pylon-proxy-error"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Req,
    Rsp,
    End,
}

/// The facts of one event, flat; `None` fields are not printed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Line {
    #[serde(rename = "type")]
    pub kind: Option<Kind>,
    /// `base:stream`, the same for the three events of one request.
    pub id: String,
    /// `in` or `out`.
    pub proxy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    /// The destination endpoint's pod, workload (`deployment/web`) and namespace, from the
    /// event's destination labels (discovery's names for the endpoint); in JSON (`-o wide`
    /// prints them in its own fields).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    /// Response head since request start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// The h2 error code of a stream reset (or cancelled) before its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_error: Option<u32>,
    /// Response end since response head (since request start when there was no head).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
}

fn micros(d: Option<&prost_types::Duration>) -> Option<u64> {
    let d = d?;
    let us = i128::from(d.seconds) * 1_000_000 + i128::from(d.nanos) / 1_000;
    u64::try_from(us).ok()
}

/// Workload kinds as the destination labels name them, the owner that names a workload first.
const WORKLOAD_KINDS: [&str; 7] = [
    "deployment",
    "statefulset",
    "daemonset",
    "cronjob",
    "job",
    "replicationcontroller",
    "replicaset",
];

/// The proxy's reason for a response it made: from the response's headers (Linkerd's
/// `l5d-proxy-error`, as any Linkerd-compatible proxy sets it), else the event's label.
fn proxy_error(headers: Option<&http_types::Headers>, label: Option<String>) -> Option<String> {
    headers
        .into_iter()
        .flat_map(|h| &h.headers)
        .find(|h| PROXY_ERROR_HEADERS.contains(&h.name.to_ascii_lowercase().as_str()))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .filter(|v| !v.is_empty())
        .or(label)
}

/// Go's names for gRPC status codes, as Linkerd's tap prints them.
pub fn grpc_status_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("Code({code})"), |s| (*s).to_string())
}

impl Line {
    /// `None` for an event that is not HTTP (the API has no other kind today).
    pub fn from_event(ev: &TapEvent) -> Option<Line> {
        use tap_event::http::Event as H;
        let Some(tap_event::Event::Http(tap_event::Http { event: Some(http) })) = &ev.event else {
            return None;
        };
        let dst_labels = ev.destination_meta.as_ref().map(|m| &m.labels);
        let dst_label = |k: &str| dst_labels.and_then(|l| l.get(k)).cloned();
        let mut line = Line {
            proxy: match tap_event::ProxyDirection::try_from(ev.proxy_direction) {
                Ok(tap_event::ProxyDirection::Inbound) => "in",
                Ok(tap_event::ProxyDirection::Outbound) => "out",
                _ => "unknown",
            },
            src: ev.source.and_then(|a| SocketAddr::try_from(a).ok()),
            dst: ev.destination.and_then(|a| SocketAddr::try_from(a).ok()),
            tls: dst_label("tls"),
            dst_pod: dst_label("pod"),
            dst_workload: WORKLOAD_KINDS
                .iter()
                .find_map(|kind| dst_label(kind).map(|name| format!("{kind}/{name}"))),
            dst_namespace: dst_label("namespace"),
            ..Line::default()
        };
        let id = match http {
            H::RequestInit(req) => {
                line.kind = Some(Kind::Req);
                line.method = req
                    .method
                    .clone()
                    .and_then(|m| http::Method::try_from(m).ok())
                    .map(|m| m.to_string());
                line.authority = Some(req.authority.clone());
                line.path = Some(req.path.clone());
                line.route = ev
                    .route_meta
                    .as_ref()
                    .and_then(|m| m.labels.get(ROUTE_LABEL))
                    .cloned();
                line.attempt = dst_label(ATTEMPT_LABEL).and_then(|a| a.parse().ok());
                line.trace_id = dst_label(TRACE_LABEL);
                req.id
            }
            H::ResponseInit(rsp) => {
                line.kind = Some(Kind::Rsp);
                line.status = Some(rsp.http_status);
                line.latency_us = micros(rsp.since_request_init.as_ref());
                line.proxy_error = proxy_error(rsp.headers.as_ref(), dst_label(PROXY_ERROR_LABEL));
                rsp.id
            }
            H::ResponseEnd(end) => {
                line.kind = Some(Kind::End);
                match end.eos.as_ref().and_then(|e| e.end.as_ref()) {
                    Some(eos::End::GrpcStatusCode(c)) => {
                        line.grpc_status = Some(grpc_status_name(*c))
                    }
                    Some(eos::End::ResetErrorCode(c)) => line.reset_error = Some(*c),
                    None => {}
                }
                line.duration_us = micros(
                    end.since_response_init
                        .as_ref()
                        .or(end.since_request_init.as_ref()),
                );
                line.response_bytes = Some(end.response_bytes);
                // A response the proxy made ends with its reason too.
                line.proxy_error = dst_label(PROXY_ERROR_LABEL);
                end.id
            }
        };
        line.id = id.map_or_else(
            || "?".to_string(),
            |id| format!("{}:{}", id.base, id.stream),
        );
        Some(line)
    }

    /// Linkerd's tap line.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let kind = match self.kind {
            Some(Kind::Req) => "req",
            Some(Kind::Rsp) => "rsp",
            Some(Kind::End) => "end",
            None => "???",
        };
        let _ = write!(s, "{kind} id={} proxy={}", self.id, self.proxy);
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let _ = write!(s, " src={} dst={}", addr(self.src), addr(self.dst));
        // Operators think in pods: name the endpoint's when discovery knows it.
        if let Some(pod) = &self.dst_pod {
            let _ = write!(s, " dst_pod={pod}");
        }
        let _ = write!(s, " tls={}", self.tls.as_deref().unwrap_or("-"));
        let mut field = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = write!(s, " {k}={v}");
            }
        };
        field(":method", self.method.clone());
        field(":authority", self.authority.clone());
        field(":path", self.path.clone());
        field(":status", self.status.map(|v| v.to_string()));
        field("latency", self.latency_us.map(|v| format!("{v}µs")));
        field("grpc-status", self.grpc_status.clone());
        field("reset-error", self.reset_error.map(|v| v.to_string()));
        field("duration", self.duration_us.map(|v| format!("{v}µs")));
        field(
            "response-length",
            self.response_bytes.map(|v| format!("{v}B")),
        );
        field("attempt", self.attempt.map(|v| v.to_string()));
        field("trace_id", self.trace_id.clone());
        // Last: both may hold spaces.
        field("proxy_error", self.proxy_error.clone());
        field("route", self.route.clone());
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkerd2_proxy_api::tap::{tap_event::http, Eos};
    use std::collections::HashMap;

    fn event(http_event: http::Event, labels: &[(&str, &str)], route: Option<&str>) -> TapEvent {
        let map = |l: &[(&str, &str)]| -> HashMap<String, String> {
            l.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        TapEvent {
            source: Some("127.0.0.1:5000".parse::<SocketAddr>().unwrap().into()),
            source_meta: None,
            route_meta: Some(tap_event::RouteMeta {
                labels: route.map(|r| map(&[("route", r)])).unwrap_or_default(),
            }),
            destination: Some("127.0.0.1:8080".parse::<SocketAddr>().unwrap().into()),
            destination_meta: Some(tap_event::EndpointMeta {
                labels: map(labels),
            }),
            proxy_direction: tap_event::ProxyDirection::Outbound as i32,
            event: Some(tap_event::Event::Http(tap_event::Http {
                event: Some(http_event),
            })),
        }
    }

    const ID: Option<http::StreamId> = Some(http::StreamId { base: 0, stream: 3 });

    #[test]
    fn request_lines_carry_route_attempt_and_trace() {
        let ev = event(
            http::Event::RequestInit(http::RequestInit {
                id: ID,
                method: Some(::http::Method::GET.into()),
                scheme: None,
                authority: "web.default.svc.cluster.local:80".into(),
                path: "/users/7".into(),
                headers: None,
            }),
            &[
                ("tls", "no_identity"),
                (ATTEMPT_LABEL, "1"),
                (TRACE_LABEL, "4bf92f"),
            ],
            Some("GET /users"),
        );
        let line = Line::from_event(&ev).unwrap();
        assert_eq!(
            line.text(),
            "req id=0:3 proxy=out src=127.0.0.1:5000 dst=127.0.0.1:8080 tls=no_identity :method=GET :authority=web.default.svc.cluster.local:80 :path=/users/7 attempt=1 trace_id=4bf92f route=GET /users"
        );
        let json: serde_json::Value = serde_json::from_str(&line.json()).unwrap();
        assert_eq!(json["type"], "req");
        assert_eq!(json["id"], "0:3");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["route"], "GET /users");
        assert_eq!(json["attempt"], 1);
        assert_eq!(json["src"], "127.0.0.1:5000");
        assert!(json.get("status").is_none());
    }

    #[test]
    fn response_lines_say_when_the_proxy_answered() {
        let ev = event(
            http::Event::ResponseInit(http::ResponseInit {
                id: ID,
                since_request_init: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1_234_000,
                }),
                http_status: 503,
                headers: None,
            }),
            &[("tls", "no_identity"), (PROXY_ERROR_LABEL, "no endpoints")],
            None,
        );
        let line = Line::from_event(&ev).unwrap();
        assert_eq!(
            line.text(),
            "rsp id=0:3 proxy=out src=127.0.0.1:5000 dst=127.0.0.1:8080 tls=no_identity :status=503 latency=1234µs proxy_error=no endpoints"
        );
        let json: serde_json::Value = serde_json::from_str(&line.json()).unwrap();
        assert_eq!(json["status"], 503);
        assert_eq!(json["latency_us"], 1234);
        assert_eq!(json["proxy_error"], "no endpoints");
    }

    #[test]
    fn the_proxys_reason_comes_from_linkerds_header_and_ends_carry_it_too() {
        // A Linkerd-style event: the reason in the response headers only.
        let header = |name: &str, value: &str| http_types::headers::Header {
            name: name.into(),
            value: value.as_bytes().to_vec(),
        };
        let ev = event(
            http::Event::ResponseInit(http::ResponseInit {
                id: ID,
                since_request_init: None,
                http_status: 504,
                headers: Some(http_types::Headers {
                    headers: vec![
                        header("content-type", "text/plain"),
                        header("l5d-proxy-error", "route timeout"),
                    ],
                }),
            }),
            &[
                ("tls", "no_identity"),
                ("pod", "web-7c9f-x2"),
                ("deployment", "web"),
            ],
            None,
        );
        let line = Line::from_event(&ev).unwrap();
        assert_eq!(
            line.text(),
            "rsp id=0:3 proxy=out src=127.0.0.1:5000 dst=127.0.0.1:8080 dst_pod=web-7c9f-x2 tls=no_identity :status=504 proxy_error=route timeout"
        );
        let json: serde_json::Value = serde_json::from_str(&line.json()).unwrap();
        assert_eq!(json["dst_pod"], "web-7c9f-x2");
        assert_eq!(json["dst_workload"], "deployment/web");
        assert_eq!(json["proxy_error"], "route timeout");

        let end = event(
            http::Event::ResponseEnd(http::ResponseEnd {
                id: ID,
                since_request_init: None,
                since_response_init: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 5_000,
                }),
                response_bytes: 14,
                eos: None,
                trailers: None,
            }),
            &[(PROXY_ERROR_LABEL, "route timeout")],
            None,
        );
        assert_eq!(
            Line::from_event(&end).unwrap().text(),
            "end id=0:3 proxy=out src=127.0.0.1:5000 dst=127.0.0.1:8080 tls=- duration=5µs response-length=14B proxy_error=route timeout"
        );
    }

    #[test]
    fn end_lines_have_grpc_status_or_reset_and_length() {
        let end = |eos| {
            http::Event::ResponseEnd(http::ResponseEnd {
                id: ID,
                since_request_init: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                since_response_init: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 70_000,
                }),
                response_bytes: 12,
                eos,
                trailers: None,
            })
        };
        let grpc = Line::from_event(&event(
            end(Some(Eos {
                end: Some(eos::End::GrpcStatusCode(0)),
            })),
            &[],
            None,
        ))
        .unwrap();
        assert_eq!(
            grpc.text(),
            "end id=0:3 proxy=out src=127.0.0.1:5000 dst=127.0.0.1:8080 tls=- grpc-status=OK duration=70µs response-length=12B"
        );
        let reset = Line::from_event(&event(
            end(Some(Eos {
                end: Some(eos::End::ResetErrorCode(8)),
            })),
            &[],
            None,
        ))
        .unwrap();
        assert!(reset.text().contains(" reset-error=8 "), "{}", reset.text());
        assert_eq!(grpc_status_name(14), "Unavailable");
        assert_eq!(grpc_status_name(99), "Code(99)");
    }
}
