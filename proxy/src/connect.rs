//! Reaching an endpoint: TCP, then mesh TLS when discovery says the endpoint is meshed.
//!
//! Whether an endpoint is meshed (and which identity it must prove) is decided once, when
//! discovery builds the endpoint; every connection to it (h2, HTTP/1 for upgrades, opaque TCP)
//! then goes through the same [`Connect`]. A meshed endpoint is never reached in plaintext: a
//! failed handshake is a failed connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pylon_identity::rustls::{self, AlertDescription, CertificateError};
use pylon_identity::tokio_rustls::client::TlsStream;
use pylon_proxy_metrics::{TcpConnMetrics, TcpTarget};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::CountingIo;
use crate::mesh_tls::{Alpn, MeshTls};
use crate::names::EndpointNames;
use crate::tcp::{self, ConnectError};

/// How to open connections to one endpoint.
pub struct Connect {
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<ServerTls>,
    /// Where its connections are counted (`tcp_*{peer="dst"}`), when they are.
    tcp: Option<TcpTarget>,
    /// Its pod and workload, for the logs.
    names: Arc<EndpointNames>,
}

/// The mesh TLS an endpoint is reached with: this proxy's credentials, and the identity the
/// endpoint's certificate must carry.
struct ServerTls {
    mesh: Arc<MeshTls>,
    server_id: Arc<str>,
}

impl Connect {
    /// Plain TCP (an endpoint discovery knows no identity for, or the app inbound).
    pub fn plain(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            tls: None,
            tcp: None,
            names: EndpointNames::unknown(),
        }
    }

    /// TCP, then mesh TLS requiring the server to prove `server_id`.
    pub fn meshed(
        addr: SocketAddr,
        timeout: Duration,
        mesh: Arc<MeshTls>,
        server_id: Arc<str>,
    ) -> Self {
        Self {
            addr,
            timeout,
            tls: Some(ServerTls { mesh, server_id }),
            tcp: None,
            names: EndpointNames::unknown(),
        }
    }

    /// Discovery's names for the endpoint, for the logs.
    pub fn named(mut self, names: Arc<EndpointNames>) -> Self {
        self.names = names;
        self
    }

    pub fn names(&self) -> &Arc<EndpointNames> {
        &self.names
    }

    /// Counts every connection (HTTP pools, the h2 connection, opaque TCP) in `tcp`.
    pub fn counted(mut self, tcp: TcpTarget) -> Self {
        self.tcp = Some(tcp);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The identity the endpoint must prove, when it is meshed.
    pub fn server_id(&self) -> Option<&Arc<str>> {
        self.tls.as_ref().map(|t| &t.server_id)
    }

    /// A new connection; over mesh TLS (announcing `alpn`) when the endpoint is meshed;
    /// counted when this `Connect` is.
    pub async fn connect(&self, alpn: Alpn) -> Result<EndpointIo, ConnectError> {
        let Some(tcp) = &self.tcp else {
            return Ok(EndpointIo::new(self.open(alpn).await?, None));
        };
        let conn = tcp.open();
        match self.open(alpn).await {
            Ok(io) => Ok(EndpointIo::new(io, Some(conn))),
            Err(e) => {
                conn.close(Some(e.errno()));
                Err(e)
            }
        }
    }

    async fn open(&self, alpn: Alpn) -> Result<Transport, ConnectError> {
        let stream = tcp::connect(self.addr, self.timeout).await?;
        let Some(tls) = &self.tls else {
            return Ok(Transport::Plain(stream));
        };
        match tls.mesh.connect(stream, &tls.server_id, alpn).await {
            Ok(stream) => Ok(Transport::Tls(Box::new(stream))),
            Err(error) => {
                let failure = TlsFailure::of_io(&error).unwrap_or(TlsFailure::Other);
                crate::warn_limited!(
                    "mesh_tls_failed",
                    destination = self.names.destination(),
                    endpoint = %self.addr,
                    endpoint_pod = self.names.pod(),
                    endpoint_workload = self.names.workload(),
                    endpoint_namespace = self.names.namespace(),
                    server_id = %tls.server_id,
                    error = %error,
                    "mesh TLS handshake failed: {}",
                    failure.describe()
                );
                Err(ConnectError::Tls {
                    addr: self.addr,
                    server_id: tls.server_id.clone(),
                    failure,
                    error,
                })
            }
        }
    }
}

