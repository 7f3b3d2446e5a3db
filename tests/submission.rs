//! Accounts, TLS and AUTH with real clients: lettre and Python smtplib over
//! STARTTLS and implicit TLS, a raw client for the dialogues that attack
//! the server, openssl and Python for old TLS versions.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use petrel::config::HumanDuration;
use petrel::protocol::session::ListenerKind;

fn tls_parameters(server: &TestServer) -> TlsParameters {
    let pem = std::fs::read(server.cert_path()).unwrap();
    TlsParameters::builder("mx.test".into())
        .add_root_certificate(Certificate::from_pem(&pem).unwrap())
        .build_rustls()
        .unwrap()
}

fn lettre_mailer(server: &TestServer, kind: ListenerKind, password: &str) -> SmtpTransport {
    let tls = match kind {
        ListenerKind::Smtps => Tls::Wrapper(tls_parameters(server)),
        _ => Tls::Required(tls_parameters(server)),
    };
    SmtpTransport::builder_dangerous("127.0.0.1")
        .port(server.addr(kind).port())
        .hello_name(ClientId::Domain("lettre.test".into()))
        .tls(tls)
        .credentials(Credentials::new(
            "alice@example.test".into(),
            password.into(),
        ))
        .authentication(vec![Mechanism::Plain])
        .build()
}

fn message(to: &str) -> Message {
    Message::builder()
        .from("Alice <alice@example.test>".parse().unwrap())
        .to(to.parse().unwrap())
        .subject("submitted")
        .body(String::from("Sent through submission.\r\n"))
        .unwrap()
}

fn queued_id(response: &lettre::transport::smtp::response::Response) -> String {
    queue_id_from(&response.message().collect::<Vec<_>>().join(" "))
}

