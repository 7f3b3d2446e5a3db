//! Fair delivery: a dead destination (a blackhole that accepts connections
//! and never answers) holds at most its concurrency limit of workers,
//! while another domain and local mailboxes get their mail at once; and at
//! shutdown, jobs no worker started go back to the queue untouched, so
//! after a restart nothing is delivered twice.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::sink::Sink;
use common::*;
use petrel::protocol::session::ListenerKind;

/// Accepts up to 100 connections on `address` and never says a word.
fn blackhole(address: &str) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(address).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(100).flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
        // Keep the last ones open until the test process ends.
        std::thread::park();
        drop(held);
    });
    accepted
}

/// One authenticated session sending one message per recipient.
fn submit_each(server: &TestServer, recipients: &[String]) -> Vec<String> {
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let ids = recipients
        .iter()
        .enumerate()
        .map(|(n, to)| {
            let body = format!("Subject: fairness {n} to {to}\r\n\r\nx\r\n");
            let reply = client.send_transaction("alice@example.test", &[to], body.as_bytes());
            assert_eq!(reply.code, 250, "{reply:?}");
            queue_id_from(&reply.text())
        })
        .collect();
    client.command("QUIT");
    ids
}

fn maildir_count(server: &TestServer, local: &str) -> usize {
    std::fs::read_dir(
        server
            .instance()
            .config()
            .data_dir
            .join("mail/example.test")
            .join(local)
            .join("new"),
    )
    .map(|d| d.count())
    .unwrap_or(0)
}

#[test]
fn a_dead_destination_holds_only_its_limit_while_others_flow() {
    let sink = Sink::start("accept", 0);
    let dead = blackhole(&format!("127.0.0.2:{}", sink.port));
    let dns = || {
        let dns = standard_dns();
        dns.mx("dead.example", 10, "mx.dead.example")
            .a("mx.dead.example", "127.0.0.2");
        dns
    };
    // Queued while no delivery runs, the dead domain's mail first: at the
    // start it is all due at once, more of it than one claim takes.
    let mut accepting =
        TestServer::start_with(dns(), petrel::instance::Options { delivery: false }, |_| {});
    let to_dead: Vec<String> = (0..100).map(|n| format!("user{n}@dead.example")).collect();
    submit_each(&accepting, &to_dead);
    let to_good: Vec<String> = (0..20)
        .map(|n| format!("friend{n}@elsewhere.example"))
        .collect();
    submit_each(&accepting, &to_good);
    let to_local: Vec<String> = (0..10)
        .map(|n| format!("{}@example.test", ["bob", "carol"][n % 2]))
        .collect();
    submit_each(&accepting, &to_local);
    let data_dir = accepting.instance().config().data_dir.clone();
    let dir = std::mem::replace(&mut accepting.dir, tempfile::tempdir().unwrap());
    accepting.shutdown();

    let server = TestServer::start_delivering(dns(), |config| {
        config.data_dir = data_dir.clone();
        config.delivery.port = sink.port;
        config.delivery.workers = 6;
        config.delivery.destination_concurrency = 3;
    });
    // Polled, not timed: with every worker, or the whole claim budget,
    // stuck at the blackhole (which never answers, for minutes) this
    // would never happen.
    sink.wait_for_messages(20);
    wait_for("local mail in the Maildirs", || {
        maildir_count(&server, "bob") + maildir_count(&server, "carol") == 10
    });
    let held = dead.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&held),
        "the dead destination holds {held} connections; its limit is 3"
    );
    let waiting: i64 = server
        .db()
        .query_row(
            "SELECT count(*) FROM recipients WHERE destination = 'mx:dead.example'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(waiting, 100, "the dead domain's mail waits, none lost");
    drop(server);
    drop(dir);
}

#[test]
fn at_shutdown_unstarted_jobs_go_back_untouched_and_nothing_is_sent_twice() {
    let sink = Sink::start("slow", 0);
    let port = sink.port;
    let mut server = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.delivery.destination_concurrency = 2;
    });
    let to: Vec<String> = (0..30)
        .map(|n| format!("friend{n}@elsewhere.example"))
        .collect();
    submit_each(&server, &to);
    // A few are delivered (0.3 s each, two at a time), most still wait.
    sink.wait_for_messages(2);
    let data_dir = server.instance().config().data_dir.clone();
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    server.shutdown();

    let db = rusqlite::Connection::open(data_dir.join("queue.db")).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM recipients WHERE status = 'delivering'"),
        0,
        "nothing left claimed"
    );
    let waiting = count("SELECT count(*) FROM recipients WHERE status = 'queued'");
    let delivered_before = sink.messages().len() as i64;
    assert!(waiting > 0, "the test needs unstarted jobs at the stop");
    assert_eq!(
        count("SELECT count(*) FROM recipients WHERE status = 'queued' AND attempts > 0"),
        0,
        "unstarted jobs went back untouched"
    );
    assert_eq!(delivered_before + waiting, 30);
    drop(db);

    // Restarted on the same queue: the rest go, each exactly once.
    let restarted = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.data_dir = data_dir.clone();
    });
    let received = sink.wait_for_messages(30);
    wait_for("the queue to empty", || restarted.message_count() == 0);
    let mut subjects: Vec<String> = received
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.content).into_owned();
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 30, "each message once");
    assert_eq!(sink.messages().len(), 30, "no duplicates");
    // The server first, then the data dir it runs on.
    drop(restarted);
    drop(dir);
}

