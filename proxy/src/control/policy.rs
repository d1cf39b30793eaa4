//! A port's inbound policy followed on the control plane (`InboundServerPolicies.WatchPort`):
//! each answer replaces the port's policy in [`InboundAuthz`]; a lost stream keeps the last one.

use std::ops::ControlFlow;
use std::sync::{Arc, Weak};

use linkerd2_proxy_api::inbound::PortSpec;
use pylon_proxy_policy::PortPolicy;

use super::{follow, ControlPlane, Event};
use crate::authz::InboundAuthz;

/// Follows `port`'s policy until `authz` is gone.
pub(crate) async fn follow_port(authz: Weak<InboundAuthz>, control: Arc<ControlPlane>, port: u16) {
    let Some(client) = control.policy.clone() else {
        return;
    };
    let spec = PortSpec {
        workload: control.workload.clone(),
        port: u32::from(port),
    };
    let target = format!("port {port}");
    let alive = authz.clone();
    follow(
        "policy",
        &target,
        &control.metrics,
        || {
            let (mut client, spec) = (client.clone(), spec.clone());
            async move { client.watch_port(spec).await }
        },
        |event| {
            let Some(authz) = authz.upgrade() else {
                return ControlFlow::Break(());
            };
            if let Event::Message(server) = event {
                match PortPolicy::from_proto(port, &server) {
                    Ok(policy) => authz.set_port_policy(port, policy),
                    Err(error) => {
                        crate::warn_limited!("control_plane_bad_policy", port, %error, "unusable policy from the control plane; keeping the last one");
                    }
                }
            }
            ControlFlow::Continue(())
        },
        || alive.strong_count() > 0,
    )
    .await;
}
