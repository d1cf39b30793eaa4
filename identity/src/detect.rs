//! Is this connection TLS? Judged from its first bytes, as peeked by the proxy.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// A TLS record carrying a ClientHello.
    Tls,
    /// Certainly not a TLS ClientHello (e.g. HTTP/1.1, the h2 preface, opaque protocols).
    NotTls,
    /// Too few bytes to tell yet; peek again (with a deadline).
    NeedMore,
}

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_PLAINTEXT_RECORD: usize = 1 << 14;
const RECORD_HEADER: usize = 5;

/// Decides from the record header and the handshake type, 6 bytes at most: content type
/// 22 (handshake), version 3.x, a length in 1..=2^14, then handshake type 1 (ClientHello).
/// Never panics, whatever `buf` holds.
pub fn detect_client_hello(buf: &[u8]) -> Detect {
    // (bytes needed, test on them), in order.
    type Check = (usize, fn(&[u8]) -> bool);
    let checks: [Check; 4] = [
        (1, |b| b[0] == CONTENT_TYPE_HANDSHAKE),
        (2, |b| b[1] == 3),
        (RECORD_HEADER, |b| {
            let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
            (1..=MAX_PLAINTEXT_RECORD).contains(&len)
        }),
        (RECORD_HEADER + 1, |b| b[5] == HANDSHAKE_CLIENT_HELLO),
    ];
    for (needed, ok) in checks {
        if buf.len() < needed {
            return Detect::NeedMore;
        }
        if !ok(buf) {
            return Detect::NotTls;
        }
    }
    Detect::Tls
}

/// The SNI host name of a ClientHello whose first record is entirely in `buf`; `None` when
/// it is not there (no SNI, not a ClientHello, truncated, malformed). Never panics.
pub fn client_hello_sni(buf: &[u8]) -> Option<&str> {
    if detect_client_hello(buf) != Detect::Tls {
        return None;
    }
    let record_len = usize::from(u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]));
    let record = buf.get(RECORD_HEADER..RECORD_HEADER + record_len)?;
    let mut r = Reader(record);
    r.take(4)?; // handshake type and length; the body may continue in later records
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let ext_type = extensions.u16()?;
        let body = extensions.vec16()?;
        if ext_type != 0 {
            continue;
        }
        // server_name: ServerNameList of (type, name); type 0 is host_name.
        let mut list = Reader(Reader(body).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.take(1)?[0];
            let name = list.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok();
            }
        }
        return None;
    }
    None
}

/// Bounds-checked reads off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.take(1)?[0]);
        self.take(len)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use crate::IdentityName;
    use rand::{Rng, SeedableRng};

    /// The first flight of a real rustls client, as the proxy would peek it.
    fn real_client_hello() -> (Vec<u8>, IdentityName) {
        let ca = test_ca("cluster.local");
        let name = IdentityName::new("api", "prod", "cluster.local").unwrap();
        let mut conn =
            rustls::ClientConnection::new(anonymous_client(&ca), name.server_name()).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        (out, name)
    }

    #[test]
    fn a_real_client_hello_is_tls_and_names_the_server() {
        let (hello, name) = real_client_hello();
        assert_eq!(detect_client_hello(&hello), Detect::Tls);
        assert_eq!(client_hello_sni(&hello), Some(name.as_str()));
        // Every prefix shorter than the decisive 6 bytes needs more; longer ones are TLS.
        for n in 0..hello.len() {
            let expected = if n < 6 { Detect::NeedMore } else { Detect::Tls };
            assert_eq!(detect_client_hello(&hello[..n]), expected, "prefix {n}");
            // A truncated record has no SNI to read, and reading it must not panic.
            if n < hello.len() {
                let _ = client_hello_sni(&hello[..n]);
            }
        }
    }

    #[test]
    fn plaintext_protocols_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"POST /x HTTP/1.1\r\n",
            b"\x00\x00\x00\x00",
            // A TLS alert and application data record: TLS, but not a ClientHello.
            b"\x15\x03\x03\x00\x02\x02\x28",
            b"\x17\x03\x03\x00\x10",
            // Handshake record, wrong version or empty length, or a ServerHello.
            b"\x16\x02\x00\x00\x10\x01",
            b"\x16\x03\x01\x00\x00\x01",
            b"\x16\x03\x01\xff\xff\x01",
            b"\x16\x03\x03\x00\x40\x02",
        ] {
            assert_eq!(detect_client_hello(bytes), Detect::NotTls, "{bytes:?}");
            assert_eq!(client_hello_sni(bytes), None);
        }
        assert_eq!(detect_client_hello(b""), Detect::NeedMore);
        assert_eq!(detect_client_hello(b"\x16"), Detect::NeedMore);
        assert_eq!(detect_client_hello(b"\x16\x03\x01\x02"), Detect::NeedMore);
        assert_eq!(detect_client_hello(b"G"), Detect::NotTls);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let (hello, _) = real_client_hello();
        for i in 0..20_000 {
            let len = rng.random_range(0..600);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // Half start like a ClientHello, so the SNI parser sees deep, broken inputs too.
            if i % 2 == 0 && buf.len() >= 9 {
                let keep = rng.random_range(0..hello.len().min(buf.len()));
                buf[..keep].copy_from_slice(&hello[..keep]);
                buf[..6].copy_from_slice(&hello[..6]);
            }
            let _ = detect_client_hello(&buf);
            let _ = client_hello_sni(&buf);
        }
    }
}
