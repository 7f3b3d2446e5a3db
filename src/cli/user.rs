//! `petrel user`: accounts (logins and local mailboxes), their app
//! passwords and their login record. Works while the server runs; the
//! server sees changes at the next lookup (and `unlock` at once, through
//! its control socket).

use std::io::BufRead as _;

use clap::Subcommand;

use super::{Failure, say};
use crate::auth::{accounts, app_passwords, password};
use crate::config::Config;
use crate::protocol::address::Address;
use crate::server::control;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account (a login and a local mailbox)
    Add {
        address: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change an account's password (not back to the current or the previous one)
    Passwd {
        address: String,
        /// Read the password from the first line of standard input
        #[arg(long)]
        password_stdin: bool,
        /// Also revoke every app password of the account (a device may be lost)
        #[arg(long)]
        revoke_app_passwords: bool,
    },
    /// Delete an account (its Maildir is left on disk)
    Del { address: String },
    /// List accounts: last login (when, from where, with which password),
    /// failed logins since, addresses locked out for failing at it
    List,
    /// Forget an account's failed logins and let the addresses locked out
    /// for failing at it log in again
    Unlock { address: String },
    /// Passwords generated per device, revocable one by one
    #[command(name = "app-password", subcommand)]
    AppPassword(AppPasswordCommand),
}

#[derive(Debug, Subcommand)]
pub enum AppPasswordCommand {
    /// Generate an app password for a device; it is shown once
    Add {
        address: String,
        /// Names the device in `list`, the log and Received: headers
        #[arg(long)]
        label: String,
    },
    /// List an account's app passwords with their last use
    List { address: String },
    /// Revoke one app password
    Revoke { address: String, label: String },
}

pub fn run(config: &Config, command: UserCommand) -> Result<(), Failure> {
    super::as_server_user(config, "petrel user")?;
    match command {
        UserCommand::Add {
            address,
            password_stdin,
        } => add(config, &address, password_stdin),
        UserCommand::Passwd {
            address,
            password_stdin,
            revoke_app_passwords,
        } => passwd(config, &address, password_stdin, revoke_app_passwords),
        UserCommand::Del { address } => {
            let address = parse(&address)?;
            let conn = open(config)?;
            accounts::delete(&conn, &address).map_err(account_failure)?;
            say!("deleted {address} (its Maildir, if any, is left on disk)");
            Ok(())
        }
        UserCommand::List => {
            let conn = open(config)?;
            let list = accounts::list(&conn).map_err(account_failure)?;
            for account in list {
                say!("{}", describe(&account));
            }
            Ok(())
        }
        UserCommand::Unlock { address } => unlock(config, &address),
        UserCommand::AppPassword(command) => app_password(config, command),
    }
}

fn add(config: &Config, address: &str, password_stdin: bool) -> Result<(), Failure> {
    let address = local_address(config, address)?;
    let conn = open(config)?;
    if exists(&conn, &address)? {
        return Err(Failure::Runtime(format!("{address} already exists")));
    }
    let password = new_password(config, &address, password_stdin)?;
    let hash = password::hash(&password).map_err(Failure::Runtime)?;
    accounts::add(&conn, &address, &hash).map_err(account_failure)?;
    say!("added {address}");
    Ok(())
}

fn passwd(
    config: &Config,
    address: &str,
    password_stdin: bool,
    revoke_app_passwords: bool,
) -> Result<(), Failure> {
    let address = local_address(config, address)?;
    let conn = open(config)?;
    let (current, previous) =
        accounts::password_hashes(&conn, &address).map_err(account_failure)?;
    let password = new_password(config, &address, password_stdin)?;
    if password::verify(&password, &current)
        || previous.is_some_and(|previous| password::verify(&password, &previous))
    {
        return Err(Failure::Usage(
            "password refused:\n  - choose one you have not used here before".into(),
        ));
    }
    let hash = password::hash(&password).map_err(Failure::Runtime)?;
    // One transaction: a concurrent `user` command or the server sees the
    // old state or the new, never half.
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| Failure::Runtime(format!("cannot change password: {e}")))?;
    accounts::set_password(&tx, &address, &hash).map_err(account_failure)?;
    let revoked = if revoke_app_passwords {
        accounts::revoke_all_app_passwords(&tx, &address).map_err(account_failure)?
    } else {
        0
    };
    tx.commit()
        .map_err(|e| Failure::Runtime(format!("cannot change password: {e}")))?;
    say!("password changed for {address}");
    if revoke_app_passwords {
        say!("revoked {revoked} app passwords of {address}");
    }
    Ok(())
}

