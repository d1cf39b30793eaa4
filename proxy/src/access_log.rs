//! The access log (`PYLON_ACCESS_LOG=json`): one JSON line per request on stderr, written
//! directly so it doesn't depend on the log level. Entries are only built when it is enabled.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use http::Request;

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
        })
    }

    pub fn set_endpoint(&mut self, endpoint: SocketAddr) {
        self.endpoint = Some(endpoint);
    }

    pub fn emit(
        &self,
        status: u16,
        grpc_status: Option<u32>,
        proxy_error: Option<&str>,
        latency: Duration,
    ) {
        let line = serde_json::json!({
            "timestamp": unix_timestamp(),
            "level": "INFO",
            "target": "pylon::access",
            "message": "access",
            "direction": self.direction,
            "method": self.method.as_str(),
            "authority": self.authority,
            "path": self.path,
            "status": status,
            "grpc_status": grpc_status,
            "proxy_error": proxy_error,
            "latency_ms": latency.as_secs_f64() * 1000.0,
            "endpoint": self.endpoint.map(|e| e.to_string()),
            "trace_id": self.trace_id,
        });
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

/// The trace id from W3C `traceparent` (`00-<trace-id>-<span-id>-<flags>`) or B3.
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let mut parts = tp.split('-');
        if let (Some(_version), Some(id)) = (parts.next(), parts.next()) {
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(id.to_string());
            }
        }
    }
    headers
        .get("x-b3-traceid")
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
