//! Inbound authorization: who may connect to which port of this workload, from the
//! `policy.linkerd.io` objects of the config dir and `--default-policy`, or, with
//! `--policy-addr`, from the control plane, port by port (`--inbound-ports` are subscribed at
//! start and `/ready` waits for them; any other port on its first connection, with the default
//! policy until the answer comes).
//!
//! The policy is rebuilt once per config change and read lock-free. A connection is decided
//! when it is accepted (its client, TLS identity and port can't change) and its metric
//! counters resolved then; an HTTP request on it only compares the policy's generation and
//! bumps a counter, and is decided again only after the policy changed, so a change applies
//! to the next request even on a kept-alive connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use pylon_proxy_metrics::{AuthzCounter, AuthzLabels, EventCounter, Metrics, Tls};
use pylon_proxy_policy::{
    ClientInfo, InboundConfig, InboundPolicy, PortPolicy, ProxyProtocol, Snapshot, Store,
};

use crate::args::ProxyArgs;
use crate::control::ControlPlane;

pub struct InboundAuthz {
    namespace: String,
    labels: BTreeMap<String, String>,
    config: InboundConfig,
    policy: ArcSwap<InboundPolicy>,
    /// Bumped after every policy update: requests on older decisions decide again.
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    /// With `--policy-addr`: the policies the control plane sent, by port.
    remote: Option<RemotePolicies>,
    me: Weak<InboundAuthz>,
}

struct RemotePolicies {
    control: Arc<ControlPlane>,
    ports: ArcSwap<HashMap<u16, PortPolicy>>,
    /// Ports subscribed to (each once).
    followed: Mutex<HashSet<u16>>,
    /// `--inbound-ports`: ready once each has its first policy.
    required: Vec<u16>,
}

/// A connection's client, as authorization sees it.
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// Mesh TLS was terminated for this connection.
    pub tls: bool,
    /// The client's verified identity (mesh TLS with a certificate).
    pub id: Option<Arc<str>>,
}

impl Client {
    pub fn plain(addr: SocketAddr) -> Client {
        Client {
            addr,
            tls: false,
            id: None,
        }
    }

    /// The `tls`/`client_id` labels of this client's traffic (Linkerd's `no_tls_from_remote`
    /// when it sent plaintext).
    pub fn tls_label(&self) -> Tls {
        match (&self.id, self.tls) {
            (Some(id), true) => Tls::ClientId(id.clone()),
            (None, true) => Tls::Secured,
            _ => Tls::NoIdentity("no_tls_from_remote"),
        }
    }
}

/// One connection's decision and the counters to record it with.
pub struct Decision {
    pub allowed: bool,
    labels: AuthzLabels,
    metrics: Arc<Metrics>,
}

impl Decision {
    /// The counter for this decision on HTTP requests (resolved once per connection).
    pub fn http_counter(&self) -> EventCounter {
        let kind = if self.allowed {
            AuthzCounter::HttpAllow
        } else {
            AuthzCounter::HttpDeny
        };
        self.metrics.authz_counter(kind, &self.labels)
    }

    /// Counts the connection as TCP.
    pub fn count_tcp(&self) {
        let kind = if self.allowed {
            AuthzCounter::TcpAllow
        } else {
            AuthzCounter::TcpDeny
        };
        self.metrics.authz_counter(kind, &self.labels).inc();
    }
}

impl InboundAuthz {
    pub fn new(
        args: &ProxyArgs,
        store: &Arc<Store>,
        trust_domain: &str,
        metrics: Arc<Metrics>,
        control: Option<Arc<ControlPlane>>,
    ) -> Arc<InboundAuthz> {
        let mut config = InboundConfig::with_trust_domain(trust_domain);
        config.default_policy = args.default_policy;
        if !args.cluster_networks.is_empty() {
            config.cluster_networks = args.cluster_networks.clone();
        }
        let labels: BTreeMap<String, String> = args.workload_labels.iter().cloned().collect();
        let policy = store
            .snapshot()
            .inbound_policy(&args.namespace, &labels, &config);
        let remote = control
            .filter(|c| c.policy.is_some())
            .map(|control| RemotePolicies {
                control,
                ports: ArcSwap::from_pointee(HashMap::new()),
                followed: Mutex::new(HashSet::new()),
                required: args.inbound_ports.clone(),
            });
        let this = Arc::new_cyclic(|me| InboundAuthz {
            namespace: args.namespace.clone(),
            labels,
            config,
            policy: ArcSwap::new(policy),
            generation: AtomicU64::new(0),
            metrics,
            remote,
            me: me.clone(),
        });
        this.spawn_updates(store);
        if let Some(remote) = &this.remote {
            for port in &remote.required {
                this.follow_port(remote, *port);
            }
        }
        this
    }

    /// Subscribes to `port`'s policy on the control plane, once.
    fn follow_port(&self, remote: &RemotePolicies, port: u16) {
        let first = remote
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
        if first {
            tokio::spawn(crate::control::policy::follow_port(
                self.me.clone(),
                remote.control.clone(),
                port,
            ));
        }
    }

