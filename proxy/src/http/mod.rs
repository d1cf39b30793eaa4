//! HTTP plumbing shared by both directions: serving client connections, endpoint clients,
//! response bodies that record metrics, hop-by-hop headers, upgrades and proxy-made errors.

pub mod body;
pub mod client;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod server;
pub mod upgrade;

pub use body::ResponseBody;
pub use errors::ProxyError;

pub type ProxyResponse = http::Response<ResponseBody>;
