//! TLS on the gateway (rustls): the certificate and key are loaded when the gateway is bound
//! (so a bad file stops `shmlockd` before it creates a segment), and each accepted connection's
//! handshake runs in a task of its own, bounded in time (the gateway's `line_timeout`, else
//! [`HANDSHAKE_TIMEOUT`]: a handshake is a message in progress, as a partial line is) and in number (at
//! most [`GatewayConfig::max_unauthenticated`](super::GatewayConfig::max_unauthenticated) at
//! once: a flood of connections that never finish one cannot hold more). After the handshake
//! the task relays between the TLS stream and one end of a Unix socket pair, and the session
//! runs on the other end exactly as on a TCP connection: its limits, deadlines and slow-reader
//! rules are those of plain sessions, and the plain path pays nothing for TLS. (The relay costs
//! two copies per message, which TLS's own encryption dwarfs.)

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{Shared, TlsFiles};
use crate::error::{Error, Result};

/// How long a client has to complete the TLS handshake after it connected, when the gateway has
/// no `line_timeout`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of TLS, made from the gateway's certificate and key.
#[derive(Clone)]
pub(super) struct Acceptor(TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// The server's TLS configuration from PEM files: the certificate chain (leaf first) and its
/// private key. Errors name the key of the config file and the file.
pub(super) fn acceptor(files: &TlsFiles) -> Result<Acceptor> {
    let bad = |key, why: String| Error::Config { key, why };
    let certs = crate::tls::read_certs(&files.cert).map_err(|why| bad("gateway.tls_cert", why))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        bad(
            "gateway.tls_key",
            format!("{}: no private key read: {e}", files.key.display()),
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("gateway.tls_cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("gateway.tls_key", format!("the key does not fit the certificate: {e}")))?;
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
}

/// Completes the handshake of an accepted connection, then serves its session over a socket
/// pair; a connection that fails the handshake, or does not finish it in time, is closed (the
/// client's TLS library reports why).
pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let Ok(_slot) = shared.handshakes.clone().try_acquire_owned() else {
        debug!(%peer, "gateway: too many TLS handshakes at once; connection closed");
        return;
    };
    let Some(Acceptor(acceptor)) = shared.tls.clone() else {
        return;
    };
    let limit = shared.config.line_timeout.unwrap_or(HANDSHAKE_TIMEOUT);
    let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "gateway: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "gateway: no TLS handshake in time (a plain client?); connection closed");
            return;
        }
    };
    drop(_slot);
    let (session_end, relay_end) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "gateway: no socket pair for a TLS session");
            return;
        }
    };
    tokio::spawn(relay(tls, relay_end));
    super::admit(session_end, peer, shared, stop).await;
}

/// Copies between the TLS stream and the relay's end of the pair until either side closes.
async fn relay(mut tls: tokio_rustls::server::TlsStream<TcpStream>, mut plain: UnixStream) {
    match tokio::io::copy_bidirectional(&mut tls, &mut plain).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => debug!(error = %e, "gateway: TLS relay ended"),
    }
}
