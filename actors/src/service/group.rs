//! `GroupCoordinator`: which member of a consumer group owns which partition.
//!
//! * **Owns** the live members of every (group, first-level topic) pair and the
//!   partition assignment derived from them (partition `p` goes to the `p % n`th member
//!   by member id), plus a generation counter per group. Nothing here is durable: the
//!   committed offsets are in the `OffsetStore`, and members re-join after a restart.
//! * **Handles** [`JoinGroup`], [`LeaveGroup`], [`GetAssignment`] from `ServerSession`s
//!   (a session leaves all its groups when its connection closes).
//! * **Rebalance.** A join or leave recomputes the assignment and wakes every member
//!   (their `Notify`), so a member blocked in a long-poll re-reads its partitions at
//!   once and a new owner starts from the committed offset.
//! * **Back-pressure.** Pure in-memory bookkeeping: answers at once. Sessions ask once
//!   per pull.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::Notify;

/// The partitions of `partitions` that member number `index` of `members` owns.
pub fn assign(partitions: u32, members: usize, index: usize) -> Vec<u32> {
    if members == 0 {
        return Vec::new();
    }
    (0..partitions)
        .filter(|p| *p as usize % members == index)
        .collect()
}

#[derive(Default)]
struct Group {
    /// member id → wake-up handle; ordered, so the assignment is deterministic.
    members: BTreeMap<u64, Arc<Notify>>,
    generation: u64,
}

/// The current assignment of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub generation: u64,
    pub partitions: Vec<u32>,
}

/// Add `member` to (`group`, `topic`); answers its partitions.
#[derive(Message)]
#[rtype(result = "Assignment")]
pub struct JoinGroup {
    pub group: String,
    pub topic: String,
    pub member: u64,
    pub wake: Arc<Notify>,
}

/// Remove `member` from (`group`, `topic`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveGroup {
    pub group: String,
    pub topic: String,
    pub member: u64,
}

/// The partitions `member` owns now; `None` if it is not a member.
#[derive(Message)]
#[rtype(result = "Option<Assignment>")]
pub struct GetAssignment {
    pub group: String,
    pub topic: String,
    pub member: u64,
}

pub struct GroupCoordinator {
    partitions: u32,
    groups: HashMap<(String, String), Group>,
    log: slog::Logger,
}

impl GroupCoordinator {
    pub fn new(partitions: u32, log: slog::Logger) -> Self {
        GroupCoordinator {
            partitions: partitions.max(1),
            groups: HashMap::new(),
            log: log.new(slog::o!("actor" => "group_coordinator")),
        }
    }

    fn assignment(&self, key: &(String, String), member: u64) -> Option<Assignment> {
        let g = self.groups.get(key)?;
        let index = g.members.keys().position(|m| *m == member)?;
        Some(Assignment {
            generation: g.generation,
            partitions: assign(self.partitions, g.members.len(), index),
        })
    }

    fn rebalanced(&mut self, key: &(String, String)) {
        if let Some(g) = self.groups.get_mut(key) {
            g.generation += 1;
            for w in g.members.values() {
                w.notify_one();
            }
            slog::debug!(self.log, "rebalanced"; "group" => &key.0, "topic" => &key.1,
                "members" => g.members.len(), "generation" => g.generation);
        }
    }
}

impl Actor for GroupCoordinator {
    type Context = Context<Self>;
}

impl Handler<JoinGroup> for GroupCoordinator {
    type Result = MessageResult<JoinGroup>;

    fn handle(&mut self, m: JoinGroup, _: &mut Context<Self>) -> Self::Result {
        let key = (m.group, m.topic);
        let g = self.groups.entry(key.clone()).or_default();
        if g.members.insert(m.member, m.wake).is_none() {
            self.rebalanced(&key);
        }
        MessageResult(self.assignment(&key, m.member).unwrap_or(Assignment {
            generation: 0,
            partitions: Vec::new(),
        }))
    }
}

impl Handler<LeaveGroup> for GroupCoordinator {
    type Result = ();

    fn handle(&mut self, m: LeaveGroup, _: &mut Context<Self>) {
        let key = (m.group, m.topic);
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        if g.members.remove(&m.member).is_some() {
            if g.members.is_empty() {
                self.groups.remove(&key);
            } else {
                self.rebalanced(&key);
            }
        }
    }
}

impl Handler<GetAssignment> for GroupCoordinator {
    type Result = MessageResult<GetAssignment>;

    fn handle(&mut self, m: GetAssignment, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.assignment(&(m.group, m.topic), m.member))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_covers_every_partition_once() {
        for n in 1..6 {
            let mut all: Vec<u32> = (0..n).flat_map(|i| assign(4, n, i)).collect();
            all.sort();
            assert_eq!(all, vec![0, 1, 2, 3]);
        }
        assert!(assign(4, 0, 0).is_empty());
    }

    #[actix_rt::test]
    async fn join_and_leave_rebalance() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let c = GroupCoordinator::new(4, log).start();
        let w = Arc::new(Notify::new());
        let join = |m| JoinGroup {
            group: "g".into(),
            topic: "t".into(),
            member: m,
            wake: w.clone(),
        };
        assert_eq!(c.send(join(1)).await.unwrap().partitions, vec![0, 1, 2, 3]);
        assert_eq!(c.send(join(2)).await.unwrap().partitions, vec![1, 3]);
        let get = |m| GetAssignment {
            group: "g".into(),
            topic: "t".into(),
            member: m,
        };
        assert_eq!(
            c.send(get(1)).await.unwrap().unwrap().partitions,
            vec![0, 2]
        );
        c.send(LeaveGroup {
            group: "g".into(),
            topic: "t".into(),
            member: 1,
        })
        .await
        .unwrap();
        assert_eq!(
            c.send(get(2)).await.unwrap().unwrap().partitions,
            vec![0, 1, 2, 3]
        );
        assert!(c.send(get(1)).await.unwrap().is_none());
    }
}