/// Forgets the failures recorded in the database, and asks a running
/// server to lift its lockouts.
fn unlock(config: &Config, address: &str) -> Result<(), Failure> {
    let address = parse(address)?;
    let conn = open(config)?;
    let recorded = accounts::unlock(&conn, &address).map_err(account_failure)?;
    let listed = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    match control::unlock(&config.data_dir, &address) {
        Some(lifted) => {
            let mut all = recorded;
            all.extend(lifted);
            all.sort();
            all.dedup();
            say!(
                "unlocked {address}: failures forgotten; lockouts lifted: {}",
                listed(&all)
            );
        }
        None => say!(
            "unlocked {address}: failures forgotten; lockouts lifted: {} (no running server \
             was reached; it will see this when it starts)",
            listed(&recorded)
        ),
    }
    Ok(())
}

fn app_password(config: &Config, command: AppPasswordCommand) -> Result<(), Failure> {
    match command {
        AppPasswordCommand::Add { address, label } => {
            let address = parse(&address)?;
            app_passwords::check_label(&label).map_err(Failure::Usage)?;
            let conn = open(config)?;
            // A selector already used by the account is drawn again: one
            // in 457 000 per app password it has, so a few tries at most.
            let mut tries = 0;
            let generated = loop {
                let generated = app_passwords::generate().map_err(Failure::Runtime)?;
                match accounts::add_app_password(
                    &conn,
                    &address,
                    &label,
                    &generated.selector,
                    &generated.hash,
                ) {
                    Ok(()) => break generated,
                    Err(accounts::AccountError::SelectorTaken) if tries < 10 => tries += 1,
                    Err(error) => return Err(account_failure(error)),
                }
            };
            say!("app password for {address} ({label}):");
            say!("");
            say!("    {}", generated.display);
            say!("");
            say!("It is shown only now. Use it instead of the account password in the");
            say!("device's mail settings (the spaces may be left out).");
        }
        AppPasswordCommand::List { address } => {
            let address = parse(&address)?;
            let conn = open(config)?;
            let list = accounts::app_passwords(&conn, &address).map_err(account_failure)?;
            if list.is_empty() {
                say!("{address} has no app passwords");
            }
            for app in list {
                let used = match (&app.last_used_at, &app.last_used_from) {
                    (Some(at), Some(from)) => format!("last used {at} UTC from {from}"),
                    _ => "never used".to_string(),
                };
                say!("{}\tcreated {} UTC\t{used}", app.label, app.created_at);
            }
        }
        AppPasswordCommand::Revoke { address, label } => {
            let address = parse(&address)?;
            let conn = open(config)?;
            let left =
                accounts::revoke_app_password(&conn, &address, &label).map_err(account_failure)?;
            say!("revoked the app password {label} of {address}");
            if left == 0 && config.auth.require_app_passwords {
                eprintln!(
                    "petrel: warning: {address} has no app password left and \
                     auth.require_app_passwords is on: it cannot send mail until it gets one \
                     (petrel user app-password add {address} --label ...)"
                );
            }
        }
    }
    Ok(())
}

/// One line of `petrel user list`, tab-separated.
fn describe(account: &accounts::AccountInfo) -> String {
    let mut fields = vec![
        account.address.clone(),
        format!("created {}", account.created_at),
        format!("password changed {}", account.password_changed_at),
    ];
    fields.push(match (&account.last_login_at, &account.last_login_from) {
        (Some(at), Some(from)) => format!(
            "last login {at} UTC from {from} with {}",
            account
                .last_login_label
                .as_deref()
                .map(|label| format!("app password {label}"))
                .unwrap_or_else(|| "the password".into())
        ),
        _ => "never logged in".into(),
    });
    if account.failures > 0 {
        fields.push(format!(
            "{} failed logins since (last {} UTC from {})",
            account.failures,
            account.last_failure_at.as_deref().unwrap_or("?"),
            account.last_failure_from.as_deref().unwrap_or("?")
        ));
    } else {
        fields.push("no failed logins since".into());
    }
    if !account.lockouts.is_empty() {
        let locked: Vec<String> = account
            .lockouts
            .iter()
            .map(|l| format!("{} until {} UTC", l.client, l.until))
            .collect();
        fields.push(format!("LOCKED OUT: {}", locked.join(", ")));
    }
    fields.push(format!("{} app passwords", account.app_passwords));
    fields.join("\t")
}

/// Unknown accounts and labels are the caller's mistake: exit 2.
fn account_failure(error: accounts::AccountError) -> Failure {
    match error {
        accounts::AccountError::NoSuchAccount(_) | accounts::AccountError::NoSuchLabel(..) => {
            Failure::Usage(error.to_string())
        }
        other => Failure::Runtime(other.to_string()),
    }
}

fn open(config: &Config) -> Result<rusqlite::Connection, Failure> {
    crate::store::open_direct(&config.data_dir).map_err(|e| Failure::Runtime(e.to_string()))
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

/// Reads a new password and checks it against the policy.
fn new_password(config: &Config, address: &str, from_stdin: bool) -> Result<String, Failure> {
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
    Ok(password)
}
