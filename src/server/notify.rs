//! systemd readiness (`Type=notify`): one datagram to `$NOTIFY_SOCKET`
//! when petrel is serving and one when it stops, so `systemctl start`
//! returns once the ports are open and a failed start is seen as failed.
//! Without the variable (not under systemd) nothing happens.

use std::os::unix::net::UnixDatagram;

pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. "READY=1"); failures are logged, never fatal: a
/// service manager that went away must not stop the mail.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(error) = send(&target, state) {
        log::warn!(
            "cannot tell the service manager {state:?} via {}: {error}",
            target.to_string_lossy()
        );
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    // "@name" is a Linux abstract socket, as systemd may hand out.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &address)?;
    } else {
        socket.send_to(state.as_bytes(), target)?;
    }
    Ok(())
}
