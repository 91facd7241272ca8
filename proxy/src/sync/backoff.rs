//! Exponential backoff with jitter, so many sidecars that lost the control plane together do not
//! come back in lockstep.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// Delays that double from `min` up to `max`, each drawn from the upper half of its step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `min`, never exceeds `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            step: min,
        }
    }

    /// The next delay: the current step with jitter; the step then doubles (capped).
    pub fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.step, 0.5);
        self.step = (self.step * 2).min(self.max);
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// `d` reduced by a random fraction of up to `spread` (0..=1) of itself.
pub fn jitter(d: Duration, spread: f64) -> Duration {
    d.mul_f64(1.0 - spread.clamp(0.0, 1.0) * random_fraction())
}

/// A uniform random number in [0, 1).
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    // The system RNG failing is not worth failing a retry over: no jitter then.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.0;
    }
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_below_each_step() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let steps: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        for (delay, step) in steps.iter().zip([100, 200, 400, 400, 400]) {
            let step = Duration::from_millis(step);
            assert!(
                *delay <= step && *delay >= step / 2,
                "{delay:?} vs {step:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let f = random_fraction();
        assert!((0.0..1.0).contains(&f));
    }
}
