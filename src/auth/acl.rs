//! The ACL file (Mosquitto style) and [`AclAuth`], the built-in authorization hook.
//!
//! File format, one directive per line (`#` comments and blank lines ignored):
//!
//! ```text
//! topic read public/#          # before any section: clients without a user name
//! user alice                   # the topic lines below apply to user alice
//! topic readwrite alice/#
//! topic deny alice/secret/#
//! client sensor-1              # ... and these to client id sensor-1
//! topic write sensors/1/#
//! pattern readwrite devices/%u/#   # every client, anywhere in the file
//! pattern write clients/%c/status
//! ```
//!
//! `topic [read|write|readwrite|deny] FILTER` (access defaults to `readwrite`);
//! `pattern` takes the same form, applies to every client and substitutes `%u` (user
//! name; a pattern with `%u` never applies to a client without one) and `%c` (client
//! id); a substituted value containing `+`, `#` or `/` makes the pattern not apply.
//!
//! **Evaluation**: rules are tried in file order; the first `deny` rule, or rule whose
//! access covers the action (`read` for SUBSCRIBE, `write` for PUBLISH, including wills
//! and retained publishes), that applies to the client and *matches* the action
//! decides. A matching rule for the other direction does not decide, so that
//! `topic write home/+/cmd` followed by `topic read home/#` allows both, but it marks
//! the topic as restricted: if no later rule grants the action, it is refused (`topic
//! read public/#` makes `public/#` read-only, whatever the default). When no rule
//! matches at all, `auth.acl_default` decides.
//! A PUBLISH topic matches a rule filter per MQTT matching
//! (`actimq_actors::mqtt::topic::matches`). For a SUBSCRIBE filter: a rule that would
//! grant it matches only when its filter *covers* the requested one (equal or a
//! wildcard superset: `a/#` covers `a/+/b`), so a grant never leaks topics it does not
//! name; a rule that would refuse it matches when the two filters *overlap* (some topic
//! matches both), so `topic deny secret/#` refuses a later `#` subscription. Retained
//! messages are delivered to a subscription that was allowed, without a second check.
//!
//! [`AclAuth`] (an actor, one per node):
//! * **Owns** the parsed [`Acl`] and the default.
//! * **Handles** [`Authorize`] (sent by `MqttSession` through the hooks for each
//!   PUBLISH, will and SUBSCRIBE filter) and [`Reload`] (`NodeHandle::reload_auth`).
//! * **Answers** `Allow`/`Deny` for a matching rule and for `acl_default = "deny"`;
//!   `Next` when nothing matched under `"allow"`, so later hooks may still decide.
//! * **Back-pressure**: a check is a scan of the rules, microseconds, on the actor's
//!   own arbiter; sessions await it within the hook deadline.

use std::path::{Path, PathBuf};

use actimq_actors::mqtt::hooks::{Action, Authorize, Decision};
use actimq_actors::mqtt::topic::matches;
use actix::prelude::*;
use slog::{error, info};

use super::Reload;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, subscribe: bool) -> bool {
        match self {
            Access::ReadWrite => true,
            Access::Read => subscribe,
            Access::Write => !subscribe,
            Access::Deny => false,
        }
    }
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Topic lines before any section: clients without a user name.
    Anonymous,
    User(String),
    Client(String),
    /// A `pattern` line: everyone (after substitution).
    Pattern,
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub scope: Scope,
    pub access: Access,
    pub filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub rules: Vec<Rule>,
}

