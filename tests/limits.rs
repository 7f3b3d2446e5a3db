//! Bounded resources under attack: password checks, memory for DATA,
//! session slots per listener and per address, deadlines, disk space,
//! file modes and printable output.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use petrel::config::HumanDuration;
use petrel::protocol::session::ListenerKind;

/// AUTH PLAIN over implicit TLS from `source`; returns the reply code.
fn login(server: &TestServer, source: &str, user: &str, password: &str) -> u16 {
    let mut client = RawClient::connect_from(source, server.addr(ListenerKind::Smtps));
    client.upgrade_tls(&server.cert_path());
    client.expect_greeting();
    client.command("EHLO client.test");
    client.auth_plain(user, password).code
}

#[test]
fn a_login_to_ones_own_account_does_not_clear_guesses_at_others() {
    let server = TestServer::start(|config| {
        config.auth.slowdown_after = 100;
        config.auth.lockout_after = 5;
    });
    let attacker = "127.0.0.7";
    for n in 0..4 {
        let code = login(
            &server,
            attacker,
            "alice@example.test",
            &format!("Guess-{n}!"),
        );
        assert_eq!(code, 535);
        // The attacker's own account, in between every guess.
        assert_eq!(login(&server, attacker, "bob@example.test", PASSWORD), 235);
    }
    assert_eq!(
        login(&server, attacker, "alice@example.test", "Guess-4!"),
        421,
        "the fifth guess locks the address out"
    );
    assert_eq!(login(&server, attacker, "bob@example.test", PASSWORD), 421);
    assert_eq!(
        login(&server, "127.0.0.8", "alice@example.test", PASSWORD),
        235
    );
}

#[test]
fn parallel_wrong_logins_are_counted_exactly() {
    let server = Arc::new(TestServer::start(|config| {
        config.auth.slowdown_after = 100;
        config.auth.lockout_after = 5;
        config.limits.max_sessions_per_ip = 50;
    }));
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|n| {
            let server = Arc::clone(&server);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let mut client =
                    RawClient::connect_from("127.0.0.9", server.addr(ListenerKind::Smtps));
                client.upgrade_tls(&server.cert_path());
                client.expect_greeting();
                client.command("EHLO client.test");
                start.wait();
                client
                    .auth_plain("alice@example.test", &format!("Parallel-{n}!"))
                    .code
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 535 || c == 421), "{codes:?}");
    assert!(
        codes.iter().filter(|&&c| c == 421).count() >= 15,
        "{codes:?}"
    );
    assert_eq!(
        server.instance().password_checks(),
        5,
        "only lockout_after guesses cost a password check: {codes:?}"
    );
    assert_eq!(
        login(&server, "127.0.0.9", "alice@example.test", PASSWORD),
        421
    );
    assert_eq!(server.instance().password_checks(), 5);
}

