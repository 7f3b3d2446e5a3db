//! DKIM signing end to end: keys made by `petrel dkim generate`, their
//! records served by a DNS server on loopback, mail from a local user
//! signed when accepted, delivered over SMTP to Python's aiosmtpd, and
//! verified there by an independent implementation (Python's dkimpy).

mod common;

use std::path::Path;

use common::dns::TestDns;
use common::serving::{dkim_generate, write_config};
use common::sink::Sink;
use common::*;
use petrel::config::Config;
use petrel::protocol::session::ListenerKind;

/// A key of `algorithm` for example.test under selector s1, made by
/// `petrel dkim generate` in a directory of its own; the record to serve.
fn key(algorithm: &str) -> (tempfile::TempDir, String, Vec<String>) {
    let keys = tempfile::tempdir().unwrap();
    let config = write_config(
        keys.path(),
        &format!(
            "[dkim]\nkey_dir = \"{}\"\n",
            keys.path().join("dkim").display()
        ),
    );
    let args = ["example.test", "--selector", "s1", "--algorithm", algorithm];
    let (name, strings) = dkim_generate(&config, &args);
    (keys, name, strings)
}

/// A delivering server that signs with the key in `keys`, delivering to
/// `port` on loopback.
fn signing_server(
    dns: TestDns,
    keys: &Path,
    port: u16,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let key_dir = keys.join("dkim");
    TestServer::start_delivering(dns, |config| {
        config.delivery.port = port;
        config.dkim.selector = "s1".into();
        config.dkim.key_dir = Some(key_dir);
        adjust(config);
    })
}

fn submit(server: &TestServer, body: &[u8]) {
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = client.send_transaction("alice@example.test", &["friend@elsewhere.example"], body);
    assert_eq!(reply.code, 250, "{reply:?}");
    client.command("QUIT");
}

/// Submits `body` as alice with a key of `algorithm`, and returns what
/// dkimpy says of the delivered copy, as is, re-folded and tampered with.
fn signed_and_verified(algorithm: &str, body: &[u8]) -> String {
    let (keys, name, strings) = key(algorithm);
    assert_eq!(name, "s1._domainkey.example.test");
    let dns = standard_dns();
    dns.txt(&name, &strings);
    let dns_addr = dns.addr;
    let sink = Sink::start("accept", 0);
    let server = signing_server(dns, keys.path(), sink.port, |_| {});
    submit(&server, body);
    let received = sink.wait_for_messages(1);
    let head = String::from_utf8_lossy(&received[0].content[..200]).into_owned();
    let expected =
        format!("DKIM-Signature: v=1; a={algorithm}-sha256; c=relaxed/relaxed; d=example.test;");
    assert!(head.starts_with(&expected), "{head}");
    let file = keys.path().join("received.eml");
    std::fs::write(&file, &received[0].content).unwrap();
    python(
        "dkim_verify.py",
        &[file.to_str().unwrap(), &dns_addr.to_string()],
    )
}

const VERIFIED: &str = "original pass\nrefolded pass\ntampered fail\n";

#[test]
fn mail_from_local_users_is_signed_and_dkimpy_verifies_it() {
    // Trailing spaces and blank lines at the end: relaxed
    // canonicalization's business.
    let message = b"From: Alice <alice@example.test>\r\nTo: friend@elsewhere.example\r\n\
        Subject: the weekly meeting notes\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
        Message-ID: <dkim@example.test>\r\n\r\nThe meeting moved.  \r\n\r\n\r\n";
    for algorithm in ["ed25519", "rsa"] {
        assert_eq!(
            signed_and_verified(algorithm, message),
            VERIFIED,
            "{algorithm}"
        );
    }
}

/// Past the in-memory bound the message is spooled to a file; it is
/// signed from there, a chunk at a time. A line too long for SMTP is
/// folded on the way out: the signature covers it folded.
#[test]
fn a_large_spooled_message_is_signed_as_it_streams() {
    let mut message = b"From: alice@example.test\r\nSubject: the big meeting\r\n\r\n".to_vec();
    message.extend_from_slice(format!("{}\r\n", "long meeting line ".repeat(100)).as_bytes());
    let line = format!("{}\r\n", "meeting minutes ".repeat(60));
    while message.len() < 600 * 1024 {
        message.extend_from_slice(line.as_bytes());
    }
    assert_eq!(signed_and_verified("ed25519", &message), VERIFIED);
}

#[test]
fn mail_relayed_for_strangers_is_not_signed() {
    let (keys, _, _) = key("ed25519");
    let sink = Sink::start("accept", 0);
    let server = signing_server(standard_dns(), keys.path(), sink.port, |config| {
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    // Port 25, no AUTH: even with our domain in MAIL FROM, not ours to sign.
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.send_message(
        "alice@example.test",
        &["friend@elsewhere.example"],
        b"From: alice@example.test\r\nSubject: x\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let received = sink.wait_for_messages(1);
    let text = String::from_utf8_lossy(&received[0].content).into_owned();
    assert!(!text.contains("DKIM-Signature"), "{text}");
}

#[test]
fn a_from_the_login_does_not_own_is_never_signed() {
    // With sender_login_match off, alice may put bob in From:, but our
    // signature must not vouch for it.
    let (keys, _, _) = key("ed25519");
    let sink = Sink::start("accept", 0);
    let server = signing_server(standard_dns(), keys.path(), sink.port, |config| {
        config.auth.sender_login_match = false;
    });
    submit(
        &server,
        b"From: Bob <bob@example.test>\r\nSubject: from bob?\r\n\r\nx\r\n",
    );
    submit(
        &server,
        b"From: alice@example.test\r\nSubject: mine\r\n\r\nx\r\n",
    );
    let received = sink.wait_for_messages(2);
    for message in received {
        let text = String::from_utf8_lossy(&message.content).into_owned();
        let signed = text.contains("DKIM-Signature");
        assert_eq!(signed, text.contains("Subject: mine"), "{text}");
    }
}
