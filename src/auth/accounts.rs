//! Accounts in the `users` table of the queue database: lookups for the
//! server (through a read pool, so changes made by `petrel user` apply to
//! the next session at once) and the changes `petrel user` makes.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{ReadPool, StoreError, StoreHandle};
use crate::timefmt::sql_timestamp;

pub struct Accounts {
    pool: ReadPool,
}

impl Accounts {
    pub fn new(pool: ReadPool) -> Accounts {
        Accounts { pool }
    }

    /// `address` is a canonical mailbox key (`Address::mailbox_key`).
    pub fn exists(&self, address: &str) -> Result<bool, StoreError> {
        self.pool
            .with("cannot look up account", |conn| exists(conn, address))
    }

    /// What a login for `address` is checked against: the main password's
    /// hash, and the app password `selector` names, if there is one.
    pub fn credentials(
        &self,
        address: &str,
        selector: Option<&str>,
    ) -> Result<Option<Credentials>, StoreError> {
        self.pool.with("cannot look up account", |conn| {
            conn.query_row(
                "SELECT u.password_hash, u.failures, u.last_login_from, a.label, a.password_hash
                 FROM users u
                 LEFT JOIN app_passwords a ON a.address = u.address AND a.selector = ?2
                 WHERE u.address = ?1",
                params![address, selector],
                |row| {
                    let app = match (row.get::<_, Option<String>>(3)?, row.get(4)?) {
                        (Some(label), Some(hash)) => Some(AppCredential { label, hash }),
                        _ => None,
                    };
                    Ok(Credentials {
                        password_hash: row.get(0)?,
                        failures: row.get(1)?,
                        last_login_from: row.get(2)?,
                        app,
                    })
                },
            )
            .optional()
        })
    }

    /// Whether a login as `address` (with the app password `label`, or
    /// the main one) would still find what it logged in with: the account,
    /// and the app password not revoked.
    pub fn login_exists(&self, address: &str, label: Option<&str>) -> Result<bool, StoreError> {
        self.pool
            .with("cannot look up account", |conn| match label {
                None => exists(conn, address),
                Some(label) => conn
                    .query_row(
                        "SELECT 1 FROM app_passwords WHERE address = ?1 AND label = ?2",
                        params![address, label],
                        |_| Ok(()),
                    )
                    .optional()
                    .map(|found| found.is_some()),
            })
    }

