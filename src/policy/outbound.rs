//! Which hosts delivery may connect to. Mail routed by MX records, address
//! records or address literals is steered by whoever controls the sender's
//! or recipient's DNS; without this rule a stranger could make petrel open
//! SMTP connections to loopback services or the private network behind it
//! (SSRF), or to petrel itself (a mail loop).
//!
//! Refused unless listed in `delivery.allowed_networks`: the special-purpose
//! ranges of the IANA IPv4 and IPv6 Special-Purpose Address Registries that
//! are not globally reachable (loopback, RFC 1918 private, shared CGN space,
//! link-local, ULA, documentation, benchmarking, multicast, reserved ...).
//! Always refused: petrel's own listening addresses. The configured smart
//! host is trusted as given and never asked about here.
//!
//! Pure: whether an address is this host's own is asked by the caller
//! ([`crate::host::assigned_here`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::config::{Config, canonical_ip};

/// Why delivery may not connect somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// A special-purpose range (named) not listed in `delivery.allowed_networks`.
    SpecialPurpose(&'static str),
    /// One of petrel's own listeners: the mail would loop back to us.
    OwnListener,
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Forbidden::SpecialPurpose(range) => write!(
                f,
                "{range} address, not allowed for delivery (see delivery.allowed_networks)"
            ),
            Forbidden::OwnListener => f.write_str("mail for it loops back to myself"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allowed: Vec<IpNet>,
    listeners: Vec<SocketAddr>,
}

impl OutboundPolicy {
    pub fn new(allowed: Vec<IpNet>, listeners: Vec<SocketAddr>) -> OutboundPolicy {
        OutboundPolicy { allowed, listeners }
    }

    /// `delivery.allowed_networks` and every configured listener. Listeners
    /// bound to port 0 (tests) are refined with [`OutboundPolicy::with_listeners`].
    pub fn from_config(config: &Config) -> OutboundPolicy {
        let listeners = [&config.smtp, &config.submission, &config.smtps]
            .into_iter()
            .flat_map(|l| l.listen.iter().copied())
            .collect();
        OutboundPolicy::new(config.delivery.allowed_networks.clone(), listeners)
    }

    /// The addresses the listeners actually bound.
    pub fn with_listeners(mut self, listeners: Vec<SocketAddr>) -> OutboundPolicy {
        self.listeners = listeners;
        self
    }

    /// May delivery connect to `peer`? `assigned_here` tells whether an
    /// address belongs to this host (for listeners on 0.0.0.0 or [::]).
    pub fn check(
        &self,
        peer: SocketAddr,
        assigned_here: impl Fn(IpAddr) -> bool,
    ) -> Result<(), Forbidden> {
        let ip = canonical_ip(peer.ip());
        for listener in &self.listeners {
            if listener.port() != peer.port() {
                continue;
            }
            let bound = canonical_ip(listener.ip());
            let same = if bound.is_unspecified() {
                bound.is_ipv4() == ip.is_ipv4() && (ip.is_loopback() || assigned_here(ip))
            } else {
                bound == ip
            };
            if same {
                return Err(Forbidden::OwnListener);
            }
        }
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match special_purpose(ip) {
            Some(range) => Err(Forbidden::SpecialPurpose(range)),
            None => Ok(()),
        }
    }
}

fn in_v4(ip: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(network)) & mask
}

fn in_v6(ip: Ipv6Addr, network: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(network)) & mask
}

const SPECIAL_V4: &[([u8; 4], u32, &str)] = &[
    ([0, 0, 0, 0], 8, "\"this network\""),
    ([10, 0, 0, 0], 8, "private (RFC 1918)"),
    ([100, 64, 0, 0], 10, "shared (carrier-grade NAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private (RFC 1918)"),
    ([192, 0, 0, 0], 24, "IETF protocol assignment"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 88, 99, 0], 24, "deprecated 6to4 relay"),
    ([192, 168, 0, 0], 16, "private (RFC 1918)"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

const SPECIAL_V6: &[([u16; 8], u32, &str)] = &[
    (
        [0, 0, 0, 0, 0, 0, 0, 0],
        96,
        "IPv4-compatible, loopback or unspecified",
    ),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignment",
    ),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing"),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (ULA)"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// The name of the special-purpose range `ip` is in, if it is not a
/// globally reachable address. IPv6 forms that embed an IPv4 address
/// (mapped, NAT64, 6to4) are judged by that address.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => SPECIAL_V4
            .iter()
            .find(|(network, prefix, _)| in_v4(v4, *network, *prefix))
            .map(|(_, _, name)| *name),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_purpose(IpAddr::V4(v4));
            }
            let bits = u128::from(v6);
            if in_v6(v6, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
                return special_purpose(IpAddr::V4(Ipv4Addr::from(bits as u32)));
            }
            if in_v6(v6, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
                return special_purpose(IpAddr::V4(Ipv4Addr::from((bits >> 80) as u32)));
            }
            SPECIAL_V6
                .iter()
                .find(|(network, prefix, _)| in_v6(v6, *network, *prefix))
                .map(|(_, _, name)| *name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn special_purpose_ranges() {
        for special in [
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.25",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001:db8::25",
            "2001::1",
            "2002:a00:1::1",
            "3fff::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(special_purpose(ip(special)).is_some(), "{special}");
        }
        for global in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.1.1",
            "223.255.255.255",
            "2a00:1450:4001::1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(special_purpose(ip(global)), None, "{global}");
        }
    }

    fn peer(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn allowed_networks_open_special_ranges_but_never_our_own_listener() {
        let nowhere = |_: IpAddr| false;
        let strict = OutboundPolicy::new(Vec::new(), vec![peer("0.0.0.0:25")]);
        assert_eq!(
            strict.check(peer("10.0.0.1:25"), nowhere),
            Err(Forbidden::SpecialPurpose("private (RFC 1918)"))
        );
        assert_eq!(strict.check(peer("8.8.8.8:25"), nowhere), Ok(()));
        assert_eq!(
            strict.check(peer("127.0.0.1:25"), nowhere),
            Err(Forbidden::OwnListener)
        );
        // Our public address, on the port we listen on.
        let ours = |ip: IpAddr| ip == IpAddr::from([198, 51, 100, 25]);
        assert_eq!(
            strict.check(peer("198.51.100.25:25"), ours),
            Err(Forbidden::OwnListener)
        );

        let internal = OutboundPolicy::new(
            vec![
                "10.0.0.0/8".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap(),
            ],
            vec![peer("127.0.0.1:2525"), peer("[::]:25")],
        );
        assert_eq!(internal.check(peer("10.0.0.1:25"), nowhere), Ok(()));
        assert_eq!(internal.check(peer("127.0.0.1:25"), nowhere), Ok(()));
        assert_eq!(
            internal.check(peer("127.0.0.1:2525"), nowhere),
            Err(Forbidden::OwnListener)
        );
        assert_eq!(
            internal.check(peer("[::1]:25"), nowhere),
            Err(Forbidden::OwnListener)
        );
        assert_eq!(
            internal.check(peer("192.168.0.1:25"), nowhere),
            Err(Forbidden::SpecialPurpose("private (RFC 1918)"))
        );
    }
}
