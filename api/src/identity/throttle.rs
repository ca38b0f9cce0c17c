//! Failed-login throttling, per account and per client address, with growing delays.
//!
//! Each key (a username, whether it exists or not, and a client address) gets `free` attempts
//! that may fail; attempts still running count against them, so a flood of parallel attempts
//! is held to `free` at a time. Past them, each failure locks the key for
//! `base_delay * 2^(failures - free)`, at most `max_delay`, and an attempt while locked is
//! refused at once (429 with `Retry-After`), before any password is hashed. A success clears
//! the account's failures; an attempt abandoned by its client counts as a failure. A key's
//! failures are forgotten `forget_after` after its last failure (so a busy shared address,
//! a school behind one NAT, is not locked for ever by old mistakes). IPv6 clients are keyed by
//! their /64 (one host usually holds a whole /64). The tables are bounded (least recently used
//! entries go first, so junk usernames cannot push out a victim that is being attacked now).
//! This is separate from general rate limiting: it exists to make password guessing slow,
//! whoever pays for the requests.
//!
//! The state is per node (in memory): with N nodes behind a balancer an attacker gets at most N
//! times the attempts, and still growing delays on each.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The throttle's settings.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    pub free_per_account: u32,
    pub free_per_address: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub forget_after: Duration,
}

#[derive(Debug, Default)]
struct Entry {
    failures: u32,
    in_flight: u32,
    locked_until: Option<Instant>,
    last_failure: Option<Instant>,
}

type Entries<K> = moka::sync::Cache<K, Arc<Mutex<Entry>>>;

/// Per-account and per-address login throttling (cheap to clone).
#[derive(Clone)]
pub struct Throttle {
    limits: ThrottleLimits,
    accounts: Entries<String>,
    addresses: Entries<IpAddr>,
}

/// One login attempt in progress: report its outcome with [`Attempt::succeeded`]; dropping it
/// otherwise records a failure.
#[derive(Debug)]
pub struct Attempt {
    account: Arc<Mutex<Entry>>,
    address: Arc<Mutex<Entry>>,
    limits: ThrottleLimits,
    done: bool,
}

/// The longest key kept for an account: usernames are at most 64 characters, anything longer
/// is unknown anyway and is throttled under its first characters.
const ACCOUNT_KEY_CHARS: usize = 128;

fn entries<K: std::hash::Hash + Eq + Send + Sync + 'static>(
    capacity: u64,
    idle: Duration,
) -> Entries<K> {
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .time_to_idle(idle)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

/// The key of a client address: IPv4 as is, IPv6 by its /64.
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Self {
        Self {
            limits,
            accounts: entries(100_000, limits.forget_after),
            addresses: entries(100_000, limits.forget_after),
        }
    }

    /// Starts an attempt, or says how long to wait before the next one.
    pub fn begin(&self, username: &str, address: IpAddr) -> Result<Attempt, Duration> {
        let key: String = username.chars().take(ACCOUNT_KEY_CHARS).collect();
        let account = self.accounts.get_with(key.to_lowercase(), Arc::default);
        let address = self.addresses.get_with(address_key(address), Arc::default);
        let now = Instant::now();
        {
            let mut a = account.lock().expect("throttle lock");
            let mut b = address.lock().expect("throttle lock");
            for entry in [&mut *a, &mut *b] {
                Self::forget_old(entry, now, self.limits.forget_after);
            }
            let wait = Self::wait(&a, self.limits.free_per_account, now).max(Self::wait(
                &b,
                self.limits.free_per_address,
                now,
            ));
            if let Some(wait) = wait {
                return Err(wait);
            }
            a.in_flight += 1;
            b.in_flight += 1;
        }
        Ok(Attempt {
            account,
            address,
            limits: self.limits,
            done: false,
        })
    }

    /// Forgets failures older than `forget_after` (once no lock is running).
    fn forget_old(entry: &mut Entry, now: Instant, forget_after: Duration) {
        let stale = entry
            .last_failure
            .is_some_and(|at| now.duration_since(at) >= forget_after);
        let unlocked = entry.locked_until.is_none_or(|until| until <= now);
        if stale && unlocked {
            entry.failures = 0;
            entry.locked_until = None;
            entry.last_failure = None;
        }
    }

    fn wait(entry: &Entry, free: u32, now: Instant) -> Option<Duration> {
        if let Some(until) = entry.locked_until.filter(|until| *until > now) {
            return Some(until - now);
        }
        if entry.failures >= free {
            // Locked out no longer, but past the free attempts: one at a time.
            return (entry.in_flight > 0).then_some(Duration::from_secs(1));
        }
        (entry.failures + entry.in_flight >= free).then_some(Duration::from_secs(1))
    }
}

