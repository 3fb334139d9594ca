//! Rate limits that slow a peer down instead of disconnecting it: a thin layer over
//! `governor` (GCRA) that answers "how long to wait" so the caller can sleep on tokio's
//! timer (governor's own async waits would bring a second timer thread).
//!
//! Used by a connection's IO task (`mqtt.max_inbound_messages_per_sec` and
//! `mqtt.max_inbound_bytes_per_sec`: it stops reading the socket, so TCP flow control
//! pushes back on the client) and by each listener's accept loop
//! (`listener.*.max_connection_rate`: it stops accepting, so the kernel's backlog holds
//! the excess).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// One rate: at most `per_sec` units a second, with a burst of one second's worth.
pub struct Rate {
    limiter: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Rate {
    /// `None` for 0, which means unlimited.
    pub fn per_second(per_sec: u32) -> Option<Rate> {
        let n = NonZeroU32::new(per_sec)?;
        Some(Rate {
            limiter: RateLimiter::direct(Quota::per_second(n)),
            burst: n,
        })
    }

    /// Take `units` (at least 1; more than one second's worth counts as a full second's
    /// worth, so a single large packet waits at most about a second): `None` if they
    /// are available now, else how long until they are. Nothing is taken when it
    /// answers a wait: call again after waiting.
    pub fn take(&self, units: u32) -> Option<Duration> {
        let n = NonZeroU32::new(units.max(1)).map_or(self.burst, |n| n.min(self.burst));
        match self.limiter.check_n(n) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(DefaultClock::default().now())),
            // Cannot happen: n is capped at the burst size.
            Err(_) => None,
        }
    }
}

/// A client's inbound limits: PUBLISH packets a second and bytes a second.
pub struct Inbound {
    messages: Option<Rate>,
    bytes: Option<Rate>,
}

impl Inbound {
    /// `None` when neither limit is set (the common case costs nothing per packet).
    pub fn new(messages_per_sec: u32, bytes_per_sec: u32) -> Option<Box<Inbound>> {
        let messages = Rate::per_second(messages_per_sec);
        let bytes = Rate::per_second(bytes_per_sec);
        if messages.is_none() && bytes.is_none() {
            return None;
        }
        Some(Box::new(Inbound { messages, bytes }))
    }

    /// Take what a packet of `size` bytes (a PUBLISH if `publish`) needs: `None` once
    /// it may be handed on, else how long to wait before asking again. `msg_taken`
    /// remembers, across the calls for one packet, that its message unit is taken.
    pub fn wait(&self, publish: bool, size: usize, msg_taken: &mut bool) -> Option<Duration> {
        if publish && !*msg_taken {
            if let Some(w) = self.messages.as_ref().and_then(|m| m.take(1)) {
                return Some(w);
            }
            *msg_taken = true;
        }
        let units = u32::try_from(size).unwrap_or(u32::MAX);
        self.bytes.as_ref().and_then(|b| b.take(units))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_unlimited() {
        assert!(Rate::per_second(0).is_none());
        assert!(Inbound::new(0, 0).is_none());
        assert!(Inbound::new(1, 0).is_some());
    }

    #[test]
    fn a_burst_of_one_second_then_a_wait() {
        let r = Rate::per_second(10).unwrap();
        for _ in 0..10 {
            assert_eq!(r.take(1), None);
        }
        let wait = r.take(1).expect("the 11th unit within a second waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn a_publish_waits_for_messages_then_bytes_and_takes_its_message_once() {
        let t = Inbound::new(1, 100).unwrap();
        let mut taken = false;
        assert_eq!(t.wait(true, 100, &mut taken), None);
        assert!(taken);
        // The next publish waits for its message unit, taking nothing.
        let mut taken = false;
        assert!(t.wait(true, 10, &mut taken).is_some());
        assert!(!taken);
        // A non-publish needs only bytes, and they are spent too.
        assert!(t.wait(false, 10, &mut false).is_some());
    }

    #[test]
    fn more_than_a_burst_counts_as_a_burst() {
        let r = Rate::per_second(100).unwrap();
        assert_eq!(r.take(1_000_000), None);
        let wait = r.take(100).expect("the bucket is empty");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
    }
}