    /// Lockouts still running, for a server that starts.
    pub fn lockouts(&self) -> Result<Vec<Lockout>, StoreError> {
        self.pool.with("cannot read auth lockouts", |conn| {
            let now = sql_timestamp(SystemTime::now());
            let mut statement =
                conn.prepare("SELECT client, account, until FROM auth_lockouts WHERE until > ?1")?;
            let rows = statement.query_map([now], |row| {
                Ok(Lockout {
                    client: row.get(0)?,
                    account: row.get(1)?,
                    until: row.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn password_hash(&self, address: &str) -> Result<Option<String>, StoreError> {
        self.pool.with("cannot look up account", |conn| {
            conn.query_row(
                "SELECT password_hash FROM users WHERE address = ?1",
                [address],
                |row| row.get(0),
            )
            .optional()
        })
    }
}

impl crate::routing::Mailboxes for Accounts {
    fn mailbox_exists(&self, mailbox: &str) -> Result<bool, String> {
        self.exists(mailbox).map_err(|e| e.to_string())
    }
}

/// For the command line (`petrel sendmail`, `petrel queue`), which reads
/// the queue database directly.
impl crate::routing::Mailboxes for Connection {
    fn mailbox_exists(&self, mailbox: &str) -> Result<bool, String> {
        exists(self, mailbox).map_err(|e| format!("cannot look up account: {e}"))
    }
}

/// `address` is a canonical mailbox key ([`crate::protocol::address::Address::mailbox_key`]).
pub fn exists(conn: &Connection, address: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM users WHERE address = ?1)",
        [address],
        |row| row.get(0),
    )
}

/// Every account's address.
pub fn addresses(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<String>> {
    let mut statement = conn.prepare("SELECT address FROM users")?;
    let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
    rows.collect()
}

/// An account as a login sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub password_hash: String,
    /// The app password the typed one's selector names, if any.
    pub app: Option<AppCredential>,
    /// Failed logins since the last success.
    pub failures: u32,
    pub last_login_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCredential {
    pub label: String,
    pub hash: String,
}

/// A client address refused AUTH until `until` (an SQL timestamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    pub client: String,
    pub account: Option<String>,
    pub until: String,
}

/// What the server learns at each login, written by the queue writer so
/// `petrel user list` can show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginEvent {
    Succeeded {
        account: String,
        client: String,
        /// The app password used; `None`: the main password.
        label: Option<String>,
    },
    /// A wrong password for an existing account.
    Failed { account: String, client: String },
    /// `client` is refused AUTH until `until`.
    LockedOut(Lockout),
}

/// Where logins are recorded, for `petrel user list`.
#[derive(Clone)]
pub struct LoginLog {
    store: StoreHandle,
}

impl LoginLog {
    pub fn new(store: StoreHandle) -> LoginLog {
        LoginLog { store }
    }

    /// Records a login without waiting for the commit: the audit trail
    /// must not slow AUTH down, and a crash may lose the last few events
    /// (never mail).
    pub fn record(&self, event: LoginEvent) {
        self.store.write_later("a login", move |conn, now| {
            record(conn, &event, now).map_err(StoreError::sqlite("cannot record a login"))
        });
    }
}

/// Records a login event (inside the store writer's transaction).
fn record(conn: &Connection, event: &LoginEvent, now: &str) -> rusqlite::Result<()> {
    match event {
        LoginEvent::Succeeded {
            account,
            client,
            label,
        } => {
            conn.prepare_cached(
                "UPDATE users SET last_login_at = ?2, last_login_from = ?3, last_login_label = ?4,
                                  failures = 0
                 WHERE address = ?1",
            )?
            .execute(params![account, now, client, label])?;
            if let Some(label) = label {
                conn.prepare_cached(
                    "UPDATE app_passwords SET last_used_at = ?3, last_used_from = ?4
                     WHERE address = ?1 AND label = ?2",
                )?
                .execute(params![account, label, now, client])?;
            }
        }
        LoginEvent::Failed { account, client } => {
            conn.prepare_cached(
                "UPDATE users SET failures = failures + 1, last_failure_at = ?2,
                                  last_failure_from = ?3
                 WHERE address = ?1",
            )?
            .execute(params![account, now, client])?;
        }
        LoginEvent::LockedOut(lockout) => {
            conn.prepare_cached("DELETE FROM auth_lockouts WHERE until <= ?1")?
                .execute([now])?;
            conn.prepare_cached(
                "INSERT INTO auth_lockouts (client, account, until) VALUES (?1, ?2, ?3)
                 ON CONFLICT (client) DO UPDATE SET account = excluded.account,
                                                    until = excluded.until",
            )?
            .execute(params![lockout.client, lockout.account, lockout.until])?;
        }
    }
    Ok(())
}

#[derive(Debug)]
pub enum AccountError {
    AlreadyExists(String),
    NoSuchAccount(String),
    /// (account, label)
    LabelTaken(String, String),
    /// (account, label)
    NoSuchLabel(String, String),
    /// The new app password's selector is in use: draw another.
    SelectorTaken,
    Database(StoreError),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::AlreadyExists(address) => write!(f, "{address} already exists"),
            AccountError::NoSuchAccount(address) => write!(f, "no account {address}"),
            AccountError::LabelTaken(address, label) => {
                write!(
                    f,
                    "{address} already has an app password labelled {label:?}"
                )
            }
            AccountError::NoSuchLabel(address, label) => {
                write!(f, "{address} has no app password labelled {label:?}")
            }
            AccountError::SelectorTaken => f.write_str("app password selector in use"),
            AccountError::Database(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for AccountError {}

fn db(context: &str) -> impl FnOnce(rusqlite::Error) -> AccountError {
    let context = context.to_string();
    move |error| AccountError::Database(StoreError::new(format!("{context}: {error}")))
}

pub fn add(conn: &Connection, address: &str, password_hash: &str) -> Result<(), AccountError> {
    let now = sql_timestamp(SystemTime::now());
    let inserted = conn
        .execute(
            "INSERT INTO users (address, password_hash, created_at, password_changed_at)
             VALUES (?1, ?2, ?3, ?3) ON CONFLICT (address) DO NOTHING",
            params![address, password_hash, now],
        )
        .map_err(db("cannot add account"))?;
    if inserted == 0 {
        return Err(AccountError::AlreadyExists(address.to_string()));
    }
    Ok(())
}

pub fn set_password(
    conn: &Connection,
    address: &str,
    password_hash: &str,
) -> Result<(), AccountError> {
    let now = sql_timestamp(SystemTime::now());
    let updated = conn
        .execute(
            "UPDATE users SET previous_password_hash = password_hash, password_hash = ?2,
                              password_changed_at = ?3
             WHERE address = ?1",
            params![address, password_hash, now],
        )
        .map_err(db("cannot change password"))?;
    if updated == 0 {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    Ok(())
}

pub fn delete(conn: &Connection, address: &str) -> Result<(), AccountError> {
    let deleted = conn
        .execute("DELETE FROM users WHERE address = ?1", [address])
        .map_err(db("cannot delete account"))?;
    if deleted == 0 {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    Ok(())
}

/// The current and the previous password hash (a new password may be
/// neither).
pub fn password_hashes(
    conn: &Connection,
    address: &str,
) -> Result<(String, Option<String>), AccountError> {
    conn.query_row(
        "SELECT password_hash, previous_password_hash FROM users WHERE address = ?1",
        [address],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
    .map_err(db("cannot look up account"))?
    .ok_or_else(|| AccountError::NoSuchAccount(address.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub address: String,
    pub created_at: String,
    pub password_changed_at: String,
    pub last_login_at: Option<String>,
    pub last_login_from: Option<String>,
    /// The app password of the last login; `None`: the main password.
    pub last_login_label: Option<String>,
    pub failures: u32,
    pub last_failure_at: Option<String>,
    pub last_failure_from: Option<String>,
    pub app_passwords: u32,
    /// Client addresses refused AUTH after failing at this account.
    pub lockouts: Vec<Lockout>,
}

pub fn list(conn: &Connection) -> Result<Vec<AccountInfo>, AccountError> {
    let now = sql_timestamp(SystemTime::now());
    let mut statement = conn
        .prepare(
            "SELECT address, created_at, password_changed_at, last_login_at, last_login_from,
                    last_login_label, failures, last_failure_at, last_failure_from,
                    (SELECT count(*) FROM app_passwords a WHERE a.address = u.address)
             FROM users u ORDER BY address",
        )
        .map_err(db("cannot list accounts"))?;
    let rows = statement
        .query_map([], |row| {
            Ok(AccountInfo {
                address: row.get(0)?,
                created_at: row.get(1)?,
                password_changed_at: row.get(2)?,
                last_login_at: row.get(3)?,
                last_login_from: row.get(4)?,
                last_login_label: row.get(5)?,
                failures: row.get(6)?,
                last_failure_at: row.get(7)?,
                last_failure_from: row.get(8)?,
                app_passwords: row.get(9)?,
                lockouts: Vec::new(),
            })
        })
        .map_err(db("cannot list accounts"))?;
    let mut accounts = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db("cannot list accounts"))?;
    let mut statement = conn
        .prepare(
            "SELECT client, account, until FROM auth_lockouts
             WHERE until > ?1 AND account IS NOT NULL ORDER BY until",
        )
        .map_err(db("cannot list lockouts"))?;
    let lockouts = statement
        .query_map([now], |row| {
            Ok(Lockout {
                client: row.get(0)?,
                account: row.get(1)?,
                until: row.get(2)?,
            })
        })
        .map_err(db("cannot list lockouts"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db("cannot list lockouts"))?;
    for lockout in lockouts {
        if let Some(account) = accounts
            .iter_mut()
            .find(|a| Some(&a.address) == lockout.account.as_ref())
        {
            account.lockouts.push(lockout);
        }
    }
    Ok(accounts)
}

/// Forgets the failures at `address` and lifts the lockouts of the client
/// addresses that failed at it; returns those addresses. (The running
/// server is told separately, through its control socket.)
pub fn unlock(conn: &Connection, address: &str) -> Result<Vec<String>, AccountError> {
    let tx = conn
        .unchecked_transaction()
        .map_err(db("cannot unlock account"))?;
    let updated = tx
        .execute(
            "UPDATE users SET failures = 0 WHERE address = ?1",
            [address],
        )
        .map_err(db("cannot unlock account"))?;
    if updated == 0 {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    let clients = {
        let mut statement = tx
            .prepare("DELETE FROM auth_lockouts WHERE account = ?1 RETURNING client")
            .map_err(db("cannot unlock account"))?;
        statement
            .query_map([address], |row| row.get(0))
            .map_err(db("cannot unlock account"))?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(db("cannot unlock account"))?
    };
    tx.commit().map_err(db("cannot unlock account"))?;
    Ok(clients)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPasswordInfo {
    pub label: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub last_used_from: Option<String>,
}

pub fn add_app_password(
    conn: &Connection,
    address: &str,
    label: &str,
    selector: &str,
    password_hash: &str,
) -> Result<(), AccountError> {
    if !exists(conn, address).map_err(db("cannot look up account"))? {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    let now = sql_timestamp(SystemTime::now());
    let result = conn.execute(
        "INSERT INTO app_passwords (address, label, selector, password_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![address, label, selector, password_hash, now],
    );
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(error, Some(text)))
            if error.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            if text.contains("selector") {
                Err(AccountError::SelectorTaken)
            } else {
                Err(AccountError::LabelTaken(
                    address.to_string(),
                    label.to_string(),
                ))
            }
        }
        Err(error) => Err(db("cannot add app password")(error)),
    }
}

pub fn app_passwords(
    conn: &Connection,
    address: &str,
) -> Result<Vec<AppPasswordInfo>, AccountError> {
    if !exists(conn, address).map_err(db("cannot look up account"))? {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    let mut statement = conn
        .prepare(
            "SELECT label, created_at, last_used_at, last_used_from FROM app_passwords
             WHERE address = ?1 ORDER BY created_at, label",
        )
        .map_err(db("cannot list app passwords"))?;
    statement
        .query_map([address], |row| {
            Ok(AppPasswordInfo {
                label: row.get(0)?,
                created_at: row.get(1)?,
                last_used_at: row.get(2)?,
                last_used_from: row.get(3)?,
            })
        })
        .map_err(db("cannot list app passwords"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db("cannot list app passwords"))
}

/// Revokes one app password; returns how many the account has left.
pub fn revoke_app_password(
    conn: &Connection,
    address: &str,
    label: &str,
) -> Result<usize, AccountError> {
    if !exists(conn, address).map_err(db("cannot look up account"))? {
        return Err(AccountError::NoSuchAccount(address.to_string()));
    }
    let deleted = conn
        .execute(
            "DELETE FROM app_passwords WHERE address = ?1 AND label = ?2",
            [address, label],
        )
        .map_err(db("cannot revoke app password"))?;
    if deleted == 0 {
        return Err(AccountError::NoSuchLabel(
            address.to_string(),
            label.to_string(),
        ));
    }
    conn.query_row(
        "SELECT count(*) FROM app_passwords WHERE address = ?1",
        [address],
        |row| row.get::<_, i64>(0),
    )
    .map(|count| usize::try_from(count).unwrap_or(0))
    .map_err(db("cannot count app passwords"))
}

/// Revokes every app password of the account; returns how many there were.
pub fn revoke_all_app_passwords(conn: &Connection, address: &str) -> Result<usize, AccountError> {
    conn.execute("DELETE FROM app_passwords WHERE address = ?1", [address])
        .map_err(db("cannot revoke app passwords"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_change_delete() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        add(&conn, "alice@example.com", "$argon2id$fake").unwrap();
        assert!(matches!(
            add(&conn, "alice@example.com", "$argon2id$fake"),
            Err(AccountError::AlreadyExists(_))
        ));
        set_password(&conn, "alice@example.com", "$argon2id$new").unwrap();
        let accounts = Accounts::new(ReadPool::new(
            &dir.path().join(crate::store::data_dir::QUEUE_FILE),
            2,
        ));
        assert_eq!(
            accounts
                .password_hash("alice@example.com")
                .unwrap()
                .as_deref(),
            Some("$argon2id$new")
        );
        assert!(accounts.exists("alice@example.com").unwrap());
        assert_eq!(list(&conn).unwrap().len(), 1);
        add_app_password(&conn, "alice@example.com", "phone", "abcd", "$argon2id$app").unwrap();
        assert!(matches!(
            add_app_password(&conn, "alice@example.com", "phone", "efgh", "$argon2id$x"),
            Err(AccountError::LabelTaken(..))
        ));
        assert!(matches!(
            add_app_password(&conn, "alice@example.com", "laptop", "abcd", "$argon2id$x"),
            Err(AccountError::SelectorTaken)
        ));
        let found = accounts
            .credentials("alice@example.com", Some("abcd"))
            .unwrap()
            .unwrap();
        assert_eq!(found.app.unwrap().label, "phone");
        delete(&conn, "alice@example.com").unwrap();
        let left: i64 = conn
            .query_row("SELECT count(*) FROM app_passwords", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "app passwords leave with their account");
        assert!(!accounts.exists("alice@example.com").unwrap());
        assert!(matches!(
            delete(&conn, "alice@example.com"),
            Err(AccountError::NoSuchAccount(_))
        ));
    }
}
