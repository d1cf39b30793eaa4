//! The demo mesh on loopback: `ml-inference` with three endpoints (an app behind its own
//! inbound proxy each), the mesh objects in a temporary config dir, and the client workload's
//! outbound proxy that discovers the endpoints from them. Every workload gets an identity
//! from a throwaway CA, so the hops between proxies are mTLS, as in a real mesh.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio::task::JoinSet;

use pylon_identity::ca;

use super::app_server::{AppBehaviour, AppServer};
use super::mesh_config::{self, EndpointObject, PodObject};
use super::proxy_process::{ProxyProcess, ProxySpec};

pub const NAMESPACE: &str = "default";
pub const SERVICE: &str = "ml-inference";
pub const SERVICE_PORT: u16 = 80;
/// The name the client workload calls.
pub const AUTHORITY: &str = "ml-inference.default.svc.cluster.local";
const CLIENT_POD: &str = "loadgen-0";
const CLIENT_WORKLOAD: &str = "deployment/loadgen";
const CLIENT_APP: &str = "loadgen";
/// The demo CA's trust domain.
const NAMESPACE_TRUST_DOMAIN: &str = "cluster.local";

/// The three `ml-inference` pods and what each does.
const ENDPOINTS: [(&str, AppBehaviour); 3] = [
    ("ml-inference-1", AppBehaviour::Healthy),
    ("ml-inference-2", AppBehaviour::Flaky { fail_one_in: 50 }),
    ("ml-inference-3", AppBehaviour::Slow),
];

/// One `ml-inference` pod: its app and its inbound proxy.
pub struct Endpoint {
    pub pod: &'static str,
    pub behaviour: AppBehaviour,
    pub app: AppServer,
    pub proxy: ProxyProcess,
}

impl Endpoint {
    /// The address other proxies send to (the inbound proxy's listener).
    pub fn target_addr(&self) -> SocketAddr {
        self.proxy.addrs().inbound
    }
}

/// A running demo mesh. Dropping it kills every proxy and removes the config dir;
/// [`Mesh::shutdown`] does that gracefully.
pub struct Mesh {
    pub endpoints: Vec<Endpoint>,
    /// The client workload's proxy; the load generator sends through its outbound listener.
    pub client_proxy: ProxyProcess,
    /// The client's and the service's mTLS identities.
    pub identities: (String, String),
    // Last, so the directories outlive the proxies watching them when dropped.
    config_dir: TempDir,
    identity_dir: TempDir,
}