/// Whether every topic matching `inner` also matches `outer` (both valid filters).
pub fn covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') != outer.starts_with('$')
        && (outer.starts_with('+') || outer.starts_with('#'))
    {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(ol), Some(il)) if il != "+" && ol == il => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Acl {
    /// Parse an ACL file's text. Errors name the line.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let mut rules = Vec::new();
        let mut scope = Scope::Anonymous;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = match line.split_once(char::is_whitespace) {
                Some((w, r)) => (w, r.trim()),
                None => (line, ""),
            };
            match word {
                "user" | "client" => {
                    if rest.is_empty() {
                        return Err(format!("line {n}: `{word}` needs a name"));
                    }
                    scope = if word == "user" {
                        Scope::User(rest.to_string())
                    } else {
                        Scope::Client(rest.to_string())
                    };
                }
                "topic" | "pattern" => {
                    let (access, filter) = match rest.split_once(char::is_whitespace) {
                        Some((a, f)) => match a {
                            "read" => (Access::Read, f.trim()),
                            "write" => (Access::Write, f.trim()),
                            "readwrite" => (Access::ReadWrite, f.trim()),
                            "deny" => (Access::Deny, f.trim()),
                            _ => return Err(format!("line {n}: unknown access {a:?}")),
                        },
                        None => (Access::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        return Err(format!("line {n}: `{word}` needs a topic filter"));
                    }
                    let check = filter.replace("%u", "u").replace("%c", "c");
                    actimq_actors::mqtt::topic::validate_filter(&check, usize::MAX)
                        .map_err(|e| format!("line {n}: bad filter {filter:?}: {e:?}"))?;
                    rules.push(Rule {
                        scope: if word == "pattern" {
                            Scope::Pattern
                        } else {
                            scope.clone()
                        },
                        access,
                        filter: filter.to_string(),
                    });
                }
                _ => return Err(format!("line {n}: unknown directive {word:?}")),
            }
        }
        Ok(Acl { rules })
    }

    /// Read and parse an ACL file.
    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Acl::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The first matching rule's verdict: `Some(true)` allowed, `Some(false)` denied,
    /// `None` when no rule matches.
    pub fn check(&self, client_id: &str, username: Option<&str>, action: &Action) -> Option<bool> {
        let (topic, subscribe) = match action {
            Action::Publish { topic, .. } => (topic.as_str(), false),
            Action::Subscribe { filter, .. } => (filter.as_str(), true),
        };
        let safe = |v: &str| !v.contains(['+', '#', '/']);
        let mut restricted = false;
        for rule in &self.rules {
            let filter = match &rule.scope {
                Scope::Anonymous if username.is_none() => rule.filter.clone(),
                Scope::User(u) if Some(u.as_str()) == username => rule.filter.clone(),
                Scope::Client(c) if c == client_id => rule.filter.clone(),
                Scope::Pattern => {
                    let mut f = rule.filter.clone();
                    if f.contains("%u") {
                        match username {
                            Some(u) if safe(u) => f = f.replace("%u", u),
                            _ => continue,
                        }
                    }
                    if f.contains("%c") {
                        if !safe(client_id) {
                            continue;
                        }
                        f = f.replace("%c", client_id);
                    }
                    f
                }
                _ => continue,
            };
            let grants = rule.access.grants(subscribe);
            let hit = if !subscribe {
                matches(&filter, topic)
            } else if grants {
                covers(&filter, topic)
            } else {
                overlaps(&filter, topic)
            };
            if !hit {
                continue;
            }
            if grants || rule.access == Access::Deny {
                return Some(grants);
            }
            // A rule for the other direction (`read` asked about a PUBLISH, `write`
            // about a SUBSCRIBE) names the topic with restricted access: a later rule
            // may still grant this direction, else it is refused.
            restricted = true;
        }
        restricted.then_some(false)
    }
}

/// The built-in authorization hook; see the module documentation.
pub struct AclAuth {
    path: Option<PathBuf>,
    default_allow: bool,
    acl: Acl,
    log: slog::Logger,
}

impl AclAuth {
    /// Load the ACL file (if any) and start the actor. Must run inside an actix `System`.
    pub fn start(
        path: Option<PathBuf>,
        default_allow: bool,
        log: slog::Logger,
    ) -> Result<Addr<AclAuth>, String> {
        let acl = match &path {
            Some(p) => Acl::load(p)?,
            None => Acl::default(),
        };
        info!(log, "ACL"; "rules" => acl.rules.len(), "default_allow" => default_allow);
        Ok(AclAuth {
            path,
            default_allow,
            acl,
            log,
        }
        .start())
    }
}

impl Actor for AclAuth {
    type Context = Context<Self>;
}

impl Handler<Authorize> for AclAuth {
    type Result = Decision;
    fn handle(&mut self, m: Authorize, _: &mut Context<Self>) -> Decision {
        match self
            .acl
            .check(&m.client_id, m.username.as_deref(), &m.action)
        {
            Some(true) => Decision::Allow,
            Some(false) => Decision::Deny,
            None if self.default_allow => Decision::Next,
            None => Decision::Deny,
        }
    }
}

