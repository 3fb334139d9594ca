//! A topic-filter trie: the index a subscription shard keeps (pure, no actors).
//!
//! Each node is one filter level; `+` and `#` are ordinary children with special
//! meaning during lookup. A value `V` is stored at the node where its filter ends.
//! Lookup of a topic name walks every branch that can match, so its cost grows with
//! the number of matching branches, not with the number of filters.

use std::collections::HashMap;

#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.values.is_empty()
    }
}

/// Filters → values. A filter may carry several values.
#[derive(Debug)]
pub struct FilterTrie<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for FilterTrie<V> {
    fn default() -> Self {
        FilterTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: PartialEq> FilterTrie<V> {
    /// Add `value` under `filter` unless it is already there. Returns true if added.
    pub fn insert(&mut self, filter: &str, value: V) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        self.len += 1;
        true
    }

    /// Remove `value` from `filter`. Returns true if it was there.
    pub fn remove(&mut self, filter: &str, value: &V) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<V>, levels: &[&str], value: &V) -> bool {
        match levels.split_first() {
            None => {
                let before = node.values.len();
                node.values.retain(|v| v != value);
                before != node.values.len()
            }
            Some((first, rest)) => {
                let Some(child) = node.children.get_mut(*first) else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, value);
                if child.is_empty() {
                    node.children.remove(*first);
                }
                removed
            }
        }
    }

    /// The values stored exactly under `filter`.
    pub fn get(&self, filter: &str) -> &[V] {
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return &[],
            }
        }
        &node.values
    }

    /// Call `f` with every value whose filter matches topic `name`
    /// (`$` topics are not matched by a leading wildcard, MQTT-4.7.2-1).
    pub fn for_each_match<'a>(&'a self, name: &str, mut f: impl FnMut(&'a V)) {
        let levels: Vec<&str> = name.split('/').collect();
        let dollar = name.starts_with('$');
        Self::walk(&self.root, &levels, dollar, true, &mut f);
    }

    fn walk<'a>(
        node: &'a Node<V>,
        levels: &[&str],
        dollar: bool,
        top: bool,
        f: &mut impl FnMut(&'a V),
    ) {
        let wild_ok = !(top && dollar);
        if wild_ok {
            // `#` matches the parent level too ("a/#" matches "a").
            if let Some(hash) = node.children.get("#") {
                hash.values.iter().for_each(&mut *f);
            }
        }
        match levels.split_first() {
            None => node.values.iter().for_each(f),
            Some((first, rest)) => {
                if let Some(child) = node.children.get(*first) {
                    Self::walk(child, rest, dollar, false, f);
                }
                if wild_ok {
                    if let Some(plus) = node.children.get("+") {
                        Self::walk(plus, rest, dollar, false, f);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::matches;

    fn collect(t: &FilterTrie<String>, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_match(name, |x| v.push(x.clone()));
        v.sort();
        v
    }

    #[test]
    fn agrees_with_matches() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/b/#", "/", "+/+", "$SYS/#", "a//c",
            "+/", "a/b/c/#",
        ];
        let names = [
            "a", "a/b", "a/b/c", "a/x/c", "/", "/b", "$SYS/x", "$SYS", "a//c", "b/b/z", "a/b/c/d",
        ];
        let mut t = FilterTrie::default();
        for f in filters {
            assert!(t.insert(f, f.to_string()));
        }
        assert!(!t.insert("a", "a".to_string()));
        for n in names {
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| matches(f, n))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(collect(&t, n), want, "name {n}");
        }
    }

    #[test]
    fn remove_prunes() {
        let mut t = FilterTrie::default();
        t.insert("a/b/c", 1);
        t.insert("a/b/c", 2);
        assert!(t.remove("a/b/c", &1));
        assert!(!t.remove("a/b/c", &1));
        assert_eq!(t.get("a/b/c"), &[2]);
        assert!(t.remove("a/b/c", &2));
        assert!(t.is_empty());
        assert!(t.root.children.is_empty());
    }
}
