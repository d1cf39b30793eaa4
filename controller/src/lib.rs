//! `pylon-controller`: Pylon's control plane. It keeps the mesh's objects in one
//! [`pylon_proxy_policy::Store`], fed by watches of the Kubernetes API (or, on one machine,
//! by a config dir), and serves every proxy over Linkerd's own proxy API: destinations and
//! profiles (`io.linkerd.proxy.destination`), inbound policy (`io.linkerd.proxy.inbound`) and
//! certificates (`io.linkerd.proxy.identity`), and injects the proxy into new pods (an
//! admission webhook running `pylon inject`'s transform). So 10,000 proxies hold one gRPC stream each
//! per destination they use, and only the controller watches the API server.
//!
//! It owns the translation from the Store's model to the proxy API's messages and the
//! subscriptions' lifecycle. It must not know how proxies route or balance (that is
//! `pylon-proxy`), nor parse mesh objects itself (that is `pylon-proxy-policy`, shared with the
//! config dir, so a rule written once holds for both sources).

pub mod admin;
pub mod destination;
pub mod identity;
pub mod kubernetes;
pub mod mesh;
pub mod policy;
mod server;
pub mod webhook;

pub use crate::server::{
    Controller, ControllerConfig, IdentityConfig, MeshSource, StartError, WebhookConfig,
};
