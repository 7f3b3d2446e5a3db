//! SPF, DKIM and DMARC of inbound mail on the MX port, end to end: every
//! record is served by a DNS server on loopback, messages come over real
//! SMTP, DKIM signatures are made by an independent implementation
//! (Python's dkimpy), and the verdicts are read from the
//! Authentication-Results field of the queued copy, or from the refusal.

mod common;

use common::dns::TestDns;
use common::*;
use petrel::config::Config;
use petrel::instance::Options;
use petrel::protocol::session::ListenerKind;

/// The standard zone plus `domain` as a mail domain (sender
/// verification wants its MX) with `spf` as its SPF record, if any.
fn sender_domain(dns: &TestDns, domain: &str, spf: Option<&str>) {
    dns.mx(domain, 10, "mx.example.org");
    if let Some(spf) = spf {
        dns.txt(domain, &[spf.to_string()]);
    }
}

/// TXT strings of at most 255 octets (RFC 1035), as a zone file splits them.
fn txt_strings(value: &str) -> Vec<String> {
    value
        .as_bytes()
        .chunks(255)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect()
}

fn queueing_server(dns: TestDns, adjust: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(dns, Options { delivery: false }, adjust)
}

/// Sends `message` from `sender` to alice on the MX port; the final reply.
fn send(server: &TestServer, helo: &str, sender: &str, message: &str) -> Reply {
    let mut client = RawClient::greeted(server.smtp());
    assert_eq!(client.command(&format!("EHLO {helo}")).code, 250);
    let reply = client.send_transaction(sender, &["alice@example.test"], message.as_bytes());
    client.command("QUIT");
    reply
}

/// The Authentication-Results field of a queued message (unfolded), or
/// None; asserts there is at most one naming this server.
fn results_of(server: &TestServer, reply: &Reply) -> Option<String> {
    assert_eq!(reply.code, 250, "{reply:?}");
    let content = server.stored_content_of(&queue_id_from(&reply.text()));
    let text = String::from_utf8_lossy(&content).replace("\r\n\t", " ");
    let ours: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("Authentication-Results: mx.test;"))
        .collect();
    assert!(ours.len() <= 1, "{text}");
    ours.first().map(|line| line.to_string())
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
    )
}

#[test]
fn spf_results_come_from_the_senders_records() {
    let dns = standard_dns();
    sender_domain(&dns, "pass.example", Some("v=spf1 ip4:127.0.0.0/8 -all"));
    sender_domain(&dns, "fail.example", Some("v=spf1 ip4:192.0.2.0/24 -all"));
    sender_domain(&dns, "softfail.example", Some("v=spf1 ~all"));
    sender_domain(&dns, "neutral.example", Some("v=spf1 ?all"));
    sender_domain(&dns, "none.example", None);
    sender_domain(
        &dns,
        "permerror.example",
        Some("v=spf1 include:nowhere.example -all"),
    );
    sender_domain(
        &dns,
        "loop.example",
        Some("v=spf1 include:loop.example -all"),
    );
    sender_domain(&dns, "down.example", Some("v=spf1 a:down-a.example -all"));
    dns.fail("down-a.example");
    sender_domain(
        &dns,
        "include.example",
        Some("v=spf1 include:pass.example -all"),
    );
    dns.txt("helo.example", &["v=spf1 ip4:127.0.0.1 -all".to_string()]);
    let server = queueing_server(dns, |_| {});
    for (domain, expected) in [
        ("pass.example", "spf=pass"),
        ("fail.example", "spf=fail"),
        ("softfail.example", "spf=softfail"),
        ("neutral.example", "spf=neutral"),
        ("none.example", "spf=none"),
        ("permerror.example", "spf=permerror"),
        ("loop.example", "spf=permerror"),
        ("down.example", "spf=temperror"),
        ("include.example", "spf=pass"),
    ] {
        let sender = format!("someone@{domain}");
        let reply = send(&server, "client.test", &sender, &message(&sender, domain));
        let results = results_of(&server, &reply).expect("an Authentication-Results field");
        assert!(
            results.contains(&format!("{expected} ("))
                && results.contains(&format!("smtp.mailfrom={domain}")),
            "{domain}: {results}"
        );
        assert!(
            results.contains("dkim=none") && results.contains("dmarc=none"),
            "{results}"
        );
    }
    // The null sender: the HELO name is the identity checked.
    let reply = send(
        &server,
        "helo.example",
        "",
        &message("mailer-daemon@helo.example", "bounce"),
    );
    let results = results_of(&server, &reply).unwrap();
    assert!(
        results.contains("spf=pass") && results.contains("smtp.helo=helo.example"),
        "{results}"
    );
}

/// A message signed by dkimpy with a key of `algorithm` for
/// signed.example (selector `selector`), and the key's record.
fn signed_by_dkimpy(algorithm: &str, selector: &str, message: &str) -> (String, String) {
    signed_for("signed.example", algorithm, selector, message)
}

