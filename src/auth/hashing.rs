//! Password verification as a bounded resource. One argon2id check needs
//! 19 MiB of memory and ~50 ms of a core; left unbounded, a burst of AUTH
//! commands costs gigabytes (128 at once took 2.5 GB). So at most a fixed
//! number of checks run at once (about one per core), each in a memory
//! block of the pool's own; an attempt that cannot get a slot by its
//! deadline is told to come back later instead of queueing forever.
//!
//! The blocks are allocated once, one per slot, on first use, and kept:
//! memory given back to the allocator after each check was not given back
//! to the system (glibc keeps a freed 19 MiB block in the freeing thread's
//! arena, so each session thread that ever checked a password held one:
//! 80 checks in a row left 278 MiB). Kept blocks bound it to
//! `size` × 19 MiB for good, however many checks run.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};

use super::password::MAX_PASSWORD_LENGTH;

/// No slot came free by the deadline: answer 454 and let the client retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

struct State {
    /// The memory blocks of the slots not in use (empty until first used).
    free: Vec<Vec<Block>>,
    /// Checks run since start (tests and benchmarks read it).
    checks: u64,
}

pub struct HashingPool {
    state: Mutex<State>,
    freed: Condvar,
    size: usize,
}

/// A PHC string of the same cost as the real ones, for unknown users: a
/// login for a name that does not exist takes as long as a wrong password.
const TIMING_EQUALISER: &str = "$argon2id$v=19$m=19456,t=2,p=1$cGV0cmVsLXRpbWluZy1lcQ$\
    a8Xfw0pyQ2H8UvD6AEZ3cn9Cp7TLKwQu6bY3M4v1dRc";

impl HashingPool {
    /// `size` checks at once (at least one).
    pub fn new(size: usize) -> HashingPool {
        let size = size.max(1);
        HashingPool {
            state: Mutex::new(State {
                free: (0..size).map(|_| Vec::new()).collect(),
                checks: 0,
            }),
            freed: Condvar::new(),
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
    /// account) spends the same effort and says no. Waits for a slot until
    /// `deadline`.
    pub fn verify(
        &self,
        password: &str,
        stored: Option<&str>,
        deadline: Instant,
    ) -> Result<bool, Busy> {
        let mut memory = self.acquire(deadline)?;
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

    fn acquire(&self, deadline: Instant) -> Result<Vec<Block>, Busy> {
        let mut state = self.lock();
        loop {
            if let Some(memory) = state.free.pop() {
                state.checks += 1;
                return Ok(memory);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Busy);
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn release(&self, memory: Vec<Block>) {
        self.lock().free.push(memory);
        self.freed.notify_one();
    }

    /// Octets held in memory blocks not in use now.
    #[cfg(test)]
    fn idle_memory(&self) -> usize {
        self.lock()
            .free
            .iter()
            .map(|m| m.capacity() * std::mem::size_of::<Block>())
            .sum()
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
    // Grown to the largest cost seen, never shrunk: the block is the slot's.
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut output = vec![0u8; expected.len()];
    if argon2
        .hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            &mut output,
            &mut memory[..blocks],
        )
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
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn verifies_phc_hashes_like_the_argon2_crate() {
        let pool = HashingPool::new(2);
        let stored = super::super::password::hash("correct-Horse-battery-9").unwrap();
        assert_eq!(
            pool.verify("correct-Horse-battery-9", Some(&stored), soon()),
            Ok(true)
        );
        assert_eq!(
            pool.verify("correct-horse-battery-9", Some(&stored), soon()),
            Ok(false)
        );
        assert_eq!(
            pool.verify("anything", Some("not a phc string"), soon()),
            Ok(false)
        );
        assert_eq!(pool.verify("anything", None, soon()), Ok(false));
        assert_eq!(pool.checks(), 4);
    }

    #[test]
    fn memory_is_one_block_per_slot_however_many_checks_run() {
        let pool = Arc::new(HashingPool::new(2));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for _ in 0..2 {
                        assert_eq!(pool.verify("x", None, soon()), Ok(false));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(pool.checks(), 12);
        let block = 19 * 1024 * 1024;
        let held = pool.idle_memory();
        assert!(held <= 2 * (block + block / 16), "{held}");
        assert!(held >= block, "the blocks are kept for the next checks");
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
        let pool = Arc::new(HashingPool::new(1));
        // Hold the only slot.
        let held = pool.acquire(soon()).unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                pool.verify("x", None, Instant::now() + Duration::from_millis(50))
            })
        };
        assert_eq!(waiter.join().unwrap(), Err(Busy));
        pool.release(held);
        assert_eq!(pool.verify("x", None, soon()), Ok(false));
    }
}
