//! `SubscriptionShard`: one of N actors that together know every live subscription
//! filter and answer "which queues does a message on this topic go to".
//!
//! * **Owns** a [`FilterTrie`] of filters → route targets, the set of owners (client
//!   ids) of each filter queue, and the members of each shared-subscription group.
//! * **Handles** [`AddRoute`] / [`RemoveRoute`] (from `MqttSession` on SUBSCRIBE and
//!   UNSUBSCRIBE, and from `ClientRegistry` when it restores or expires persistent
//!   sessions) and [`Route`] (from publishers: sessions, service producers, wills).
//! * **Sharding.** A topic is routed by the shard of its first level. A filter whose
//!   first level is concrete lives in that level's shard; a filter that starts with a
//!   wildcard lives in every shard, so each shard can answer alone.
//! * **Back-pressure.** Routing is a pure in-memory lookup, so a shard answers at once;
//!   publishers cap their own outstanding requests. Every filter change bumps the
//!   gateway's route epoch so that sessions drop their cached routes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::topic::first_level;
use super::trie::FilterTrie;
use crate::storage::QueueName;

/// What a trie entry routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// The filter queue shared by every non-shared subscriber of this filter.
    Queue(QueueName),
    /// A `$share/{group}/{filter}` group: one member queue per message, round-robin.
    Group(Arc<str>, Arc<str>),
}

/// How a subscription receives messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// A normal subscription: reads the filter queue `f:{filter}`.
    Filter,
    /// A member of shared group `group`: reads its own member queue.
    Shared { group: String },
}

/// The queue a subscription of `owner` on `filter` reads.
pub fn queue_for(owner: &str, filter: &str, kind: &RouteKind) -> QueueName {
    match kind {
        RouteKind::Filter => QueueName::filter(filter),
        RouteKind::Shared { group } => QueueName(format!("s:{group}/{owner}/{filter}").into()),
    }
}

/// The shard index that owns topics whose first level is `level`.
pub fn shard_of(level: &str, shards: usize) -> usize {
    QueueName(level.into()).hash64() as usize % shards.max(1)
}

/// The shards a filter must be added to.
pub fn shards_for_filter(filter: &str, shards: usize) -> Vec<usize> {
    let first = first_level(filter);
    if first == "+" || first == "#" {
        (0..shards.max(1)).collect()
    } else {
        vec![shard_of(first, shards)]
    }
}

/// Start routing `filter` for `owner`. Answers with the queue the subscription reads.
#[derive(Message, Debug, Clone)]
#[rtype(result = "QueueName")]
pub struct AddRoute {
    pub owner: Arc<str>,
    pub filter: String,
    pub kind: RouteKind,
}

/// Stop routing `filter` for `owner`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RemoveRoute {
    pub owner: Arc<str>,
    pub filter: String,
    pub kind: RouteKind,
}

/// The queues a message on each of `topics` goes to: one partition of the first-level
/// topic queue (chosen by hashing `key`: the publisher's client id, or a service
/// producer's key, so that one publisher's messages stay in order) and the queue of
/// every matching filter (one member queue per shared group).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<Routed>")]
pub struct Route {
    pub topics: Vec<String>,
    pub key: Arc<str>,
}

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub queues: Vec<QueueName>,
    /// A shared-subscription group matched, so `queues` holds the member whose turn it
    /// was: ask again for the next message (a publisher may cache only unshared routes,
    /// or one publisher's messages would all go to one member).
    pub shared: bool,
}

/// The partition of a first-level topic queue that messages keyed `key` go to.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    (QueueName(key.into()).hash64() % partitions.max(1) as u64) as u32
}

/// The first-level topic queue partition of a message on `topic` keyed `key`.
pub fn topic_queue(topic: &str, key: &str, partitions: u32) -> QueueName {
    QueueName::topic(first_level(topic), partition_of(key, partitions))
}

#[derive(Default)]
struct Group {
    members: Vec<QueueName>,
    next: usize,
}

pub struct SubscriptionShard {
    index: usize,
    /// Partitions of every first-level topic queue (`service.partitions`).
    partitions: u32,
    trie: FilterTrie<Target>,
    /// Owners of each filter queue; the trie entry goes when the last owner leaves.
    owners: HashMap<QueueName, HashSet<Arc<str>>>,
    /// Members of each (group, filter) shared subscription.
    groups: HashMap<(Arc<str>, String), Group>,
    epoch: Arc<AtomicU64>,
    log: slog::Logger,
}

impl SubscriptionShard {
    pub fn new(index: usize, partitions: u32, epoch: Arc<AtomicU64>, log: slog::Logger) -> Self {
        SubscriptionShard {
            index,
            partitions: partitions.max(1),
            trie: FilterTrie::default(),
            owners: HashMap::new(),
            groups: HashMap::new(),
            epoch,
            log: log.new(slog::o!("actor" => "subscription_shard", "shard" => index)),
        }
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

impl Actor for SubscriptionShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Publishers wait on Route; a deep mailbox lets bursts queue instead of parking.
        ctx.set_mailbox_capacity(1024);
        slog::debug!(self.log, "started"; "shard" => self.index);
    }
}

impl Handler<AddRoute> for SubscriptionShard {
    type Result = MessageResult<AddRoute>;

