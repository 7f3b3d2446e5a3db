//! petrel: a mail server (SMTP MTA) in one binary with a SQLite queue.
//!
//! Where things live:
//! - [`protocol`]: SMTP parsing and the session state machine (no IO)
//! - [`server`]: listeners, acceptor, worker pool, the per-connection IO loop
//! - [`intake`]: between a session's envelope and the commit: the recipient
//!   directory, SPF/DKIM/DMARC checks, signing, the queue's form
//! - [`queue`]: messages, recipients and delivery state, and their SQL
//! - [`store`]: the SQLite file, migrations, the group-commit writer, read
//!   connections, and every path in `data_dir`
//! - [`envelope`]: a final recipient and its route: the one vocabulary of
//!   routing, the queue and delivery
//! - [`routing`]: where a recipient's mail goes, decided once at acceptance
//! - [`policy`]: relay, sender and outbound-address decisions as pure functions
//! - [`delivery`]: the scheduler, delivery workers, the SMTP client, Maildirs,
//!   bounces (DSNs)
//! - [`dkim`]: DKIM signing of our users' mail, and verification
//! - [`mailauth`]: SPF, DMARC and Authentication-Results for inbound mail
//! - [`mta_sts`]: MTA-STS policies of the domains mail is delivered to
//! - [`dns`]: the blocking DNS facade over hickory-resolver
//! - [`auth`]: accounts, password policy and hashing, brute-force limiter
//! - [`tls`]: certificates and rustls configurations
//! - [`config`]: the TOML config file, defaults and validation
//! - [`cli`]: the `petrel` command line
//! - [`instance`]: a whole running server, started and stopped in order
//! - [`host`]: what the system says about this host (its own addresses)
//! - [`safe_fs`]: file operations for root in folders others can write
//! - [`watched`]: files reloaded when they change on disk
//! - [`printable`], [`timefmt`]: escaping network text; dates

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod envelope;
mod error;
pub mod host;
pub mod instance;
pub mod intake;
pub mod mailauth;
pub mod mta_sts;
pub mod policy;
pub mod printable;
pub mod protocol;
pub mod queue;
pub mod routing;
pub mod safe_fs;
pub mod server;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod watched;