    /// The control plane's policy for `port` (each answer, as it comes).
    pub(crate) fn set_port_policy(&self, port: u16, policy: PortPolicy) {
        let Some(remote) = &self.remote else { return };
        tracing::info!(
            port,
            server = policy.server_name(),
            protocol = policy.protocol().as_str(),
            "inbound policy from the control plane"
        );
        remote.ports.rcu(|ports| {
            let mut ports = HashMap::clone(ports);
            ports.insert(port, policy.clone());
            ports
        });
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether every `--inbound-ports` port has its policy (always, without a control plane).
    pub fn is_ready(&self) -> bool {
        match &self.remote {
            None => true,
            Some(remote) => {
                let ports = remote.ports.load();
                remote.required.iter().all(|p| ports.contains_key(p))
            }
        }
    }

    /// `port`'s policy: the control plane's, else the Store's (or the default policy).
    fn port_policy(&self, port: u16) -> PortPolicy {
        if let Some(remote) = &self.remote {
            if let Some(policy) = remote.ports.load().get(&port) {
                return policy.clone();
            }
            // Until the control plane answers, the default policy decides, as it does for a
            // proxy without one.
            self.follow_port(remote, port);
        }
        self.policy.load().for_port(port)
    }

    /// Policy changes apply to connections accepted after them.
    fn spawn_updates(self: &Arc<Self>, store: &Arc<Store>) {
        let mut rx = store.subscribe();
        let this: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let snapshot: Arc<Snapshot> = rx.borrow_and_update().clone();
                let Some(this) = this.upgrade() else { return };
                let policy = snapshot.inbound_policy(&this.namespace, &this.labels, &this.config);
                // Most config changes (endpoints, routes) leave the policy as it was: then
                // every connection's decision still holds and nothing is decided again.
                if *policy != **this.policy.load() {
                    this.policy.store(policy);
                    this.generation.fetch_add(1, Ordering::Release);
                }
            }
        });
    }

    /// Which policy version decisions are made on (see [`ConnectionAuthz`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What the Server on `port` declares it speaks (`Unknown` when nothing declares it).
    pub fn declared_protocol(&self, port: u16) -> ProxyProtocol {
        self.port_policy(port).protocol()
    }

    /// Decides `client` on `port` and logs the decision (denials and allows at info, as
    /// Linkerd does; allows only at debug for the default all-unauthenticated policy, which
    /// allows everything and would log every connection).
    pub fn decide(&self, port: u16, client: &Client, target_addr: &Arc<str>) -> Decision {
        let policy = self.port_policy(port);
        // (`authorize` takes an IPv4-mapped peer as IPv4 itself.)
        let a = policy.authorize(&ClientInfo {
            peer: client.addr.ip(),
            tls: client.tls,
            identity: client.id.as_deref(),
        });
        let server = format_args!("{}/{}", a.srv_kind, a.srv_name);
        if !a.allowed {
            tracing::info!(client = %client.addr, client_id = client.id.as_deref(), tls = client.tls, port, %server, "connection denied by policy");
        } else if a.srv_kind == "default" && a.srv_name == "all-unauthenticated" {
            tracing::debug!(client = %client.addr, client_id = client.id.as_deref(), port, %server, "connection allowed");
        } else {
            let authz = format_args!("{}/{}", a.authz_kind, a.authz_name);
            tracing::info!(client = %client.addr, client_id = client.id.as_deref(), tls = client.tls, port, %server, %authz, "connection allowed by policy");
        }
        let s = |v: &str| -> Arc<str> { Arc::from(v) };
        Decision {
            allowed: a.allowed,
            labels: AuthzLabels {
                target_addr: target_addr.clone(),
                srv_port: port,
                server: (s(a.srv_group), s(a.srv_kind), s(a.srv_name)),
                authz: a
                    .allowed
                    .then(|| (s(a.authz_group), s(a.authz_kind), s(a.authz_name))),
                tls: client.tls_label(),
            },
            metrics: self.metrics.clone(),
        }
    }
}

/// One HTTP connection's authorization, checked per request: the connection's decision until
/// the policy changes, then decided again (and counted under the new decision's labels).
pub struct ConnectionAuthz {
    authz: Arc<InboundAuthz>,
    port: u16,
    client: Client,
    target_label: Arc<str>,
    current: ArcSwap<Current>,
}

struct Current {
    generation: u64,
    allowed: bool,
    counter: EventCounter,
}

impl ConnectionAuthz {
    /// `decision` was made on `generation` (read before deciding, so a change in between
    /// only makes the first request decide again).
    pub fn new(
        authz: Arc<InboundAuthz>,
        generation: u64,
        port: u16,
        client: Client,
        target_label: Arc<str>,
        decision: &Decision,
    ) -> Arc<ConnectionAuthz> {
        Arc::new(ConnectionAuthz {
            authz,
            port,
            client,
            target_label,
            current: ArcSwap::from_pointee(Current {
                generation,
                allowed: decision.allowed,
                counter: decision.http_counter(),
            }),
        })
    }

    /// Whether this request may go on; counted either way.
    /// The client connected over mesh TLS.
    pub fn client_tls(&self) -> bool {
        self.client.tls
    }

    pub fn check_request(&self) -> bool {
        let generation = self.authz.generation();
        let current = self.current.load();
        if current.generation == generation {
            current.counter.inc();
            return current.allowed;
        }
        let decision = self
            .authz
            .decide(self.port, &self.client, &self.target_label);
        let next = Current {
            generation,
            allowed: decision.allowed,
            counter: decision.http_counter(),
        };
        next.counter.inc();
        let allowed = next.allowed;
        self.current.store(Arc::new(next));
        allowed
    }
}
