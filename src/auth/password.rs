//! The password file and [`PasswordAuth`], the built-in authentication hook.
//!
//! File format: one `user:PHC` line per user, where PHC is an argon2 hash string
//! (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`) as written by `actimq passwd`; blank
//! lines and lines starting with `#` are ignored. User names may not contain `:`.
//!
//! [`PasswordAuth`] (an actor, one per node):
//! * **Owns** the parsed users and, shared with the verifiers, the per-IP
//!   [`FailureLimiter`].
//! * **Handles** [`Authenticate`] (sent by `MqttSession` on CONNECT, through the hooks)
//!   and [`Reload`] (sent by `NodeHandle::reload_auth`, i.e. SIGHUP).
//! * **Answers**: a verified certificate CN (`cert_username`) is allowed without a
//!   password; no user name is `Next` when `allow_anonymous` (else 0x87 / v3 5); a
//!   blocked IP is refused with 0x9F (v3 3) without checking anything; a right
//!   password is `Allow`; anything else is 0x86 (v3 5) and counts as a failure. An
//!   unknown user is verified against a dummy hash, so that timing does not reveal
//!   which user names exist.
//! * **Back-pressure**: argon2 runs on `verify_threads` [`Verifier`] threads of a
//!   `SyncArbiter`, never on an arbiter; the session waits for at most the hook
//!   deadline (`hooks.timeout_ms`), and a request still queued past that deadline is
//!   dropped unchecked, so a burst of logins costs no CPU for clients already refused. The verifier checks
//!   the failure limit again just before hashing, so a burst queued from one address
//!   stops costing CPU once it is blocked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actimq_actors::mqtt::hooks::{AuthDecision, Authenticate};
use actix::prelude::*;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use bytes::Bytes;
use slog::{error, info, warn};

use super::Reload;

/// Parsed password file: user name to PHC string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users(HashMap<String, String>);

impl Users {
    /// Parse a password file's text. Errors name the line.
    pub fn parse(text: &str) -> Result<Users, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some((user, phc)) = line.split_once(':') else {
                return Err(format!("line {n}: expected user:$argon2id$..."));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            let parsed = PasswordHash::new(phc).map_err(|e| format!("line {n} ({user}): {e}"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(format!("line {n} ({user}): not an argon2 hash"));
            }
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(format!(
                    "line {n} ({user}): incomplete hash (no salt or hash)"
                ));
            }
            if users.insert(user.to_string(), phc.to_string()).is_some() {
                return Err(format!("line {n}: user {user} appears twice"));
            }
        }
        Ok(Users(users))
    }

    /// Read and parse a password file.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Users::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// How many users.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The PHC string of `user`.
    pub fn get(&self, user: &str) -> Option<&str> {
        self.0.get(user).map(String::as_str)
    }
}

/// An argon2id PHC string for `password`, with a random salt and the crate's default
/// (OWASP-recommended) parameters.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches `phc` (false for a malformed PHC string).
pub fn verify_password(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(password, &h).is_ok(),
        Err(_) => false,
    }
}

