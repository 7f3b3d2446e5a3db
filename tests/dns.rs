//! The DNS facade and address verification against real DNS servers on
//! loopback: dnsmasq (an independent implementation) and the in-process
//! test server (for SERVFAIL and query counting).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};

use common::dns::TestDns;
use common::sink::free_port;
use common::*;
use petrel::config::{AddressFamily, DnsConfig, HumanDuration};
use petrel::dns::{Dns, DnsFailure, MailHost};
use petrel::protocol::session::ListenerKind;

fn resolver(server: SocketAddr) -> Dns {
    Dns::new(&DnsConfig {
        nameservers: vec![server],
        timeout: HumanDuration::secs(1),
    })
    .unwrap()
}

fn names(hosts: &[MailHost]) -> Vec<&str> {
    hosts.iter().map(|h| h.name.as_str()).collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

#[test]
fn mx_a_fallback_null_mx_nxdomain_and_servfail() {
    let dns = TestDns::start();
    dns.mx("mx.test", 20, "backup.mx.test")
        .mx("mx.test", 10, "primary.mx.test")
        .a("primary.mx.test", "192.0.2.1")
        .a("primary.mx.test", "2001:db8::1")
        .a("backup.mx.test", "192.0.2.2")
        .a("bare.test", "192.0.2.3")
        .null_mx("nullmx.test")
        .a("v6only.test", "2001:db8::6")
        .fail("servfail.test");
    let resolver = resolver(dns.addr);

    let hosts = resolver.mail_hosts("mx.test").unwrap();
    assert_eq!(names(&hosts), vec!["primary.mx.test", "backup.mx.test"]);
    assert_eq!(
        resolver
            .addresses("primary.mx.test", AddressFamily::Any)
            .unwrap(),
        ips(&["2001:db8::1", "192.0.2.1"])
    );
    assert_eq!(
        resolver
            .addresses("primary.mx.test", AddressFamily::Ipv4)
            .unwrap(),
        ips(&["192.0.2.1"])
    );
    assert_eq!(
        resolver
            .addresses("primary.mx.test", AddressFamily::Ipv6)
            .unwrap(),
        ips(&["2001:db8::1"])
    );
    // No MX: the domain itself is the mail host (RFC 5321 5.1).
    assert_eq!(
        names(&resolver.mail_hosts("bare.test").unwrap()),
        vec!["bare.test"]
    );
    assert_eq!(resolver.mail_hosts("nullmx.test"), Err(DnsFailure::NullMx));
    assert_eq!(
        resolver.mail_hosts("nowhere.test"),
        Err(DnsFailure::NoSuchDomain)
    );
    assert_eq!(
        resolver.addresses("v6only.test", AddressFamily::Ipv4),
        Err(DnsFailure::NoMailHosts)
    );
    assert!(matches!(
        resolver.mail_hosts("servfail.test"),
        Err(DnsFailure::Temporary(_))
    ));
    // Literals and localhost need no query.
    assert_eq!(
        resolver.addresses("192.0.2.9", AddressFamily::Any).unwrap(),
        ips(&["192.0.2.9"])
    );
    assert_eq!(
        resolver.addresses("localhost", AddressFamily::Any).unwrap(),
        ips(&["127.0.0.1", "::1"])
    );
    assert_eq!(dns.queries_for("localhost"), 0);

    // Verification: the addresses of the mail hosts, or why there are none.
    assert!(!resolver.mail_addresses("mx.test").unwrap().is_empty());
    assert_eq!(
        resolver.mail_addresses("nullmx.test"),
        Err(DnsFailure::NullMx)
    );
    assert_eq!(
        resolver.mail_addresses("nowhere.test"),
        Err(DnsFailure::NoSuchDomain)
    );
    assert!(matches!(
        resolver.mail_addresses("servfail.test"),
        Err(DnsFailure::Temporary(_))
    ));
}

#[test]
fn equal_preferences_are_tried_in_random_order() {
    let dns = TestDns::start();
    for host in ["a", "b", "c"] {
        dns.mx("spread.test", 10, &format!("{host}.spread.test"));
    }
    let resolver = resolver(dns.addr);
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..60 {
        let hosts = resolver.mail_hosts("spread.test").unwrap();
        assert_eq!(hosts.len(), 3);
        firsts.insert(hosts[0].name.clone());
    }
    assert!(firsts.len() > 1, "always {firsts:?} first");
}

#[test]
fn an_unresponsive_resolver_is_a_temporary_failure() {
    // A UDP port nobody answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = resolver(silent.local_addr().unwrap());
    assert!(matches!(
        resolver.mail_hosts("example.org"),
        Err(DnsFailure::Temporary(_))
    ));
    assert!(matches!(
        resolver.mail_addresses("example.org"),
        Err(DnsFailure::Temporary(_))
    ));
}

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn against_dnsmasq() {
    let port = free_port();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let child = Command::new("dnsmasq")
        .args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--user={user}"))
        .args(["--pid-file=", "--local=/dm.test/"])
        .args([
            "--mx-host=dm.test,mx.dm.test,10",
            "--address=/mx.dm.test/127.0.0.1",
        ])
        // RFC 7505 null MX as a raw record: preference 0, root target.
        .arg("--dns-rr=nullmx.dm.test,15,000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed (package dnsmasq-base, see .ci/run)");
    let _guard = Dnsmasq(child);
    let resolver = resolver(SocketAddr::from(([127, 0, 0, 1], port)));
    wait_for("dnsmasq to answer", || {
        resolver.mail_hosts("dm.test").is_ok()
    });
    assert_eq!(
        names(&resolver.mail_hosts("dm.test").unwrap()),
        vec!["mx.dm.test"]
    );
    assert_eq!(
        resolver
            .addresses("mx.dm.test", AddressFamily::Ipv4)
            .unwrap(),
        ips(&["127.0.0.1"])
    );
    assert_eq!(
        resolver.mail_hosts("nullmx.dm.test"),
        Err(DnsFailure::NullMx)
    );
    assert_eq!(
        resolver.mail_hosts("nope.dm.test"),
        Err(DnsFailure::NoSuchDomain)
    );
}

fn verification_server() -> TestServer {
    verification_server_with(|_| {})
}

fn verification_server_with(adjust: impl FnOnce(&mut petrel::config::Config)) -> TestServer {
    let dns = standard_dns();
    dns.null_mx("nullmx.test")
        .fail("servfail.test")
        .a("bare.test", "127.0.0.3");
    TestServer::start_with(
        dns,
        petrel::instance::Options { delivery: false },
        |config| {
            config.dns.timeout = HumanDuration::secs(1);
            adjust(config);
        },
    )
}

#[test]
fn sender_domains_of_strangers_are_verified() {
    let server = verification_server();
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    for (sender, code, enhanced) in [
        ("a@nowhere.test", 553, "5.1.8"),
        ("a@nullmx.test", 553, "5.1.8"),
        ("a@servfail.test", 451, "4.4.3"),
        ("a@bare.test", 250, "2.1.0"),
        ("a@example.org", 250, "2.1.0"),
    ] {
        let reply = client.command(&format!("MAIL FROM:<{sender}>"));
        assert_eq!(
            (reply.code, &reply.lines[0][..5]),
            (code, enhanced),
            "{sender}: {reply:?}"
        );
        client.command("RSET");
    }
    // Local domains and the null sender need no lookup.
    assert_eq!(client.command("MAIL FROM:<>").code, 250);
    client.command("RSET");
    assert_eq!(client.command("MAIL FROM:<someone@example.test>").code, 250);
}

#[test]
fn relayed_recipient_domains_are_verified() {
    let server = verification_server();
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    assert_eq!(client.command("MAIL FROM:<alice@example.test>").code, 250);
    for (recipient, code, enhanced) in [
        ("x@nowhere.test", 550, "5.1.2"),
        ("x@nullmx.test", 556, "5.1.10"),
        ("x@servfail.test", 451, "4.4.3"),
        ("x@elsewhere.example", 250, "2.1.5"),
    ] {
        let reply = client.command(&format!("RCPT TO:<{recipient}>"));
        assert_eq!(reply.code, code, "{recipient}: {reply:?}");
        assert!(
            reply.lines[0].starts_with(enhanced),
            "{recipient}: {reply:?}"
        );
    }
}

#[test]
fn verification_verdicts_are_cached_briefly() {
    // SPF asks about the same names; only verification is counted here.
    let server = verification_server_with(|config| config.mail_auth.enabled = false);
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    assert_eq!(client.command("MAIL FROM:<a@example.org>").code, 250);
    let after_first = server.dns.queries_for("example.org");
    assert!(after_first >= 1);
    for _ in 0..5 {
        client.command("RSET");
        assert_eq!(client.command("MAIL FROM:<b@example.org>").code, 250);
    }
    assert_eq!(
        server.dns.queries_for("example.org"),
        after_first,
        "answered from the cache"
    );
    // Temporary failures are not cached: each attempt asks again.
    client.command("RSET");
    client.command("MAIL FROM:<a@servfail.test>");
    let first = server.dns.queries_for("servfail.test");
    client.command("RSET");
    client.command("MAIL FROM:<a@servfail.test>");
    assert!(server.dns.queries_for("servfail.test") > first);
}
