//! Built-in authentication and ACL: the first users of the hook mechanism
//! (`actimq_actors::mqtt::hooks`), and its reference example.
//!
//! They live in the node crate, not in `actimq-actors`, on purpose: they read files
//! named by the node's configuration and are registered through the same
//! [`crate::NodeBuilder`] hooks as any third-party extension, so the actors crate keeps
//! knowing nothing about them, and nothing here uses an API an extension could not.
//!
//! * [`password`]: the password file (argon2id PHC strings), the per-IP failure limit,
//!   and [`password::PasswordAuth`], an [`Authenticate`](actimq_actors::mqtt::hooks::Authenticate)
//!   hook that verifies on a `SyncArbiter` (never on an IO thread).
//! * [`acl`]: the Mosquitto-style ACL parser and matcher, and [`acl::AclAuth`], an
//!   [`Authorize`](actimq_actors::mqtt::hooks::Authorize) hook.
//!
//! The node starts them when `[auth]` asks for them, registers them before any
//! `NodeBuilder` hook (a decision they make is final; what they leave open they answer
//! `Next`), and forwards [`Reload`] to both on [`crate::NodeHandle::reload_auth`]
//! (SIGHUP in the binary).

pub mod acl;
pub mod password;

use actix::Message;

/// Re-read the file an actor was started with. A file that cannot be read or parsed
/// keeps the old contents; the error says why. `Ok` carries the number of entries.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<usize, String>")]
pub struct Reload;
