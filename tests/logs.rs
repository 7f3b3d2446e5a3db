//! What an operator and fail2ban read: one line per connection, refusal,
//! failed login, accepted message, delivery (with outbound TLS), operator
//! action and local submission, in Postfix's words; and the fail2ban filter
//! in contrib/ matched against a real log with the real `fail2ban-regex`.

mod common;

use std::path::Path;
use std::process::Command;

use common::serving::{Serving, add_user, petrel, write_config};
use common::*;

#[test]
fn every_event_gets_a_line_that_operators_and_fail2ban_can_use() {
    let dns = standard_dns();
    // B: where A's relayed mail goes (its SMTP port offers STARTTLS).
    let b_dir = tempfile::tempdir().unwrap();
    let b_config = write_config(
        b_dir.path(),
        &format!(
            "[domains]\nlocal = [\"elsewhere.example\"]\n[dns]\nnameservers = [\"{}\"]\n",
            dns.addr
        ),
    );
    add_user(&b_config, "friend@elsewhere.example");
    let mut b = Serving::start(&b_config);
    let b_port = b.listen_address("smtp").port();

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n\
             [delivery]\nport = {b_port}\n[queue]\nretry_min = \"1h\"\nretry_max = \"1h\"\n\
             [auth]\nslowdown_after = 100\n",
            dns.addr
        ),
    );
    add_user(&config, "alice@example.test");
    let mut a = Serving::start(&config);
    let smtp = a.listen_address("smtp");

    // A stranger trying to relay, twice.
    let mut stranger = RawClient::connect_from("127.0.0.5", smtp);
    stranger.expect_greeting();
    stranger.command("EHLO spammer.test");
    stranger.command("MAIL FROM:<x@example.org>");
    assert_eq!(
        stranger.command("RCPT TO:<victim@elsewhere.example>").code,
        554
    );
    assert_eq!(
        stranger.command("RCPT TO:<other@elsewhere.example>").code,
        554
    );
    stranger.command("QUIT");
    // A password guesser.
    let smtps = a.listen_address("smtps");
    let mut guesser = RawClient::connect_from("127.0.0.6", smtps);
    guesser.upgrade_tls(&dir.path().join("data/tls/selfsigned-cert.pem"));
    guesser.expect_greeting();
    guesser.command("EHLO guesser.test");
    assert_eq!(
        guesser.auth_plain("alice@example.test", "Guess-1!").code,
        535
    );
    // Alice relays a message through A to B over STARTTLS.
    let mut alice = RawClient::connect_from("127.0.0.7", smtps);
    alice.upgrade_tls(&dir.path().join("data/tls/selfsigned-cert.pem"));
    alice.expect_greeting();
    alice.command("EHLO laptop.test");
    assert_eq!(alice.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = alice.send_transaction(
        "alice@example.test",
        &["friend@elsewhere.example"],
        b"Subject: hi\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
    alice.command("QUIT");

    let lines = [
        a.wait_for_log("connect from unknown[127.0.0.5] on smtp"),
        a.wait_for_log("NOQUEUE: reject: RCPT from unknown[127.0.0.5]: 554 5.7.1"),
        a.wait_for_log("disconnect from unknown[127.0.0.5] ehlo=1 mail=1 rcpt=0/2 quit=1 commands=3/5"),
        a.wait_for_log("warning: unknown[127.0.0.6]: SASL PLAIN authentication failed"),
        a.wait_for_log("client=unknown[127.0.0.7], helo=<laptop.test>, listener=smtps, sasl_username=alice@example.test"),
        a.wait_for_log("Untrusted TLS connection established to mx.elsewhere.example[127.0.0.1]:"),
        a.wait_for_log("to=<friend@elsewhere.example>, relay=mx.elsewhere.example[127.0.0.1]"),
    ];
    assert!(lines[6].contains("status=sent"), "{}", lines[6]);
    assert!(
        lines[1].contains(
            "from=<x@example.org> to=<victim@elsewhere.example> proto=ESMTP helo=<spammer.test>"
        ),
        "{}",
        lines[1]
    );
    assert!(
        !lines.iter().any(|l| l.contains("Delay(")),
        "no Rust debug text"
    );

    // An operator action and a local submission show in the server's log.
    let (code, _) = queue_cli(&config, &["retry", "--all"]);
    assert_eq!(code, 0);
    a.wait_for_log("retry now, by the operator (petrel queue, uid=");
    let mut child = petrel()
        .args([
            "sendmail",
            "-c",
            config.to_str().unwrap(),
            "alice@example.test",
        ])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(b"Subject: cron\n\nnightly\n");
    assert!(
        child.status.success(),
        "{}",
        String::from_utf8_lossy(&child.stderr)
    );
    child.stderr.clear();
    let uid = rustix::process::getuid().as_raw();
    let line = a.wait_for_log(&format!(
        "client=local[uid={uid}], helo=<localhost>, listener=local, to=<"
    ));
    assert!(line.contains("@example.test>, size="), "{line}");
    // sendmail reads the 221 to QUIT: a clean end, no broken pipe.
    let line = a.wait_for_log(&format!(
        "disconnect from local[uid={uid}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"
    ));
    assert!(!line.contains("error"), "{line}");
    b.wait_for_log("to=<friend@elsewhere.example>, relay=local");

    // fail2ban's own tool, with the filter we ship, on this log.
    let log = dir.path().join("petrel.log");
    std::fs::write(&log, a.seen_lines().join("\n") + "\n").unwrap();
    let filter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/fail2ban/filter.d/petrel.conf");
    let output = Command::new("fail2ban-regex")
        .arg(&log)
        .arg(&filter)
        .output()
        .expect("fail2ban-regex (Debian package fail2ban, see .ci/run)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    // Two relay refusals from .5 and one failed login from .6; nothing
    // from alice's successful session.
    assert!(report.contains("Failregex: 3 total"), "{report}");
    assert!(report.contains("|   1) [2] "), "{report}");
    assert!(report.contains("|   2) [1] "), "{report}");
    // Every line's own time is read (the shipped pattern once matched
    // none: fail2ban took "now" for each, and skipped a file's existing
    // lines at start).
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    let date_hits: usize = report
        .split("Date template hits:")
        .nth(1)
        .and_then(|rest| rest.lines().find(|l| l.trim_start().starts_with("|  [")))
        .and_then(|l| l.split('[').nth(1)?.split(']').next()?.parse().ok())
        .unwrap_or(0);
    assert_eq!(date_hits, lines, "{report}");
    let matched = Command::new("fail2ban-regex")
        .args(["--print-all-matched"])
        .arg(&log)
        .arg(&filter)
        .output()
        .unwrap();
    let matched = String::from_utf8_lossy(&matched.stdout);
    let matched_lines: Vec<&str> = matched
        .split("Matched line(s):")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .take_while(|l| !l.starts_with('`'))
        .filter(|l| l.contains("petrel::"))
        .collect();
    assert_eq!(matched_lines.len(), 3, "{matched}");
    assert!(
        matched_lines
            .iter()
            .all(|l| l.contains("127.0.0.5]") || l.contains("127.0.0.6]")),
        "only the relay attempts and the guess: {matched_lines:#?}"
    );
    eprintln!("{report}");
}

fn queue_cli(config: &Path, args: &[&str]) -> (i32, String) {
    let output = petrel()
        .arg("-c")
        .arg(config)
        .arg("queue")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        use std::io::Write as _;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

#[test]
fn an_unreachable_smart_host_is_logged_with_what_waits_for_it() {
    // The log said "0 waiting recipients" while two waited.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [delivery]\nsmarthost = \"127.0.0.1:{port}\"\nsmarthost_tls = \"none\"\nworkers = 1\n"
        ),
    );
    add_user(&config, "alice@example.test");
    let mut serving = Serving::start(&config);
    let mut client = RawClient::greeted(serving.listen_address("smtp"));
    client.command("EHLO client.test");
    for n in 0..2 {
        let reply = client.send_transaction(
            "alice@example.test",
            &[
                &format!("friend{n}@elsewhere.example"),
                &format!("colleague{n}@elsewhere.example"),
            ],
            b"Subject: x\r\n\r\nx\r\n",
        );
        // The smart host decides about the domain: no DNS asked here.
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    let line = serving.wait_for_log("smarthost unreachable;");
    // The failed message's two recipients wait, and perhaps the other
    // message (or it is still being tried, or not claimed yet).
    let waiting: usize = line
        .split("unreachable; ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(waiting >= 2, "{line}");
    serving.terminate();
}