/// `text` (a password file) with `user`'s line set to `phc`: replaced in place when the
/// user exists, appended otherwise. Other lines (comments too) are kept as they are.
pub fn set_user(text: &str, user: &str, phc: &str) -> Result<String, String> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
        return Err(format!(
            "{user:?} is not a valid user name (non-empty, no ':' or spaces)"
        ));
    }
    let mut out = String::with_capacity(text.len() + phc.len() + user.len() + 2);
    let mut found = false;
    for line in text.lines() {
        match line.trim().split_once(':') {
            Some((u, _)) if u == user && !line.trim().starts_with('#') => {
                if !found {
                    out.push_str(&format!("{user}:{phc}\n"));
                }
                found = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !found {
        out.push_str(&format!("{user}:{phc}\n"));
    }
    Ok(out)
}

/// Counts failed logins per IP address and blocks an address that fails too often.
#[derive(Debug)]
pub struct FailureLimiter {
    /// Failures within `window` that block; 0 disables the limiter.
    max: u32,
    window: Duration,
    block: Duration,
    by_ip: HashMap<IpAddr, Failures>,
}

#[derive(Debug)]
struct Failures {
    /// Start of the current counting window.
    since: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// Above this many tracked addresses, stale entries are pruned on the next failure.
const PRUNE_ABOVE: usize = 10_000;

impl FailureLimiter {
    pub fn new(max: u32, window: Duration, block: Duration) -> FailureLimiter {
        FailureLimiter {
            max,
            window,
            block,
            by_ip: HashMap::new(),
        }
    }

    /// Whether `ip` is blocked at `now`.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.by_ip
            .get(&ip)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Record a failed login; true when it blocks the address.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.max == 0 {
            return false;
        }
        if self.by_ip.len() > PRUNE_ABOVE {
            let (window, block) = (self.window, self.block);
            self.by_ip.retain(|_, f| {
                now.duration_since(f.since) < window.max(block)
                    || f.blocked_until.is_some_and(|u| now < u)
            });
        }
        let f = self.by_ip.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            blocked_until: None,
        });
        if now.duration_since(f.since) >= self.window || f.blocked_until.is_some_and(|u| now >= u) {
            *f = Failures {
                since: now,
                count: 0,
                blocked_until: None,
            };
        }
        f.count += 1;
        if f.count >= self.max && f.blocked_until.is_none() {
            f.blocked_until = Some(now + self.block);
            return true;
        }
        false
    }

    /// Record a successful login: forget the address's failures.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.by_ip.remove(&ip);
    }
}

type SharedLimiter = Arc<Mutex<FailureLimiter>>;

fn lock(l: &SharedLimiter) -> MutexGuard<'_, FailureLimiter> {
    // The limiter holds counters only: a panic elsewhere cannot leave it inconsistent.
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// The settings of [`PasswordAuth`] (`[auth]`).
#[derive(Debug, Clone)]
pub struct PasswordAuthConfig {
    pub allow_anonymous: bool,
    /// `None`: no password file (only anonymous and certificate clients).
    pub password_file: Option<PathBuf>,
    pub max_failures: u32,
    pub failure_window: Duration,
    pub block: Duration,
    pub verify_threads: usize,
    /// How long a verification may wait for a verifier thread before it is dropped
    /// unchecked (the hook deadline: the session has given up by then).
    pub verify_deadline: Duration,
}

/// Verify one password (sent by [`PasswordAuth`] to a [`Verifier`]).
#[derive(Message)]
#[rtype(result = "Verified")]
pub struct Verify {
    /// Not verified after this instant: whoever asked has stopped waiting.
    pub deadline: Instant,
    pub ip: IpAddr,
    pub phc: String,
    pub password: Bytes,
}

/// The answer to [`Verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub enum Verified {
    Ok,
    Wrong,
    /// The address was blocked while the request waited: not checked.
    Blocked,
    /// The request waited past its deadline: not checked.
    Expired,
}

/// A password-verification thread (a `SyncArbiter` actor): hashes, and keeps the
/// failure limiter up to date.
pub struct Verifier {
    limiter: SharedLimiter,
}

impl Actor for Verifier {
    type Context = SyncContext<Self>;
}

impl Handler<Verify> for Verifier {
    type Result = Verified;
    fn handle(&mut self, m: Verify, _: &mut SyncContext<Self>) -> Verified {
        if Instant::now() > m.deadline {
            return Verified::Expired;
        }
        if lock(&self.limiter).blocked(m.ip, Instant::now()) {
            return Verified::Blocked;
        }
        if verify_password(&m.phc, &m.password) {
            lock(&self.limiter).succeeded(m.ip);
            Verified::Ok
        } else {
            lock(&self.limiter).failed(m.ip, Instant::now());
            Verified::Wrong
        }
    }
}

/// The built-in authentication hook; see the module documentation.
pub struct PasswordAuth {
    cfg: PasswordAuthConfig,
    users: Users,
    /// A hash of a random password, verified for unknown users so that a refusal takes
    /// as long whether or not the user exists.
    dummy: String,
    limiter: SharedLimiter,
    verifier: Addr<Verifier>,
    log: slog::Logger,
}

