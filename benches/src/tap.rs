//! Tap clients for the telemetry-cost row: Linkerd's tap API, read as fast as events come.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use linkerd2_proxy_api::tap::tap_client::TapClient;
use linkerd2_proxy_api::tap::ObserveRequest;
use tokio::task::JoinHandle;

/// Open taps on some proxies, each read by its own task.
pub struct Taps {
    received: Arc<AtomicU64>,
    readers: Vec<JoinHandle<()>>,
}

impl Taps {
    /// Taps every request on each proxy (up to `max_rps` sampled per second and tap).
    pub async fn open(addrs: &[SocketAddr], max_rps: u32) -> Result<Taps> {
        let received = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        for addr in addrs {
            let mut client = TapClient::connect(format!("http://{addr}"))
                .await
                .with_context(|| format!("connecting to the tap port {addr}"))?;
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
            let received = received.clone();
            readers.push(tokio::spawn(async move {
                while let Ok(Some(_)) = stream.message().await {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Ok(Taps { received, readers })
    }

    /// Closes the taps; returns how many events arrived.
    pub fn close(self) -> u64 {
        for r in &self.readers {
            r.abort();
        }
        self.received.load(Ordering::Relaxed)
    }
}
