//! Log-in throttling. Failed log-ins are counted per account (the e-mail address given) and per
//! client address, each by a GCRA rate limiter (`governor`): a burst of failures is allowed,
//! then one more per period. The failure that exceeds either limit starts a lockout of that
//! account or address until the limiter has room again; during a lockout log-ins are refused
//! before the password is checked, the right password included. Successful log-ins count for
//! nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How many failed log-ins are allowed at once, and how often one more is allowed after that.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub burst: u32,
    pub period: Duration,
}

impl Limit {
    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.burst.max(1)).expect("at least 1");
        Quota::with_period(self.period.max(Duration::from_millis(1)))
            .expect("a period above zero")
            .allow_burst(burst)
    }
}

/// What a lockout applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// An e-mail address, as given (compared without case).
    Account(String),
    /// A client address.
    Address(IpAddr),
}

/// A lockout that a failed log-in started.
#[derive(Debug)]
pub struct Lockout {
    pub scope: Scope,
    pub retry_after: Duration,
}

pub struct LoginThrottle {
    clock: DefaultClock,
    accounts: DefaultKeyedRateLimiter<String>,
    addresses: DefaultKeyedRateLimiter<IpAddr>,
    /// Lockouts in force, until when.
    locked: Mutex<HashMap<Scope, Instant>>,
}

/// The account key of an e-mail address: without case, and bounded in length.
fn account(email: &str) -> String {
    email.trim().to_lowercase().chars().take(254).collect()
}

impl LoginThrottle {
    pub fn new(per_account: Limit, per_address: Limit) -> Self {
        let clock = DefaultClock::default();
        Self {
            accounts: RateLimiter::dashmap_with_clock(per_account.quota(), clock.clone()),
            addresses: RateLimiter::dashmap_with_clock(per_address.quota(), clock.clone()),
            clock,
            locked: Mutex::new(HashMap::new()),
        }
    }

    /// How long until a log-in as `email` from `address` may be tried, if the account or the
    /// address is locked out now.
    pub fn locked(&self, email: &str, address: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let locked = self.locked.lock().unwrap();
        [
            Some(Scope::Account(account(email))),
            address.map(Scope::Address),
        ]
        .into_iter()
        .flatten()
        .filter_map(|scope| locked.get(&scope))
        .filter(|until| **until > now)
        .map(|until| *until - now)
        .max()
    }

    /// Counts a failed log-in as `email` from `address`; the lockouts it starts.
    pub fn failed(&self, email: &str, address: Option<IpAddr>) -> Vec<Lockout> {
        let account = account(email);
        let mut refused = Vec::new();
        if let Err(not_until) = self.accounts.check_key(&account) {
            refused.push((
                Scope::Account(account),
                not_until.wait_time_from(self.clock.now()),
            ));
        }
        if let Some(ip) = address
            && let Err(not_until) = self.addresses.check_key(&ip)
        {
            refused.push((
                Scope::Address(ip),
                not_until.wait_time_from(self.clock.now()),
            ));
        }
        let now = Instant::now();
        let mut locked = self.locked.lock().unwrap();
        refused
            .into_iter()
            .map(|(scope, wait)| {
                // At least a second: Retry-After counts whole seconds.
                let retry_after = wait.max(Duration::from_secs(1));
                locked.insert(scope.clone(), now + retry_after);
                Lockout { scope, retry_after }
            })
            .collect()
    }

    /// Forgets lockouts that have ended and counters that are back to a full burst.
    pub fn prune(&self) {
        let now = Instant::now();
        self.locked.lock().unwrap().retain(|_, until| *until > now);
        self.accounts.retain_recent();
        self.addresses.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_then_a_lockout_per_account_and_per_address() {
        let minute = Duration::from_secs(60);
        let t = LoginThrottle::new(
            Limit {
                burst: 3,
                period: minute,
            },
            Limit {
                burst: 5,
                period: minute,
            },
        );
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert!(t.failed("Eve@example.org", Some(ip)).is_empty());
            assert_eq!(t.locked("eve@example.org", Some(ip)), None);
        }
        let lockouts = t.failed("eve@example.org ", Some(ip));
        assert_eq!(lockouts.len(), 1, "{lockouts:?}");
        assert_eq!(lockouts[0].scope, Scope::Account("eve@example.org".into()));
        assert!(lockouts[0].retry_after > Duration::from_secs(50));
        assert!(t.locked("EVE@example.org", None).is_some());
        // Another account from the same address: the address has one failure left.
        assert_eq!(t.locked("bob@example.org", Some(ip)), None);
        assert!(t.failed("bob@example.org", Some(ip)).is_empty());
        let lockouts = t.failed("carol@example.org", Some(ip));
        assert_eq!(lockouts.len(), 1, "{lockouts:?}");
        assert_eq!(lockouts[0].scope, Scope::Address(ip));
        assert!(t.locked("dave@example.org", Some(ip)).is_some());
        assert_eq!(t.locked("dave@example.org", "192.0.2.8".parse().ok()), None);
        t.prune();
        assert!(
            t.locked("dave@example.org", Some(ip)).is_some(),
            "still in force"
        );
    }
}