impl Handler<Reload> for AclAuth {
    type Result = Result<usize, String>;
    fn handle(&mut self, _: Reload, _: &mut Context<Self>) -> Self::Result {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        match Acl::load(path) {
            Ok(acl) => {
                self.acl = acl;
                info!(self.log, "ACL file reloaded"; "rules" => self.acl.rules.len());
                Ok(self.acl.rules.len())
            }
            Err(e) => {
                error!(self.log, "ACL file not reloaded; keeping the old one"; "error" => &e);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(t: &str) -> Action {
        Action::Publish {
            topic: t.into(),
            qos: 0,
            retain: false,
        }
    }
    fn subscribe(f: &str) -> Action {
        Action::Subscribe {
            filter: f.into(),
            qos: 0,
        }
    }

    const FILE: &str = "\
# comment
topic read public/#
user alice
topic deny alice/secret/#
topic readwrite alice/#
client sensor-1
topic write sensors/1/#
pattern readwrite devices/%u/#
pattern write clients/%c/status
";

    #[test]
    fn parses_sections_access_and_patterns() {
        let e = Acl::parse("topic").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let acl = Acl::parse(FILE).unwrap();
        assert_eq!(acl.rules.len(), 6);
        assert_eq!(acl.rules[0].scope, Scope::Anonymous);
        assert_eq!(acl.rules[1].scope, Scope::User("alice".into()));
        assert_eq!(acl.rules[1].access, Access::Deny);
        assert_eq!(acl.rules[3].scope, Scope::Client("sensor-1".into()));
        assert_eq!(acl.rules[4].scope, Scope::Pattern);
        let acl = Acl::parse("user bob\ntopic a/b\n").unwrap();
        assert_eq!(acl.rules[0].access, Access::ReadWrite);
        assert!(Acl::parse("topic sometimes a").is_err());
        assert!(Acl::parse("topic read a/#/b").is_err());
        assert!(Acl::parse("frobnicate x").is_err());
        assert!(Acl::parse("user").is_err());
    }

    #[test]
    fn a_rule_for_the_other_direction_does_not_decide_but_restricts() {
        let acl = Acl::parse("topic write home/+/cmd\ntopic read home/#\n").unwrap();
        assert_eq!(acl.check("c", None, &subscribe("home/#")), Some(true));
        assert_eq!(acl.check("c", None, &publish("home/x/cmd")), Some(true));
        assert_eq!(acl.check("c", None, &publish("home/x/temp")), Some(false));
        let acl = Acl::parse("topic read home/#\ntopic write home/+/cmd\n").unwrap();
        assert_eq!(acl.check("c", None, &subscribe("home/#")), Some(true));
        assert_eq!(acl.check("c", None, &publish("home/x/cmd")), Some(true));
        // Read-only: no later grant, so writing is refused even under a default allow.
        let acl = Acl::parse("topic read public/#\n").unwrap();
        assert_eq!(acl.check("c", None, &publish("public/x")), Some(false));
        assert_eq!(acl.check("c", None, &publish("elsewhere")), None);
    }

    #[test]
    fn first_matching_rule_decides() {
        let acl = Acl::parse(FILE).unwrap();
        let a = Some("alice");
        assert_eq!(acl.check("c", a, &publish("alice/x")), Some(true));
        assert_eq!(acl.check("c", a, &subscribe("alice/x/+")), Some(true));
        // alice/+ matches alice/secret, which the deny rule's alice/secret/# covers.
        assert_eq!(acl.check("c", a, &subscribe("alice/+")), Some(false));
        assert_eq!(acl.check("c", a, &publish("alice/secret/x")), Some(false));
        // A deny overlapping a requested wildcard refuses it.
        assert_eq!(acl.check("c", a, &subscribe("alice/#")), Some(false));
        assert_eq!(acl.check("c", a, &subscribe("alice/+/x")), Some(false));
        // Anonymous-section rules do not apply to alice; nothing else matches.
        assert_eq!(acl.check("c", a, &subscribe("public/x")), None);
        assert_eq!(acl.check("c", None, &subscribe("public/x")), Some(true));
        // read does not grant write.
        assert_eq!(acl.check("c", None, &publish("public/x")), Some(false));
        // client section.
        assert_eq!(
            acl.check("sensor-1", None, &publish("sensors/1/t")),
            Some(true)
        );
        assert_eq!(
            acl.check("sensor-1", None, &subscribe("sensors/1/t")),
            Some(false)
        );
        assert_eq!(acl.check("sensor-2", None, &publish("sensors/1/t")), None);
    }

    #[test]
    fn patterns_substitute_user_and_client() {
        let acl = Acl::parse(FILE).unwrap();
        assert_eq!(
            acl.check("c", Some("bob"), &publish("devices/bob/t")),
            Some(true)
        );
        assert_eq!(acl.check("c", Some("bob"), &publish("devices/eve/t")), None);
        assert_eq!(acl.check("c", None, &publish("devices/bob/t")), None);
        assert_eq!(
            acl.check("dev9", None, &publish("clients/dev9/status")),
            Some(true)
        );
        assert_eq!(
            acl.check("dev9", None, &subscribe("clients/dev9/status")),
            Some(false)
        );
        // Wildcards in a substituted value never widen a pattern.
        assert_eq!(acl.check("c", Some("#"), &publish("devices/#/t")), None);
        assert_eq!(acl.check("+", None, &publish("clients/x/status")), None);
    }

    #[test]
    fn a_pattern_without_substitutions_applies_to_everyone() {
        let acl = Acl::parse("pattern read $client/%c/#\npattern deny $client/#\n").unwrap();
        let own = subscribe("$client/dev1/#");
        assert_eq!(acl.check("dev1", None, &own), Some(true));
        assert_eq!(acl.check("dev2", Some("u"), &own), Some(false));
        assert_eq!(
            acl.check("dev2", None, &subscribe("$client/+/x")),
            Some(false)
        );
        assert_eq!(acl.check("dev2", None, &subscribe("other")), None);
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(covers("#", "x/y"));
        assert!(!covers("#", "$SYS/x"));
        assert!(overlaps("a/#", "#"));
        assert!(overlaps("a/+/c", "a/b/+"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/b", "a/b/c"));
        assert!(overlaps("a/b", "a/b/#"));
        assert!(!overlaps("$SYS/#", "#"));
    }
}
