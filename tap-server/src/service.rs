//! The gRPC side: `io.linkerd.proxy.tap.Tap/Observe` on the tap port, for authorized clients.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;

use linkerd2_proxy_api::tap::tap_server::{Tap, TapServer};
use linkerd2_proxy_api::tap::{ObserveRequest, TapEvent};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{Matcher, Taps, DEFAULT_MAX_RPS};

/// Request metadata a client may set to change how many requests per second are sampled
/// (Linkerd's API has no field for it).
pub const MAX_RPS_HEADER: &str = "pylon-tap-max-rps";

/// Who may tap: clients from these networks (loopback only unless configured) that the
/// proxy's own inbound policy, when given, also lets in.
#[derive(Clone, Debug)]
pub struct Authz {
    networks: Vec<IpNet>,
    policy: Option<PolicyCheck>,
}

/// The proxy's inbound policy for the tap port: whether a client may connect at all.
#[derive(Clone)]
pub struct PolicyCheck(pub Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>);

impl std::fmt::Debug for PolicyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyCheck")
    }
}

impl Default for Authz {
    fn default() -> Self {
        Self {
            networks: vec![
                IpNet::from(ipnet::Ipv4Net::new_assert([127, 0, 0, 0].into(), 8)),
                IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            ],
            policy: None,
        }
    }
}

impl Authz {
    /// Clients from `networks` (`10.0.0.0/8`, `192.168.1.7`), instead of loopback.
    pub fn networks(networks: &[String]) -> Result<Self, String> {
        let parsed = networks
            .iter()
            .map(|n| {
                let (ip, len) = match n.split_once('/') {
                    Some((ip, len)) => (ip, Some(len)),
                    None => (n.as_str(), None),
                };
                let ip: IpAddr = ip
                    .trim()
                    .parse()
                    .map_err(|_| format!("{n:?} is not an IP address or CIDR"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let len = match len {
                    Some(l) => l
                        .trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|l| *l <= max)
                        .ok_or_else(|| format!("{n:?}: prefix length must be 0..={max}"))?,
                    None => max,
                };
                IpNet::new(ip, len).map_err(|e| format!("{n:?}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            networks: parsed,
            policy: None,
        })
    }

    /// Also asks the proxy's inbound policy for every client.
    pub fn with_policy(mut self, check: PolicyCheck) -> Self {
        self.policy = Some(check);
        self
    }

    pub fn allows(&self, client: Option<SocketAddr>) -> bool {
        let Some(client) = client else { return false };
        if let Some(PolicyCheck(check)) = &self.policy {
            if !check(client) {
                return false;
            }
        }
        // A v4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
        let ip = client.ip().to_canonical();
        self.networks.iter().any(|net| net.contains(&ip))
    }
}

/// The `Tap` gRPC service over the proxy's [`Taps`].
pub struct TapService {
    taps: Taps,
    authz: Authz,
}

impl TapService {
    pub fn new(taps: Taps, authz: Authz) -> Self {
        Self { taps, authz }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TapEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Tap for TapService {
    type ObserveStream = EventStream;

    async fn observe(
        &self,
        req: Request<ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let client = req.remote_addr();
        if !self.authz.allows(client) {
            tracing::info!(
                client = client.map(tracing::field::display),
                "tap refused: client not authorized"
            );
            return Err(Status::permission_denied(
                "this client may not tap this proxy",
            ));
        }
        let max_rps = match req.metadata().get(MAX_RPS_HEADER) {
            None => DEFAULT_MAX_RPS,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("{MAX_RPS_HEADER} must be a positive integer"))
                })?,
        };
        let observe = req.into_inner();
        let matcher = Matcher::compile(observe.r#match)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(
            client = client.map(tracing::field::display),
            limit = observe.limit,
            max_rps,
            "tap opened"
        );
        let events = self.taps.open(matcher, u64::from(observe.limit), max_rps);
        let stream = ReceiverStream::new(events).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the tap API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    taps: Taps,
    authz: Authz,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(TapServer::new(TapService::new(taps, authz)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
