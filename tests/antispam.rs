//! The gate before the session on the MX port, against the real binary:
//! the pregreet test with a bot, Python's smtplib and swaks; DNS lists
//! served by dnsmasq on loopback (an independent DNS server), with a
//! weighted allowlist, a "query refused" answer and a list that never
//! answers; and the clients the gate must leave alone.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::serving::{Serving, add_user, write_config};
use common::sink::free_port;
use common::{standard_dns, wait_for};

/// Connects from a chosen loopback address.
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Everything the server says until it closes the connection.
fn read_to_end(mut stream: TcpStream) -> String {
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

/// Reads replies until a last line (`NNN `) arrives; returns them all.
fn read_reply(stream: &mut TcpStream) -> String {
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = stream.read(&mut byte) {
        text.push(byte[0]);
        if text.ends_with(b"\r\n") {
            let lines = String::from_utf8_lossy(&text).into_owned();
            let last = lines.trim_end().lines().last().unwrap_or("").to_string();
            if last.len() >= 4 && last.as_bytes()[3] == b' ' {
                break;
            }
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Seconds Python's smtplib takes to be greeted from `source`, and
/// whether it then sent a message through (a real client, which waits for
/// the whole greeting).
fn smtplib_session(server: SocketAddr, source: &str) -> (f64, String) {
    let script = r#"
import smtplib, sys, time
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.monotonic()
s = smtplib.SMTP(host, port, source_address=(source, 0), timeout=30)
greeted = time.monotonic() - started
s.ehlo("client.example.org")
s.sendmail("someone@example.org", ["alice@example.test"], "Subject: smtplib\r\n\r\nhello\r\n")
s.quit()
print(f"{greeted:.3f} sent")
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .arg(source)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (seconds, said) = stdout.trim().split_once(' ').unwrap();
    (seconds.parse().unwrap(), said.to_string())
}

#[test]
fn a_client_that_talks_first_is_refused_and_a_patient_one_passes_once_per_ttl() {
    let dns = standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n\
             [mail_auth]\nenabled = false\n\
             [relay]\ntrusted_networks = [\"127.0.0.8/32\"]\n\
             [antispam]\ncheck_loopback = true\ngreet_wait = \"1s\"\n",
            dns.addr
        ),
    );
    add_user(&config, "alice@example.test");
    let mut serving = Serving::start(&config);
    let smtp = serving.listen_address("smtp");

    // A bot: EHLO before the greeting is over.
    let mut bot = connect_from("127.0.0.5", smtp);
    bot.write_all(b"EHLO bot.example\r\n").unwrap();
    let said = read_to_end(bot);
    assert!(said.starts_with("220-"), "{said}");
    assert!(
        said.contains(
            "554 5.7.1 Service unavailable; client [127.0.0.5] talked before the greeting\r\n"
        ),
        "{said}"
    );
    assert!(!said.contains("250"), "no session for a bot: {said}");
    let pregreet = serving.wait_for_log("PREGREET 18 after");
    assert!(pregreet.contains("from [127.0.0.5]:"), "{pregreet}");
    assert!(
        pregreet.contains(": EHLO bot.example\\x0d\\x0a"),
        "{pregreet}"
    );
    serving.wait_for_log(
        "NOQUEUE: reject: CONNECT from unknown[127.0.0.5]: 554 5.7.1 Service unavailable; \
         client [127.0.0.5] talked before the greeting",
    );

    // Python's smtplib waits for the whole greeting: it passes, after the
    // wait, and is greeted at once on its next connection.
    let (first, sent) = smtplib_session(smtp, "127.0.0.6");
    assert_eq!(sent, "sent");
    assert!(first >= 0.9, "greeted after {first}s");
    let (second, sent) = smtplib_session(smtp, "127.0.0.6");
    assert_eq!(sent, "sent");
    assert!(second < 0.5, "greeted after {second}s the second time");

    // swaks, a second real client.
    let output = Command::new("swaks")
        .args(["--server", &smtp.ip().to_string()])
        .args(["--port", &smtp.port().to_string()])
        .args(["--local-interface", "127.0.0.7"])
        .args([
            "--from",
            "someone@example.org",
            "--to",
            "alice@example.test",
        ])
        .args(["--helo", "swaks.example.org"])
        .output()
        .expect("swaks (see .ci/run)");
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{transcript}");
    assert!(transcript.contains("<-  220-"), "{transcript}");
    assert!(transcript.contains("250 2.0.0 OK queued"), "{transcript}");

    // Left alone: a trusted network, and the submission port, where a
    // client that talks first gets its session.
    for (source, listener) in [("127.0.0.8", "smtp"), ("127.0.0.9", "submission")] {
        let mut eager = connect_from(source, serving.listen_address(listener));
        eager.write_all(b"EHLO eager.example\r\n").unwrap();
        let greeting = read_reply(&mut eager);
        assert!(greeting.starts_with("220 "), "{source}: {greeting}");
        let ehlo = read_reply(&mut eager);
        assert!(ehlo.starts_with("250"), "{source}: {ehlo}");
    }
    let lines = serving.seen_lines();
    assert_eq!(
        lines.iter().filter(|l| l.contains("PREGREET")).count(),
        1,
        "{lines:#?}"
    );
}

/// A dnsmasq serving the test lists on loopback; killed when dropped.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `zen.example.test` lists 127.0.0.2 and 127.0.0.3, and answers
/// "query refused" (127.255.255.254) for 127.0.0.4; `wl.example.test`
/// allows 127.0.0.3; `slow.example.test` goes to `silent`, which never
/// answers.
fn dnsbl_server(silent: SocketAddr) -> Dnsmasq {
    let port = free_port();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let child = Command::new("dnsmasq")
        .args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--local=/example.test/",
            "--local=/example.org/",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--user={user}"))
        .arg(format!(
            "--server=/slow.example.test/{}#{}",
            silent.ip(),
            silent.port()
        ))
        .args([
            "--host-record=2.0.0.127.zen.example.test,127.0.0.2",
            "--host-record=3.0.0.127.zen.example.test,127.0.0.2",
            "--host-record=3.0.0.127.wl.example.test,127.0.10.2",
            "--host-record=4.0.0.127.zen.example.test,127.255.255.254",
            "--mx-host=example.org,mx.example.org,10",
            "--host-record=mx.example.org,127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed (see .ci/run)");
    Dnsmasq {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

#[test]
fn dns_listed_clients_are_refused_allowlisted_ones_let_in_and_failures_cost_nothing() {
    // Receives the queries for the slow list and never answers them.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dnsmasq = dnsbl_server(silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n\
             [mail_auth]\nenabled = false\n\
             [antispam]\ncheck_loopback = true\npregreet = false\n\
             dnsbl = [\"zen.example.test*2\", \"wl.example.test=127.0.[0..255].[1..3]*-3\", \
             \"slow.example.test*2\"]\ndnsbl_threshold = 2\ndnsbl_timeout = \"1s\"\n",
            dnsmasq.addr
        ),
    );
    wait_for("dnsmasq to answer", || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .is_ok_and(|probe| probe.connect(dnsmasq.addr).is_ok() && probe.send(&[0; 12]).is_ok())
    });
    let mut serving = Serving::start(&config);
    let smtp = serving.listen_address("smtp");

    // Listed by zen (weight 2, the threshold): refused as the greeting.
    let started = Instant::now();
    let said = read_to_end(connect_from("127.0.0.2", smtp));
    assert_eq!(
        said,
        "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example.test\r\n"
    );
    // The slow list cost its deadline and no more.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let unanswered = serving.wait_for_log("slow.example.test gave no answer for [127.0.0.2]");
    assert!(
        unanswered.contains("counted as not listing it"),
        "{unanswered}"
    );
    serving.wait_for_log("DNSBL rank 2 for [127.0.0.2]:");
    let reject = serving.wait_for_log("NOQUEUE: reject: CONNECT from unknown[127.0.0.2]");
    assert!(
        reject.contains(
            ": 554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example.test"
        ),
        "{reject}"
    );

    // Listed by zen, but the allowlist's -3 brings it under the threshold;
    // "query refused" is not a listing (and is logged as a setup problem).
    for source in ["127.0.0.3", "127.0.0.4"] {
        let mut client = connect_from(source, smtp);
        let greeting = read_reply(&mut client);
        assert!(greeting.starts_with("220 "), "{source}: {greeting}");
        client.write_all(b"EHLO client.example.org\r\n").unwrap();
        assert!(read_reply(&mut client).starts_with("250"), "{source}");
        client.write_all(b"QUIT\r\n").unwrap();
    }
    serving.wait_for_log("zen.example.test answered 127.255.255.254");
    // A list that never answers counts for nothing: 127.0.0.4 came in
    // although the slow list's weight alone reaches the threshold.
    serving.wait_for_log("slow.example.test gave no answer for [127.0.0.4]");

    // Logged as fail2ban's filter reads it.
    let log = dir.path().join("petrel.log");
    std::fs::write(&log, serving.seen_lines().join("\n")).unwrap();
    let output = Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(&log)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/fail2ban/filter.d/petrel.conf"
        ))
        .output()
        .expect("fail2ban-regex (see .ci/run)");
    let report = String::from_utf8_lossy(&output.stdout);
    let matched = report.split("Matched line(s):").nth(1).unwrap_or_default();
    assert!(
        matched.contains("NOQUEUE: reject: CONNECT from unknown[127.0.0.2]"),
        "{report}"
    );
    drop(silent);
}
