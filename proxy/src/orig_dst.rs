//! The original destination of a connection redirected by iptables (`SO_ORIGINAL_DST`).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address the client meant to reach, when iptables redirected the connection to us.
/// `None` when the connection was made to the listener directly.
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig.ok()?.as_socket()?;
    // Without a redirect the kernel reports the listener's own address.
    (orig != local).then_some(orig)
}