/// Fifty threads from one address connect to 587, STARTTLS and log in at
/// the same moment; returns the reply codes of their AUTH (or of their
/// greeting, when that was not 220).
fn parallel_logins(server: &Arc<TestServer>, source: &'static str, password: &str) -> Vec<u16> {
    let start = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let server = Arc::clone(server);
            let start = Arc::clone(&start);
            let password = password.to_string();
            std::thread::spawn(move || {
                let mut client =
                    RawClient::connect_from(source, server.addr(ListenerKind::Submission));
                let greeting = client.reply();
                if greeting.code != 220 {
                    start.wait();
                    return greeting.code;
                }
                client.command("EHLO webapp.test");
                client.starttls(&server.cert_path());
                client.command("EHLO webapp.test");
                start.wait();
                client.auth_plain("alice@example.test", &password).code
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn lockouts_recorded(server: &TestServer) -> i64 {
    server
        .db()
        .query_row("SELECT count(*) FROM auth_lockouts", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn fifty_parallel_correct_logins_from_one_address_all_get_in() {
    // A web application's worker pool, or an office behind NAT, on the
    // defaults: only failed checks count, and one address may have fifty
    // sessions.
    let server = Arc::new(TestServer::start(|_| {}));
    let codes = parallel_logins(&server, "127.0.0.10", PASSWORD);
    assert!(codes.iter().all(|&c| c == 235), "{codes:?}");
    assert_eq!(
        login(&server, "127.0.0.10", "alice@example.test", PASSWORD),
        235
    );
    assert_eq!(lockouts_recorded(&server), 0);

    // Fifty wrong ones at once from another address lock it, as before,
    // at the cost of lockout_after checks.
    let before = server.instance().password_checks();
    let codes = parallel_logins(&server, "127.0.0.11", "Wrong-Password-1!");
    assert!(codes.iter().all(|&c| c == 535 || c == 421), "{codes:?}");
    let lockout_after = u64::from(server.instance().config().auth.lockout_after);
    assert_eq!(server.instance().password_checks() - before, lockout_after);
    assert_eq!(
        login(&server, "127.0.0.11", "alice@example.test", PASSWORD),
        421
    );
    assert_eq!(lockouts_recorded(&server), 1);
}

#[test]
fn unknown_names_are_slowed_down_like_accounts() {
    // The enumeration the slowdown allowed: four wrong tries at a name,
    // then a fifth from a new address took 2.04 s for an account and
    // 0.02 s for a name that is none.
    let server = TestServer::start(|config| {
        config.auth.slowdown_after = 3;
        config.auth.slowdown_step = HumanDuration::secs(1);
    });
    let fifth_takes = |name: &str, net: u8| {
        for n in 0..4 {
            let source = format!("127.0.{net}.{}", n + 1);
            assert_eq!(login(&server, &source, name, "Wrong-Guess-1!"), 535);
        }
        let mut client =
            RawClient::connect_from(&format!("127.0.{net}.99"), server.addr(ListenerKind::Smtps));
        client.upgrade_tls(&server.cert_path());
        client.expect_greeting();
        client.command("EHLO client.test");
        let started = std::time::Instant::now();
        assert_eq!(client.auth_plain(name, "Wrong-Guess-2!").code, 535);
        started.elapsed()
    };
    let account = fifth_takes("alice@example.test", 30);
    let unknown = fifth_takes("nobody-here@example.test", 31);
    for took in [account, unknown] {
        assert!(
            took >= std::time::Duration::from_millis(1500),
            "{account:?} {unknown:?}"
        );
    }
    let apart = account.abs_diff(unknown);
    assert!(
        apart < std::time::Duration::from_millis(700),
        "{account:?} {unknown:?}"
    );
}

#[test]
fn submission_keeps_its_slots_while_port_25_is_flooded() {
    let server = TestServer::start(|config| {
        config.limits.max_sessions = 24;
        config.limits.submission_reserved = 8;
        config.limits.max_sessions_per_ip = 4;
    });
    // Idle connections to port 25 from fifteen addresses, as many as we
    // are allowed to hold.
    let mut flood = Vec::new();
    let mut refused = 0;
    for host in 1..=15 {
        for _ in 0..4 {
            let mut client = RawClient::connect_from(&format!("127.0.1.{host}"), server.smtp());
            match client.try_reply() {
                Some(reply) if reply.code == 220 => flood.push(client),
                Some(reply) if reply.code == 421 => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(flood.len(), 16, "port 25 holds all but the reserve");
    assert_eq!(refused, 60 - 16);

    // A user still submits: STARTTLS, AUTH, DATA.
    let mut user = RawClient::greeted(server.addr(ListenerKind::Submission));
    user.command("EHLO laptop.test");
    user.starttls(&server.cert_path());
    user.command("EHLO laptop.test");
    assert_eq!(user.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = user.send_transaction(
        "alice@example.test",
        &["bob@example.test"],
        b"Subject: still works\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
}

/// Reads replies until the server closes; returns the last one.
fn until_closed(client: &mut RawClient) -> Option<Reply> {
    let mut last = None;
    while let Some(reply) = client.try_reply() {
        last = Some(reply);
    }
    last
}

#[test]
fn trickling_clients_are_cut_off_by_deadlines() {
    let server = TestServer::start(|config| {
        config.limits.command_timeout = HumanDuration::secs(2);
        config.limits.data_timeout = HumanDuration::secs(1);
        config.limits.min_data_rate = petrel::config::ByteSize(1000);
    });
    // A command that never ends, one byte at a time, each well within the
    // timeout of a single read.
    let mut client = RawClient::greeted(server.smtp());
    let mut closed = false;
    for byte in b"NOOP xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        .iter()
        .take(40)
    {
        if client.try_send_raw(std::slice::from_ref(byte)).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let last = until_closed(&mut client);
    assert!(closed || last.is_some(), "the server never gave up");
    let last = last.expect("a 421 before closing");
    assert_eq!(last.code, 421, "{last:?}");

    // DATA at 3 octets a second against a floor of 1000.
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO slow.test");
    client.command("MAIL FROM:<x@example.org>");
    client.command("RCPT TO:<alice@example.test>");
    assert_eq!(client.command("DATA").code, 354);
    for byte in b"Subject: slow\r\n\r\n".iter().cycle().take(40) {
        if client.try_send_raw(std::slice::from_ref(byte)).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let last = until_closed(&mut client).expect("a 421 before closing");
    assert_eq!(last.code, 421, "{last:?}");
    assert!(last.text().starts_with("4.4.2"), "{last:?}");
    assert_eq!(server.message_count(), 0, "nothing queued");
}

#[test]
fn new_mail_is_refused_below_the_disk_floor() {
    let server = TestServer::start(|config| {
        // More than any disk has: the floor is always hit.
        config.queue.min_free_space = petrel::config::ByteSize(u64::MAX / 2);
    });
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    let reply = client.command("MAIL FROM:<x@example.org>");
    assert_eq!(reply.code, 452, "{reply:?}");
    assert!(reply.text().starts_with("4.3.1"), "{reply:?}");
    assert_eq!(server.message_count(), 0);
}

fn db_files_size(data_dir: &std::path::Path) -> u64 {
    ["queue.db", "queue.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(data_dir.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn the_database_gives_space_back_after_the_queue_drains() {
    let server = TestServer::start_delivering(standard_dns(), |_| {});
    let data_dir = server.instance().config().data_dir.clone();
    let line = format!("{}\r\n", "z".repeat(998));
    let body = format!("Subject: big\r\n\r\n{}", line.repeat(3 * 1024));
    for _ in 0..8 {
        let mut client = RawClient::greeted(server.smtp());
        let reply = client.send_message("x@example.org", &["carol@example.test"], body.as_bytes());
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    wait_for("delivery of all eight", || server.message_count() == 0);
    // 24 MiB went through; what stays is a small database.
    wait_for("queue.db to shrink", || {
        db_files_size(&data_dir) < 4 * 1024 * 1024
    });
    let dir = data_dir.join("mail/example.test/carol/new");
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 8);
}

#[test]
fn session_threads_start_as_sessions_need_them_and_are_reused() {
    let server = TestServer::start(|config| {
        config.limits.max_sessions_per_ip = 50;
    });
    let started = server.instance().session_threads();
    assert!(started <= 4, "a few at first, not max_sessions: {started}");
    // Twelve at once: each is greeted at once (none waits for a thread).
    for round in 0..2 {
        let mut clients: Vec<RawClient> =
            (0..12).map(|_| RawClient::greeted(server.smtp())).collect();
        for client in &mut clients {
            assert_eq!(client.command("NOOP").code, 250);
        }
        let threads = server.instance().session_threads();
        assert!(
            (12..=16).contains(&threads),
            "round {round}: {threads} threads for 12 sessions"
        );
        for client in &mut clients {
            client.command("QUIT");
        }
        drop(clients);
        wait_for("the sessions to end", || {
            server.instance().active_sessions() == 0
        });
    }
    // Reused, not started anew.
    assert!(server.instance().session_threads() <= 16);
}