impl Attempt {
    /// The password was right: the account's failures are forgotten.
    pub fn succeeded(mut self) {
        self.done = true;
        let mut account = self.account.lock().expect("throttle lock");
        account.in_flight = account.in_flight.saturating_sub(1);
        account.failures = 0;
        account.locked_until = None;
        drop(account);
        let mut address = self.address.lock().expect("throttle lock");
        address.in_flight = address.in_flight.saturating_sub(1);
    }

    /// The attempt ended without an answer about the password (the service was busy): it
    /// neither counts as a failure nor clears any.
    pub fn abandoned(mut self) {
        self.done = true;
        for entry in [&self.account, &self.address] {
            let mut entry = entry.lock().expect("throttle lock");
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = Instant::now();
        for (entry, free) in [
            (&self.account, self.limits.free_per_account),
            (&self.address, self.limits.free_per_address),
        ] {
            let mut entry = entry.lock().expect("throttle lock");
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = Some(now);
            if entry.failures >= free {
                let doublings = (entry.failures - free).min(30);
                let delay = self
                    .limits
                    .base_delay
                    .saturating_mul(1 << doublings)
                    .min(self.limits.max_delay);
                entry.locked_until = Some(now + delay);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), HOME);
    }

    #[test]
    fn old_failures_are_forgotten_once_the_lock_is_over() {
        let t = Throttle::new(ThrottleLimits {
            forget_after: Duration::ZERO,
            base_delay: Duration::ZERO,
            ..throttle().limits
        });
        for _ in 0..10 {
            drop(t.begin("ada", HOME).unwrap());
        }
        t.begin("ada", HOME).unwrap().succeeded();
    }

    fn throttle() -> Throttle {
        Throttle::new(ThrottleLimits {
            free_per_account: 3,
            free_per_address: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
        })
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const AWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn failures_past_the_free_ones_lock_with_growing_delays() {
        let t = throttle();
        for _ in 0..3 {
            drop(t.begin("ada", HOME).unwrap());
        }
        let first = t.begin("ada", AWAY).unwrap_err();
        assert!(first <= Duration::from_secs(1) && first > Duration::ZERO);
        // The same account under another case is the same account.
        assert!(t.begin("ADA", AWAY).is_err());
        // Another account from the same address is not locked.
        t.begin("grace", HOME).unwrap().succeeded();
    }

    #[test]
    fn parallel_attempts_count_before_they_fail_and_success_clears_the_account() {
        let t = throttle();
        let running: Vec<_> = (0..3).map(|_| t.begin("ada", HOME).unwrap()).collect();
        assert!(
            t.begin("ada", AWAY).is_err(),
            "three running use the free attempts"
        );
        for attempt in running {
            attempt.abandoned();
        }
        drop(t.begin("ada", HOME).unwrap());
        drop(t.begin("ada", HOME).unwrap());
        t.begin("ada", HOME).unwrap().succeeded();
        for _ in 0..2 {
            drop(t.begin("ada", HOME).unwrap());
        }
        t.begin("ada", HOME).unwrap().succeeded();
    }

    #[test]
    fn an_address_is_throttled_across_accounts() {
        let t = throttle();
        for i in 0..5 {
            drop(t.begin(&format!("user{i}"), HOME).unwrap());
        }
        assert!(t.begin("someone-else", HOME).is_err());
        t.begin("someone-else", AWAY).unwrap().succeeded();
    }

    #[test]
    fn delays_double_and_stop_at_the_maximum() {
        let t = throttle();
        let entry = Arc::new(Mutex::new(Entry::default()));
        for failures in 0..40u32 {
            let attempt = Attempt {
                account: entry.clone(),
                address: Arc::new(Mutex::new(Entry::default())),
                limits: t.limits,
                done: false,
            };
            entry.lock().unwrap().in_flight += 1;
            drop(attempt);
            let locked = entry.lock().unwrap().locked_until;
            if failures + 1 < 3 {
                assert!(locked.is_none());
            } else {
                let left = locked.unwrap() - Instant::now();
                let expected = Duration::from_secs(1 << (failures + 1 - 3).min(30))
                    .min(Duration::from_secs(60));
                assert!(left <= expected && left + Duration::from_millis(500) > expected);
            }
        }
    }
}