/// A connection to an endpoint, counted into its `tcp_*` metrics when its [`Connect`] is. One
/// type, so the h1 pool and the h2 connection need no generics or boxed trait objects; flat, so
/// a read is one match and not a call through a box per layer (it is read and written on every
/// request).
pub type EndpointIo = CountingIo<Transport, Option<TcpConnMetrics>>;

/// Plain TCP, or mesh TLS. The TLS stream is boxed: it is large and most endpoints aren't
/// meshed.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl EndpointIo {
    /// Whether an idle connection is still open and quiet: the endpoint has neither closed it
    /// nor sent anything (an idle HTTP/1 server has nothing to say). Only plain TCP can tell
    /// without reading; a TLS connection is never taken for quiet.
    pub fn is_open_and_quiet(&mut self) -> bool {
        match self.get_mut() {
            Transport::Plain(stream) => {
                // Peeked, not read: nothing is taken, and no one waits to be woken.
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                stream.poll_peek(&mut cx, &mut buf).is_pending()
            }
            Transport::Tls(_) => false,
        }
    }

    /// Whether it is mesh TLS (then [`is_open_and_quiet`](Self::is_open_and_quiet) can't tell).
    pub fn is_tls(&self) -> bool {
        matches!(self.get_ref(), Transport::Tls(_))
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why mesh TLS to an endpoint failed: a fixed vocabulary, since it becomes the
/// `pylon-proxy-error` header and the `error` metric label (the details, with the expected
/// identity, go to the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The endpoint's certificate is valid but for another identity.
    WrongIdentity,
    /// The endpoint's certificate doesn't chain to this proxy's trust anchor.
    UnknownCa,
    /// The endpoint's certificate is expired or not yet valid.
    CertificateNotValidNow,
    /// The endpoint refused this proxy's certificate (or the handshake) with an alert.
    Refused,
    /// What came back was not TLS: the endpoint isn't meshed, or its proxy has another
    /// identity (a proxy passes TLS for a name not its own through to its app, as Linkerd's
    /// does, so the app's bytes come back).
    NotTls,
    TimedOut,
    Other,
}

impl TlsFailure {
    /// The `pylon-proxy-error` value.
    pub fn reason(self) -> &'static str {
        match self {
            Self::WrongIdentity => {
                "mesh TLS handshake failed: endpoint certificate is not for the expected identity"
            }
            Self::UnknownCa => {
                "mesh TLS handshake failed: endpoint certificate is not from a trusted CA"
            }
            Self::CertificateNotValidNow => {
                "mesh TLS handshake failed: endpoint certificate is expired or not yet valid"
            }
            Self::Refused => "mesh TLS handshake failed: endpoint refused the client identity",
            Self::NotTls => "mesh TLS handshake failed: no TLS answer for the expected identity",
            Self::TimedOut => "mesh TLS handshake timed out",
            Self::Other => "mesh TLS handshake failed",
        }
    }

    /// For the log line: the reason without its prefix.
    fn describe(self) -> &'static str {
        let reason = self.reason();
        reason.split_once(": ").map_or(reason, |(_, what)| what)
    }

    /// The TLS failure behind an I/O error of a TLS stream, if it is one. tokio-rustls wraps
    /// rustls errors in `InvalidData` I/O errors; `MeshTls::connect` times out with `TimedOut`.
    pub fn of_io(err: &io::Error) -> Option<Self> {
        if let Some(tls) = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(Self::of_rustls(tls));
        }
        match err.kind() {
            io::ErrorKind::TimedOut => Some(Self::TimedOut),
            _ => None,
        }
    }

    /// The TLS failure anywhere in an error's chain (hyper and h2 wrap the stream's errors).
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::of_rustls(tls));
            }
            // `io::Error::source` skips the error it wraps, so look inside.
            let io = e
                .downcast_ref::<io::Error>()
                .or_else(|| e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
            if let Some(tls) = io
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(Self::of_rustls(tls));
            }
            cur = e.source();
        }
        None
    }

    fn of_rustls(err: &rustls::Error) -> Self {
        use rustls::Error::{
            AlertReceived, InappropriateMessage, InvalidCertificate, InvalidMessage,
        };
        match err {
            InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => Self::WrongIdentity,
            InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Self::UnknownCa,
            InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Self::CertificateNotValidNow,
            AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::CertificateRequired
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied
                | AlertDescription::HandshakeFailure,
            ) => Self::Refused,
            InvalidMessage(_) | InappropriateMessage { .. } => Self::NotTls,
            _ => Self::Other,
        }
    }
}

