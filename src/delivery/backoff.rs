//! When to try again: exponential backoff from `queue.retry_min`, doubled
//! per failed attempt, with jitter so that a destination's queue does not
//! come back as one burst, capped at `queue.retry_max`.

use std::time::Duration;

/// Delay after the `failures`-th failed attempt (1 = the first failure).
/// `random` is uniform in [0, 1); the jitter spreads delays ±20%.
pub fn retry_delay(failures: u32, min: Duration, max: Duration, random: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(32);
    let base = min.saturating_mul(1u32 << exponent.min(31)).min(max);
    let factor = 0.8 + 0.4 * random.clamp(0.0, 1.0);
    base.mul_f64(factor).clamp(min, max)
}

/// A uniform number in [0, 1).
pub fn random_fraction() -> f64 {
    (crate::dns::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(300);
    const MAX: Duration = Duration::from_secs(3600);

    #[test]
    fn doubles_then_caps() {
        let delays: Vec<u64> = (1..=6)
            .map(|n| retry_delay(n, MIN, MAX, 0.5).as_secs())
            .collect();
        assert_eq!(delays, vec![300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(retry_delay(1000, MIN, MAX, 0.5), MAX);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for n in 1..=8 {
            for random in [0.0, 0.25, 0.999] {
                let delay = retry_delay(n, MIN, MAX, random);
                assert!(delay >= MIN && delay <= MAX, "{n} {random}: {delay:?}");
            }
        }
        assert_eq!(retry_delay(2, MIN, MAX, 0.0).as_secs(), 480);
        assert!(retry_delay(2, MIN, MAX, 0.999).as_secs() >= 719);
    }

    #[test]
    fn random_fraction_is_in_range() {
        for _ in 0..1000 {
            let r = random_fraction();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
