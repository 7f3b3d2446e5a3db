//! Password verification as a bounded resource. One argon2id check needs
//! 19 MiB of memory and ~50 ms of a core; left unbounded, a burst of AUTH
//! commands costs gigabytes (128 at once took 2.5 GB). So at most a fixed
//! number of checks run at once (about one per core), each in a memory
//! block the pool hands out; an attempt that cannot get a slot within a
//! bounded wait is told to come back later instead of queueing forever.
//!
//! Memory blocks are reused while checks are waiting and dropped when the
//! pool goes idle, so a burst costs at most `size` blocks and leaves none.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};

use super::password::MAX_PASSWORD_LENGTH;

/// No slot came free within the wait: answer 454 and let the client retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

#[derive(Default)]
struct State {
    free: usize,
    waiting: usize,
    /// Blocks given back while others waited, ready for the next check.
    spare: Vec<Vec<Block>>,
    /// Checks run since start (tests and benchmarks read it).
    checks: u64,
}

pub struct HashingPool {
    state: Mutex<State>,
    freed: Condvar,
    wait: Duration,
    size: usize,
}

/// A PHC string of the same cost as the real ones, for unknown users: a
/// login for a name that does not exist takes as long as a wrong password.
const TIMING_EQUALISER: &str = "$argon2id$v=19$m=19456,t=2,p=1$cGV0cmVsLXRpbWluZy1lcQ$\
    a8Xfw0pyQ2H8UvD6AEZ3cn9Cp7TLKwQu6bY3M4v1dRc";

impl HashingPool {
    /// `size` checks at once (at least one); `wait` for a slot at most.
    pub fn new(size: usize, wait: Duration) -> HashingPool {
        let size = size.max(1);
        HashingPool {
            state: Mutex::new(State {
                free: size,
                ..State::default()
            }),
            freed: Condvar::new(),
            wait,
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Password checks run so far.
    pub fn checks(&self) -> u64 {
        self.lock().checks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `password` matches the stored PHC string; `None` (no such
    /// account) spends the same effort and says no.
    pub fn verify(&self, password: &str, stored: Option<&str>) -> Result<bool, Busy> {
        let mut memory = self.acquire()?;
        let result = match stored {
            Some(stored) => matches(password, stored, &mut memory),
            None => {
                let _ = matches(password, TIMING_EQUALISER, &mut memory);
                false
            }
        };
        self.release(memory);
        Ok(result)
    }

    fn acquire(&self) -> Result<Vec<Block>, Busy> {
        let deadline = Instant::now() + self.wait;
        let mut state = self.lock();
        state.waiting += 1;
        while state.free == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.waiting -= 1;
                return Err(Busy);
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.waiting -= 1;
        state.free -= 1;
        state.checks += 1;
        Ok(state.spare.pop().unwrap_or_default())
    }

    fn release(&self, memory: Vec<Block>) {
        let mut state = self.lock();
        state.free += 1;
        // Keep the block only for a check that is already waiting for it;
        // an idle pool holds no memory.
        if state.waiting > state.spare.len() {
            state.spare.push(memory);
        } else {
            state.spare.clear();
            drop(memory);
        }
        drop(state);
        self.freed.notify_one();
    }
}

/// argon2 over the caller's memory block, against a PHC string.
pub(crate) fn matches(password: &str, stored: &str, memory: &mut Vec<Block>) -> bool {
    if password.len() > MAX_PASSWORD_LENGTH * 4 {
        return false;
    }
    let parsed = match PasswordHash::new(stored) {
        Ok(parsed) => parsed,
        Err(error) => {
            log::error!("auth: a stored password hash is not a valid PHC string: {error}");
            return false;
        }
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        log::error!("auth: a stored password hash has no salt or no hash");
        return false;
    };
    let prepared = (|| {
        let algorithm = Algorithm::try_from(parsed.algorithm.as_str()).ok()?;
        let version = match parsed.version {
            Some(version) => Version::try_from(version).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).ok()?;
        Some(Argon2::new(algorithm, version, params))
    })();
    let Some(argon2) = prepared else {
        log::error!("auth: a stored password hash has parameters argon2 does not accept");
        return false;
    };
    let blocks = argon2.params().block_count();
    if memory.len() != blocks {
        memory.clear();
        memory.resize(blocks, Block::default());
    }
    let mut output = vec![0u8; expected.len()];
    if argon2
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut output, &mut memory[..])
        .is_err()
    {
        return false;
    }
    // Output's comparison is constant-time.
    argon2::password_hash::phc::Output::new(&output).is_ok_and(|computed| computed == *expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn verifies_phc_hashes_like_the_argon2_crate() {
        let pool = HashingPool::new(2, Duration::from_secs(10));
        let stored = super::super::password::hash("correct-Horse-battery-9").unwrap();
        assert_eq!(
            pool.verify("correct-Horse-battery-9", Some(&stored)),
            Ok(true)
        );
        assert_eq!(
            pool.verify("correct-horse-battery-9", Some(&stored)),
            Ok(false)
        );
        assert_eq!(pool.verify("anything", Some("not a phc string")), Ok(false));
        assert_eq!(pool.verify("anything", None), Ok(false));
        assert_eq!(pool.checks(), 4);
        assert!(pool.lock().spare.is_empty(), "an idle pool holds no memory");
    }

    #[test]
    fn the_equaliser_costs_what_a_real_hash_costs() {
        let real = super::super::password::hash("x").unwrap();
        let params = |phc: &str| {
            let parsed = PasswordHash::new(phc).unwrap();
            Params::try_from(&parsed).unwrap().block_count()
        };
        assert_eq!(params(TIMING_EQUALISER), params(&real));
    }

    #[test]
    fn at_most_size_checks_run_and_waits_are_bounded() {
        let pool = Arc::new(HashingPool::new(1, Duration::from_millis(50)));
        // Hold the only slot.
        let held = pool.acquire().unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.verify("x", None))
        };
        assert_eq!(waiter.join().unwrap(), Err(Busy));
        pool.release(held);
        assert_eq!(pool.verify("x", None), Ok(false));
    }
}