impl PasswordAuth {
    /// Load the password file (if any) and start the actor and its verifier threads.
    /// Must run inside an actix `System`.
    pub fn start(cfg: PasswordAuthConfig, log: slog::Logger) -> Result<Addr<PasswordAuth>, String> {
        let users = match &cfg.password_file {
            Some(p) => Users::load(p)?,
            None => Users::default(),
        };
        let limiter = Arc::new(Mutex::new(FailureLimiter::new(
            cfg.max_failures,
            cfg.failure_window,
            cfg.block,
        )));
        let mut secret = [0u8; 16];
        argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut secret);
        let dummy = hash_password(&secret)?;
        let shared = limiter.clone();
        let verifier = SyncArbiter::start(cfg.verify_threads.max(1), move || Verifier {
            limiter: shared.clone(),
        });
        info!(log, "password authentication"; "users" => users.len(),
            "allow_anonymous" => cfg.allow_anonymous);
        Ok(PasswordAuth {
            cfg,
            users,
            dummy,
            limiter,
            verifier,
            log,
        }
        .start())
    }
}

impl Actor for PasswordAuth {
    type Context = Context<Self>;
}

impl Handler<Authenticate> for PasswordAuth {
    type Result = ResponseFuture<AuthDecision>;

    fn handle(&mut self, m: Authenticate, _: &mut Context<Self>) -> Self::Result {
        let ready = |d| -> Self::Result { Box::pin(async move { d }) };
        // 3.1.1 has 4 (bad user name or password), but, like Mosquitto, we answer 5
        // (not authorized), which tells a guesser nothing about the user name.
        let bad = if m.protocol == 5 { 0x86 } else { 0x87 };
        if m.cert_username.is_some() {
            // The listener verified the certificate against its CA: the CN is the user.
            return ready(AuthDecision::Allow);
        }
        let Some(user) = m.username else {
            return ready(if self.cfg.allow_anonymous {
                AuthDecision::Next
            } else {
                AuthDecision::Deny(0x87)
            });
        };
        let ip = m.peer.ip();
        if lock(&self.limiter).blocked(ip, Instant::now()) {
            return ready(AuthDecision::Deny(0x9F));
        }
        let Some(password) = m.password else {
            // A user name without a password: a failure, refused at once.
            if lock(&self.limiter).failed(ip, Instant::now()) {
                warn!(self.log, "login failures: blocking address"; "ip" => %ip);
            }
            return ready(AuthDecision::Deny(bad));
        };
        // An unknown user (or no password file) costs the same verification as a
        // known one, against a hash no password matches.
        let phc = self.users.get(&user).unwrap_or(&self.dummy);
        let ask = self.verifier.send(Verify {
            deadline: Instant::now() + self.cfg.verify_deadline,
            ip,
            phc: phc.to_string(),
            password,
        });
        let log = self.log.clone();
        Box::pin(async move {
            match ask.await {
                Ok(Verified::Ok) => AuthDecision::Allow,
                Ok(Verified::Wrong) => {
                    info!(log, "wrong password"; "user" => &user, "ip" => %ip);
                    AuthDecision::Deny(bad)
                }
                Ok(Verified::Blocked) => AuthDecision::Deny(0x9F),
                Ok(Verified::Expired) => {
                    warn!(log, "password verification queue too long"; "user" => &user);
                    AuthDecision::Deny(0x88)
                }
                Err(e) => {
                    error!(log, "password verifier unavailable"; "error" => %e);
                    AuthDecision::Deny(0x88)
                }
            }
        })
    }
}

impl Handler<Reload> for PasswordAuth {
    type Result = Result<usize, String>;

