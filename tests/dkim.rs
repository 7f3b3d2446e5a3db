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

/// Sends one message as alice over implicit TLS to a `petrel serve`.
fn submit_to(serving: &common::serving::Serving, data_dir: &Path, subject: &str) {
    let mut client = RawClient::implicit_tls(
        serving.listen_address("smtps"),
        &data_dir.join("tls/selfsigned-cert.pem"),
    );
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let body = format!("From: alice@example.test\r\nSubject: {subject}\r\n\r\nx\r\n");
    let reply = client.send_transaction(
        "alice@example.test",
        &["friend@elsewhere.example"],
        body.as_bytes(),
    );
    assert_eq!(reply.code, 250, "{reply:?}");
}

/// The selector of the DKIM-Signature of the message with `subject`, if
/// it has one.
fn selector_of(sink: &Sink, subject: &str) -> Option<String> {
    sink.messages().into_iter().find_map(|m| {
        let text = String::from_utf8_lossy(&m.content).into_owned();
        if !text.contains(&format!("Subject: {subject}\r\n")) {
            return None;
        }
        let at = text.find("\ts=")?;
        Some(text[at + 3..].split(';').next()?.to_string())
    })
}

#[test]
fn a_new_key_is_used_without_a_restart_and_sighup_reloads_dkim() {
    use common::serving::{Serving, add_user, petrel};
    // Before, `petrel dkim generate` while the server ran left mail
    // unsigned until a restart; SIGHUP reloaded only the certificate.
    let sink = Sink::start("accept", 0);
    let dns = standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n\
             [delivery]\nport = {}\n",
            dns.addr, sink.port
        ),
    );
    add_user(&config, "alice@example.test");
    let data_dir = dir.path().join("data");
    let mut serving = Serving::start(&config);
    submit_to(&serving, &data_dir, "before any key");
    sink.wait_for_messages(1);
    assert_eq!(selector_of(&sink, "before any key"), None);

    let generate = |selector: &str| {
        let output = petrel()
            .arg("-c")
            .arg(&config)
            .args(["dkim", "generate", "example.test", "--selector", selector])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let said = generate("petrel");
    assert!(
        said.contains("the running server signs mail from example.test with this key"),
        "{said}"
    );
    // Picked up at the next signing once a look at the files is due (at
    // most every 2 s): polled by sending, a bounded number of times.
    let mut picked_up = false;
    for attempt in 0..20 {
        let subject = format!("after generate {attempt}");
        submit_to(&serving, &data_dir, &subject);
        sink.wait_for_messages(2 + attempt);
        if selector_of(&sink, &subject).as_deref() == Some("petrel") {
            picked_up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(picked_up, "the new key was never used");
    serving.wait_for_log("dkim: key files changed; signing for example.test with selector petrel");

    // A rollover: a key under a new selector, the config switched, SIGHUP.
    let said = generate("s2");
    assert!(said.contains("set dkim.selector = \"s2\""), "{said}");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[dkim]\nselector = \"s2\"\n")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &serving.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    serving.wait_for_log("dkim: signing for example.test with selector s2");
    serving.wait_for_log("tls: reloaded certificate");
    let before = sink.messages().len();
    submit_to(&serving, &data_dir, "after the rollover");
    sink.wait_for_messages(before + 1);
    assert_eq!(
        selector_of(&sink, "after the rollover").as_deref(),
        Some("s2")
    );
    // `petrel reload` does SIGHUP's work and says what it loaded.
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .arg("reload")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for line in [
        "reload: config ",
        "aliases: 0",
        "dkim: signing for example.test with selector s2",
        "tls: reloaded certificate",
    ] {
        assert!(said.contains(line), "{said}");
    }
    serving.terminate();
}
