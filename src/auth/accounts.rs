//! Accounts in the `users` table of the queue database: lookups for the
//! server (through a read pool, so changes made by `petrel user` apply to
//! the next session at once) and the changes `petrel user` makes.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use crate::queue::{QueueError, ReadPool};
use crate::timefmt::sql_timestamp;

pub struct Accounts {
    pool: ReadPool,
}

impl Accounts {
    pub fn new(pool: ReadPool) -> Accounts {
        Accounts { pool }
    }

    /// `address` is a canonical mailbox key (`Address::mailbox_key`).
    pub fn exists(&self, address: &str) -> Result<bool, QueueError> {
        self.pool
            .with("cannot look up account", |conn| exists(conn, address))
    }

    pub fn password_hash(&self, address: &str) -> Result<Option<String>, QueueError> {
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

#[derive(Debug)]
pub enum AccountError {
    AlreadyExists(String),
    NoSuchAccount(String),
    Database(QueueError),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::AlreadyExists(address) => write!(f, "{address} already exists"),
            AccountError::NoSuchAccount(address) => write!(f, "no account {address}"),
            AccountError::Database(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for AccountError {}

fn db(context: &str) -> impl FnOnce(rusqlite::Error) -> AccountError {
    let context = context.to_string();
    move |error| AccountError::Database(QueueError::new(format!("{context}: {error}")))
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
            "UPDATE users SET password_hash = ?2, password_changed_at = ?3 WHERE address = ?1",
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub address: String,
    pub created_at: String,
    pub password_changed_at: String,
}

pub fn list(conn: &Connection) -> Result<Vec<AccountInfo>, AccountError> {
    let mut statement = conn
        .prepare("SELECT address, created_at, password_changed_at FROM users ORDER BY address")
        .map_err(db("cannot list accounts"))?;
    let rows = statement
        .query_map([], |row| {
            Ok(AccountInfo {
                address: row.get(0)?,
                created_at: row.get(1)?,
                password_changed_at: row.get(2)?,
            })
        })
        .map_err(db("cannot list accounts"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db("cannot list accounts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_change_delete() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::queue::open_direct(dir.path()).unwrap();
        add(&conn, "alice@example.com", "$argon2id$fake").unwrap();
        assert!(matches!(
            add(&conn, "alice@example.com", "$argon2id$fake"),
            Err(AccountError::AlreadyExists(_))
        ));
        set_password(&conn, "alice@example.com", "$argon2id$new").unwrap();
        let accounts = Accounts::new(ReadPool::new(&dir.path().join(crate::queue::QUEUE_FILE)));
        assert_eq!(
            accounts
                .password_hash("alice@example.com")
                .unwrap()
                .as_deref(),
            Some("$argon2id$new")
        );
        assert!(accounts.exists("alice@example.com").unwrap());
        assert_eq!(list(&conn).unwrap().len(), 1);
        delete(&conn, "alice@example.com").unwrap();
        assert!(!accounts.exists("alice@example.com").unwrap());
        assert!(matches!(
            delete(&conn, "alice@example.com"),
            Err(AccountError::NoSuchAccount(_))
        ));
    }
}
