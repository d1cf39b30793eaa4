//! Structured logs: JSON lines on stderr (jq-able), level from `PYLON_LOG`, changeable at runtime
//! through the admin server.
//!
//! Release builds compile `trace!` out (the workspace's `release_max_level_debug`): a filter of
//! `trace` logs what `debug` does there. The dependencies' trace callsites (h2's, per frame) cost
//! an h2 hop 5% of its instructions while no one was logging them.

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

pub const DEFAULT_LEVEL: &str = "info";

/// Changes the log filter of a running proxy.
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("invalid log filter: {0}")]
    Parse(#[from] tracing_subscriber::filter::ParseError),
    #[error("could not apply log filter: {0}")]
    Reload(#[from] reload::Error),
}

impl LogLevel {
    pub fn get(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), LogLevelError> {
        let filter = filter.trim();
        let parsed = EnvFilter::builder().parse(filter)?;
        self.handle.reload(parsed)?;
        if let Ok(mut cur) = self.current.lock() {
            *cur = filter.to_string();
        }
        Ok(())
    }
}

/// Installs the global subscriber. A bad `PYLON_LOG` is reported and the default used, so a typo
/// never takes a proxy down.
pub fn init() -> LogLevel {
    let requested = std::env::var("PYLON_LOG").unwrap_or_else(|_| DEFAULT_LEVEL.to_string());
    let (filter, current, bad) = match EnvFilter::builder().parse(&requested) {
        Ok(f) => (f, requested, None),
        Err(e) => (
            EnvFilter::new(DEFAULT_LEVEL),
            DEFAULT_LEVEL.to_string(),
            Some((requested, e)),
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr);
    // A second init (tests, or `pylon` running the proxy in-process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    if let Some((requested, e)) = bad {
        tracing::warn!(filter = %requested, error = %e, "invalid PYLON_LOG; using {DEFAULT_LEVEL}");
    }
    LogLevel {
        handle,
        current: Mutex::new(current),
    }
}
