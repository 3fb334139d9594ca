//! `Notifier`: one shard of the arrival-hint fan-out.
//!
//! * Owns, for the queues that hash to it, the list of watchers (`Recipient<Arrived>`).
//! * Handles [`Watch`] / [`Unwatch`] (from sessions and service consumers, through
//!   `Storage::watch`/`unwatch`, rare control messages) and [`QueueArrived`] (from the
//!   `QueueIndex` shards, sent with `try_send` and dropped when this mailbox is full).
//! * Sends [`Arrived`] to every watcher with `Recipient::try_send`: a full watcher mailbox
//!   drops the hint (a watcher also polls on a slow tick), a closed one removes the watcher.
//!   Nothing here ever waits, so storage never blocks on a slow session.
//! * Coalescing: the index shards already send one `QueueArrived` per queue per dispatch
//!   batch; here a hint older than one already delivered is not re-sent.

use std::collections::HashMap;

use actix::prelude::*;
use slog::{o, Logger};

use super::{Arrived, Offset, QueueName, Unwatch, Watch};

/// Large: hints come in bursts from the index shards, and a dropped hint only costs latency.
pub const NOTIFIER_MAILBOX: usize = 8192;

/// From a `QueueIndex` shard: `queue` now has entries up to `max_offset`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct QueueArrived {
    pub queue: QueueName,
    pub max_offset: Offset,
}

/// Number of watched queues and watchers of this shard.
#[derive(Message, Debug)]
#[rtype(result = "NotifierStats")]
pub struct NotifierStatsQuery;

#[derive(Debug, Clone, Copy, Default)]
pub struct NotifierStats {
    pub queues: usize,
    pub watchers: usize,
    pub delivered: u64,
    pub dropped: u64,
}

struct Watched {
    watchers: Vec<(u64, Recipient<Arrived>)>,
    last_sent: Offset,
}

pub struct Notifier {
    queues: HashMap<QueueName, Watched>,
    delivered: u64,
    dropped: u64,
    log: Logger,
}

impl Notifier {
    pub fn new(shard: usize, log: &Logger) -> Self {
        Notifier {
            queues: HashMap::new(),
            delivered: 0,
            dropped: 0,
            log: log.new(o!("actor" => "notifier", "shard" => shard)),
        }
    }
}

impl Actor for Notifier {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(NOTIFIER_MAILBOX);
    }
}

impl Handler<Watch> for Notifier {
    type Result = ();
    fn handle(&mut self, w: Watch, _: &mut Self::Context) {
        let entry = self.queues.entry(w.queue).or_insert_with(|| Watched {
            watchers: Vec::new(),
            last_sent: 0,
        });
        entry.watchers.retain(|(id, _)| *id != w.id);
        entry.watchers.push((w.id, w.watcher));
    }
}

impl Handler<Unwatch> for Notifier {
    type Result = ();
    fn handle(&mut self, u: Unwatch, _: &mut Self::Context) {
        if let Some(entry) = self.queues.get_mut(&u.queue) {
            entry.watchers.retain(|(id, _)| *id != u.id);
            if entry.watchers.is_empty() {
                self.queues.remove(&u.queue);
            }
        }
    }
}

impl Handler<QueueArrived> for Notifier {
    type Result = ();
    fn handle(&mut self, a: QueueArrived, _: &mut Self::Context) {
        let Some(entry) = self.queues.get_mut(&a.queue) else {
            return;
        };
        if a.max_offset <= entry.last_sent {
            return; // coalesced: a newer hint was already delivered
        }
        entry.last_sent = a.max_offset;
        let mut dead = false;
        for (_, w) in &entry.watchers {
            match w.try_send(Arrived {
                queue: a.queue.clone(),
                max_offset: a.max_offset,
            }) {
                Ok(()) => self.delivered += 1,
                Err(SendError::Full(_)) => self.dropped += 1,
                Err(SendError::Closed(_)) => dead = true,
            }
        }
        if dead {
            entry.watchers.retain(|(_, w)| w.connected());
            if entry.watchers.is_empty() {
                slog::debug!(self.log, "last watcher gone"; "queue" => %a.queue);
                self.queues.remove(&a.queue);
            }
        }
    }
}

impl Handler<NotifierStatsQuery> for Notifier {
    type Result = MessageResult<NotifierStatsQuery>;
    fn handle(&mut self, _: NotifierStatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(NotifierStats {
            queues: self.queues.len(),
            watchers: self.queues.values().map(|w| w.watchers.len()).sum(),
            delivered: self.delivered,
            dropped: self.dropped,
        })
    }
}
