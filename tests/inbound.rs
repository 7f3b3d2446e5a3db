//! The receiving side end to end: real clients (lettre, Python smtplib, a
//! raw socket client) against a real server on loopback, with the real
//! SQLite queue checked afterwards.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use petrel::config::{ByteSize, HumanDuration};

fn trusting_localhost(config: &mut petrel::config::Config) {
    config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
}

#[test]
fn lettre_message_lands_in_the_queue() {
    let server = TestServer::start(|_| {});
    let mailer = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(server.smtp().port())
        .hello_name(ClientId::Domain("lettre.test".into()))
        .build();
    let email = Message::builder()
        .from("Sender <sender@example.org>".parse().unwrap())
        .to("alice@example.test".parse().unwrap())
        .cc("bob@example.test".parse().unwrap())
        .subject("Hello from lettre")
        .body(String::from(
            "First line\r\n.starts with a dot\r\nLast line\r\n",
        ))
        .unwrap();
    let response = mailer.send(&email).expect("lettre sends");
    assert_eq!(u16::from(response.code()), 250);
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = queue_id_from(&text);

    assert_eq!(server.sender_of(&id), "sender@example.org");
    assert_eq!(
        server.recipients_of(&id),
        vec!["alice@example.test", "bob@example.test"]
    );
    // lettre ends DATA with "\r\n.\r\n" after the body, so the stored
    // message is exactly what it formatted plus that CRLF.
    assert_eq!(
        server.content_of(&id),
        [email.formatted(), b"\r\n".to_vec()].concat()
    );
    let (status, listener, helo): (String, String, String) = server
        .db()
        .query_row(
            "SELECT r.status, m.listener, m.helo FROM recipients r JOIN messages m ON m.id = r.message_id
             WHERE m.id = ?1 LIMIT 1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (status.as_str(), listener.as_str(), helo.as_str()),
        ("queued", "smtp", "lettre.test")
    );
}

#[test]
fn python_smtplib_message_lands_in_the_queue() {
    let server = TestServer::start(|_| {});
    let port = server.smtp().port().to_string();
    let output = python(
        "smtplib_send.py",
        &[
            "plain",
            "127.0.0.1",
            &port,
            "py@example.org",
            "alice@example.test,carol@example.test",
        ],
    );
    assert!(output.starts_with("250 2.0.0 OK queued as "), "{output}");
    let id = queue_id_from(output.trim());
    assert_eq!(server.sender_of(&id), "py@example.org");
    assert_eq!(
        server.recipients_of(&id),
        vec!["alice@example.test", "carol@example.test"]
    );
    let content = String::from_utf8(server.content_of(&id)).unwrap();
    assert!(
        content.contains("Subject: sent by smtplib\r\n"),
        "{content}"
    );
    assert!(
        content.ends_with("Hello from Python.\r\n.leading dot\r\n"),
        "{content:?}"
    );
}

