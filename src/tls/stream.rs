//! A TCP connection that may have been upgraded to TLS: the one piece of
//! plain/TLS plumbing that the server's sessions, the delivery client and
//! the tests share. It owns the socket; protocol code above it only reads
//! and writes bytes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};

use rustls::{ConnectionCommon, SideData, StreamOwned};

/// `C` is `rustls::ServerConnection` or `rustls::ClientConnection`.
pub enum Transport<C> {
    Plain(TcpStream),
    Tls(Box<StreamOwned<C, TcpStream>>),
}

/// Protocol version and cipher suite, in the words Received headers and
/// logs use ("TLSv1_3", "TLS13_AES_256_GCM_SHA384").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    pub version: String,
    pub cipher: String,
}

impl<C, S> Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &tls.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The rustls connection, once TLS is up.
    pub fn tls(&self) -> Option<&C> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(tls) => Some(&tls.conn),
        }
    }

    /// Runs the handshake of `connection` over the plain socket, done by
    /// `deadline`: a peer that sends a byte now and then still runs out
    /// of time (the socket's timeouts are set to what is left, and stay
    /// so). Without a deadline, the socket's own timeouts apply to each
    /// read and write.
    pub fn upgrade(
        self,
        mut connection: C,
        deadline: Option<std::time::Instant>,
    ) -> io::Result<Transport<C>> {
        let Transport::Plain(mut tcp) = self else {
            return Err(io::Error::other("TLS is already active"));
        };
        while connection.is_handshaking() {
            if let Some(deadline) = deadline {
                let left = deadline
                    .checked_duration_since(std::time::Instant::now())
                    .filter(|left| !left.is_zero())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })?;
                tcp.set_read_timeout(Some(left))?;
                tcp.set_write_timeout(Some(left))?;
            }
            connection.complete_io(&mut tcp)?;
        }
        Ok(Transport::Tls(Box::new(StreamOwned::new(connection, tcp))))
    }

    pub fn summary(&self) -> Option<TlsSummary> {
        self.tls().map(|conn| TlsSummary {
            version: super::version_name(conn.protocol_version()),
            cipher: super::cipher_name(conn.negotiated_cipher_suite()),
        })
    }

    /// Writes all of `data` and pushes it to the peer (TLS records are
    /// only sent on flush).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data)?;
        self.flush()
    }
}

impl<C, S> Read for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl<C, S> Write for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.write(buf),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => tcp.flush(),
            Transport::Tls(tls) => tls.flush(),
        }
    }
}
