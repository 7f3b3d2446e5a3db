//! `petrel user add|passwd|del|list`: accounts (logins and local mailboxes).
//! Works while the server runs; the server sees changes at the next lookup.

use std::io::BufRead as _;

use clap::Subcommand;

use super::{Failure, say};
use crate::auth::{accounts, password};
use crate::config::Config;
use crate::protocol::address::Address;
use crate::queue;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account (a login and a local mailbox)
    Add {
        address: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change an account's password
    Passwd {
        address: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete an account (its Maildir is left on disk)
    Del { address: String },
    /// List accounts
    List,
}

pub fn run(config: &Config, command: UserCommand) -> Result<(), Failure> {
    super::as_server_user(config)?;
    match command {
        UserCommand::Add {
            address,
            password_stdin,
        } => {
            let address = local_address(config, &address)?;
            let conn = open(config)?;
            if exists(&conn, &address)? {
                return Err(Failure::Runtime(format!("{address} already exists")));
            }
            let hash = new_password_hash(config, &address, password_stdin)?;
            accounts::add(&conn, &address, &hash).map_err(|e| Failure::Runtime(e.to_string()))?;
            say!("added {address}");
        }
        UserCommand::Passwd {
            address,
            password_stdin,
        } => {
            let address = local_address(config, &address)?;
            let conn = open(config)?;
            if !exists(&conn, &address)? {
                return Err(Failure::Runtime(format!("no account {address}")));
            }
            let hash = new_password_hash(config, &address, password_stdin)?;
            accounts::set_password(&conn, &address, &hash)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            say!("password changed for {address}");
        }
        UserCommand::Del { address } => {
            let address = parse(&address)?;
            let conn = open(config)?;
            accounts::delete(&conn, &address).map_err(|e| Failure::Runtime(e.to_string()))?;
            say!("deleted {address} (its Maildir, if any, is left on disk)");
        }
        UserCommand::List => {
            let conn = open(config)?;
            let list = accounts::list(&conn).map_err(|e| Failure::Runtime(e.to_string()))?;
            for account in list {
                say!(
                    "{}\tcreated {}\tpassword changed {}",
                    account.address,
                    account.created_at,
                    account.password_changed_at
                );
            }
        }
    }
    Ok(())
}

fn open(config: &Config) -> Result<rusqlite::Connection, Failure> {
    queue::open_direct(&config.data_dir).map_err(|e| Failure::Runtime(e.to_string()))
}

fn exists(conn: &rusqlite::Connection, address: &str) -> Result<bool, Failure> {
    accounts::exists(conn, address)
        .map_err(|e| Failure::Runtime(format!("cannot look up {address}: {e}")))
}

fn parse(text: &str) -> Result<String, Failure> {
    Address::parse(text)
        .map(|address| address.mailbox_key())
        .map_err(|e| Failure::Usage(format!("{text:?} is not an address: {e}")))
}

/// Accounts are mailboxes, so they live in a local domain.
fn local_address(config: &Config, text: &str) -> Result<String, Failure> {
    let address = Address::parse(text)
        .map_err(|e| Failure::Usage(format!("{text:?} is not an address: {e}")))?;
    if !config.is_local_domain(address.domain()) {
        return Err(Failure::Usage(format!(
            "{} is not a local domain; add it to domains.local first (local: {})",
            address.domain(),
            config.domains.local.join(", ")
        )));
    }
    Ok(address.mailbox_key())
}

fn new_password_hash(config: &Config, address: &str, from_stdin: bool) -> Result<String, Failure> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure::Runtime(format!("cannot read the password from stdin: {e}")))?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let prompt = |text: &str| {
            rpassword::prompt_password(text).map_err(|e| {
                Failure::Usage(format!(
                    "cannot read a password from the terminal ({e}); use --password-stdin"
                ))
            })
        };
        let first = prompt(&format!("New password for {address}: "))?;
        let second = prompt("Repeat it: ")?;
        if first != second {
            return Err(Failure::Usage("the two passwords differ".into()));
        }
        first
    };
    password::check_policy(&config.auth.password_policy, &password, address)
        .map_err(|refused| Failure::Usage(refused.to_string()))?;
    password::hash(&password).map_err(Failure::Runtime)
}
