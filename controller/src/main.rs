//! `pylon-controller`: see the library's documentation.

// jemalloc, as the proxy: glibc's arenas contend and fragment under the controller's
// many-threaded snapshot rebuilds (measured in benches/results/controller-latest.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pylon_controller::mesh::MeshConfig;
use std::sync::Arc;

use anyhow::Context;
use pylon_controller::kubernetes::KubeTokenReviewer;
use pylon_controller::{Controller, ControllerConfig, IdentityConfig, MeshSource, WebhookConfig};

/// Pylon's control plane: watches the Kubernetes API (or a config dir) and serves proxies over
/// Linkerd's destination, policy and identity APIs.
#[derive(Debug, Parser)]
#[command(name = "pylon-controller", version)]
struct Args {
    /// Serve from this config dir instead of the Kubernetes API (one machine, tests).
    #[arg(long, env = "PYLON_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// The kubeconfig to use; default: $KUBECONFIG, ~/.kube/config, else in-cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Destination API (Linkerd's port 8086).
    #[arg(long, env = "PYLON_DESTINATION_ADDR", default_value = "0.0.0.0:8086")]
    destination_addr: SocketAddr,
    /// Inbound policy API (Linkerd's port 8090).
    #[arg(long, env = "PYLON_POLICY_ADDR", default_value = "0.0.0.0:8090")]
    policy_addr: SocketAddr,
    /// Default inbound policy for ports no Server selects, where neither the pod nor its
    /// namespace has `config.linkerd.io/default-inbound-policy`.
    #[arg(
        long,
        env = "PYLON_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    default_inbound_policy: pylon_proxy_policy::DefaultPolicy,
    /// Networks the `cluster-*` default policies trust (comma-separated CIDRs); default:
    /// Linkerd's clusterNetworks.
    #[arg(long, env = "PYLON_CLUSTER_NETWORKS", value_delimiter = ',')]
    cluster_networks: Vec<pylon_proxy_policy::IpNet>,
    /// /metrics, /ready, /live (Linkerd's destination admin port 9996).
    #[arg(
        long,
        env = "PYLON_CONTROLLER_ADMIN_ADDR",
        default_value = "0.0.0.0:9996"
    )]
    admin_addr: SocketAddr,
    #[arg(long, env = "PYLON_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Trust domain of workload identities.
    #[arg(long, env = "PYLON_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The issuer part of identity names: `pylon` (`SA.NS.serviceaccount.identity.pylon.TD`),
    /// or `linkerd` to keep the names of a cluster moving from Linkerd.
    #[arg(long, env = "PYLON_IDENTITY_ISSUER_NAME", default_value = "pylon")]
    identity_issuer_name: String,
    /// Serve Linkerd's identity API with the issuer in this CA dir (`issuer.crt`,
    /// `issuer.key`, `ca.crt`, `trust-domain`, as `pylon identity init-ca` writes them).
    /// Tokens are reviewed by the Kubernetes API.
    #[arg(long, env = "PYLON_IDENTITY_ISSUER_DIR")]
    identity_issuer_dir: Option<PathBuf>,
    /// Identity API (Linkerd's port 8080).
    #[arg(long, env = "PYLON_IDENTITY_ADDR", default_value = "0.0.0.0:8080")]
    identity_addr: SocketAddr,
    /// Lifetime of issued certificates.
    #[arg(long, env = "PYLON_IDENTITY_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    identity_cert_lifetime: std::time::Duration,
    /// Audiences a proxy's token must be valid for (Linkerd's projected token's
    /// `identity.l5d.io`); `--identity-token-audience ''` accepts the API server's default.
    #[arg(
        long,
        env = "PYLON_IDENTITY_TOKEN_AUDIENCE",
        default_value = "identity.l5d.io",
        value_delimiter = ','
    )]
    identity_token_audience: Vec<String>,
    /// Serve the proxy injector (an admission webhook over HTTPS) here; needs
    /// `--webhook-tls-dir`.
    #[arg(long, env = "PYLON_WEBHOOK_ADDR", requires = "webhook_tls_dir")]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate and key (`tls.crt`, `tls.key`).
    #[arg(long, env = "PYLON_WEBHOOK_TLS_DIR")]
    webhook_tls_dir: Option<PathBuf>,
    /// The image injected pods run the proxy from.
    #[arg(long, env = "PYLON_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Namespace for a config dir's objects that name none.
    #[arg(long, default_value = "default")]
    namespace: String,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PYLON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "pylon-controller failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let source = match &args.config_dir {
        Some(dir) => MeshSource::ConfigDir(dir.clone()),
        None => MeshSource::Kubernetes(kube_client(args.kubeconfig.as_deref()).await?),
    };
    let identity = match (&args.identity_issuer_dir, &source) {
        (None, _) => None,
        (Some(dir), MeshSource::Kubernetes(client)) => Some(IdentityConfig {
            ca: Arc::new(
                pylon_identity::ca::Ca::load(dir)
                    .with_context(|| format!("--identity-issuer-dir {}", dir.display()))?,
            ),
            reviewer: Arc::new(KubeTokenReviewer::new(client.clone())),
            lifetime: args.identity_cert_lifetime,
            audiences: args
                .identity_token_audience
                .iter()
                .filter(|a| !a.is_empty())
                .cloned()
                .collect(),
            addr: args.identity_addr,
        }),
        (Some(_), MeshSource::ConfigDir(_)) => {
            anyhow::bail!("--identity-issuer-dir needs the Kubernetes API to review tokens; it can't be used with --config-dir")
        }
    };
    let webhook = match (args.webhook_addr, &args.webhook_tls_dir) {
        (Some(addr), Some(dir)) => {
            let mut inject = pylon_inject::InjectConfig::new(env!("CARGO_PKG_VERSION"));
            inject.created_by = format!("pylon/webhook {}", env!("CARGO_PKG_VERSION"));
            if let Some(image) = &args.proxy_image {
                inject.image = image.clone();
            }
            inject.cluster_domain = args.cluster_domain.clone();
            inject.trust_domain = args.trust_domain.clone();
            inject.trust_anchors_pem = identity.as_ref().map(|i| i.ca.anchor_pem().to_string());
            if let MeshSource::Kubernetes(client) = &source {
                // Native sidecars where the cluster has them.
                match client.apiserver_version().await {
                    Ok(v) => {
                        inject.native_sidecar = pylon_inject::supports_native_sidecars(&format!(
                            "{}.{}",
                            v.major,
                            v.minor.trim_end_matches('+')
                        ))
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the API server's version; injecting native sidecars")
                    }
                }
            }
            Some(WebhookConfig {
                addr,
                tls: pylon_controller::webhook::tls_acceptor(dir)?,
                inject,
            })
        }
        _ => None,
    };
    let _controller = Controller::start(ControllerConfig {
        source,
        cluster_domain: args.cluster_domain,
        default_namespace: args.namespace,
        mesh: MeshConfig {
            trust_domain: args.trust_domain,
            identity_issuer: args.identity_issuer_name,
            ..MeshConfig::default()
        },
        policy: pylon_controller::policy::PolicyDefaults {
            default_policy: args.default_inbound_policy,
            cluster_networks: if args.cluster_networks.is_empty() {
                pylon_proxy_policy::default_cluster_networks()
            } else {
                args.cluster_networks
            },
        },
        destination_addr: args.destination_addr,
        policy_addr: args.policy_addr,
        identity,
        webhook,
        admin_addr: args.admin_addr,
    })
    .await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received; exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; exiting"),
    }
    Ok(())
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    pylon_proxy_policy::duration::parse(s).map_err(|e| e.to_string())
}
