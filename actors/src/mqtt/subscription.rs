//! `Subscription`: an in-process consumer of one topic filter, for extension actors.
//!
//! * **Owns** one filter route in the `SubscriptionShard`s (for `owner`), the watch on
//!   its queue, and its read position, committed to the `OffsetStore` under `owner`
//!   (so a restarted extension resumes where it left off; a new owner starts at the
//!   end of the queue).
//! * **Handles** [`Arrived`] (the queue's `Notifier`), [`Close`] and [`QueueOf`] (the
//!   extension).
//! * **Sends** [`Delivered`] to the extension's recipient, one message at a time, then
//!   commits the offset after each pull: at-least-once delivery.
//! * **Back-pressure**: it awaits each `Delivered` before sending the next and pulls
//!   again only when the batch is handed over, so a slow extension leaves its backlog
//!   in the log. Hints may be dropped; it also probes its queue every few seconds.
//!
//! The route outlives the actor unless it is closed with `remove_route`: messages
//! published meanwhile wait in the queue for the next start with the same owner.
//!
//! ```ignore
//! let sub = Subscription::start(gw.clone(), "rules", "sensors/+/temperature",
//!     my_actor.recipient())?;
//! // my_actor: impl Handler<Delivered>
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::shard::{shards_for_filter, AddRoute, RemoveRoute, RouteKind};
use super::topic::{parse_filter, TopicError};
use super::Gateway;
use crate::storage::{Arrived, Message, Offset, Pull, QueueName, StorageError, Unwatch, Watch};

/// One message of the subscribed filter, sent to the extension.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Delivered {
    pub message: Arc<Message>,
    pub queue: QueueName,
    pub offset: Offset,
}

/// Stop consuming; with `remove_route`, also stop routing the filter to the queue.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Close {
    pub remove_route: bool,
}

/// The queue being consumed, once the route is in place (`None` if it could not be
/// added). Answered only after start-up, so awaiting it means "routing has begun".
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Option<QueueName>")]
pub struct QueueOf;

const PULL_BATCH: usize = 256;
const PULL_BYTES: usize = 1 << 20;
const PROBE: Duration = Duration::from_secs(5);

/// See the module documentation.
pub struct Subscription {
    gw: Gateway,
    owner: Arc<str>,
    filter: String,
    kind: RouteKind,
    recipient: Recipient<Delivered>,
    /// Known once the route is added.
    queue: Option<QueueName>,
    next: Offset,
    known_max: Offset,
    pulling: bool,
    watch_id: u64,
}

impl Subscription {
    /// Start consuming `filter` (a topic filter, or `$share/{group}/{filter}`) as
    /// `owner`, on the current arbiter; messages go to `recipient`.
    pub fn start(
        gw: Gateway,
        owner: impl Into<String>,
        filter: &str,
        recipient: Recipient<Delivered>,
    ) -> Result<Addr<Subscription>, TopicError> {
        let parsed = parse_filter(filter, gw.config().max_topic_levels)?;
        let kind = match parsed.share_group {
            Some(g) => RouteKind::Shared {
                group: g.to_string(),
            },
            None => RouteKind::Filter,
        };
        let sub = Subscription {
            owner: owner.into().into(),
            filter: parsed.filter.to_string(),
            kind,
            recipient,
            queue: None,
            next: 0,
            known_max: Offset::MAX,
            pulling: false,
            watch_id: gw.next_id(),
            gw,
        };
        Ok(sub.start())
    }

