//! The access log (`PYLON_ACCESS_LOG=json`): one JSON line per request on stderr, written
//! directly so it doesn't depend on the log level. Entries are only built when it is enabled.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use crate::names::EndpointNames;

pub fn enabled_from_env() -> bool {
    matches!(std::env::var("PYLON_ACCESS_LOG").as_deref(), Ok("json"))
}

pub struct AccessEntry {
    direction: &'static str,
    method: http::Method,
    authority: String,
    path: String,
    trace_id: Option<String>,
    endpoint: Option<SocketAddr>,
    endpoint_names: Option<Arc<EndpointNames>>,
}

impl AccessEntry {
    pub fn new<B>(direction: &'static str, req: &Request<B>, authority: &str) -> Box<Self> {
        Box::new(Self {
            direction,
            method: req.method().clone(),
            authority: authority.to_string(),
            path: req.uri().path().to_string(),
            trace_id: trace_id(req.headers()),
            endpoint: None,
            endpoint_names: None,
        })
    }

    /// The endpoint the request went to, and its pod and workload when discovery knows them.
    pub fn set_endpoint(&mut self, endpoint: SocketAddr, names: &Arc<EndpointNames>) {
        self.endpoint = Some(endpoint);
        self.endpoint_names = Some(names.clone());
    }

    pub fn emit(
        &self,
        status: u16,
        grpc_status: Option<u32>,
        proxy_error: Option<&str>,
        latency: Duration,
    ) {
        let mut line = serde_json::json!({
            "timestamp": unix_timestamp(),
            "level": "INFO",
            "target": "pylon::access",
            "message": "access",
            "direction": self.direction,
            "method": self.method.as_str(),
            "authority": self.authority,
            "path": self.path,
            "status": status,
            "latency_ms": latency.as_secs_f64() * 1000.0,
        });
        // What an entry doesn't have is left out, as in the other log lines (not `null`).
        if let Some(map) = line.as_object_mut() {
            let optional = [
                ("grpc_status", grpc_status.map(serde_json::Value::from)),
                ("proxy_error", proxy_error.map(serde_json::Value::from)),
                (
                    "endpoint",
                    self.endpoint
                        .map(|e| serde_json::Value::from(e.to_string())),
                ),
                (
                    "trace_id",
                    self.trace_id.clone().map(serde_json::Value::from),
                ),
            ];
            let names = self.endpoint_names.as_deref();
            let named = [
                ("endpoint_pod", names.and_then(EndpointNames::pod)),
                ("endpoint_workload", names.and_then(EndpointNames::workload)),
                (
                    "endpoint_namespace",
                    names.and_then(EndpointNames::namespace),
                ),
            ];
            for (key, value) in optional {
                if let Some(value) = value {
                    map.insert(key.to_owned(), value);
                }
            }
            for (key, value) in named {
                if let Some(value) = value {
                    map.insert(key.to_owned(), value.into());
                }
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const B3_TRACE_ID: http::HeaderName = http::HeaderName::from_static("x-b3-traceid");

/// The trace id from W3C `traceparent` (`00-<trace-id>-<span-id>-<flags>`) or B3.
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    if let Some(tp) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let mut parts = tp.split('-');
        if let (Some(_version), Some(id)) = (parts.next(), parts.next()) {
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(id.to_string());
            }
        }
    }
    headers
        .get(B3_TRACE_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

fn unix_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", now.as_secs(), now.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-b3-traceid",
            "80f198ee56343ba864fe8b2a57d3eff7".parse().unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7")
        );
        h.insert("x-b3-traceid", "not hex!".parse().unwrap());
        assert_eq!(trace_id(&h), None);
    }
}