#[test]
fn lettre_starttls_and_implicit_tls_with_auth() {
    let server = TestServer::start(|_| {});
    for kind in [ListenerKind::Submission, ListenerKind::Smtps] {
        let mailer = lettre_mailer(&server, kind, PASSWORD);
        let response = mailer
            .send(&message("friend@elsewhere.example"))
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let id = queued_id(&response);
        assert_eq!(server.recipients_of(&id), vec!["friend@elsewhere.example"]);
        let (auth_user, listener): (String, String) = server
            .db()
            .query_row(
                "SELECT auth_user, listener FROM messages WHERE id = ?1",
                [&id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(auth_user, "alice@example.test");
        assert_eq!(listener, kind.name());
        let content: Vec<u8> = server
            .db()
            .query_row(
                "SELECT c.content FROM messages m JOIN message_contents c ON c.id = m.content_id WHERE m.id = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        let content = String::from_utf8(content).unwrap();
        assert!(content.contains("with ESMTPSA id"), "{content}");
        assert!(
            content.contains("(using TLSv1.3 with cipher TLS13_"),
            "{content}"
        );
    }
}

#[test]
fn lettre_with_a_wrong_password_gets_535() {
    let server = TestServer::start(|_| {});
    let mailer = lettre_mailer(&server, ListenerKind::Submission, "Wrong-Password-1!");
    let error = mailer
        .send(&message("friend@elsewhere.example"))
        .unwrap_err();
    assert!(error.to_string().contains("535"), "{error}");
    assert_eq!(server.message_count(), 0);
}

#[test]
fn python_smtplib_starttls_and_ssl_login() {
    let server = TestServer::start(|_| {});
    for (mode, kind) in [
        ("starttls", ListenerKind::Submission),
        ("ssl", ListenerKind::Smtps),
    ] {
        let port = server.addr(kind).port().to_string();
        let output = python(
            "smtplib_send.py",
            &[
                mode,
                "127.0.0.1",
                &port,
                "alice@example.test",
                "friend@elsewhere.example",
                "alice@example.test",
                PASSWORD,
            ],
        );
        assert!(
            output.starts_with("250 2.0.0 OK queued as"),
            "{mode}: {output}"
        );
        let id = queue_id_from(output.trim());
        assert_eq!(server.recipients_of(&id), vec!["friend@elsewhere.example"]);
    }
}

#[test]
fn auth_is_neither_offered_nor_accepted_without_tls() {
    let server = TestServer::start(|_| {});
    for kind in [ListenerKind::Smtp, ListenerKind::Submission] {
        let mut client = RawClient::greeted(server.addr(kind));
        let ehlo = client.command("EHLO client.test");
        assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
        assert!(
            !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
            "{ehlo:?}"
        );
        let refused = client.auth_plain("alice@example.test", PASSWORD);
        assert_eq!(refused.code, 538, "{refused:?}");
        let refused = client.command("AUTH LOGIN");
        assert_eq!(refused.code, 538, "{refused:?}");
    }
    // Submission refuses mail without AUTH.
    let mut client = RawClient::greeted(server.addr(ListenerKind::Submission));
    client.command("EHLO client.test");
    let refused = client.command("MAIL FROM:<alice@example.test>");
    assert_eq!(refused.code, 530);
    assert!(refused.text().starts_with("5.7.0"), "{refused:?}");
    client.starttls(&server.cert_path());
    let ehlo = client.command("EHLO client.test");
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "{ehlo:?}"
    );
    assert_eq!(client.command("MAIL FROM:<alice@example.test>").code, 530);
}

#[test]
fn plaintext_pipelined_after_starttls_is_not_executed() {
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    // CVE-2011-0411: the NOOP rides in the same packet as STARTTLS.
    client.send_raw(b"STARTTLS\r\nNOOP\r\n");
    let ready = client.reply();
    assert_eq!(ready.code, 220, "{ready:?}");
    // upgrade_tls asserts no plaintext reply to NOOP arrived before TLS.
    client.upgrade_tls(&server.cert_path());
    let ehlo = client.command("EHLO client.test");
    assert_eq!(ehlo.code, 250);
    assert!(
        ehlo.lines[0].starts_with("mx.test Hello"),
        "the first reply inside TLS must be EHLO's, not NOOP's: {ehlo:?}"
    );
    assert!(ehlo.lines.len() > 1, "{ehlo:?}");
    // And the state was reset: no transaction survived STARTTLS.
    assert_eq!(client.command("RCPT TO:<alice@example.test>").code, 503);
}

#[test]
fn relay_policy_table() {
    let closed = TestServer::start(|_| {});
    let trusted = TestServer::start(|config| {
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let rcpt = |client: &mut RawClient, to: &str| client.command(&format!("RCPT TO:<{to}>"));

    // Unauthenticated stranger: foreign refused, known local accepted,
    // unknown local refused.
    let mut stranger = RawClient::greeted(closed.smtp());
    stranger.command("EHLO client.test");
    stranger.command("MAIL FROM:<someone@example.org>");
    let relay = rcpt(&mut stranger, "victim@elsewhere.example");
    assert_eq!((relay.code, relay.lines[0].get(..5)), (554, Some("5.7.1")));
    assert_eq!(rcpt(&mut stranger, "alice@example.test").code, 250);
    let unknown = rcpt(&mut stranger, "nobody@example.test");
    assert_eq!(
        (unknown.code, unknown.lines[0].get(..5)),
        (550, Some("5.1.1"))
    );

    // Trusted network: relays.
    let mut neighbour = RawClient::greeted(trusted.smtp());
    neighbour.command("EHLO client.test");
    neighbour.command("MAIL FROM:<app@example.org>");
    assert_eq!(rcpt(&mut neighbour, "victim@elsewhere.example").code, 250);
    assert_eq!(rcpt(&mut neighbour, "nobody@example.test").code, 550);

    // Authenticated user on port 25 after STARTTLS: relays.
    let mut user = RawClient::greeted(closed.smtp());
    user.command("EHLO client.test");
    user.starttls(&closed.cert_path());
    user.command("EHLO client.test");
    assert_eq!(user.auth_plain("alice@example.test", PASSWORD).code, 235);
    user.command("MAIL FROM:<alice@example.test>");
    assert_eq!(rcpt(&mut user, "friend@elsewhere.example").code, 250);
}

#[test]
fn an_open_relay_scanner_finishes_its_sixteen_probes() {
    // The probes of the classic relay tests, each in one session: every
    // RCPT refused. With 10 errors allowed the session was closed half way
    // and the scanner reported an error instead of "not an open relay".
    let server = TestServer::start(|_| {});
    let probes = [
        "victim@elsewhere.example",
        "victim%elsewhere.example@example.test",
        "victim%elsewhere.example@[127.0.0.1]",
        "\"victim@elsewhere.example\"@example.test",
        "\"victim%elsewhere.example\"@example.test",
        "victim@elsewhere.example@example.test",
        "@example.test:victim@elsewhere.example",
        "elsewhere.example!victim@example.test",
        "elsewhere.example!victim@[127.0.0.1]",
        "victim@elsewhere.example.",
        "victim@[127.0.0.2]",
        "VICTIM@ELSEWHERE.EXAMPLE",
        "victim@sub.elsewhere.example",
        "victim%elsewhere.example%example.test@example.test",
        "victim@elsewhere.example:25",
        "postmaster@elsewhere.example",
    ];
    let mut scanner = RawClient::greeted(server.smtp());
    scanner.command("EHLO scanner.test");
    let started = std::time::Instant::now();
    let mut codes = Vec::new();
    for probe in probes {
        assert_eq!(scanner.command("MAIL FROM:<scanner@example.org>").code, 250);
        codes.push(scanner.command(&format!("RCPT TO:<{probe}>")).code);
        assert_eq!(scanner.command("RSET").code, 250);
    }
    assert!(codes.iter().all(|&c| (500..600).contains(&c)), "{codes:?}");
    assert_eq!(scanner.command("QUIT").code, 221, "the scan finished");
    // Past the soft limit of 10 errors, each refusal came a second late.
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.message_count(), 0);
}

#[test]
fn authenticated_users_send_only_as_themselves() {
    let server = TestServer::start(|config| {
        config.aliases.insert(
            "sales@example.test".into(),
            petrel::config::AliasTargets::One("alice@example.test".into()),
        );
    });
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let refused = client.command("MAIL FROM:<bob@example.test>");
    assert_eq!(refused.code, 553);
    assert!(refused.text().starts_with("5.7.1"), "{refused:?}");
    assert_eq!(
        client.command("MAIL FROM:<sales@example.test>").code,
        250,
        "alias of alice"
    );
    client.command("RSET");
    assert_eq!(client.command("MAIL FROM:<ALICE@example.test>").code, 250);
}

#[test]
fn the_from_header_must_belong_to_the_login_too() {
    // Before, only the envelope was bound: alice sent "From: bob@" with
    // an aligned DKIM signature.
    let server = TestServer::start(|config| {
        config.aliases.insert(
            "sales@example.test".into(),
            petrel::config::AliasTargets::One("alice@example.test".into()),
        );
    });
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let send = |client: &mut RawClient, from: &str| {
        client.send_transaction(
            "alice@example.test",
            &["carol@example.test"],
            format!("From: {from}\r\nSubject: s\r\n\r\nx\r\n").as_bytes(),
        )
    };
    for forged in [
        "bob@example.test",
        "Alice <alice@example.test>, bob@example.test",
        "\"alice@example.test\" <bob@example.test>",
        "(alice@example.test) bob@example.test",
        "Team: bob@example.test;",
    ] {
        let refused = send(&mut client, forged);
        assert_eq!(refused.code, 553, "{forged}: {refused:?}");
        assert!(refused.text().starts_with("5.7.1"), "{refused:?}");
    }
    for own in [
        "alice@example.test",
        "Alice Example <ALICE@example.test>",
        "Sales <sales@example.test>",
    ] {
        assert_eq!(send(&mut client, own).code, 250, "{own}");
    }
    assert_eq!(server.message_count(), 3);
}

#[test]
fn password_guessing_is_slowed_then_refused_per_address() {
    let server = TestServer::start(|config| {
        config.auth.slowdown_after = 1;
        config.auth.slowdown_step = HumanDuration::secs(1);
        config.auth.lockout_after = 3;
        config.auth.lockout_duration = HumanDuration::secs(600);
    });
    let addr = server.addr(ListenerKind::Smtps);
    let cert = server.cert_path();
    let mut attacker = RawClient::implicit_tls(addr, &cert);
    attacker.command("EHLO attacker.test");

    let first = attacker.auth_plain("alice@example.test", "Guess-Number-1!");
    assert_eq!(first.code, 535);
    assert!(first.text().starts_with("5.7.8"), "{first:?}");

    let started = Instant::now();
    let second = attacker.auth_plain("alice@example.test", "Guess-Number-2!");
    assert_eq!(second.code, 535);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "second failure was not slowed down"
    );

    let third = attacker.auth_plain("alice@example.test", "Guess-Number-3!");
    assert_eq!(third.code, 421, "{third:?}");
    attacker.expect_closed();

    // Even the right password is refused from that address now ...
    let mut again = RawClient::implicit_tls(addr, &cert);
    again.command("EHLO attacker.test");
    assert_eq!(again.auth_plain("alice@example.test", PASSWORD).code, 421);

    // ... while another client address logs in at once.
    let mut other = RawClient::connect_from("127.0.0.2", addr);
    other.upgrade_tls(&cert);
    other.expect_greeting();
    other.command("EHLO other.test");
    assert_eq!(other.auth_plain("alice@example.test", PASSWORD).code, 235);
}

#[test]
fn tls_older_than_1_2_is_refused() {
    let server = TestServer::start(|_| {});
    let smtps = server.addr(ListenerKind::Smtps).to_string();
    let smtp = server.smtp().to_string();
    // Python's ssl, allowed to go as low as TLS 1.0 but no higher than 1.1.
    let script = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.set_ciphers("DEFAULT:@SECLEVEL=0")
context.minimum_version = ssl.TLSVersion[sys.argv[2]]
context.maximum_version = ssl.TLSVersion[sys.argv[3]]
try:
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with context.wrap_socket(sock) as tls:
            print("handshake ok", tls.version())
except (ssl.SSLError, OSError) as error:
    print("handshake failed", error)
"#;
    let run = |min: &str, max: &str| {
        let output = Command::new("python3")
            .args(["-c", script, &smtps, min, max])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let old = run("TLSv1", "TLSv1_1");
    assert!(old.starts_with("handshake failed"), "{old}");
    let modern = run("TLSv1_2", "TLSv1_2");
    assert!(modern.starts_with("handshake ok TLSv1.2"), "{modern}");

    // openssl s_client with STARTTLS, forced to TLS 1.1.
    let s_client = |version: &str| {
        Command::new("openssl")
            .args(["s_client", "-starttls", "smtp", "-connect", &smtp, version])
            .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed")
    };
    let old = s_client("-tls1_1");
    let transcript = String::from_utf8_lossy(&old.stdout);
    // openssl names the version it tried even when the handshake failed;
    // a failed one has no cipher and no server certificate.
    assert!(transcript.contains("Cipher is (NONE)"), "{transcript}");
    assert!(
        transcript.contains("no peer certificate available"),
        "{transcript}"
    );
    let modern = s_client("-tls1_2");
    let transcript = String::from_utf8_lossy(&modern.stdout);
    assert!(
        transcript.contains("New, TLSv1.2, Cipher is ECDHE"),
        "{transcript}"
    );
}

fn write_certificate(dir: &Path, name: &str) -> Vec<u8> {
    let generated = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).unwrap();
    // Key first, then the certificate, as a renewal tool would.
    std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), generated.cert.pem()).unwrap();
    std::fs::copy(dir.join("cert.pem"), dir.join(name)).unwrap();
    generated.cert.der().to_vec()
}

