//! Topic names and topic filters: validation and matching (pure, no actors).
//!
//! The rules are those of MQTT 3.1.1 §4.7 and MQTT 5.0 §4.7 and §4.8.2; each check names
//! the normative statement it enforces.

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Zero-length name or filter (MQTT-4.7.3-1).
    Empty,
    /// A wildcard in a topic name (MQTT-3.3.2-2).
    WildcardInName,
    /// `#` not last or not alone in its level (MQTT-4.7.1-2), or `+` not alone (MQTT-4.7.1-3).
    BadWildcard,
    /// U+0000 in a name or filter (MQTT-4.7.3-2).
    Nul,
    /// Longer than 65535 bytes (MQTT-4.7.3-3) or more levels than the server allows.
    TooLong,
    /// `$share/{name}/{filter}` with an empty or invalid share name or filter (MQTT 5 §4.8.2).
    BadShare,
}

/// Check a topic name as used in PUBLISH (and will topics).
pub fn validate_name(name: &str, max_levels: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    let mut levels = 0usize;
    for level in name.split('/') {
        levels += 1;
        if level.contains(['+', '#']) {
            return Err(TopicError::WildcardInName);
        }
    }
    if name.contains('\0') {
        return Err(TopicError::Nul);
    }
    if levels > max_levels {
        return Err(TopicError::TooLong);
    }
    Ok(())
}

/// Check a (non-shared) topic filter.
pub fn validate_filter(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.len() > max_levels {
        return Err(TopicError::TooLong);
    }
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(TopicError::BadWildcard);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// A subscription filter as written by the client, split into its share group (if any)
/// and the filter that topics are matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Parse and validate a SUBSCRIBE/UNSUBSCRIBE filter, including `$share/{group}/{filter}`.
pub fn parse_filter(raw: &str, max_levels: usize) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter, max_levels)?;
        return Ok(ParsedFilter {
            share_group: Some(group),
            filter,
        });
    }
    if raw == "$share" {
        return Err(TopicError::BadShare);
    }
    validate_filter(raw, max_levels)?;
    Ok(ParsedFilter {
        share_group: None,
        filter: raw,
    })
}

/// Does `filter` match topic `name`? Both must already be valid.
///
/// Filters that start with a wildcard do not match names that start with `$`
/// (MQTT-4.7.2-1).
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The first level of a topic name or filter (`home` for `home/room1/temp`).
pub fn first_level(topic: &str) -> &str {
    topic.split('/').next().unwrap_or(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("", 8), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+/b", 8), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#", 8), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/b\0", 8), Err(TopicError::Nul));
        assert_eq!(validate_name("a/b/c", 2), Err(TopicError::TooLong));
        assert!(validate_name("/", 8).is_ok());
        assert!(validate_name("$SYS/x", 8).is_ok());
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "+/#"] {
            assert!(validate_filter(ok, 8).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a+", "a/b+/c", "##", ""] {
            assert!(validate_filter(bad, 8).is_err(), "{bad}");
        }
    }

    #[test]
    fn shares() {
        let p = parse_filter("$share/g1/a/+", 8).unwrap();
        assert_eq!(p.share_group, Some("g1"));
        assert_eq!(p.filter, "a/+");
        assert!(parse_filter("$share//a", 8).is_err());
        assert!(parse_filter("$share/g", 8).is_err());
        assert!(parse_filter("$share/g/", 8).is_err());
        assert!(parse_filter("$share/g+/a", 8).is_err());
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a")); // MQTT-4.7.1-2: "sport/#" matches "sport"
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("+/+", "/x"));
        assert!(matches("+", "x"));
        assert!(!matches("+", "/x"));
        assert!(matches("#", "a/b"));
        // MQTT-4.7.2-1
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }
}
