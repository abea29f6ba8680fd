//! Who may change a running instance, and whether its engine still moves.
//!
//! - [`ControlToken`]: `POST /checkpoint` and `POST /resume` need
//!   `Authorization: Bearer <token>`; the operator generates the token, keeps it
//!   in a Secret it owns and gives it to the pods through `secretKeyRef`. Without
//!   a token configured the endpoints refuse everything: a stage that anyone on
//!   the network could stop is never the default.
//! - [`Watchdog`]: the engine loop beats once per turn (a turn polls for at most
//!   50 ms); `/healthz` fails once the engine has been running without a beat for
//!   longer than its limit, which is what a hung expression or a blocked client
//!   call looks like from outside.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::clock::Clock;

/// The shared secret of the control endpoints. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ControlToken(String);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(<redacted>)")
    }
}

impl ControlToken {
    /// A token, unless it is empty (an empty Secret value is no credential).
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into().trim().to_owned();
        (!token.is_empty()).then_some(Self(token))
    }

    /// Whether an `Authorization` header value carries this token, compared in
    /// constant time (the length aside).
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(presented) = authorization.and_then(|value| value.strip_prefix(b"Bearer ")) else {
            return false;
        };
        presented.ct_eq(self.0.as_bytes()).into()
    }
}

/// Why a control request is refused, if it is: the status and the body to send.
pub fn refusal(
    token: Option<&ControlToken>,
    authorization: Option<&[u8]>,
) -> Option<(u16, &'static str)> {
    match token {
        None => Some((
            403,
            "control endpoints are disabled: this instance has no control token \
             (--control-token or KEYSTONE_CONTROL_TOKEN)\n",
        )),
        Some(_) if authorization.is_none() => Some((
            401,
            "control endpoints need the operator's credential: Authorization: Bearer <token>\n",
        )),
        Some(token) if !token.admits(authorization) => {
            Some((403, "the credential is not this pipeline's control token\n"))
        }
        Some(_) => None,
    }
}

/// The default limit: far above any healthy turn (a commit of a large
/// transaction, a sink retry backoff), well below what an operator notices.
pub const DEFAULT_WATCHDOG_TIMEOUT: Duration = Duration::from_secs(60);

/// Not armed: the engine has not entered its loop (or has left it).
const DISARMED: i64 = i64::MIN;

/// The engine's progress heartbeat.
pub struct Watchdog {
    clock: Arc<dyn Clock>,
    limit: Duration,
    last_beat_ms: AtomicI64,
}

impl Watchdog {
    pub fn new(clock: Arc<dyn Clock>, limit: Duration) -> Self {
        Self {
            clock,
            limit,
            last_beat_ms: AtomicI64::new(DISARMED),
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The engine made progress (a turn of its loop). Also arms the watchdog.
    pub fn beat(&self) {
        self.last_beat_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// The engine leaves its loop on purpose (shutdown): no beats are expected.
    pub fn disarm(&self) {
        self.last_beat_ms.store(DISARMED, Ordering::Relaxed);
    }

    /// How long since the last beat; None while not armed.
    pub fn since_beat(&self) -> Option<Duration> {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        if last == DISARMED {
            return None;
        }
        let elapsed = self.clock.now_ms().saturating_sub(last).max(0);
        Some(Duration::from_millis(u64::try_from(elapsed).unwrap_or(0)))
    }

    /// How long the engine has been stuck, once that is longer than the limit.
    pub fn stalled(&self) -> Option<Duration> {
        self.since_beat().filter(|since| *since > self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn the_token_is_compared_whole_and_only_as_a_bearer_credential() {
        let token = ControlToken::new("s3cret").expect("a token");
        assert!(token.admits(Some(b"Bearer s3cret")));
        assert!(!token.admits(Some(b"Bearer s3cre")));
        assert!(!token.admits(Some(b"Bearer s3cret2")));
        assert!(!token.admits(Some(b"Basic s3cret")));
        assert!(!token.admits(Some(b"s3cret")));
        assert!(!token.admits(None));
        assert!(ControlToken::new("  \n").is_none());
        assert_eq!(format!("{token:?}"), "ControlToken(<redacted>)");
    }

    #[test]
    fn refusals_say_what_is_missing() {
        let token = ControlToken::new("t").expect("a token");
        assert_eq!(refusal(None, Some(b"Bearer t")).map(|r| r.0), Some(403));
        assert_eq!(refusal(Some(&token), None).map(|r| r.0), Some(401));
        assert_eq!(
            refusal(Some(&token), Some(b"Bearer x")).map(|r| r.0),
            Some(403)
        );
        assert_eq!(refusal(Some(&token), Some(b"Bearer t")), None);
    }

    #[test]
    fn the_watchdog_fires_only_after_the_limit_without_a_beat_and_only_when_armed() {
        let clock = ManualClock::new(1_000);
        let watchdog = Watchdog::new(Arc::new(clock.clone()), Duration::from_secs(60));
        // Before the loop runs (joining, restoring): nothing is expected yet.
        clock.advance(600_000);
        assert_eq!(watchdog.since_beat(), None);
        assert_eq!(watchdog.stalled(), None);
        watchdog.beat();
        clock.advance(60_000);
        assert_eq!(watchdog.stalled(), None, "exactly the limit is not a stall");
        clock.advance(1);
        assert_eq!(watchdog.stalled(), Some(Duration::from_millis(60_001)));
        watchdog.beat();
        assert_eq!(watchdog.stalled(), None, "a beat clears it");
        clock.advance(120_000);
        watchdog.disarm();
        assert_eq!(watchdog.stalled(), None, "a disarmed watchdog never fires");
    }
}
