//! The `actimq` binary: parse the command line, load the config, run a [`Node`] until
//! SIGINT or SIGTERM, then stop it gracefully.
//!
//! The command line is parsed by hand: it has two subcommands and one option, and a
//! parser crate would cost more build time than these lines.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use actimq::config::{Config, DEFAULT_TOML};
use actimq::{logging, Node};
use anyhow::Context as _;
use slog::{info, warn};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "\
Usage:
  actimq [run] [--config FILE]   run the node (the default command)
  actimq print-config            print the built-in default configuration
  actimq --help | -h             print this help
  actimq --version | -V          print the version

The configuration is the built-in default, then FILE (only the keys it changes),
then environment variables ACTIMQ__SECTION__KEY, e.g.
  ACTIMQ__LISTENER__TCP__BIND=127.0.0.1:1883 ACTIMQ__STORAGE__FLUSH=sync actimq
SIGINT or SIGTERM stops the node gracefully.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// Run the node.
    Run {
        /// The `--config FILE` layer, if given.
        config: Option<PathBuf>,
    },
    PrintConfig,
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut subcommand: Option<String> = None;
    let mut config = None;
    while let Some(arg) = args.next() {
        let Some(s) = arg.to_str() else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        match s {
            "-h" | "--help" | "help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-c" | "--config" => match args.next() {
                Some(file) => config = Some(PathBuf::from(file)),
                None => return Err(format!("{s} needs a FILE")),
            },
            _ if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]));
            }
            "run" | "print-config" if subcommand.is_none() => subcommand = Some(s.to_string()),
            _ => return Err(format!("unexpected argument {s:?}")),
        }
    }
    match subcommand.as_deref() {
        None | Some("run") => Ok(Command::Run { config }),
        Some(_) if config.is_some() => Err("print-config takes no --config".into()),
        Some(_) => Ok(Command::PrintConfig),
    }
}

fn main() -> ExitCode {
    match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Help) => {
            println!(
                "actimq {}: {}\n\n{USAGE}",
                env!("CARGO_PKG_VERSION"),
                env!("CARGO_PKG_DESCRIPTION")
            );
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("actimq {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::PrintConfig) => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Ok(Command::Run { config }) => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("actimq: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("actimq: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref()).context("invalid configuration")?;
    let (log, _log_guard) =
        logging::init(&config.log, &config.node.name).context("cannot set up logging")?;
    info!(log, "starting"; "version" => env!("CARGO_PKG_VERSION"),
        "config" => config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in".into()));

    actix_rt::System::new().block_on(async move {
        // Registered before the node starts, so that a signal during start-up waits
        // for the start and then stops the node cleanly instead of killing it.
        let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

        let node = Node::start(config, log.clone()).await?;
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        info!(log, "signal received; stopping gracefully"; "signal" => name);

        // A second signal means the operator will not wait: exit at once. Storage has
        // written every acknowledged record to the OS, so only unflushed data is at risk.
        let impatient = log.clone();
        actix_rt::spawn(async move {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            warn!(impatient, "second signal: exiting without a clean stop");
            std::process::exit(1);
        });

        node.stop().await;
        Ok::<(), anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn command_line() {
        assert_eq!(parse(&[]), Ok(Command::Run { config: None }));
        assert_eq!(parse(&["run"]), Ok(Command::Run { config: None }));
        let with = Ok(Command::Run {
            config: Some("a.toml".into()),
        });
        assert_eq!(parse(&["--config", "a.toml"]), with);
        assert_eq!(parse(&["run", "-c", "a.toml"]), with);
        assert_eq!(parse(&["--config=a.toml", "run"]), with);
        assert_eq!(parse(&["print-config"]), Ok(Command::PrintConfig));
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["run", "-h"]), Ok(Command::Help));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert!(parse(&["--config"]).is_err());
        assert!(parse(&["run", "run"]).is_err());
        assert!(parse(&["print-config", "--config", "a"]).is_err());
        assert!(parse(&["serve"]).is_err());
    }
}
