//! The connection under the multiplexer: a TCP socket, or (feature `tls`) TLS over one.
//!
//! The multiplexer reads from one thread at a time (the reading role) while any thread may
//! write, so a TLS link shares one rustls connection between the two sides under a mutex that a
//! reader never holds while it waits: it waits for the socket to be readable (`poll`) first,
//! then takes the mutex to decrypt what came. A writer encrypts and sends under the mutex.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// A connection to a gateway.
#[derive(Debug)]
pub(super) enum Link {
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(std::sync::Arc<tls::TlsLink>),
}

impl Link {
    /// A second handle on the same connection (the reader's, beside the writer's).
    pub(super) fn try_clone(&self) -> io::Result<Link> {
        match self {
            Link::Tcp(s) => s.try_clone().map(Link::Tcp),
            #[cfg(feature = "tls")]
            Link::Tls(t) => Ok(Link::Tls(t.clone())),
        }
    }

    /// Reads what has come (blocking until something does, or the read timeout); 0 at the end.
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => {
                let mut s: &TcpStream = s;
                s.read(buf)
            }
            #[cfg(feature = "tls")]
            Link::Tls(t) => t.read(buf),
        }
    }

    /// Sends all of `buf`.
    pub(super) fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Link::Tcp(s) => {
                let mut s: &TcpStream = s;
                s.write_all(buf)
            }
            #[cfg(feature = "tls")]
            Link::Tls(t) => t.write_all(buf),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(t)
    }

    /// Ends the connection both ways (a blocked read returns).
    pub(super) fn shutdown(&self) -> io::Result<()> {
        #[cfg(feature = "tls")]
        if let Link::Tls(t) = self {
            t.close_notify();
        }
        self.socket().shutdown(Shutdown::Both)
    }

    fn socket(&self) -> &TcpStream {
        match self {
            Link::Tcp(s) => s,
            #[cfg(feature = "tls")]
            Link::Tls(t) => &t.sock,
        }
    }
}

#[cfg(feature = "tls")]
pub(super) mod tls {
    use std::io::{self, Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    /// How long the TLS handshake may take when no read timeout is given.
    pub(in crate::remote) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// TLS over a TCP socket: one rustls connection for both directions.
    #[derive(Debug)]
    pub(in crate::remote) struct TlsLink {
        pub(super) sock: TcpStream,
        conn: Mutex<ClientConnection>,
        read_timeout: Option<Duration>,
    }

    fn lock(m: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalid(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// A client configuration that trusts the certificates in the PEM file `ca_file` (and
    /// nothing else: not the system's store).
    pub(in crate::remote) fn config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::read_certs(ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a CA certificate: {e}", ca_file.display()))?;
        }
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    impl TlsLink {
        /// Completes the handshake on `sock` as a client of `server_name`, verifying the
        /// gateway's certificate. `read_timeout` bounds each later wait for an answer.
        pub(in crate::remote) fn handshake(
            mut sock: TcpStream,
            config: Arc<ClientConfig>,
            server_name: &str,
            read_timeout: Option<Duration>,
        ) -> Result<TlsLink, String> {
            let name = ServerName::try_from(server_name.to_string())
                .map_err(|e| format!("{server_name:?} is not a server name for TLS: {e}"))?;
            let mut conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
            let io_err = |e: io::Error| e.to_string();
            sock.set_read_timeout(Some(read_timeout.unwrap_or(HANDSHAKE_TIMEOUT)))
                .map_err(io_err)?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "the TLS handshake timed out".to_string(),
                    io::ErrorKind::UnexpectedEof => "the gateway closed the connection during the TLS handshake".into(),
                    _ => format!("TLS handshake failed: {e}"),
                })?;
            }
            sock.set_read_timeout(read_timeout).map_err(io_err)?;
            Ok(TlsLink {
                sock,
                conn: Mutex::new(conn),
                read_timeout,
            })
        }

        pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                {
                    let mut c = lock(&self.conn);
                    match c.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // Closed without close_notify: the end, as a TCP read of 0 says.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                }
                // Wait without the mutex: writers go on meanwhile.
                self.wait_readable()?;
                let mut c = lock(&self.conn);
                match c.read_tls(&mut &self.sock) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => continue,
                    Err(e) => return Err(e),
                }
                c.process_new_packets().map_err(invalid)?;
                // An alert or a key update to answer.
                flush(&mut c, &self.sock)?;
            }
        }

        fn wait_readable(&self) -> io::Result<()> {
            let timeout = match self.read_timeout {
                None => PollTimeout::NONE,
                Some(t) => {
                    PollTimeout::try_from(t.as_millis().clamp(1, i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
                }
            };
            loop {
                let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, timeout) {
                    Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
                    Ok(_) => return Ok(()),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }

        pub(super) fn write_all(&self, buf: &[u8]) -> io::Result<()> {
            let mut c = lock(&self.conn);
            c.writer().write_all(buf)?;
            flush(&mut c, &self.sock)
        }

        /// Tells the gateway this side is done (best effort).
        pub(super) fn close_notify(&self) {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            let _ = flush(&mut c, &self.sock);
        }
    }

    /// Sends whatever TLS records the connection has queued.
    fn flush(c: &mut ClientConnection, mut sock: &TcpStream) -> io::Result<()> {
        while c.wants_write() {
            c.write_tls(&mut sock)?;
        }
        Ok(())
    }
}
