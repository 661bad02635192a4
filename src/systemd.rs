//! systemd's service notifications (`sd_notify(3)`): `shmlockd` tells a `Type=notify` unit
//! `READY=1` once it serves, `STOPPING=1` when it begins to shut down, and `WATCHDOG=1` from its
//! reaper thread while that thread goes round, when the unit sets `WatchdogSec=`.
//!
//! A notification is one datagram on the unix socket named by `$NOTIFY_SOCKET`: a path, or an
//! abstract name when it starts with `@`. This is std's `UnixDatagram` rather than the
//! `sd-notify` crate: its current release connects to `$NOTIFY_SOCKET` as a path, so an abstract
//! socket (which systemd and container managers hand out) would not be reached, and std does it
//! all in a few lines. Without `$NOTIFY_SOCKET` nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use tracing::warn;

/// The variable that names the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (lines such as `READY=1`) to `$NOTIFY_SOCKET`. Ok(false): the variable is not
/// set (or empty), so nothing was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the socket `socket` names (`@NAME`: the abstract socket NAME).
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(Path::new(socket))?,
    };
    let sent = UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "notification truncated"));
    }
    Ok(())
}

/// [`notify`], logging a failure (a notification that cannot be sent never stops shmlockd:
/// systemd then acts on its own timeouts).
pub fn notify_or_warn(state: &str) {
    if let Err(e) = notify(state) {
        warn!("cannot notify the service manager ({NOTIFY_SOCKET}) of {state:?}: {e}");
    }
}

/// The watchdog interval systemd asks for (`$WATCHDOG_USEC`, for this process if
/// `$WATCHDOG_PID` names one), if any: a `WATCHDOG=1` must arrive more often than this.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then(|| Duration::from_micros(usec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_abstract_sockets_receive_the_state() {
        let dir = std::env::temp_dir().join(format!("shmlock-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("shmlock-sd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        assert!(notify_to(OsStr::new("/nonexistent/shmlock-notify"), "READY=1\n").is_err());
    }
}
