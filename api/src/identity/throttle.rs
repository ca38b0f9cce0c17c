//! Failed-login throttling, per account and per client address, with growing delays.
//!
//! Three keys count failed logins: an account *from one address* (`free_per_account`, 5 by
//! default), an account *from all addresses* (`free_per_account_total`, 50), and a client
//! address across all accounts (`free_per_address`, 20). Usernames count whether they exist or
//! not. Each key gets its free attempts that may fail; attempts still running count against
//! them, so a flood of parallel attempts is held to that many at a time. Past them, each
//! failure locks the key for `base_delay * 2^(failures - free)`, at most `max_delay`, and an
//! attempt while any of its keys is locked is refused at once (429 with `Retry-After`), before
//! any password is hashed.
//!
//! So one attacker guessing one account locks only itself (its address and that account from
//! that address) after a few tries: the account's owner, from another address, still logs in;
//! only a guessing campaign from many addresses (50 failures) slows the account for everyone,
//! and then with growing delays, not a fixed lockout. A success clears the account's failures
//! (both account keys); an attempt abandoned by its client counts as a failure. A key's
//! failures are forgotten `forget_after` after its last failure (a busy shared address, a
//! school behind one NAT, is not locked for ever by old mistakes). IPv6 clients are keyed by
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
    /// Failures of one account from one address before delays.
    pub free_per_account: u32,
    /// Failures of one account from every address together before delays.
    pub free_per_account_total: u32,
    /// Failures from one address (any accounts) before delays.
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

type Shared = Arc<Mutex<Entry>>;
type Entries<K> = moka::sync::Cache<K, Shared>;

/// Per-account and per-address login throttling (cheap to clone).
#[derive(Clone)]
pub struct Throttle {
    limits: ThrottleLimits,
    pairs: Entries<(String, IpAddr)>,
    accounts: Entries<String>,
    addresses: Entries<IpAddr>,
}

/// One login attempt in progress: report its outcome with [`Attempt::succeeded`]; dropping it
/// otherwise records a failure.
#[derive(Debug)]
pub struct Attempt {
    /// The account from this address, the account in total, the address; with their free
    /// failures.
    keys: [(Shared, u32); 3],
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
            pairs: entries(200_000, limits.forget_after),
            accounts: entries(100_000, limits.forget_after),
            addresses: entries(100_000, limits.forget_after),
        }
    }

    /// Starts an attempt, or says how long to wait before the next one.
    pub fn begin(&self, username: &str, address: IpAddr) -> Result<Attempt, Duration> {
        let account: String = username
            .chars()
            .take(ACCOUNT_KEY_CHARS)
            .collect::<String>()
            .to_lowercase();
        let address = address_key(address);
        let limits = self.limits;
        let keys = [
            (
                self.pairs
                    .get_with((account.clone(), address), Arc::default),
                limits.free_per_account,
            ),
            (
                self.accounts.get_with(account, Arc::default),
                limits.free_per_account_total,
            ),
            (
                self.addresses.get_with(address, Arc::default),
                limits.free_per_address,
            ),
        ];
        let now = Instant::now();
        // Locked in a fixed order (pair, account, address): no two attempts deadlock.
        let mut guards: Vec<_> = keys
            .iter()
            .map(|(entry, _)| entry.lock().expect("throttle lock"))
            .collect();
        let mut wait = None;
        for (guard, (_, free)) in guards.iter_mut().zip(&keys) {
            Self::forget_old(guard, now, limits.forget_after);
            wait = wait.max(Self::wait(guard, *free, now));
        }
        if let Some(wait) = wait {
            return Err(wait);
        }
        for guard in &mut guards {
            guard.in_flight += 1;
        }
        drop(guards);
        Ok(Attempt {
            keys,
            limits,
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
    /// The password was right: the account's failures are forgotten (from this address and
    /// in total); the address's are not.
    pub fn succeeded(mut self) {
        self.done = true;
        for (i, (entry, _)) in self.keys.iter().enumerate() {
            let mut entry = entry.lock().expect("throttle lock");
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if i < 2 {
                entry.failures = 0;
                entry.locked_until = None;
                entry.last_failure = None;
            }
        }
    }

    /// The attempt ended without an answer about the password (the service was busy): it
    /// neither counts as a failure nor clears any.
    pub fn abandoned(mut self) {
        self.done = true;
        for (entry, _) in &self.keys {
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
        for (entry, free) in &self.keys {
            let mut entry = entry.lock().expect("throttle lock");
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = Some(now);
            if entry.failures >= *free {
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

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const AWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn limits() -> ThrottleLimits {
        ThrottleLimits {
            free_per_account: 3,
            free_per_account_total: 6,
            free_per_address: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
        }
    }

    fn fail(t: &Throttle, who: &str, from: IpAddr) {
        drop(t.begin(who, from).unwrap());
    }

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
    fn one_guesser_locks_the_account_for_itself_not_for_its_owner_elsewhere() {
        let t = Throttle::new(limits());
        for _ in 0..3 {
            fail(&t, "ada", HOME);
        }
        let wait = t.begin("ada", HOME).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        // The same account under another case is the same account.
        assert!(t.begin("ADA", HOME).is_err());
        // Its owner, from elsewhere, is not locked out.
        t.begin("ada", AWAY).unwrap().succeeded();
        // Another account from the guesser's address is not locked either (2 more failures
        // would reach the address's 5).
        t.begin("grace", HOME).unwrap().succeeded();
    }

    #[test]
    fn guesses_from_many_addresses_slow_the_account_for_everyone() {
        let t = Throttle::new(limits());
        for i in 0..6u8 {
            fail(&t, "ada", IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i)));
        }
        assert!(t.begin("ada", AWAY).is_err(), "6 failures in total");
        t.begin("grace", AWAY).unwrap().succeeded();
    }

    #[test]
    fn an_address_is_throttled_across_accounts() {
        let t = Throttle::new(limits());
        for i in 0..5 {
            fail(&t, &format!("user{i}"), HOME);
        }
        assert!(t.begin("someone-else", HOME).is_err());
        t.begin("someone-else", AWAY).unwrap().succeeded();
    }

    #[test]
    fn parallel_attempts_count_before_they_fail_and_success_clears_the_account() {
        let t = Throttle::new(limits());
        let running: Vec<_> = (0..3).map(|_| t.begin("ada", HOME).unwrap()).collect();
        assert!(
            t.begin("ada", HOME).is_err(),
            "three running use the free attempts"
        );
        for attempt in running {
            attempt.abandoned();
        }
        fail(&t, "ada", HOME);
        fail(&t, "ada", HOME);
        t.begin("ada", HOME).unwrap().succeeded();
        fail(&t, "ada", HOME);
        fail(&t, "ada", HOME);
        t.begin("ada", AWAY).unwrap().succeeded();
    }

    #[test]
    fn old_failures_are_forgotten_once_the_lock_is_over() {
        let t = Throttle::new(ThrottleLimits {
            forget_after: Duration::ZERO,
            base_delay: Duration::ZERO,
            ..limits()
        });
        for _ in 0..10 {
            fail(&t, "ada", HOME);
        }
        t.begin("ada", HOME).unwrap().succeeded();
    }

    #[test]
    fn delays_double_and_stop_at_the_maximum() {
        let limits = limits();
        let entry: Shared = Arc::default();
        for failures in 0..40u32 {
            entry.lock().unwrap().in_flight += 1;
            drop(Attempt {
                keys: [
                    (entry.clone(), 3),
                    (Arc::default(), 1000),
                    (Arc::default(), 1000),
                ],
                limits,
                done: false,
            });
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