/// A hostile MX host on `address`: greets with "220-" and then sends a
/// byte every 200 ms, never finishing its reply, on every connection.
/// Records when each connection began, and how long each lasted (until
/// the client gave up).
struct Trickler {
    started: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    lasted: Arc<std::sync::Mutex<Vec<std::time::Duration>>>,
}

impl Trickler {
    fn start(address: &str) -> Trickler {
        let listener = TcpListener::bind(address).unwrap();
        let trickler = Trickler {
            started: Arc::default(),
            lasted: Arc::default(),
        };
        let (started, lasted) = (Arc::clone(&trickler.started), Arc::clone(&trickler.lasted));
        std::thread::spawn(move || {
            for stream in listener.incoming().take(100).flatten() {
                let began = std::time::Instant::now();
                started.lock().unwrap().push(began);
                let lasted = Arc::clone(&lasted);
                std::thread::spawn(move || {
                    use std::io::Write as _;
                    let mut stream = stream;
                    let mut sent = stream.write_all(b"220-").is_ok();
                    // Bounded: 2 minutes at most, then it stops itself.
                    for _ in 0..600 {
                        if !sent {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        sent = stream.write_all(b"x").is_ok();
                    }
                    lasted.lock().unwrap().push(began.elapsed());
                });
            }
        });
        trickler
    }

    fn ended(&self) -> Vec<std::time::Duration> {
        self.lasted.lock().unwrap().clone()
    }

    fn starts(&self) -> Vec<std::time::Instant> {
        self.started.lock().unwrap().clone()
    }
}

#[test]
fn hostile_mx_hosts_that_trickle_hold_a_worker_for_one_reply_timeout_at_most() {
    let sink = Sink::start("accept", 0);
    let hostile = Trickler::start(&format!("127.0.0.2:{}", sink.port));
    let dns = standard_dns();
    let hostile_domains: Vec<String> = (0..4).map(|n| format!("hostile{n}.example")).collect();
    for domain in &hostile_domains {
        dns.mx(domain, 10, &format!("mx.{domain}"))
            .a(&format!("mx.{domain}"), "127.0.0.2");
    }
    let server = TestServer::start_delivering(dns, |config| {
        config.delivery.port = sink.port;
        config.delivery.workers = 2;
        config.delivery.reply_timeout = petrel::config::HumanDuration::secs(1);
        config.queue.retry_min = petrel::config::HumanDuration::secs(3600);
    });
    let to_hostile: Vec<String> = hostile_domains
        .iter()
        .map(|domain| format!("victim@{domain}"))
        .collect();

    // Round one: four hostile domains and then a good one, two workers.
    // Before, each hostile connection held its worker for as long as the
    // host kept trickling (the per-read timeout never ran out), and the
    // good message never left.
    submit_each(&server, &to_hostile);
    submit_each(&server, &["friend@elsewhere.example".to_string()]);
    sink.wait_for_messages(1);
    wait_for("every hostile domain tried once", || {
        hostile.ended().len() == hostile_domains.len()
    });
    for lasted in hostile.ended() {
        assert!(
            lasted < std::time::Duration::from_secs(4),
            "a hostile host held a worker for {lasted:?}; the reply timeout is 1 s"
        );
    }

    // Round two: the hostile domains are known to be slow now. New mail
    // for all of them, and for good domains: the slow ones share one of
    // the two workers (their connections come one after another), and
    // the good mail flows through the other meanwhile.
    submit_each(&server, &to_hostile);
    let to_good: Vec<String> = (0..5)
        .map(|n| format!("friend{n}@elsewhere.example"))
        .collect();
    submit_each(&server, &to_good);
    sink.wait_for_messages(6);
    wait_for("the hostile domains' second round", || {
        hostile.starts().len() == 2 * hostile_domains.len()
    });
    let round_two = &hostile.starts()[hostile_domains.len()..];
    for pair in round_two.windows(2) {
        let apart = pair[1].duration_since(pair[0]);
        assert!(
            apart >= std::time::Duration::from_millis(900),
            "two slow destinations held workers at once (started {apart:?} apart)"
        );
    }
    // Nothing lost: every hostile message still waits in the queue.
    let waiting: i64 = server
        .db()
        .query_row(
            "SELECT count(*) FROM recipients WHERE destination LIKE 'mx:hostile%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(waiting, 8);
}