impl Mesh {
    /// Starts the apps and proxies; `progress` hears about each step.
    pub async fn start(progress: &dyn Fn(&str)) -> Result<Mesh> {
        let config_dir = tempfile::Builder::new()
            .prefix("pylon-demo-")
            .tempdir()
            .context("creating the demo's config dir")?;

        let identity_dir = tempfile::Builder::new()
            .prefix("pylon-demo-identity-")
            .tempdir()
            .context("creating the demo's identity dir")?;
        let ca_dir = identity_dir.path().join("ca");
        ca::init_ca(
            NAMESPACE_TRUST_DOMAIN,
            &ca_dir,
            Duration::from_secs(24 * 3600),
        )
        .context("creating the demo's CA")?;
        let issue = |sa: &str| -> Result<(std::path::PathBuf, String)> {
            let dir = identity_dir.path().join(sa);
            let (cert, _) = ca::issue(&ca_dir, sa, NAMESPACE, &dir, Duration::from_secs(3600))
                .with_context(|| format!("issuing the identity of {sa}"))?;
            Ok((dir, cert.identity.as_str().to_owned()))
        };
        let (server_identity_dir, server_identity) = issue(SERVICE)?;
        let (client_identity_dir, client_identity) = issue(CLIENT_APP)?;
        progress(&format!(
            "issued identities {server_identity} and {client_identity} from a new CA"
        ));

        let mut endpoints = Vec::with_capacity(ENDPOINTS.len());
        for (pod, behaviour) in ENDPOINTS {
            let app = AppServer::start(pod, behaviour).await?;
            progress(&format!(
                "started app {pod} on {} ({})",
                app.addr(),
                behaviour.describe()
            ));
            let proxy = ProxyProcess::spawn(ProxySpec {
                pod,
                workload: "deployment/ml-inference",
                namespace: NAMESPACE,
                config_dir: config_dir.path(),
                inbound_forward: Some(app.addr()),
                identity_dir: &server_identity_dir,
            })
            .await?;
            progress(&format!(
                "started the inbound proxy of {pod} on {} (admin {})",
                proxy.addrs().inbound,
                proxy.addrs().admin
            ));
            endpoints.push(Endpoint {
                pod,
                behaviour,
                app,
                proxy,
            });
        }

        let objects: Vec<EndpointObject> = endpoints
            .iter()
            .map(|e| EndpointObject {
                pod: e.pod,
                addr: e.target_addr(),
            })
            .collect();
        let yaml = mesh_config::render(
            SERVICE,
            NAMESPACE,
            SERVICE_PORT,
            &objects,
            Some(&server_identity),
        );
        let file = mesh_config::write(config_dir.path(), mesh_config::FILE_NAME, &yaml)?;
        progress(&format!(
            "wrote Service {SERVICE}, its ServiceProfile and {} EndpointSlices to {}",
            objects.len(),
            file.display()
        ));

        let client_proxy = ProxyProcess::spawn(ProxySpec {
            pod: CLIENT_POD,
            workload: CLIENT_WORKLOAD,
            namespace: NAMESPACE,
            config_dir: config_dir.path(),
            inbound_forward: None,
            identity_dir: &client_identity_dir,
        })
        .await?;
        progress(&format!(
            "started the outbound proxy of {CLIENT_POD} on {} (admin {})",
            client_proxy.addrs().outbound,
            client_proxy.addrs().admin
        ));
        let mut pods = vec![PodObject {
            pod: CLIENT_POD,
            app: CLIENT_APP,
            admin: client_proxy.addrs().admin,
        }];
        pods.extend(endpoints.iter().map(|e| PodObject {
            pod: e.pod,
            app: SERVICE,
            admin: e.proxy.addrs().admin,
        }));
        mesh_config::write(
            config_dir.path(),
            mesh_config::PODS_FILE_NAME,
            &mesh_config::render_pods(NAMESPACE, &pods),
        )?;

        Ok(Mesh {
            endpoints,
            client_proxy,
            identities: (client_identity, server_identity),
            config_dir,
            identity_dir,
        })
    }

    pub fn config_dir(&self) -> &Path {
        self.config_dir.path()
    }

    /// `Some(description)` if any proxy has exited on its own.
    pub fn exited_proxy(&mut self) -> Option<String> {
        if let Some(exited) = self.client_proxy.exited() {
            return Some(exited);
        }
        self.endpoints.iter_mut().find_map(|e| e.proxy.exited())
    }

    /// Stops everything in order: the client's proxy (no new traffic), the endpoints' proxies,
    /// the apps, then removes the config dir. Everything is stopped even if a step fails; the
    /// returned list says what did not stop cleanly.
    pub async fn shutdown(self) -> Vec<String> {
        let Mesh {
            endpoints,
            client_proxy,
            config_dir,
            identity_dir,
            ..
        } = self;
        let mut problems = Vec::new();
        if let Err(e) = client_proxy.shutdown().await {
            problems.push(format!("{e:#}"));
        }
        let mut apps = Vec::with_capacity(endpoints.len());
        let mut stopping = JoinSet::new();
        for endpoint in endpoints {
            stopping.spawn(endpoint.proxy.shutdown());
            apps.push(endpoint.app);
        }
        // Each shutdown is bounded (graceful, then SIGTERM, then SIGKILL); this bounds a hung
        // task too.
        let all = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(stopped) = stopping.join_next().await {
                match stopped {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => problems.push(format!("{e:#}")),
                    Err(e) => problems.push(format!("stopping a proxy: {e}")),
                }
            }
        })
        .await;
        if all.is_err() {
            // Dropping the JoinSet aborts the tasks; their children are killed on drop.
            problems.push("stopping the endpoints' proxies timed out; killed them".to_owned());
        }
        drop(stopping);
        drop(apps);
        for dir in [config_dir, identity_dir] {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
        problems
    }
}
