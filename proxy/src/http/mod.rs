//! HTTP plumbing shared by both directions: serving client connections, the layers every HTTP
//! stack is built from (`RespondLayer`, `HttpMetricsLayer`, `ResponseTimeoutLayer`), the
//! `EndpointClient` at the bottom, response bodies that record when they end, hop-by-hop headers
//! and tunnels.

pub mod body;
pub mod client;
pub mod errors;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod timeout;
pub mod upgrade;

use std::future::Future;
use std::pin::Pin;

pub use body::ResponseBody;
pub use errors::ProxyError;

pub type ProxyResponse = http::Response<ResponseBody>;

/// Layers box their futures: one small allocation each keeps the stack's types readable.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
