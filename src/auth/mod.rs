//! Accounts and authentication: the users table, the password policy,
//! argon2id hashing and the brute-force limiter. Never stores, logs or
//! compares a password in clear.

pub mod accounts;
pub mod app_passwords;
pub mod hashing;
pub mod limiter;
pub mod password;

pub use accounts::Accounts;
pub use hashing::HashingPool;
pub use limiter::{AuthLimiter, FailureOutcome, Refused};
