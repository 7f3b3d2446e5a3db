//! SMTP as pure data transformations: addresses, command parsing, replies,
//! the DATA decoder and the session state machine. Nothing in here owns a
//! socket, a thread or a file.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod date;
pub mod dsn;
pub mod line;
pub mod reply;
pub mod sasl;
pub mod services;
pub mod session;
