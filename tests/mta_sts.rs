//! MTA-STS (RFC 8461) end to end, on loopback only: the `_mta-sts` record
//! and the MX records come from the test DNS server, the policy from an
//! HTTPS server with a certificate from a test CA, and the MX host is a
//! second petrel whose STARTTLS certificate is (or is not) valid for its
//! name. The sending petrel trusts the test CA through `delivery.ca_file`.

mod common;

use common::dns::TestDns;
use common::https::{HttpsServer, TestCa};
use common::*;
use petrel::protocol::session::ListenerKind;

const DOMAIN: &str = "sts.example";
const MX: &str = "mx.sts.example";
const RECIPIENT: &str = "user@sts.example";

struct Setup {
    sender: TestServer,
    receiver: TestServer,
    https: HttpsServer,
    _ca: TestCa,
}

fn dns() -> TestDns {
    let dns = standard_dns();
    dns.mx(DOMAIN, 10, MX)
        .a(MX, "127.0.0.1")
        .a(&format!("mta-sts.{DOMAIN}"), "127.0.0.1")
        .txt(
            &format!("_mta-sts.{DOMAIN}"),
            &["v=STSv1; id=2026112901".to_string()],
        );
    dns
}

/// A receiving petrel for sts.example whose certificate names
/// `certificate_name`, the policy server serving `policy`, and a sending
/// petrel that delivers to them.
fn setup(policy: &str, certificate_name: &str) -> Setup {
    let ca = TestCa::new();
    let (cert, key) = ca.leaf(certificate_name);
    let receiver = TestServer::start_delivering(dns(), |config| {
        config.domains.local = vec![DOMAIN.into()];
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
    });
    add_accounts(&receiver.instance().config().data_dir, &[RECIPIENT]);
    let (https_cert, https_key) = ca.leaf(&format!("mta-sts.{DOMAIN}"));
    let https = HttpsServer::start(&https_cert, &https_key);
    https.serve_policy(policy);
    let port = receiver.smtp().port();
    let https_port = https.port;
    let ca_path = ca.ca_path();
    let sender = TestServer::start_delivering(dns(), |config| {
        config.delivery.port = port;
        config.delivery.mta_sts_port = https_port;
        config.delivery.ca_file = Some(ca_path);
        // A deferral is retried quickly enough to watch, not in a loop.
        config.queue.retry_min = petrel::config::HumanDuration::secs(3600);
    });
    Setup {
        sender,
        receiver,
        https,
        _ca: ca,
    }
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

fn submit(server: &TestServer, subject: &str) -> String {
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let body =
        format!("From: alice@example.test\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n\r\nHi.\r\n");
    let reply = client.send_transaction("alice@example.test", &[RECIPIENT], body.as_bytes());
    assert_eq!(reply.code, 250, "{reply:?}");
    queue_id_from(&reply.text())
}

fn delivered(server: &TestServer) -> Vec<String> {
    maildir_messages(&server.instance().config().data_dir, RECIPIENT)
        .iter()
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect()
}

/// The recipient's status and last reply, once delivery has tried it.
fn attempted(server: &TestServer, id: &str) -> (String, String) {
    let query = |server: &TestServer| -> Option<(String, String)> {
        server
            .db()
            .query_row(
                "SELECT status, last_reply FROM recipients WHERE message_id = ?1 AND last_reply IS NOT NULL",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok()
    };
    wait_for("a delivery attempt", || query(server).is_some());
    query(server).unwrap()
}

fn cached_mode(server: &TestServer) -> Option<String> {
    server
        .db()
        .query_row(
            "SELECT mode FROM mta_sts_policies WHERE domain = ?1",
            [DOMAIN],
            |r| r.get(0),
        )
        .ok()
}

#[test]
fn enforce_delivers_over_verified_tls_to_a_listed_mx_and_caches_the_policy() {
    let setup = setup(&policy("enforce", MX), MX);
    submit(&setup.sender, "first");
    wait_for("the first message", || {
        delivered(&setup.receiver).len() == 1
    });
    let message = &delivered(&setup.receiver)[0];
    assert!(message.contains("(using TLSv1."), "{message}");
    assert_eq!(cached_mode(&setup.sender).as_deref(), Some("enforce"));
    // The same policy id: the cached policy is used, not fetched again.
    submit(&setup.sender, "second");
    wait_for("the second message", || {
        delivered(&setup.receiver).len() == 2
    });
    assert_eq!(setup.https.requests(), 1);
}

#[test]
fn enforce_defers_when_the_mx_certificate_is_not_valid_for_its_name() {
    let setup = setup(&policy("enforce", MX), "wrong.example");
    let id = submit(&setup.sender, "wrong certificate");
    let (status, reply) = attempted(&setup.sender, &id);
    assert_eq!(status, "queued", "deferred, not bounced: {reply}");
    assert!(
        reply.contains("certificate") || reply.contains("TLS"),
        "{reply}"
    );
    assert!(delivered(&setup.receiver).is_empty());
}

#[test]
fn enforce_defers_when_the_policy_lists_no_mx_of_the_domain() {
    let setup = setup(&policy("enforce", "mx.elsewhere.example"), MX);
    let id = submit(&setup.sender, "unlisted");
    let (status, reply) = attempted(&setup.sender, &id);
    assert_eq!(status, "queued", "{reply}");
    assert!(
        reply.contains("4.7.5") && reply.contains("lists none of its MX hosts"),
        "{reply}"
    );
    assert!(delivered(&setup.receiver).is_empty());
}

#[test]
fn testing_mode_and_invalid_policies_deliver_as_before() {
    // Testing: the certificate would fail enforcement; mail goes anyway.
    let testing = setup(&policy("testing", MX), "wrong.example");
    submit(&testing.sender, "testing");
    wait_for("the message", || delivered(&testing.receiver).len() == 1);
    assert_eq!(cached_mode(&testing.sender).as_deref(), Some("testing"));
    drop(testing);
    // A policy that is not one is no policy (RFC 8461 3.3), not an error.
    let invalid = setup("<html>Not found</html>", "wrong.example");
    submit(&invalid.sender, "no policy");
    wait_for("the message", || delivered(&invalid.receiver).len() == 1);
    assert_eq!(invalid.https.requests(), 1);
    assert_eq!(cached_mode(&invalid.sender), None);
}