/// Identities for unit tests: a CA, identity dirs it issues, and `MeshTls` loaded from them.
#[cfg(test)]
pub mod test_support {
    use std::sync::Arc;
    use std::time::Duration;

    use pylon_identity::ca::{Ca, ValidityWindow};
    use pylon_proxy_metrics::Metrics;

    use crate::mesh_tls::MeshTls;

    pub fn ca() -> Ca {
        let day = ValidityWindow::starting_now(Duration::from_secs(86_400)).expect("window");
        Ca::generate("cluster.local", day).expect("CA")
    }

    /// `sa`'s identity issued by `ca`, loaded (call within a Tokio runtime: it is watched).
    pub fn mesh_tls(ca: &Ca, sa: &str) -> (tempfile::TempDir, Arc<MeshTls>) {
        let day = ValidityWindow::starting_now(Duration::from_secs(86_400)).expect("window");
        let dir = tempfile::tempdir().expect("tempdir");
        ca.issue(sa, "default", day)
            .expect("issue")
            .write(dir.path())
            .expect("write identity");
        let tls = MeshTls::start(dir.path(), Metrics::new(Default::default())).expect("load");
        (dir, tls)
    }

    pub fn identity(sa: &str) -> Arc<str> {
        format!("{sa}.default.serviceaccount.identity.pylon.cluster.local").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(err: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn certificate_errors_are_named() {
        let wrong = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ));
        assert_eq!(TlsFailure::of_io(&wrong), Some(TlsFailure::WrongIdentity));
        let unknown = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert_eq!(TlsFailure::of_io(&unknown), Some(TlsFailure::UnknownCa));
        let refused = wrapped(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(TlsFailure::of_io(&refused), Some(TlsFailure::Refused));
        let plain = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(TlsFailure::of_io(&plain), None);
    }

    #[test]
    fn failures_are_found_through_wrappers() {
        // As hyper reports a stream error: the I/O error is a source, the rustls one inside it.
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(wrapped(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate,
        )));
        assert_eq!(TlsFailure::find(&err), Some(TlsFailure::Refused));
        let err = Outer(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(TlsFailure::find(&err), None);
    }

    #[test]
    fn reasons_name_tls() {
        for f in [
            TlsFailure::WrongIdentity,
            TlsFailure::UnknownCa,
            TlsFailure::CertificateNotValidNow,
            TlsFailure::Refused,
            TlsFailure::NotTls,
            TlsFailure::TimedOut,
            TlsFailure::Other,
        ] {
            assert!(f.reason().starts_with("mesh TLS"), "{f:?}");
            // A header value.
            assert!(http::HeaderValue::from_str(f.reason()).is_ok());
        }
        assert_eq!(
            TlsFailure::WrongIdentity.describe(),
            "endpoint certificate is not for the expected identity"
        );
    }
}
