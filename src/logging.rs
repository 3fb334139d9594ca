//! The root logger: slog to stderr through slog-async, so that logging never blocks an
//! actor on a terminal write.
//!
//! Records of crates that use the `log` facade (actix, tokio's friends) are routed into
//! the same drain through `slog-stdlog` and `slog-scope`, so one stream holds all lines.

use slog::{o, Drain};

use crate::config::{LogSection, LOG_LEVELS};

/// Keeps the logging machinery alive. Hold it until the end of `main`: dropping it
/// detaches the `log` facade and flushes the lines still queued for stderr.
pub struct LogGuard {
    /// Routes `log` records to our drain while it lives (dropped first, so that no new
    /// record arrives while the async drain is flushed).
    _scope: slog_scope::GlobalLoggerGuard,
    /// Dropping it waits for the async drain's thread to write out what it holds.
    _flush: slog_async::AsyncGuard,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `log.level` is not a known level (normally caught by config validation).
    #[error("invalid value for `log.level`: {0:?} is not one of {levels}", levels = LOG_LEVELS.join(", "))]
    Level(String),
    /// Another logger already owns the `log` facade (init called twice).
    #[error("the `log` facade already has a logger: {0}")]
    AlreadySet(#[from] log::SetLoggerError),
}

/// The slog level of a `log.level` value.
pub fn parse_level(level: &str) -> Option<slog::Level> {
    match level {
        "trace" => Some(slog::Level::Trace),
        "debug" => Some(slog::Level::Debug),
        "info" => Some(slog::Level::Info),
        "warning" | "warn" => Some(slog::Level::Warning),
        "error" => Some(slog::Level::Error),
        "critical" => Some(slog::Level::Critical),
        _ => None,
    }
}

/// Build the process's root logger at `cfg.level`, tagged with `node`, and route the
/// `log` facade into it. Call once per process (the `log` facade has one logger).
pub fn init(cfg: &LogSection, node: &str) -> Result<(slog::Logger, LogGuard), LogError> {
    let level = parse_level(&cfg.level).ok_or_else(|| LogError::Level(cfg.level.clone()))?;
    let decorator = slog_term::TermDecorator::new().stderr().build();
    let term = slog_term::FullFormat::new(decorator).build().fuse();
    let filtered = slog::LevelFilter::new(term, level).fuse();
    let (drain, flush) = slog_async::Async::new(filtered)
        .chan_size(8192)
        .thread_name("actimq-log".into())
        .build_with_guard();
    let root = slog::Logger::root(drain.fuse(), o!("node" => node.to_string()));

    let scope = slog_scope::set_global_logger(root.new(o!("from" => "log")));
    slog_stdlog::init_with_level(log_level(level))?;
    Ok((
        root,
        LogGuard {
            _scope: scope,
            _flush: flush,
        },
    ))
}

/// The `log` crate's level for a slog level (`log` has no "critical").
fn log_level(level: slog::Level) -> log::Level {
    match level {
        slog::Level::Critical | slog::Level::Error => log::Level::Error,
        slog::Level::Warning => log::Level::Warn,
        slog::Level::Info => log::Level::Info,
        slog::Level::Debug => log::Level::Debug,
        slog::Level::Trace => log::Level::Trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_level_parses() {
        for l in LOG_LEVELS {
            assert!(parse_level(l).is_some(), "{l}");
        }
        assert!(parse_level("loud").is_none());
    }
}
