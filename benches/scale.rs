//! The queue at scale (issue #10): fills a queue database with N
//! recipients (default 1,000,000: 99 % deferred to a tempfailing
//! destination, 1 % due at a healthy one), then times what the server and
//! the operator do with it:
//! - a claim of 64 (what the scheduler does while inbound waits behind
//!   the single writer), with petrel's claim and, alternately, the claim
//!   of the previous release (a GROUP BY over every due row), with 1 %
//!   and then with every recipient due;
//! - the same claim passing over a busy destination with due mail;
//! - backing off a destination as a whole;
//! - `queue list`'s first page, the `queue_status` count, the
//!   `queue_by_domain` summary;
//! - the size of the database.
//!
//!   cargo bench --bench scale -- [RECIPIENTS] [DATA_DIR]
//!
//! Loopback only (no network at all). With DATA_DIR the filled queue is
//! kept there (bench/scale.sh starts a server on it).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use petrel::queue::delivery::{ClaimLimits, back_off, claim_due};
use petrel::queue::views;
use petrel::timefmt::sql_timestamp;
use rusqlite::{Connection, params};

/// The claim of petrel 0.1 up to schema 6, for comparison.
const PREVIOUS_CLAIM: &str = "UPDATE recipients SET status = 'delivering', updated_at = ?1
     WHERE status = 'queued' AND next_attempt_at <= ?1
       AND message_id IN (SELECT message_id FROM recipients
                          WHERE status = 'queued' AND next_attempt_at <= ?1
                          GROUP BY message_id
                          ORDER BY min(next_attempt_at), message_id LIMIT ?2)
     RETURNING id";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let recipients: usize = args
        .first()
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let kept = args.get(1).map(PathBuf::from);
    let temporary = tempfile::tempdir().expect("a temporary directory");
    let data_dir = kept.unwrap_or_else(|| temporary.path().to_path_buf());
    let conn = petrel::store::open_direct(&data_dir).expect("the queue opens");

    let started = Instant::now();
    fill(&conn, recipients);
    println!(
        "filled {recipients} recipients in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let now = sql_timestamp(SystemTime::now());

    let mut new = Vec::new();
    let mut old = Vec::new();
    let put_back = |conn: &Connection| {
        conn.execute(
            "UPDATE recipients SET status = 'queued' WHERE status = 'delivering'",
            [],
        )
        .expect("put back");
    };
    // Warm both (statement preparation, page cache), unmeasured.
    claim_due(&conn, &now, &ClaimLimits::rows(64)).expect("claim");
    put_back(&conn);
    for _ in 0..20 {
        let t = Instant::now();
        let claimed = claim_due(&conn, &now, &ClaimLimits::rows(64)).expect("claim");
        new.push(t.elapsed());
        assert!(!claimed.recipients.is_empty());
        put_back(&conn);
        let t = Instant::now();
        let mut statement = conn.prepare_cached(PREVIOUS_CLAIM).expect("prepare");
        let count = statement
            .query_map(params![now, 64], |row| row.get::<_, i64>(0))
            .expect("claim")
            .count();
        old.push(t.elapsed());
        assert!(count > 0);
        put_back(&conn);
    }
    report("claim of 64, this build", &mut new);
    report("claim of 64, previous release", &mut old);

    let mut skipping = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        claim_due(
            &conn,
            &now,
            &ClaimLimits::rows(64).skipping(&["mx:good.example"]),
        )
        .expect("claim");
        skipping.push(t.elapsed());
        put_back(&conn);
    }
    report(
        "claim passing over a busy destination with 1 % of the queue due",
        &mut skipping,
    );

    // The worst case of the previous release: everything due at once.
    conn.execute(
        "UPDATE recipients SET next_attempt_at = ?1 WHERE status = 'queued'",
        params![sql_timestamp(SystemTime::now() - Duration::from_secs(60))],
    )
    .expect("all due");
    let mut new = Vec::new();
    let mut old = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        claim_due(&conn, &now, &ClaimLimits::rows(64)).expect("claim");
        new.push(t.elapsed());
        put_back(&conn);
        let t = Instant::now();
        let mut statement = conn.prepare_cached(PREVIOUS_CLAIM).expect("prepare");
        let _ = statement
            .query_map(params![now, 64], |row| row.get::<_, i64>(0))
            .expect("claim")
            .count();
        old.push(t.elapsed());
        put_back(&conn);
    }
    report("claim of 64 with every recipient due, this build", &mut new);
    report(
        "claim of 64 with every recipient due, previous release",
        &mut old,
    );
    conn.execute(
        "UPDATE recipients SET next_attempt_at = ?1 WHERE destination = 'mx:tarpit.example'",
        params![sql_timestamp(SystemTime::now() + Duration::from_secs(3600))],
    )
    .expect("defer again");

    let t = Instant::now();
    let until = sql_timestamp(SystemTime::now() + Duration::from_secs(600));
    let moved = back_off(&conn, "mx:good.example", &until, &now).expect("back off");
    println!(
        "back off a destination ({moved} waiting recipients moved): {:.1} ms",
        ms(t.elapsed())
    );

    let time = |what: &str, sql: &str| {
        let t = Instant::now();
        let rows = conn
            .prepare(sql)
            .expect("prepare")
            .query_map([], |_| Ok(()))
            .expect("query")
            .count();
        println!("{what} ({rows} rows): {:.1} ms", ms(t.elapsed()));
    };
    let t = Instant::now();
    let page = views::list_page(&conn, "", 100).expect("list");
    let totals = views::totals(&conn).expect("totals");
    println!(
        "queue list, first page of 100 with totals ({} rows; {} messages, {} recipients): {:.1} ms",
        page.len(),
        totals.0,
        totals.1,
        ms(t.elapsed())
    );
    let t = Instant::now();
    let shape = views::shape(&conn, SystemTime::now()).expect("shape");
    println!(
        "queue summary, per destination and age ({} destinations): {:.1} ms",
        shape.len(),
        ms(t.elapsed())
    );
    time("queue_by_domain view", "SELECT * FROM queue_by_domain");
    time(
        "queue_status view, first 100",
        "SELECT * FROM queue_status LIMIT 100",
    );
    time(
        "queue_status view, count",
        "SELECT count(*) FROM queue_status",
    );
    let size: i64 = conn
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )
        .expect("size");
    println!("database size: {} MiB", size / (1024 * 1024));
}

