//! Start-up: the Store and its source, then the gRPC servers and the admin server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use linkerd2_proxy_api::destination::destination_server::DestinationServer;
use linkerd2_proxy_api::inbound::inbound_server_policies_server::InboundServerPoliciesServer;
use pylon_proxy_policy::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::{Admin, ControllerMetrics};
use crate::destination::DestinationService;
use crate::identity::{IdentityService, TokenReviewer};
use crate::kubernetes::{self, WatchStatus};
use crate::mesh::MeshConfig;
use crate::policy::{PolicyDefaults, PolicyService};

/// The identity service: the issuer that signs, and who reviews the tokens.
#[derive(Clone)]
pub struct IdentityConfig {
    pub ca: Arc<pylon_identity::ca::Ca>,
    pub reviewer: Arc<dyn TokenReviewer>,
    pub lifetime: std::time::Duration,
    /// Audiences a proxy's token must be valid for (Linkerd's `identity.l5d.io`); empty: the
    /// API server's default.
    pub audiences: Vec<String>,
    /// Linkerd's port 8080.
    pub addr: SocketAddr,
}

/// The injection webhook: where it listens, its TLS, and how it injects.
#[derive(Clone)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub tls: pylon_identity::tokio_rustls::TlsAcceptor,
    pub inject: pylon_inject::InjectConfig,
}

/// Where the mesh's objects come from.
#[derive(Clone)]
pub enum MeshSource {
    /// The Kubernetes API, through this client.
    Kubernetes(kube::Client),
    /// A config dir, watched (one machine, tests).
    ConfigDir(PathBuf),
}

#[derive(Clone)]
pub struct ControllerConfig {
    pub source: MeshSource,
    pub cluster_domain: String,
    /// Namespace for a config dir's objects without one.
    pub default_namespace: String,
    pub mesh: MeshConfig,
    pub policy: PolicyDefaults,
    /// Linkerd's ports: destination 8086, policy 8090.
    pub destination_addr: SocketAddr,
    pub policy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Serve `Identity/Certify` (needs an issuer).
    pub identity: Option<IdentityConfig>,
    /// Serve the proxy injector.
    pub webhook: Option<WebhookConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("config dir: {0}")]
    Store(#[from] pylon_proxy_policy::StoreError),
}

/// A running controller: its Store and the addresses it serves on.
pub struct Controller {
    pub store: Arc<Store>,
    pub destination_addr: SocketAddr,
    pub policy_addr: SocketAddr,
    pub identity_addr: Option<SocketAddr>,
    pub webhook_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub watches: Option<Arc<WatchStatus>>,
    _config_watch: Option<pylon_proxy_policy::WatchHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Controller {
    /// Binds every listener (so a bad address fails start-up), starts the source and serves.
    pub async fn start(config: ControllerConfig) -> Result<Controller, StartError> {
        let store_config = StoreConfig {
            default_namespace: config.default_namespace.clone(),
            cluster_domain: config.cluster_domain.clone(),
        };
        let (store, watches, config_watch) = match &config.source {
            MeshSource::Kubernetes(client) => {
                let store = Store::empty(store_config);
                let watches = kubernetes::spawn_watches(client.clone(), store.clone());
                (store, Some(watches), None)
            }
            MeshSource::ConfigDir(dir) => {
                let store = Store::load_dir(dir, store_config)?;
                let watch = store.watch()?;
                (store, None, Some(watch))
            }
        };
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let destination_listener = bind("destination", config.destination_addr).await?;
        let policy_listener = bind("policy", config.policy_addr).await?;
        let identity_listener = match &config.identity {
            Some(identity) => Some(bind("identity", identity.addr).await?),
            None => None,
        };
        let webhook_listener = match &config.webhook {
            Some(webhook) => Some(bind("webhook", webhook.addr).await?),
            None => None,
        };
        let admin_listener = bind("admin", config.admin_addr).await?;
        let destination_addr = local_addr(&destination_listener, config.destination_addr);
        let policy_addr = local_addr(&policy_listener, config.policy_addr);
        let admin_addr = local_addr(&admin_listener, config.admin_addr);

        let identity_addr = identity_listener
            .as_ref()
            .zip(config.identity.as_ref())
            .map(|(l, c)| local_addr(l, c.addr));
        let identity = config.identity.as_ref().map(|c| {
            IdentityService::new(c.ca.clone(), c.reviewer.clone())
                .with_lifetime(c.lifetime)
                .with_audiences(c.audiences.clone())
        });
        let metrics = ControllerMetrics::new(
            store.clone(),
            watches.clone(),
            identity.as_ref().map(IdentityService::stats),
        );
        let mesh = Arc::new(config.mesh.clone());
        let destination =
            DestinationService::new(store.clone(), mesh.clone(), metrics.destination.clone());
        let mut tasks = Vec::new();
        let listed = cluster_listed(watches.clone());
        tasks.push(tokio::spawn(async move {
            listed.await;
            let served = tonic::transport::Server::builder()
                .add_service(DestinationServer::new(destination))
                .serve_with_incoming(TcpListenerStream::new(destination_listener))
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "destination server stopped");
            }
        }));
        let policy =
            PolicyService::new(store.clone(), mesh.clone(), Arc::new(config.policy.clone()));
        let listed = cluster_listed(watches.clone());
        tasks.push(tokio::spawn(async move {
            listed.await;
            let served = tonic::transport::Server::builder()
                .add_service(InboundServerPoliciesServer::new(policy))
                .serve_with_incoming(TcpListenerStream::new(policy_listener))
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "policy server stopped");
            }
        }));
        if let (Some(identity), Some(listener)) = (identity, identity_listener) {
            tasks.push(tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .add_service(identity.into_server())
                    .serve_with_incoming(TcpListenerStream::new(listener))
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "identity server stopped");
                }
            }));
        }
        let webhook_addr = webhook_listener
            .as_ref()
            .zip(config.webhook.as_ref())
            .map(|(l, c)| local_addr(l, c.addr));
        if let (Some(listener), Some(webhook)) = (webhook_listener, &config.webhook) {
            let server = Arc::new(crate::webhook::Webhook {
                store: store.clone(),
                config: webhook.inject.clone(),
            });
            tasks.push(tokio::spawn(server.serve(listener, webhook.tls.clone())));
        }
        tasks.push(tokio::spawn(crate::admin::keep_endpoint_gauges(
            store.clone(),
            metrics.endpoints.clone(),
        )));
        let admin = Arc::new(Admin::new(metrics, watches.clone()));
        tasks.push(tokio::spawn(admin.serve(admin_listener)));
        tracing::info!(%destination_addr, %policy_addr, identity_addr = ?identity_addr, webhook_addr = ?webhook_addr, %admin_addr, "serving");
        Ok(Controller {
            store,
            destination_addr,
            policy_addr,
            identity_addr,
            webhook_addr,
            admin_addr,
            watches,
            _config_watch: config_watch,
            tasks,
        })
    }
}

/// What the servers that answer proxies wait for: the cluster's first listing in the Store
/// (`WatchStatus::applied`); at once from a config dir. Proxies queue on the bound listeners
/// meanwhile and keep what they had: a half-listed cluster would tell a restarted controller's
/// proxies that a Service has no endpoints.
async fn cluster_listed(watches: Option<Arc<WatchStatus>>) {
    if let Some(watches) = watches {
        watches.applied().await;
    }
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(asked)
}
