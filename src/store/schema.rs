//! Opens the queue database with the settings durability depends on and
//! brings its schema up to date from the numbered files in `sql/`.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::config::DbConfig;

use super::StoreError;

/// SQLite's page cache per connection, in KiB. The default (2 MiB) for
/// the writer and every pooled reader was 2.3 MB of the server's peak
/// memory under 100 senders (bench/memory.sh). A transaction touches few
/// pages, and a miss is a read from the OS page cache: neither the relay
/// bench nor the claims on a million-row queue (bench/scale.sh) changed.
const CACHE_KIB: u32 = 256;

/// Dirty pages a transaction may hold in memory before SQLite writes
/// them to the WAL ahead of the commit (4 MiB at the 4 KiB pages petrel's
/// queues use). By default it spills once the small cache above is full:
/// a group commit of twenty 100 KiB messages then wrote most of its pages
/// twice and read them back in between (`strace`: 194 `pwrite` and 58
/// `pread` per message, 117 and 40 with this), and 100 KiB relaying took
/// 5 % more CPU. Only a connection that writes (the server's one writer,
/// a CLI command's) has dirty pages, and only until its commit; then the
/// cache shrinks back to `CACHE_KIB`.
const SPILL_PAGES: u32 = 1024;

/// Applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_queue.sql", include_str!("../../sql/0001_queue.sql")),
    ("0002_users.sql", include_str!("../../sql/0002_users.sql")),
    (
        "0003_delivery.sql",
        include_str!("../../sql/0003_delivery.sql"),
    ),
    ("0004_routes.sql", include_str!("../../sql/0004_routes.sql")),
    (
        "0005_contents.sql",
        include_str!("../../sql/0005_contents.sql"),
    ),
    (
        "0006_app_passwords.sql",
        include_str!("../../sql/0006_app_passwords.sql"),
    ),
    (
        "0007_destinations.sql",
        include_str!("../../sql/0007_destinations.sql"),
    ),
    (
        "0008_mta_sts.sql",
        include_str!("../../sql/0008_mta_sts.sql"),
    ),
    (
        "0009_quarantine.sql",
        include_str!("../../sql/0009_quarantine.sql"),
    ),
];

pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How long a statement waits for another writer (the CLI, `petrel sendmail`)
/// before giving up; the server turns a give-up into a 4xx, never a loss.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The WAL file is cut back to this after a checkpoint, so one burst of
/// big messages does not leave it at its peak size for good.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Opens (creating if needed) and migrates. Every connection gets WAL and
/// `synchronous=FULL`: a commit is on disk when it returns.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    create_private_file(path)?;
    let conn = open_connection(path)?;
    migrate(&conn, path)?;
    ensure_incremental_vacuum(&conn, path)?;
    Ok(conn)
}

/// The database holds all queued mail and the password hashes: it is
/// created readable by petrel's user only (SQLite gives its -wal and -shm
/// files the same mode), whatever the umask.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let result = match created {
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            // Asked here, not of SQLite, whose error would not say why.
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
        }
        other => other,
    };
    match result {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(StoreError::new(format!(
                "cannot open {}: permission denied; the queue is private to root and \
                 the user petrel runs as (try sudo)",
                path.display()
            )))
        }
        Err(error) => Err(StoreError::new(format!(
            "cannot create {}: {error}",
            path.display()
        ))),
    }
}

/// Freed pages go back to the filesystem (a periodic incremental vacuum
/// in the writer), so queue.db shrinks after the queue drains. A database
/// made before this needs one full VACUUM to switch; it is done here, once.
fn ensure_incremental_vacuum(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
        .map_err(StoreError::sqlite("cannot read auto_vacuum"))?;
    if mode == 2 {
        return Ok(());
    }
    log::info!(
        "queue: switching {} to incremental vacuum (once; takes a moment on a big queue)",
        path.display()
    );
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
        .map_err(StoreError::sqlite(format!(
            "cannot switch {} to incremental vacuum",
            path.display()
        )))
}

pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let context = |what: &str| format!("{what} {}", path.display());
    let conn = Connection::open(path).map_err(StoreError::sqlite(context("cannot open")))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(StoreError::sqlite(context("cannot configure")))?;
    // Takes effect only on a new, empty database, and must come before
    // the switch to WAL writes its first page; older ones are converted
    // once by `ensure_incremental_vacuum`.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
        .map_err(StoreError::sqlite(context("cannot configure")))?;
    let mode = switch_to_wal(&conn).map_err(StoreError::sqlite(context("cannot switch to WAL")))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::new(format!(
            "{}: journal mode is {mode}, WAL is required",
            path.display()
        )));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};
         PRAGMA cache_size = -{CACHE_KIB};
         PRAGMA cache_spill = {SPILL_PAGES};"
    ))
    .map_err(StoreError::sqlite(context("cannot configure")))?;
    // Plans never depend on bound values. Otherwise SQLite recompiles a
    // statement each time a value it planned with is bound anew, and in the
    // SQLite we bundle a bound LIMIT is one: the scheduler's claims, which
    // bind theirs, were parsed and planned on every run (4 % of the queue
    // writer's time). Our hot statements name their index; none needs a
    // value to choose one.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(StoreError::sqlite(context("cannot configure")))?;
    Ok(conn)
}

/// Brings the schema up to date in one `BEGIN IMMEDIATE` transaction that
/// also reads the version: a second process starting at the same moment
/// waits for the lock, then finds the work done (read outside, both ran
/// the same `ALTER TABLE` and the second failed). The version bump commits
/// with the migrations, so a crash halfway leaves the old schema intact.
/// `PRAGMA journal_mode = WAL`, tried again while another process holds
/// the database (two starting on one data dir at once): SQLite answers
/// this one with "database is locked" at once instead of waiting.
fn switch_to_wal(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            done => return done,
        }
    }
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let failed = |what: String| StoreError::sqlite(format!("{what} {}", path.display()));
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(failed("cannot lock for migration:".into()))?;
    let migrated = (|| {
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(failed("cannot read schema version of".into()))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::new(format!(
                "{} has schema version {version}, but this petrel knows only up to \
                 {SCHEMA_VERSION}; it was written by a newer petrel",
                path.display()
            )));
        }
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS.iter().skip(version as usize) {
            conn.execute_batch(sql)
                .map_err(failed(format!("migration {name} failed on")))?;
            applied.push(*name);
        }
        if !applied.is_empty() {
            conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
                .map_err(failed("cannot record the schema version of".into()))?;
        }
        Ok(applied)
    })();
    match migrated {
        Ok(applied) => {
            conn.execute_batch("COMMIT")
                .map_err(failed("cannot commit the migration of".into()))?;
            for name in applied {
                log::info!("queue schema: applied {name}");
            }
            Ok(())
        }
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `.cargo/config.toml` builds the bundled SQLite without the up-front
    /// page-cache block (see the comment there); a build that lost the
    /// option would still work, only slower, so nothing else would notice.
    #[test]
    fn sqlite_is_built_without_the_page_cache_block() {
        let conn = Connection::open_in_memory().unwrap();
        let mut statement = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = statement
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_PCACHE_INITSZ=0"),
            "{options:?}"
        );
    }

    /// The same flags make SQLite sync with fdatasync (see the comment in
    /// `.cargo/config.toml`). SQLite does not list that option, but the
    /// test above shows the flags reached its build; this one, that the
    /// option is still among them.
    #[test]
    fn sqlite_is_built_to_sync_with_fdatasync() {
        let flags = option_env!("LIBSQLITE3_FLAGS").unwrap_or_default();
        assert!(
            flags.split_whitespace().any(|f| f == "-DHAVE_FDATASYNC=1"),
            "{flags:?}"
        );
    }

    /// A group commit of a few big messages stays in memory until it
    /// commits (see `SPILL_PAGES`): nothing reaches the WAL before.
    #[test]
    fn a_transaction_of_a_mebibyte_is_not_spilled_before_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut conn = open(&path).unwrap();
        let wal = dir.path().join("queue.db-wal");
        let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let before = wal_size();
        let tx = conn.transaction().unwrap();
        for _ in 0..4 {
            tx.execute(
                "INSERT INTO message_contents (content) VALUES (randomblob(256 * 1024))",
                [],
            )
            .unwrap();
        }
        assert_eq!(wal_size(), before, "pages were written before the commit");
        tx.commit().unwrap();
        assert!(wal_size() > before + 1024 * 1024, "{}", wal_size());
    }

    #[test]
    fn migrates_once_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let conn = open(&path).unwrap();
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(conn);
        let conn = open(&path).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'messages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1);
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let conn = open(&path).unwrap();
        conn.execute_batch("PRAGMA user_version = 999").unwrap();
        drop(conn);
        let error = open(&path).unwrap_err();
        assert!(error.to_string().contains("newer petrel"), "{error}");
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        std::fs::write(
            &path,
            b"this is not sqlite, just some text that is long enough",
        )
        .unwrap();
        assert!(open(&path).is_err());
    }
}
