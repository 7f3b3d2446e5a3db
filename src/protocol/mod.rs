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
pub mod milter;
pub mod reply;
pub mod sasl;
pub mod services;
pub mod session;

/// A small deterministic source of numbers below `bound`, for tests that
/// try many arbitrary inputs and splits (xorshift64; `seed` not zero).
#[cfg(test)]
pub(crate) fn test_numbers(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    }
}
