//! Loop prevention, part one: the proxy never connects to itself.
//!
//! A request whose destination is one of this proxy's own listeners (outbound, inbound, admin,
//! tap) would come straight back in, be proxied again, and so on until file descriptors run out:
//! `curl -x http://127.0.0.1:4140 http://127.0.0.1:4140/` once opened 17,600 of them. Any client
//! can name such a destination (h2load's default `Host` does), and so can a misconfigured
//! EndpointSlice or an SSRF in the app. So every connection the proxy opens (`tcp::connect`)
//! first checks whether its address is one of ours (on any local address of the host, for a
//! listener bound to the unspecified address) and refuses it: the client gets
//! `pylon-proxy-error: loop detected` (as Linkerd refuses outbound connections to its inbound
//! port). The check compares ports first, so it costs nothing for other destinations.
//!
//! Chains of proxies that forward to each other are caught by the hop limit (`http::hops`).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::OnceLock;

/// This process's listening addresses, set once at start-up after binding (unit tests run
/// without: nothing is a loop).
static OWN_LISTENERS: OnceLock<Vec<SocketAddr>> = OnceLock::new();

/// Records the addresses the proxy listens on (as bound: port 0 already resolved).
pub fn set_own_listeners(addrs: Vec<SocketAddr>) {
    let _ = OWN_LISTENERS.set(addrs);
}

/// Whether connecting to `target` would reach one of this proxy's own listeners.
pub fn is_own_listener(target: SocketAddr) -> bool {
    OWN_LISTENERS
        .get()
        .is_some_and(|own| reaches_any(own, target, is_local_ip))
}

fn reaches_any(own: &[SocketAddr], target: SocketAddr, is_local: impl Fn(IpAddr) -> bool) -> bool {
    let ip = target.ip().to_canonical();
    own.iter().filter(|l| l.port() == target.port()).any(|l| {
        let listener = l.ip().to_canonical();
        // Connecting to 0.0.0.0 or :: reaches the host itself.
        listener == ip
            || (ip.is_unspecified() && (listener.is_loopback() || listener.is_unspecified()))
            || (listener.is_unspecified()
                    // A dual-stack [::] listener takes IPv4 too; 0.0.0.0 takes only IPv4.
                    && (listener.is_ipv6() || ip.is_ipv4())
                    && is_local(ip))
    })
}

/// Whether `ip` is one of this host's addresses: loopback, or bindable (the kernel lets a
/// socket bind only to a local address). Called only when the port is one of ours.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_listeners_are_loops_on_every_local_address() {
        let own = [
            addr("127.0.0.1:4140"),
            addr("0.0.0.0:4143"),
            addr("[::]:4191"),
        ];
        let local = |ip: IpAddr| ip.is_loopback() || ip == "10.1.2.3".parse::<IpAddr>().unwrap();
        let loops = |t: &str| reaches_any(&own, addr(t), local);
        // The outbound listener, as dialled and through 0.0.0.0.
        assert!(loops("127.0.0.1:4140"));
        assert!(loops("0.0.0.0:4140"));
        assert!(loops("[::ffff:127.0.0.1]:4140"));
        // Bound to 127.0.0.1 only: another address with that port is someone else.
        assert!(!loops("127.0.0.2:4140"));
        assert!(!loops("10.1.2.3:4140"));
        // The inbound listener on 0.0.0.0: any local IPv4 address.
        assert!(loops("10.1.2.3:4143"));
        assert!(loops("127.0.0.5:4143"));
        assert!(!loops("10.9.9.9:4143"), "not a local address");
        assert!(!loops("[::1]:4143"), "0.0.0.0 doesn't take IPv6");
        // A dual-stack listener takes both families.
        assert!(loops("[::1]:4191"));
        assert!(loops("10.1.2.3:4191"));
        // Other ports are never loops.
        assert!(!loops("127.0.0.1:8080"));
    }

    #[test]
    fn the_host_s_own_addresses_are_local() {
        assert!(is_local_ip("127.0.0.1".parse().unwrap()));
        assert!(is_local_ip("::1".parse().unwrap()));
        // TEST-NET-3 is never assigned to a host.
        assert!(!is_local_ip("203.0.113.7".parse().unwrap()));
    }
}
