//! Tap clients for the telemetry-cost row: Linkerd's tap API, read as fast as events come.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::ObserveRequest;
use tokio::task::JoinHandle;

/// Open taps on some proxies, each read by its own task (or, stalled, never read).
pub struct Taps {
    received: Arc<AtomicU64>,
    readers: Vec<JoinHandle<()>>,
    stalled: Vec<tonic::codec::Streaming<linkerd2_proxy_api::tap::TapEvent>>,
}

impl Taps {
    /// Taps every request on each proxy (up to `max_rps` sampled per second and tap).
    pub async fn open(addrs: &[SocketAddr], max_rps: u32) -> Result<Taps> {
        Self::open_with(addrs, max_rps, false).await
    }

    /// Taps every request on each proxy and never reads: a client that has stalled (its h2
    /// window kept small, so the proxy's queue fills at once).
    pub async fn open_stalled(addrs: &[SocketAddr]) -> Result<Taps> {
        Self::open_with(addrs, u32::MAX, true).await
    }

    async fn open_with(addrs: &[SocketAddr], max_rps: u32, stall: bool) -> Result<Taps> {
        let received = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        let mut stalled = Vec::new();
        for addr in addrs {
            let window = stall.then_some(16 * 1024);
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .context("tap endpoint")?
                .initial_stream_window_size(window)
                .initial_connection_window_size(window)
                .connect()
                .await
                .with_context(|| format!("connecting to the tap port {addr}"))?;
            let mut client = TapClient::new(channel);
            let mut req = tonic::Request::new(ObserveRequest::default());
            req.metadata_mut().insert(
                "pylon-tap-max-rps",
                max_rps.to_string().parse().context("max rps header")?,
            );
            let mut stream = client
                .observe(req)
                .await
                .with_context(|| format!("opening a tap on {addr}"))?
                .into_inner();
            if stall {
                stalled.push(stream);
                continue;
            }
            let received = received.clone();
            readers.push(tokio::spawn(async move {
                while let Ok(Some(_)) = stream.message().await {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Ok(Taps {
            received,
            readers,
            stalled,
        })
    }

    /// Closes the taps; returns how many events arrived.
    pub fn close(self) -> u64 {
        for r in &self.readers {
            r.abort();
        }
        drop(self.stalled);
        self.received.load(Ordering::Relaxed)
    }
}