    fn try_pull(&mut self, ctx: &mut Context<Self>) {
        let Some(queue) = self.queue.clone() else {
            return;
        };
        if self.pulling || self.next >= self.known_max {
            return;
        }
        self.pulling = true;
        let storage = self.gw.storage().clone();
        let recipient = self.recipient.clone();
        let owner = self.owner.to_string();
        let from = self.next;
        let fut = async move {
            let pull = Pull {
                queue: queue.clone(),
                from,
                max: PULL_BATCH,
                max_bytes: PULL_BYTES,
            };
            let pulled = storage.pull(pull).await?;
            let mut next = pulled.next.max(from).max(pulled.min_offset);
            for m in pulled.messages {
                if m.offset < from {
                    continue;
                }
                let d = Delivered {
                    message: m.message,
                    queue: queue.clone(),
                    offset: m.offset,
                };
                if recipient.send(d).await.is_err() {
                    // The extension is gone: keep what it had, stop.
                    next = m.offset;
                    let _ = storage.commit_offset(owner, queue, next).await;
                    return Err(StorageError::Closed);
                }
            }
            if next > from {
                storage.commit_offset(owner, queue, next).await?;
            }
            Ok((next, pulled.max_offset))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.pulling = false;
            match res {
                Ok((next, max)) => {
                    act.next = next;
                    act.known_max = if act.known_max == Offset::MAX {
                        max
                    } else {
                        act.known_max.max(max)
                    };
                    act.try_pull(ctx);
                }
                Err(StorageError::Closed) => ctx.stop(),
                Err(e) => {
                    slog::warn!(act.gw.inner.log, "extension subscription pull failed";
                        "owner" => &*act.owner, "error" => %e);
                }
            }
        }));
    }
}

impl Actor for Subscription {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let shards = self.gw.inner.shards.clone();
        let storage = self.gw.storage().clone();
        let add = AddRoute {
            owner: self.owner.clone(),
            filter: self.filter.clone(),
            kind: self.kind.clone(),
        };
        let owner = self.owner.to_string();
        let fut = async move {
            let mut queue = None;
            for i in shards_for_filter(&add.filter, shards.len()) {
                if let Ok(q) = shards[i].send(add.clone()).await {
                    queue = Some(q);
                }
            }
            let queue = queue?;
            // Resume from the committed offset; a new owner reads from now on.
            let next = match storage.load_offset(owner, queue.clone()).await {
                Ok(Some(o)) => o,
                _ => storage
                    .bounds(queue.clone())
                    .await
                    .map(|b| b.max_offset)
                    .unwrap_or(0),
            };
            Some((queue, next))
        };
        // Waited: no hint is handled before the queue and position are known.
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            let Some((queue, next)) = res else {
                return ctx.stop();
            };
            act.gw.storage().watch(Watch {
                queue: queue.clone(),
                id: act.watch_id,
                watcher: ctx.address().recipient(),
            });
            act.queue = Some(queue);
            act.next = next;
            act.try_pull(ctx);
        }));
        ctx.run_interval(PROBE, |act, ctx| {
            if !act.pulling {
                act.known_max = Offset::MAX;
            }
            act.try_pull(ctx);
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(queue) = self.queue.take() {
            self.gw.storage().unwatch(Unwatch {
                queue,
                id: self.watch_id,
            });
        }
    }
}

impl Handler<Arrived> for Subscription {
    type Result = ();
    fn handle(&mut self, m: Arrived, ctx: &mut Context<Self>) {
        if self.known_max == Offset::MAX || self.known_max < m.max_offset {
            self.known_max = m.max_offset;
        }
        self.try_pull(ctx);
    }
}

impl Handler<Close> for Subscription {
    type Result = ();
    fn handle(&mut self, m: Close, ctx: &mut Context<Self>) {
        if m.remove_route {
            let n = self.gw.inner.shards.len();
            for i in shards_for_filter(&self.filter, n) {
                self.gw.inner.shards[i].do_send(RemoveRoute {
                    owner: self.owner.clone(),
                    filter: self.filter.clone(),
                    kind: self.kind.clone(),
                });
            }
        }
        ctx.stop();
    }
}

impl Handler<QueueOf> for Subscription {
    type Result = Option<QueueName>;
    fn handle(&mut self, _: QueueOf, _: &mut Context<Self>) -> Option<QueueName> {
        self.queue.clone()
    }
}