/// The certificate served on an implicit-TLS port, if it verifies
/// against `trust`.
fn served_certificate(addr: std::net::SocketAddr, trust: &Path) -> Option<Vec<u8>> {
    let mut client = RawClient::connect(addr);
    client.try_upgrade_tls(trust).ok()?;
    client.expect_greeting();
    Some(client.peer_certificate())
}

#[test]
fn replaced_certificate_files_are_picked_up_without_restart() {
    let certs = tempfile::tempdir().unwrap();
    let first = write_certificate(certs.path(), "first.pem");
    let cert_dir = certs.path().to_path_buf();
    let server = TestServer::start(|config| {
        config.tls.cert = Some(cert_dir.join("cert.pem"));
        config.tls.key = Some(cert_dir.join("key.pem"));
    });
    let addr = server.addr(ListenerKind::Smtps);
    assert_eq!(
        served_certificate(addr, &certs.path().join("first.pem")),
        Some(first)
    );

    let second = write_certificate(certs.path(), "second.pem");
    let trust = certs.path().join("second.pem");
    let deadline = Instant::now() + WAIT;
    loop {
        // Until the reload, the old certificate fails verification against
        // the new trust anchor; poll with fresh connections.
        if let Some(served) = served_certificate(addr, &trust) {
            assert_eq!(served, second);
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        std::thread::sleep(Duration::from_millis(200));
    }
}