/// N messages of one recipient each, 256-octet content; 1 % due now at
/// good.example, the rest deferred an hour at tarpit.example.
fn fill(conn: &Connection, recipients: usize) {
    let arrival = SystemTime::now() - Duration::from_secs(7200);
    let received = sql_timestamp(arrival);
    let first_micros = arrival
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64;
    let due = sql_timestamp(SystemTime::now() - Duration::from_secs(3600));
    let later = sql_timestamp(SystemTime::now() + Duration::from_secs(3600));
    let content = vec![b'x'; 256];
    conn.execute_batch("BEGIN").expect("begin");
    {
        let mut content_row = conn
            .prepare("INSERT INTO message_contents (id, content) VALUES (?1, ?2)")
            .expect("prepare");
        let mut message = conn
            .prepare(
                "INSERT INTO messages (id, received_at, sender, listener, size, content_id)
                 VALUES (?1, ?2, 'sender@example.org', 'smtp', 256, ?3)",
            )
            .expect("prepare");
        let mut recipient = conn
            .prepare(
                "INSERT INTO recipients (message_id, address, next_attempt_at, updated_at,
                                         attempts, route, domain)
                 VALUES (?1, ?2, ?3, ?3, ?4, 'mx', ?5)",
            )
            .expect("prepare");
        for n in 0..recipients {
            // Queue ids as petrel makes them: arrival time in microseconds.
            let id = format!("{:013X}000", first_micros + n as u64);
            content_row
                .execute(params![n as i64, content])
                .expect("content");
            message
                .execute(params![id, received, n as i64])
                .expect("message");
            let (domain, next, attempts) = if n % 100 == 0 {
                ("good.example", &due, 0)
            } else {
                ("tarpit.example", &later, 3)
            };
            recipient
                .execute(params![
                    id,
                    format!("user{n}@{domain}"),
                    next,
                    attempts,
                    domain
                ])
                .expect("recipient");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    println!("{what}: p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99));
}
