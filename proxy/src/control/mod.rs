//! Clients of the control plane, over Linkerd's proxy API: with `--destination-addr` a
//! destination's endpoints and routes come from `Destination.Get`/`GetProfile`, and with
//! `--policy-addr` a port's inbound policy from `InboundServerPolicies.WatchPort`, instead of a
//! config dir. The controller may be Pylon's or Linkerd's.
//!
//! Every subscription is lazy (opened when a destination or port is first used) and
//! [`follow`]ed: when its stream fails or ends it is reopened with jittered exponential backoff,
//! and meanwhile the destination keeps the last state it received, so losing the controller
//! never stops traffic that was flowing. Each loss is logged and counted in
//! `control_plane_stream_errors_total`, and `control_plane_streams{state}` says how many
//! subscriptions are running on stale state.

pub mod destination;
pub mod policy;

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::inbound::inbound_server_policies_client::InboundServerPoliciesClient;
use pylon_proxy_metrics::{ControlPlaneMetrics, Metrics};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// First retry delay after a stream fails; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often an idle subscription checks that its destination is still in use.
const LIVENESS_CHECK: Duration = Duration::from_secs(30);

/// The control plane's APIs this proxy uses, with what it tells them about itself.
pub struct ControlPlane {
    pub destination: Option<DestinationClient<Channel>>,
    pub policy: Option<InboundServerPoliciesClient<Channel>>,
    /// Sent with every destination lookup (Linkerd's `LINKERD2_PROXY_DESTINATION_CONTEXT`):
    /// the client's namespace decides whose ServiceProfile wins.
    pub context_token: String,
    /// This pod, as `WatchPort` names it (`{"ns":NS,"pod":POD}`).
    pub workload: String,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid control plane address {addr:?}: {reason}")]
pub struct AddrError {
    addr: String,
    reason: String,
}

impl ControlPlane {
    /// Connections are made lazily (and remade by the channel when lost), so a controller
    /// that is not up yet does not stop the proxy from starting.
    pub fn new(
        destination_addr: Option<&str>,
        policy_addr: Option<&str>,
        context_token: String,
        workload: String,
        metrics: Arc<Metrics>,
    ) -> Result<ControlPlane, AddrError> {
        Ok(ControlPlane {
            destination: destination_addr
                .map(channel)
                .transpose()?
                .map(DestinationClient::new),
            policy: policy_addr
                .map(channel)
                .transpose()?
                .map(InboundServerPoliciesClient::new),
            context_token,
            workload,
            metrics,
        })
    }
}

/// A lazily connected h2 channel to `host:port` (a name is resolved at each connect, so a
/// headless Service's new pods are found).
fn channel(addr: &str) -> Result<Channel, AddrError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| AddrError {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3))
        .connect_lazy())
}

/// Jittered exponential backoff: each delay is half to all of the current step.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { step: MIN_BACKOFF }
    }

    pub(crate) fn reset(&mut self) {
        self.step = MIN_BACKOFF;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(MAX_BACKOFF);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// Where one subscription stands, kept in the gauges; dropping it takes it out of them.
struct StreamState {
    metrics: ControlPlaneMetrics,
    connected: bool,
    disconnected: bool,
}

impl StreamState {
    fn set(&mut self, connected: bool, disconnected: bool) {
        if connected != self.connected {
            if connected {
                self.metrics.connected.inc();
            } else {
                self.metrics.connected.dec();
            }
            self.connected = connected;
        }
        if disconnected != self.disconnected {
            if disconnected {
                self.metrics.disconnected.inc();
            } else {
                self.metrics.disconnected.dec();
            }
            self.disconnected = disconnected;
        }
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.set(false, false);
    }
}

/// What [`follow`] reports besides messages.
pub(crate) enum Event<T> {
    Message(T),
    /// The stream failed before its first message, or after it: the subscriber keeps its
    /// last state (or, without one, falls back) while it is reopened.
    Failed {
        first: bool,
    },
}

/// Opens a stream with `open` and hands each message to `on_event`, reopening it with
/// backoff whenever it fails or ends, until `on_event` breaks or `alive` says the subscriber
/// is gone.
pub(crate) async fn follow<T, O, F>(
    api: &'static str,
    target: &str,
    metrics: &Metrics,
    mut open: O,
    mut on_event: impl FnMut(Event<T>) -> ControlFlow<()>,
    alive: impl Fn() -> bool,
) where
    O: FnMut() -> F,
    F: Future<Output = Result<tonic::Response<Streaming<T>>, Status>>,
{
    let mut state = StreamState {
        metrics: metrics.control_plane(api),
        connected: false,
        disconnected: false,
    };
    let mut backoff = Backoff::new();
    let mut received_any = false;
    loop {
        let error = match open().await {
            Err(status) => status,
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        _ = tokio::time::sleep(LIVENESS_CHECK) => {
                            if !alive() { return }
                            continue;
                        }
                    };
                    match next {
                        Ok(Some(message)) => {
                            if state.disconnected {
                                tracing::info!(api, target, "control plane stream restored");
                            }
                            state.set(true, false);
                            backoff.reset();
                            received_any = true;
                            if on_event(Event::Message(message)).is_break() || !alive() {
                                return;
                            }
                        }
                        Ok(None) => break Status::unavailable("the stream ended"),
                        Err(status) => break status,
                    }
                }
            }
        };
        if !alive() {
            return;
        }
        state.metrics.errors.inc();
        state.set(false, true);
        let delay = backoff.next_delay();
        crate::warn_limited!(
            "control_plane_stream_failed",
            api,
            target,
            code = %error.code(),
            error = %error.message(),
            retry_in_ms = delay.as_millis() as u64,
            "control plane stream failed; keeping the last state and retrying"
        );
        if on_event(Event::Failed {
            first: !received_any,
        })
        .is_break()
        {
            return;
        }
        tokio::time::sleep(delay).await;
        if !alive() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let mut step = MIN_BACKOFF;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} for step {step:?}");
            step = (step * 2).min(MAX_BACKOFF);
        }
        assert!(b.next_delay() <= MAX_BACKOFF);
        b.reset();
        assert!(b.next_delay() <= MIN_BACKOFF);
    }
}
