//! `OffsetStore`: committed consumer offsets, (owner, queue) -> offset.
//!
//! * Owns nothing on disk itself: it keeps its pairs in its own [`KvStore`] (its own
//!   directory `{dir}/offsets`, so offsets survive log retention and do not share a
//!   journal with retained messages). Keys are `{owner}\0{queue}` (MQTT strings cannot
//!   hold U+0000), values the offset as u64 little endian.
//! * Handles [`CommitOffset`], [`LoadOffset`], [`DropOwner`] (from sessions and service
//!   consumers) and [`OffsetShutdown`] (from `Storage::shutdown`).
//! * Back-pressure: bounded mailbox ([`OFFSETS_MAILBOX`]); requests are forwarded with
//!   `send`, so a slow store parks the callers of the forwarded futures.
//! * Durability: `CommitOffset` answers when the kv store says the change is durable
//!   (fsync grouped with other commits in `sync` mode).

use actix::prelude::*;

use super::kv::{KvDeletePrefix, KvGet, KvPut, KvShutdown, KvStore};
use super::{CommitOffset, DropOwner, LoadOffset, Offset, StorageError};

pub const OFFSETS_MAILBOX: usize = 4096;

pub struct OffsetStore {
    kv: Addr<KvStore>,
}

impl OffsetStore {
    pub fn new(kv: Addr<KvStore>) -> Self {
        OffsetStore { kv }
    }
}

fn key(owner: &str, queue: &str) -> String {
    let mut k = String::with_capacity(owner.len() + queue.len() + 1);
    k.push_str(owner);
    k.push('\0');
    k.push_str(queue);
    k
}

impl Actor for OffsetStore {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(OFFSETS_MAILBOX);
    }
}

impl Handler<CommitOffset> for OffsetStore {
    type Result = ResponseFuture<Result<(), StorageError>>;
    fn handle(&mut self, m: CommitOffset, _: &mut Self::Context) -> Self::Result {
        let req = self.kv.send(KvPut {
            key: key(&m.owner, m.queue.as_str()),
            value: Some(m.offset.to_le_bytes().to_vec()),
        });
        Box::pin(async move { req.await.map_err(|_| StorageError::Closed)? })
    }
}

impl Handler<LoadOffset> for OffsetStore {
    type Result = ResponseFuture<Result<Option<Offset>, StorageError>>;
    fn handle(&mut self, m: LoadOffset, _: &mut Self::Context) -> Self::Result {
        let req = self.kv.send(KvGet {
            key: key(&m.owner, m.queue.as_str()),
        });
        Box::pin(async move {
            let v = req.await.map_err(|_| StorageError::Closed)??;
            Ok(v.and_then(|b| {
                <[u8; 8]>::try_from(b.as_slice())
                    .ok()
                    .map(u64::from_le_bytes)
            }))
        })
    }
}

impl Handler<DropOwner> for OffsetStore {
    type Result = ResponseFuture<Result<(), StorageError>>;
    fn handle(&mut self, m: DropOwner, _: &mut Self::Context) -> Self::Result {
        let mut prefix = m.owner;
        prefix.push('\0');
        let req = self.kv.send(KvDeletePrefix { prefix });
        Box::pin(async move { req.await.map_err(|_| StorageError::Closed)?.map(|_| ()) })
    }
}

/// Flush the underlying store and stop.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), StorageError>")]
pub struct OffsetShutdown;

impl Handler<OffsetShutdown> for OffsetStore {
    type Result = ResponseActFuture<Self, Result<(), StorageError>>;
    fn handle(&mut self, _: OffsetShutdown, _: &mut Self::Context) -> Self::Result {
        let req = self.kv.send(KvShutdown);
        Box::pin(
            async move { req.await.unwrap_or(Ok(())) }
                .into_actor(self)
                .map(|r, _, ctx| {
                    ctx.stop();
                    r
                }),
        )
    }
}