#[test]
fn the_queue_view_explains_what_waits() {
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.send_message(
        "s@example.org",
        &["alice@example.test"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
    let (sender, recipient, status, waiting): (String, String, String, String) = server
        .db()
        .query_row(
            "SELECT sender, recipient, status, waiting FROM queue_status",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (
            sender.as_str(),
            recipient.as_str(),
            status.as_str(),
            waiting.as_str()
        ),
        (
            "s@example.org",
            "alice@example.test",
            "queued",
            "new, due now"
        )
    );
    let received_at: String = server
        .db()
        .query_row("SELECT received_at FROM messages", [], |r| r.get(0))
        .unwrap();
    assert!(
        petrel::timefmt::parse_sql_timestamp(&received_at).is_some(),
        "readable timestamp: {received_at}"
    );
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "PIPELINING"));
    client.send_raw(
        b"MAIL FROM:<p@example.org>\r\n\
          RCPT TO:<alice@example.test>\r\n\
          RCPT TO:<stranger@elsewhere.example>\r\n\
          RCPT TO:<bob@example.test>\r\n\
          DATA\r\n",
    );
    let codes: Vec<u16> = (0..5).map(|_| client.reply().code).collect();
    assert_eq!(codes, vec![250, 250, 554, 250, 354]);
    client.send_raw(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n");
    let queued = client.reply();
    assert_eq!(queued.code, 250, "{queued:?}");
    assert_eq!(client.reply().code, 250, "NOOP after the terminator");
    assert_eq!(client.reply().code, 221);
    let id = queue_id_from(&queued.text());
    assert_eq!(
        server.recipients_of(&id),
        vec!["alice@example.test", "bob@example.test"]
    );
}

#[test]
fn dot_stuffed_lines_round_trip_byte_exact() {
    let server = TestServer::start(|_| {});
    let original: &[u8] = b"Subject: dots\r\n\r\n.\r\n..\r\n...leading\r\n. space\r\nmid.dle.\r\n.\r\n\r\n.x\r\nend\r\n";
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.send_message(
        "d@example.org",
        &["alice@example.test"],
        &dot_stuff(original),
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(server.content_of(&queue_id_from(&reply.text())), original);
}

#[test]
fn ten_mib_message_is_accepted_intact() {
    let server = TestServer::start(|_| {});
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let line = [b'x'; 998];
    while body.len() < 10 * 1024 * 1024 {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    let mail = client.command(&format!("MAIL FROM:<big@example.org> SIZE={}", body.len()));
    assert_eq!(mail.code, 250, "{mail:?}");
    assert_eq!(client.command("RCPT TO:<alice@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(&body);
    client.send_raw(b".\r\n");
    let reply = client.reply();
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(server.content_of(&queue_id_from(&reply.text())), body);
}

#[test]
fn oversized_messages_are_refused_at_mail_and_during_data() {
    let server = TestServer::start(|config| {
        config.limits.max_message_size = ByteSize(1024 * 1024);
    });
    let mut client = RawClient::greeted(server.smtp());
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 1048576"), "{ehlo:?}");
    let refused = client.command("MAIL FROM:<big@example.org> SIZE=2000000");
    assert_eq!(refused.code, 552);
    assert!(refused.text().starts_with("5.3.4"), "{refused:?}");

    // No SIZE given: the limit is enforced while the data streams in.
    assert_eq!(client.command("MAIL FROM:<big@example.org>").code, 250);
    assert_eq!(client.command("RCPT TO:<alice@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    let chunk = [b"y".repeat(998), b"\r\n".to_vec()].concat();
    for _ in 0..1500 {
        client.send_raw(&chunk);
    }
    client.send_raw(b".\r\n");
    let reply = client.reply();
    assert_eq!(reply.code, 552, "{reply:?}");
    // The session is still in step and usable.
    assert_eq!(client.command("RSET").code, 250);
    assert_eq!(server.message_count(), 0);
}

#[test]
fn smuggling_never_produces_a_second_message() {
    let server = TestServer::start(|_| {});
    for trick in [&b"\n.\r\n"[..], b"\r\n.\n", b"\n.\n", b"\r.\r\n"] {
        let before = server.message_count();
        let mut client = RawClient::greeted(server.smtp());
        client.command("EHLO client.test");
        assert_eq!(client.command("MAIL FROM:<a@example.org>").code, 250);
        assert_eq!(client.command("RCPT TO:<alice@example.test>").code, 250);
        assert_eq!(client.command("DATA").code, 354);
        let mut data = b"Subject: innocent\r\n\r\nhello".to_vec();
        data.extend_from_slice(trick);
        data.extend_from_slice(
            b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n\
              Subject: smuggled\r\n\r\nevil\r\n.\r\n",
        );
        client.send_raw(&data);
        // Exactly one reply for the whole thing: a refusal.
        let reply = client.reply();
        assert_eq!(reply.code, 554, "{trick:?}: {reply:?}");
        // And the server is still in step: the next command gets its own reply.
        let noop = client.command("NOOP");
        assert_eq!(noop.code, 250, "{trick:?}: {noop:?}");
        assert_eq!(server.message_count(), before, "{trick:?} queued something");
    }
    // A clean message afterwards goes through, alone.
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.send_message(
        "a@example.org",
        &["alice@example.test"],
        b"Subject: clean\r\n\r\nok\r\n",
    );
    assert_eq!(reply.code, 250);
    assert_eq!(server.message_count(), 1);
}

#[test]
fn disconnect_mid_data_leaves_nothing() {
    let server = TestServer::start(|_| {});
    {
        let mut client = RawClient::greeted(server.smtp());
        client.command("EHLO client.test");
        client.command("MAIL FROM:<a@example.org>");
        client.command("RCPT TO:<alice@example.test>");
        assert_eq!(client.command("DATA").code, 354);
        client.send_raw(b"Subject: cut off\r\n\r\nhalf a message\r\n");
        // The client vanishes here.
    }
    wait_for("the session to end", || {
        server.instance().active_sessions() == 0
    });
    assert_eq!(server.message_count(), 0);
    let recipients: i64 = server
        .db()
        .query_row("SELECT count(*) FROM recipients", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recipients, 0);
}

#[test]
fn garbage_gets_errors_and_others_are_still_served() {
    let server = TestServer::start(|_| {});
    let mut garbage = RawClient::greeted(server.smtp());
    garbage.send_raw(b"\x00\x01\x02\xff\xfe binary junk\r\n");
    assert_eq!(garbage.reply().code, 500);
    garbage.send_raw(&[b'Z'; 20_000]);
    garbage.send_raw(b"\r\n");
    let too_long = garbage.reply();
    assert_eq!(too_long.code, 500, "{too_long:?}");
    assert!(too_long.text().contains("5.5.2"));
    garbage.send_raw(b"\xc3\x28\r\n");
    assert_eq!(garbage.reply().code, 500);

    // Meanwhile a well-behaved client is served.
    let mut good = RawClient::greeted(server.smtp());
    let reply = good.send_message(
        "g@example.org",
        &["alice@example.test"],
        b"Subject: fine\r\n\r\nfine\r\n",
    );
    assert_eq!(reply.code, 250);

    // The garbage sender is cut off after too many errors.
    let mut codes = Vec::new();
    for _ in 0..20 {
        garbage.send_raw(b"GARBAGE\r\n");
        match garbage.try_reply() {
            Some(reply) => {
                codes.push(reply.code);
                if reply.code == 421 {
                    break;
                }
            }
            None => break,
        }
    }
    assert_eq!(codes.last(), Some(&421), "{codes:?}");
    garbage.expect_closed();
}

#[test]
fn two_hundred_concurrent_clients_each_queue_a_message() {
    const CLIENTS: usize = 200;
    let server = TestServer::start(|config| {
        config.limits.max_sessions_per_ip = CLIENTS;
        // All 200 on port 25: none of the default 256 kept for submission.
        config.limits.submission_reserved = 0;
    });
    let addr = server.smtp();
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = RawClient::greeted(addr);
                // Every client is connected before any sends its message.
                barrier.wait();
                let body = format!("Subject: client {n}\r\n\r\nmessage {n}\r\n");
                let reply = client.send_message(
                    &format!("c{n}@example.org"),
                    &["alice@example.test"],
                    body.as_bytes(),
                );
                assert_eq!(reply.code, 250, "client {n}: {reply:?}");
                client.command("QUIT");
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    assert_eq!(server.message_count(), CLIENTS as i64);
    let distinct: i64 = server
        .db()
        .query_row("SELECT count(DISTINCT sender) FROM messages", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(distinct, CLIENTS as i64);
}

#[test]
fn concurrent_senders_share_commits() {
    const SENDERS: usize = 64;
    let server = TestServer::start(|config| {
        config.limits.max_sessions_per_ip = SENDERS;
    });
    let addr = server.smtp();
    let stats_before = server.instance().queue().stats().insert_commits();
    let barrier = Arc::new(Barrier::new(SENDERS));
    let threads: Vec<_> = (0..SENDERS)
        .map(|n| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = RawClient::greeted(addr);
                client.command("EHLO client.test");
                client.command(&format!("MAIL FROM:<g{n}@example.org>"));
                client.command("RCPT TO:<alice@example.test>");
                assert_eq!(client.command("DATA").code, 354);
                client.send_raw(b"Subject: group commit\r\n\r\nbody\r\n");
                // All end their DATA at the same moment.
                barrier.wait();
                client.send_raw(b".\r\n");
                assert_eq!(client.reply().code, 250);
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("sender thread");
    }
    let stats = server.instance().queue();
    let commits = stats.stats().insert_commits() - stats_before;
    let messages = stats.stats().messages();
    assert_eq!(messages, SENDERS as u64);
    assert!(
        commits < messages,
        "group commit: {commits} commits for {messages} messages"
    );
}

#[test]
fn per_address_and_total_session_limits_answer_421() {
    let server = TestServer::start(|config| {
        config.limits.max_sessions = 3;
        config.limits.max_sessions_per_ip = 2;
        config.limits.submission_reserved = 0;
    });
    let addr = server.smtp();
    let _a = RawClient::greeted(addr);
    let _b = RawClient::greeted(addr);
    let mut third = RawClient::connect(addr);
    let refused = third.reply();
    assert_eq!(refused.code, 421);
    assert!(refused.text().starts_with("4.7.0"), "{refused:?}");
    third.expect_closed();

    // Another loopback address still gets in, until the total is reached.
    let other = RawClient::connect_from("127.0.0.2", addr);
    let mut other = other;
    assert_eq!(other.reply().code, 220);
    let mut busy = RawClient::connect_from("127.0.0.3", addr);
    let refused = busy.reply();
    assert_eq!(refused.code, 421);
    assert!(refused.text().starts_with("4.3.2"), "{refused:?}");
}

#[test]
fn idle_clients_time_out_with_421() {
    let server = TestServer::start(|config| {
        config.limits.command_timeout = HumanDuration::secs(1);
    });
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.reply();
    assert_eq!(reply.code, 421);
    assert!(reply.text().starts_with("4.4.2"), "{reply:?}");
    client.expect_closed();
}

#[test]
fn stalled_data_times_out_and_queues_nothing() {
    let server = TestServer::start(|config| {
        config.limits.data_timeout = HumanDuration::secs(1);
    });
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    client.command("MAIL FROM:<a@example.org>");
    client.command("RCPT TO:<alice@example.test>");
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(b"Subject: slow\r\n");
    let reply = client.reply();
    assert_eq!(reply.code, 421, "{reply:?}");
    assert_eq!(server.message_count(), 0);
}

/// The socket's read timeout is the shorter of the command and DATA
/// timeouts; a client quiet for longer than that between commands, but
/// within the command timeout, keeps its session, and the command timeout
/// still ends it.
#[test]
fn a_quiet_client_is_timed_out_by_the_command_timeout_not_the_data_timeout() {
    let server = TestServer::start(|config| {
        config.limits.command_timeout = HumanDuration::secs(3);
        config.limits.data_timeout = HumanDuration::secs(1);
    });
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO quiet.test");
    // Over TLS too: the read that timed out early is taken up again
    // inside the TLS stream.
    let mut tls = RawClient::greeted(server.smtp());
    tls.command("EHLO quiet-tls.test");
    tls.starttls(&server.cert_path());
    // The clients' silence is what is tested, not a wait for the server.
    std::thread::sleep(std::time::Duration::from_millis(1600));
    assert_eq!(client.command("NOOP").code, 250);
    assert_eq!(tls.command("NOOP").code, 250);
    let quiet_since = std::time::Instant::now();
    let reply = client.reply();
    assert_eq!(reply.code, 421, "{reply:?}");
    let waited = quiet_since.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(2700),
        "timed out after {waited:?}, before the 3 s command timeout"
    );
}

/// Workers keep their buffers from one session to the next: what a client
/// pipelined behind QUIT must not become the next client's command.
#[test]
fn a_session_never_sees_input_left_by_the_one_before() {
    let server = TestServer::start(|config| {
        // One worker thread, so both sessions run on it.
        config.limits.max_sessions = 1;
        config.limits.submission_reserved = 0;
    });
    let mut first = RawClient::greeted(server.smtp());
    first.send_raw(b"EHLO first.test\r\nQUIT\r\nMAIL FROM:<left@example.org>\r\n");
    assert_eq!(first.reply().code, 250);
    assert_eq!(first.reply().code, 221);
    first.expect_closed();

    // The permit of the first session is given back just after its socket
    // closes: a connection in between is refused with 421.
    let mut second = None;
    wait_for("the only session slot to be free again", || {
        let mut client = RawClient::connect(server.smtp());
        let greeting = client.reply();
        if greeting.code == 220 {
            second = Some(client);
        }
        second.is_some()
    });
    let mut second = second.expect("greeted");
    let reply = second.command("EHLO second.test");
    assert_eq!(reply.code, 250, "{reply:?}");
    let reply = second.command("RCPT TO:<alice@example.test>");
    assert_eq!(reply.code, 503, "a MAIL FROM carried over: {reply:?}");
}

#[test]
fn relay_is_refused_for_strangers_and_allowed_for_trusted_networks() {
    let closed = TestServer::start(|_| {});
    let mut client = RawClient::greeted(closed.smtp());
    client.command("EHLO client.test");
    client.command("MAIL FROM:<a@example.org>");
    let refused = client.command("RCPT TO:<someone@elsewhere.example>");
    assert_eq!(refused.code, 554);
    assert!(refused.text().starts_with("5.7.1"), "{refused:?}");

    let trusted = TestServer::start(trusting_localhost);
    let mut client = RawClient::greeted(trusted.smtp());
    let reply = client.send_message(
        "a@example.org",
        &["someone@elsewhere.example"],
        b"Subject: relay\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
}

#[test]
fn rfc5321_size_limits_on_commands_and_paths() {
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    let long_local = "a".repeat(65);
    let reply = client.command(&format!("MAIL FROM:<{long_local}@example.org>"));
    assert_eq!(reply.code, 501, "{reply:?}");
    let long_line = format!("NOOP {}", "x".repeat(600));
    assert_eq!(client.command(&long_line).code, 500);
    let label = "d".repeat(63);
    let long_domain = [label.as_str(); 5].join(".");
    assert_eq!(
        client.command(&format!("MAIL FROM:<a@{long_domain}>")).code,
        501
    );
    assert_eq!(client.command("MAIL FROM:<ok@example.org>").code, 250);
}

#[test]
fn long_lines_are_taken_up_to_the_configured_bound() {
    let server = TestServer::start(|config| {
        config.limits.max_line_length = petrel::config::ByteSize(4096);
    });
    let send = |length: usize| {
        let mut client = RawClient::greeted(server.smtp());
        let mut body = b"Subject: long\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'q', length));
        body.extend_from_slice(b"\r\n");
        client.send_message("a@example.org", &["alice@example.test"], &body)
    };
    // Real mail has lines over RFC 5321's 1000 octets: accepted ...
    let reply = send(3000);
    assert_eq!(reply.code, 250, "{reply:?}");
    // ... up to limits.max_line_length.
    let reply = send(5000);
    assert_eq!(reply.code, 500, "{reply:?}");
    assert!(reply.text().starts_with("5.5.2"), "{reply:?}");
    assert_eq!(server.message_count(), 1);
}

#[test]
fn graceful_shutdown_tells_idle_clients() {
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    let writer = std::thread::spawn(move || server.shutdown());
    let reply = client.reply();
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.text().starts_with("4.3.2"));
    writer.join().unwrap();
}

#[test]
fn stream_writes_survive_partial_reads() {
    // A client that dribbles one byte at a time still gets correct replies.
    let server = TestServer::start(|_| {});
    let mut client = RawClient::greeted(server.smtp());
    for byte in b"EHLO slow.test\r\n" {
        client.send_raw(&[*byte]);
    }
    assert_eq!(client.reply().code, 250);
}