fn signed_for(domain: &str, algorithm: &str, selector: &str, message: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("message.eml");
    let output = dir.path().join("signed.eml");
    std::fs::write(&input, message).unwrap();
    let record = python(
        "dkim_sign.py",
        &[
            algorithm,
            domain,
            selector,
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    let signed = String::from_utf8(std::fs::read(&output).unwrap()).unwrap();
    (signed, record.trim().to_string())
}

#[test]
fn inbound_dkim_signed_by_dkimpy_pass_tampered_and_missing_key() {
    let dns = standard_dns();
    // SPF fails for everyone: only DKIM can satisfy the p=reject policy.
    sender_domain(&dns, "signed.example", Some("v=spf1 -all"));
    dns.txt("_dmarc.signed.example", &["v=DMARC1; p=reject".to_string()]);
    let original = message("News <news@signed.example>", "signed");
    let mut signed = Vec::new();
    let mut records = Vec::new();
    for algorithm in ["rsa", "ed25519"] {
        let selector = format!("{algorithm}1");
        let (message, record) = signed_by_dkimpy(algorithm, &selector, &original);
        dns.txt(
            &format!("{selector}._domainkey.signed.example"),
            &txt_strings(&record),
        );
        signed.push((algorithm, message));
        records.push(record);
    }
    // Signed with a key that was never published.
    let (unpublished, _) = signed_by_dkimpy("ed25519", "gone", &original);
    let server = queueing_server(dns, |_| {});
    for (algorithm, message) in &signed {
        let reply = send(&server, "client.test", "bounce@signed.example", message);
        let results = results_of(&server, &reply).unwrap();
        let selector = format!("header.s={algorithm}1");
        assert!(
            results.contains("dkim=pass (signature verified) header.d=signed.example")
                && results.contains(&selector),
            "{algorithm}: {results}"
        );
        assert!(results.contains("spf=fail"), "{results}");
        assert!(
            results.contains("dmarc=pass (p=reject) header.from=signed.example"),
            "{results}"
        );
        // A body changed on the way fails DKIM, and so DMARC, and the
        // domain asked for that to be refused.
        let tampered = message.replace("Hello.", "Hello!");
        let reply = send(&server, "client.test", "bounce@signed.example", &tampered);
        assert_eq!(reply.code, 550, "{algorithm}: {reply:?}");
        assert!(reply.text().contains("5.7.1"), "{reply:?}");
        assert!(
            reply.text().contains("DMARC policy of signed.example"),
            "{reply:?}"
        );
    }
    let reply = send(
        &server,
        "client.test",
        "bounce@signed.example",
        &unpublished,
    );
    assert_eq!(reply.code, 550, "{reply:?}");
    // The same without the domain's reject policy: accepted and tagged.
    let server = {
        let dns = standard_dns();
        sender_domain(&dns, "signed.example", Some("v=spf1 -all"));
        queueing_server(dns, |_| {})
    };
    let reply = send(
        &server,
        "client.test",
        "bounce@signed.example",
        &unpublished,
    );
    let results = results_of(&server, &reply).unwrap();
    assert!(
        results.contains("dkim=permerror (no key at gone._domainkey.signed.example)")
            && results.contains("dmarc=none"),
        "{results}"
    );
    // And a tampered body, recorded as such.
    let (algorithm, message) = &signed[0];
    server.dns.txt(
        &format!("{algorithm}1._domainkey.signed.example"),
        &txt_strings(&records[0]),
    );
    let tampered = message.replace("Hello.", "Hello!");
    let reply = send(&server, "client.test", "bounce@signed.example", &tampered);
    let results = results_of(&server, &reply).unwrap();
    assert!(
        results.contains("dkim=fail (body hash did not verify) header.d=signed.example"),
        "{results}"
    );
}

#[test]
fn a_name_server_that_never_answers_gives_temperrors_and_the_mail_is_kept() {
    let dns = standard_dns();
    sender_domain(
        &dns,
        "dead.example",
        Some("v=spf1 include:_spf.dead.example -all"),
    );
    dns.silent("_spf.dead.example")
        .silent("s1._domainkey.dead.example")
        .silent("_dmarc.dead.example");
    let (signed, _) = signed_for(
        "dead.example",
        "ed25519",
        "s1",
        &message("a@dead.example", "no answers"),
    );
    let server = queueing_server(dns, |config| {
        config.dns.timeout = petrel::config::HumanDuration(std::time::Duration::from_millis(300));
    });
    let reply = send(&server, "client.test", "a@dead.example", &signed);
    let results = results_of(&server, &reply).unwrap();
    for expected in ["spf=temperror", "dkim=temperror", "dmarc=temperror"] {
        assert!(results.contains(expected), "{expected}: {results}");
    }
}

#[test]
fn dmarc_alignment_and_policies() {
    let dns = standard_dns();
    for domain in ["relaxed.example", "strict.example", "quarantine.example"] {
        sender_domain(&dns, domain, Some("v=spf1 -all"));
        sender_domain(
            &dns,
            &format!("mail.{domain}"),
            Some("v=spf1 ip4:127.0.0.1 -all"),
        );
    }
    dns.txt(
        "_dmarc.relaxed.example",
        &["v=DMARC1; p=reject".to_string()],
    );
    dns.txt(
        "_dmarc.strict.example",
        &["v=DMARC1; p=reject; aspf=s".to_string()],
    );
    dns.txt(
        "_dmarc.quarantine.example",
        &["v=DMARC1; p=quarantine".to_string()],
    );
    sender_domain(&dns, "elsewhere.test", Some("v=spf1 ip4:127.0.0.1 -all"));
    let server = queueing_server(dns, |_| {});
    // Relaxed: SPF passed for a subdomain of the From domain's organization.
    let reply = send(
        &server,
        "client.test",
        "bounces@mail.relaxed.example",
        &message("ceo@relaxed.example", "relaxed"),
    );
    let results = results_of(&server, &reply).unwrap();
    assert!(results.contains("dmarc=pass (p=reject)"), "{results}");
    // Strict: the same is not aligned, and the policy says reject.
    let reply = send(
        &server,
        "client.test",
        "bounces@mail.strict.example",
        &message("ceo@strict.example", "strict"),
    );
    assert_eq!(reply.code, 550, "{reply:?}");
    // A pass for an unrelated domain does not speak for the From domain.
    let reply = send(
        &server,
        "client.test",
        "someone@elsewhere.test",
        &message("ceo@relaxed.example", "spoofed"),
    );
    assert_eq!(reply.code, 550, "{reply:?}");
    // Quarantine is only recorded.
    let reply = send(
        &server,
        "client.test",
        "someone@elsewhere.test",
        &message("ceo@quarantine.example", "quarantined"),
    );
    let results = results_of(&server, &reply).unwrap();
    assert!(
        results.contains("dmarc=fail (p=quarantine) header.from=quarantine.example"),
        "{results}"
    );
    drop(server);

    // An operator who only tags: the failure is recorded, the mail kept.
    let dns = TestDns::start();
    for (name, value) in [
        ("_dmarc.strict.example", "v=DMARC1; p=reject; aspf=s"),
        ("mail.strict.example", "v=spf1 ip4:127.0.0.1 -all"),
    ] {
        dns.txt(name, &[value.to_string()]);
    }
    dns.mx("mail.strict.example", 10, "mx.example.org")
        .a("mx.example.org", "127.0.0.1");
    let server = queueing_server(dns, |config| config.mail_auth.honour_dmarc_reject = false);
    let reply = send(
        &server,
        "client.test",
        "bounces@mail.strict.example",
        &message("ceo@strict.example", "strict"),
    );
    let results = results_of(&server, &reply).unwrap();
    assert!(results.contains("dmarc=fail (p=reject)"), "{results}");
}

#[test]
fn results_claiming_our_name_are_removed_others_kept() {
    let dns = standard_dns();
    sender_domain(&dns, "pass.example", Some("v=spf1 ip4:127.0.0.1 -all"));
    let server = queueing_server(dns, |_| {});
    let forged = "Authentication-Results: mx.test;\r\n\tdkim=pass header.d=bank.example\r\n\
                  Authentication-Results: other.example; spf=pass\r\n\
                  AUTHENTICATION-RESULTS: (sure) MX.TEST; dmarc=pass\r\n";
    let body = format!("{forged}{}", message("a@pass.example", "forged"));
    let reply = send(&server, "client.test", "a@pass.example", &body);
    let results = results_of(&server, &reply).unwrap();
    assert!(results.contains("spf=pass"), "{results}");
    let content = server.stored_content_of(&queue_id_from(&reply.text()));
    let text = String::from_utf8_lossy(&content).to_ascii_lowercase();
    assert_eq!(
        text.matches("authentication-results: mx.test").count(),
        1,
        "{text}"
    );
    assert!(
        !text.contains("bank.example") && !text.contains("(sure)"),
        "{text}"
    );
    assert!(
        text.contains("authentication-results: other.example; spf=pass"),
        "{text}"
    );
}

#[test]
fn trusted_networks_and_submission_are_not_checked() {
    let dns = standard_dns();
    sender_domain(&dns, "fail.example", Some("v=spf1 -all"));
    dns.txt("_dmarc.fail.example", &["v=DMARC1; p=reject".to_string()]);
    let server = queueing_server(dns, |config| {
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let reply = send(
        &server,
        "client.test",
        "a@fail.example",
        &message("a@fail.example", "trusted"),
    );
    assert_eq!(results_of(&server, &reply), None);
    assert_eq!(server.dns.queries_for("_dmarc.fail.example"), 0);
    // Submission: an authenticated user's mail is not checked either.
    let mut client = RawClient::greeted(server.addr(ListenerKind::Submission));
    client.command("EHLO client.test");
    client.starttls(&server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = client.send_transaction(
        "alice@example.test",
        &["bob@example.test"],
        message("alice@example.test", "submitted").as_bytes(),
    );
    assert_eq!(results_of(&server, &reply), None);
}