    fn handle(&mut self, m: AddRoute, _: &mut Context<Self>) -> Self::Result {
        let queue = queue_for(&m.owner, &m.filter, &m.kind);
        match &m.kind {
            RouteKind::Filter => {
                let owners = self.owners.entry(queue.clone()).or_default();
                let first = owners.is_empty();
                owners.insert(m.owner.clone());
                if first {
                    self.trie.insert(&m.filter, Target::Queue(queue.clone()));
                    self.bump();
                }
            }
            RouteKind::Shared { group } => {
                let g: Arc<str> = group.as_str().into();
                let entry = self
                    .groups
                    .entry((g.clone(), m.filter.clone()))
                    .or_default();
                if entry.members.is_empty() {
                    self.trie
                        .insert(&m.filter, Target::Group(g, m.filter.as_str().into()));
                }
                if !entry.members.contains(&queue) {
                    entry.members.push(queue.clone());
                }
                self.bump();
            }
        }
        MessageResult(queue)
    }
}

impl Handler<RemoveRoute> for SubscriptionShard {
    type Result = ();

    fn handle(&mut self, m: RemoveRoute, _: &mut Context<Self>) {
        let queue = queue_for(&m.owner, &m.filter, &m.kind);
        match &m.kind {
            RouteKind::Filter => {
                if let Some(owners) = self.owners.get_mut(&queue) {
                    owners.remove(&m.owner);
                    if owners.is_empty() {
                        self.owners.remove(&queue);
                        self.trie.remove(&m.filter, &Target::Queue(queue));
                        self.bump();
                    }
                }
            }
            RouteKind::Shared { group } => {
                let g: Arc<str> = group.as_str().into();
                let key = (g.clone(), m.filter.clone());
                if let Some(entry) = self.groups.get_mut(&key) {
                    entry.members.retain(|q| *q != queue);
                    if entry.members.is_empty() {
                        self.groups.remove(&key);
                        self.trie
                            .remove(&m.filter, &Target::Group(g, m.filter.as_str().into()));
                    }
                    self.bump();
                }
            }
        }
    }
}

impl Handler<Route> for SubscriptionShard {
    type Result = MessageResult<Route>;

    fn handle(&mut self, m: Route, _: &mut Context<Self>) -> Self::Result {
        let mut out = Vec::with_capacity(m.topics.len());
        for topic in &m.topics {
            let mut queues = vec![topic_queue(topic, &m.key, self.partitions)];
            let mut groups: Vec<(Arc<str>, String)> = Vec::new();
            self.trie.for_each_match(topic, |t| match t {
                Target::Queue(q) => {
                    if !queues.contains(q) {
                        queues.push(q.clone())
                    }
                }
                Target::Group(g, f) => groups.push((g.clone(), f.to_string())),
            });
            for key in &groups {
                if let Some(grp) = self.groups.get_mut(key) {
                    if grp.members.is_empty() {
                        continue;
                    }
                    let q = grp.members[grp.next % grp.members.len()].clone();
                    grp.next = grp.next.wrapping_add(1);
                    if !queues.contains(&q) {
                        queues.push(q);
                    }
                }
            }
            out.push(Routed {
                queues,
                shared: !groups.is_empty(),
            });
        }
        MessageResult(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    #[actix_rt::test]
    async fn routes_filters_and_groups() {
        let epoch = Arc::new(AtomicU64::new(0));
        let s = SubscriptionShard::new(0, 1, epoch.clone(), log()).start();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let q1 = s
            .send(AddRoute {
                owner: a.clone(),
                filter: "home/+/temp".into(),
                kind: RouteKind::Filter,
            })
            .await
            .unwrap();
        let q2 = s
            .send(AddRoute {
                owner: b.clone(),
                filter: "home/+/temp".into(),
                kind: RouteKind::Filter,
            })
            .await
            .unwrap();
        assert_eq!(q1, q2);
        for o in [&a, &b] {
            s.send(AddRoute {
                owner: o.clone(),
                filter: "home/#".into(),
                kind: RouteKind::Shared { group: "g".into() },
            })
            .await
            .unwrap();
        }
        assert!(epoch.load(Ordering::Acquire) > 0);
        let r = s
            .send(Route {
                topics: vec!["home/r1/temp".into(), "home/r1/temp".into(), "other".into()],
                key: "a".into(),
            })
            .await
            .unwrap();
        assert_eq!(r[0].queues.len(), 3); // t:home, f:home/+/temp, one member of g
        assert!(r[0].queues.contains(&QueueName::filter("home/+/temp")));
        assert_ne!(
            r[0].queues[2], r[1].queues[2],
            "round robin across the group"
        );
        assert!(r[0].shared && r[1].shared);
        assert_eq!(
            r[2],
            Routed {
                queues: vec![QueueName::topic("other", 0)],
                shared: false
            }
        );
        s.send(RemoveRoute {
            owner: a.clone(),
            filter: "home/+/temp".into(),
            kind: RouteKind::Filter,
        })
        .await
        .unwrap();
        let r = s
            .send(Route {
                topics: vec!["home/r1/temp".into()],
                key: "a".into(),
            })
            .await
            .unwrap();
        assert!(
            r[0].queues.contains(&QueueName::filter("home/+/temp")),
            "b still subscribed"
        );
        s.send(RemoveRoute {
            owner: b.clone(),
            filter: "home/+/temp".into(),
            kind: RouteKind::Filter,
        })
        .await
        .unwrap();
        let r = s
            .send(Route {
                topics: vec!["home/r1/temp".into()],
                key: "a".into(),
            })
            .await
            .unwrap();
        assert!(!r[0].queues.contains(&QueueName::filter("home/+/temp")));
    }
}
