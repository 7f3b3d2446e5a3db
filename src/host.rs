//! Questions petrel asks the system about the host it runs on, kept out
//! of the pure decisions that use the answers ([`crate::policy`]).

use std::net::{IpAddr, SocketAddr};

/// Whether `ip` is one of this host's own addresses (for listeners on
/// 0.0.0.0 or [::]): binding a socket to it succeeds only then.
pub fn assigned_here(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_assigned_here_and_a_documentation_address_is_not() {
        assert!(assigned_here("127.0.0.1".parse().unwrap()));
        assert!(!assigned_here("192.0.2.1".parse().unwrap()));
    }
}
