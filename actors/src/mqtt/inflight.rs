//! The outbound in-flight window of one session (pure, no actors).
//!
//! Holds the QoS 1 and QoS 2 messages sent to a client and not yet acknowledged, keyed
//! by packet identifier, in the order they were sent: on reconnect they are resent in
//! that order with their original packet identifiers (MQTT-4.4.0-1). Entries carry
//! where the message lives (queue and offset, or a retained topic), never its body.

use std::collections::{HashMap, VecDeque};

use bincode::{Decode, Encode};

/// One unacknowledged outbound message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct InflightEntry {
    pub packet_id: u16,
    /// Queue the message was pulled from; empty for a retained message sent on subscribe.
    pub queue: String,
    pub offset: u64,
    /// Topic of a retained message delivered on subscribe (read back from the
    /// RetainStore on resend), when `queue` is empty.
    pub retained_topic: Option<String>,
    /// QoS the message was delivered at (1 or 2).
    pub qos: u8,
    /// RETAIN flag as delivered.
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// QoS 2: PUBREC received and PUBREL sent; only PUBCOMP is awaited.
    pub released: bool,
}

/// The window. `capacity` is min(our max_inflight, the client's Receive Maximum).
#[derive(Debug)]
pub struct Inflight {
    entries: HashMap<u16, InflightEntry>,
    order: VecDeque<u16>,
    next_id: u16,
    capacity: usize,
}

impl Inflight {
    pub fn new(capacity: usize) -> Self {
        Inflight {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_id: 1,
            capacity: capacity.max(1),
        }
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Free slots in the window.
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.entries.len())
    }

    /// A packet identifier not in use, or None when the window is full.
    pub fn alloc_id(&mut self) -> Option<u16> {
        if self.free() == 0 || self.entries.len() >= u16::MAX as usize {
            return None;
        }
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.entries.contains_key(&id) {
                return Some(id);
            }
        }
    }

    /// Record a sent message (its id must come from `alloc_id` or a restored session).
    pub fn insert(&mut self, e: InflightEntry) {
        let id = e.packet_id;
        if self.entries.insert(id, e).is_none() {
            self.order.push_back(id);
        }
    }

    pub fn get_mut(&mut self, packet_id: u16) -> Option<&mut InflightEntry> {
        self.entries.get_mut(&packet_id)
    }

    /// Remove an acknowledged message.
    pub fn remove(&mut self, packet_id: u16) -> Option<InflightEntry> {
        let e = self.entries.remove(&packet_id)?;
        // Acks usually come in order: pop stale ids from the front cheaply.
        while let Some(front) = self.order.front() {
            if self.entries.contains_key(front) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|id| entries.contains_key(id));
        }
        Some(e)
    }

    /// Entries in the order they were first sent.
    pub fn in_order(&self) -> Vec<InflightEntry> {
        let mut seen = std::collections::HashSet::new();
        self.order
            .iter()
            .filter(|id| seen.insert(**id))
            .filter_map(|id| self.entries.get(id).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u16) -> InflightEntry {
        InflightEntry {
            packet_id: id,
            queue: "f:a".into(),
            offset: id as u64,
            retained_topic: None,
            qos: 1,
            retain: false,
            sub_ids: vec![],
            released: false,
        }
    }

    #[test]
    fn window_and_order() {
        let mut w = Inflight::new(3);
        let ids: Vec<u16> = (0..3).map(|_| w.alloc_id().unwrap()).collect();
        for id in &ids {
            w.insert(entry(*id));
        }
        assert_eq!(w.alloc_id(), None);
        assert!(w.remove(ids[1]).is_some());
        assert_eq!(w.free(), 1);
        let order: Vec<u16> = w.in_order().iter().map(|e| e.packet_id).collect();
        assert_eq!(order, vec![ids[0], ids[2]]);
        let id = w.alloc_id().unwrap();
        assert!(!ids[..1].contains(&id) && id != ids[2]);
    }

    #[test]
    fn ids_wrap_and_skip_zero_and_used() {
        let mut w = Inflight::new(10);
        w.next_id = u16::MAX;
        let a = w.alloc_id().unwrap();
        w.insert(entry(a));
        let b = w.alloc_id().unwrap();
        assert_eq!((a, b), (u16::MAX, 1));
    }
}
