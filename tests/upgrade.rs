//! Upgrades keep mail: a queue database written by petrel 0.1 (schema 3,
//! made by tests/fixtures/make-queue-v3.sh with the 0.1 binary) is migrated
//! when this petrel opens it, its recipients get their routes, and every
//! message in it is delivered, including the mixed-case local recipient
//! 0.1 would have bounced and the deliveries 0.1 had in flight when it died;
//! its accounts still log in.

mod common;

use std::path::Path;

use common::sink::Sink;
use common::*;

const FIXTURE: &str = include_str!("fixtures/queue-v3.sql");

fn maildir_count(data_dir: &Path, local: &str) -> usize {
    std::fs::read_dir(data_dir.join("mail/example.test").join(local).join("new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_queue_from_the_previous_release_is_upgraded_and_delivered() {
    let sink = Sink::start("accept", 0);
    let port = sink.port;
    let dns = standard_dns();
    dns.mx("tarpit.example", 10, "mx.tarpit.example")
        .a("mx.tarpit.example", "127.0.0.1");
    let server = TestServer::start_delivering(dns, |config| {
        config.domains.local = vec!["example.test".into()];
        config.delivery.port = port;
        // The old database, as 0.1 left it, where this petrel will look.
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let old = rusqlite::Connection::open(config.data_dir.join("queue.db")).unwrap();
        old.execute_batch(FIXTURE).unwrap();
        let version: u32 = old
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3, "the fixture is a 0.1 database");
    });
    let data_dir = server.instance().config().data_dir.clone();

    sink.wait_for_messages(7);
    wait_for("alice's two and carol's one", || {
        maildir_count(&data_dir, "alice") == 2 && maildir_count(&data_dir, "carol") == 1
    });
    // A bounce would be queued with the failure and leave only once sent.
    wait_for("the queue to empty", || server.message_count() == 0);
    let received = sink.messages();
    assert!(received.iter().all(|m| m.mail_from != "<>"), "no bounces");
    assert_eq!(maildir_count(&data_dir, "alice"), 2);
    assert_eq!(maildir_count(&data_dir, "ALICE"), 0);

    let mut remote: Vec<String> = received.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    remote.sort();
    assert_eq!(
        remote,
        vec![
            "bob@elsewhere.example",
            "bob@elsewhere.example",
            "x1@tarpit.example",
            "x2@tarpit.example",
            "x3@tarpit.example",
            "x4@tarpit.example",
            "x5@tarpit.example",
        ]
    );
    let db = server.db();
    let version: u32 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, petrel::store::SCHEMA_VERSION);
    // Schema 8's MTA-STS policy cache is there, empty.
    let policies: i64 = db
        .query_row("SELECT count(*) FROM mta_sts_policies", [], |r| r.get(0))
        .unwrap();
    assert_eq!(policies, 0);

    // The accounts 0.1 made still log in, and their logins are recorded
    // in the columns schema 6 added.
    let mut client = RawClient::implicit_tls(
        server.addr(petrel::protocol::session::ListenerKind::Smtps),
        &server.cert_path(),
    );
    client.command("EHLO upgraded.test");
    assert_eq!(
        client
            .auth_plain("alice@example.test", "Fixture-Password-42!")
            .code,
        235
    );
    wait_for("the login to be recorded", || {
        db.query_row(
            "SELECT last_login_from FROM users WHERE address = 'alice@example.test'",
            [],
            |r| r.get::<_, Option<String>>(0),
        )
        .unwrap()
        .as_deref()
            == Some("127.0.0.1")
    });
}

#[test]
fn two_processes_starting_on_a_fresh_data_dir_both_migrate_it() {
    // The version was read outside the migration's transaction: both ran
    // the same ALTER TABLE, and the second failed ("duplicate column").
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let config = common::serving::write_config(dir.path(), "");
        // A database left at the previous release's schema: the later
        // migrations (ALTER TABLE among them) still to run.
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let old = rusqlite::Connection::open(dir.path().join("data/queue.db")).unwrap();
        old.execute_batch(FIXTURE).unwrap();
        drop(old);
        let children: Vec<_> = (0..2)
            .map(|_| {
                common::serving::petrel()
                    .arg("-c")
                    .arg(&config)
                    .args(["queue", "list"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let db = rusqlite::Connection::open(dir.path().join("data/queue.db")).unwrap();
        let version: u32 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, petrel::store::SCHEMA_VERSION);
    }
}