    fn handle(&mut self, _: Reload, _: &mut Context<Self>) -> Self::Result {
        let Some(path) = &self.cfg.password_file else {
            return Ok(0);
        };
        match Users::load(path) {
            Ok(users) => {
                self.users = users;
                info!(self.log, "password file reloaded"; "users" => self.users.len());
                Ok(self.users.len())
            }
            Err(e) => {
                error!(self.log, "password file not reloaded; keeping the old one"; "error" => &e);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_parse_round_trip() {
        let phc = hash_password(b"s3cret").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password(&phc, b"s3cret"));
        assert!(!verify_password(&phc, b"S3cret"));
        assert!(!verify_password("garbage", b"s3cret"));

        let text = set_user("# users\n", "alice", &phc).unwrap();
        let text = set_user(&text, "bob", &phc).unwrap();
        let users = Users::parse(&text).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users.get("alice"), Some(phc.as_str()));
        // Changing a user replaces its line and keeps the others and the comment.
        let other = hash_password(b"new").unwrap();
        let text = set_user(&text, "alice", &other).unwrap();
        assert!(text.starts_with("# users\nalice:"));
        let users = Users::parse(&text).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users.get("alice"), Some(other.as_str()));
        assert!(set_user("", "a:b", &phc).is_err());
        assert!(set_user("", "", &phc).is_err());
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = Users::parse("\n# c\nalice\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = Users::parse("alice:$argon2id$nonsense").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = Users::parse(":$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA").unwrap_err();
        assert!(e.contains("empty user"), "{e}");
        let phc = hash_password(b"x").unwrap();
        let e = Users::parse(&format!("a:{phc}\na:{phc}\n")).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(Users::parse("").unwrap().is_empty());
    }

    #[test]
    fn verifier_skips_expired_and_blocked_requests() {
        actix_rt::System::new().block_on(async {
            let limiter = Arc::new(Mutex::new(FailureLimiter::new(
                1,
                Duration::from_secs(60),
                Duration::from_secs(60),
            )));
            let shared = limiter.clone();
            let v = SyncArbiter::start(1, move || Verifier {
                limiter: shared.clone(),
            });
            let phc = hash_password(b"pw").unwrap();
            let ask = |deadline: Instant, password: &'static [u8]| Verify {
                deadline,
                ip: "10.0.0.9".parse().unwrap(),
                phc: phc.clone(),
                password: Bytes::from_static(password),
            };
            let later = Instant::now() + Duration::from_secs(60);
            let past = Instant::now() - Duration::from_millis(1);
            assert_eq!(v.send(ask(past, b"pw")).await.unwrap(), Verified::Expired);
            assert_eq!(v.send(ask(later, b"pw")).await.unwrap(), Verified::Ok);
            assert_eq!(v.send(ask(later, b"no")).await.unwrap(), Verified::Wrong);
            // max_failures = 1: blocked now, even with the right password.
            assert_eq!(v.send(ask(later, b"pw")).await.unwrap(), Verified::Blocked);
        });
    }

    #[test]
    fn limiter_blocks_after_max_failures_for_the_block_window() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        assert!(!l.failed(ip, t0));
        assert!(!l.failed(ip, t0 + Duration::from_secs(1)));
        assert!(!l.blocked(ip, t0 + Duration::from_secs(2)));
        assert!(l.failed(ip, t0 + Duration::from_secs(2)));
        assert!(l.blocked(ip, t0 + Duration::from_secs(3)));
        assert!(!l.blocked(other, t0 + Duration::from_secs(3)));
        assert!(l.blocked(ip, t0 + Duration::from_secs(301)));
        assert!(!l.blocked(ip, t0 + Duration::from_secs(303)));
        // Failures spread wider than the window never block.
        let mut l = FailureLimiter::new(2, Duration::from_secs(60), Duration::from_secs(300));
        assert!(!l.failed(ip, t0));
        assert!(!l.failed(ip, t0 + Duration::from_secs(61)));
        assert!(l.failed(ip, t0 + Duration::from_secs(62)));
        // A success forgets the failures.
        let mut l = FailureLimiter::new(2, Duration::from_secs(60), Duration::from_secs(300));
        l.failed(ip, t0);
        l.succeeded(ip);
        assert!(!l.failed(ip, t0));
        // 0 disables.
        let mut l = FailureLimiter::new(0, Duration::from_secs(60), Duration::from_secs(300));
        for _ in 0..100 {
            assert!(!l.failed(ip, t0));
        }
        assert!(!l.blocked(ip, t0));
    }
}
