//! Bounded resources under attack: password checks, memory for DATA,
//! session slots per listener and per address, deadlines, disk space,
//! file modes and printable output.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
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
