//! The `actimq` binary: parse the command line, load the config, run a [`Node`] until
//! SIGINT or SIGTERM, then stop it gracefully; SIGHUP reloads the password and ACL
//! files. `actimq passwd FILE USER` adds or changes a user in a password file.
//!
//! The command line is parsed by hand: it has three subcommands and one option, and a
//! parser crate would cost more build time than these lines.

use std::ffi::OsString;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use actimq::config::{Config, DEFAULT_TOML};
use actimq::{logging, Node};
use anyhow::Context as _;
use slog::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "\
Usage:
  actimq [run] [--config FILE]   run the node (the default command)
  actimq print-config            print the built-in default configuration
  actimq passwd FILE USER        add USER to password file FILE, or change its
                                 password (asked twice on a terminal, else one
                                 line read from stdin)
  actimq --help | -h             print this help
  actimq --version | -V          print the version

The configuration is the built-in default, then FILE (only the keys it changes),
then environment variables ACTIMQ__SECTION__KEY, e.g.
  ACTIMQ__LISTENER__TCP__BIND=127.0.0.1:1883 ACTIMQ__STORAGE__FLUSH=sync actimq
SIGINT or SIGTERM stops the node gracefully; SIGHUP reloads the password and ACL
files (a bad file keeps the old one).";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// Run the node.
    Run {
        /// The `--config FILE` layer, if given.
        config: Option<PathBuf>,
    },
    PrintConfig,
    /// Add or change a user in a password file.
    Passwd {
        file: PathBuf,
        user: String,
    },
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().and_then(|a| a.to_str()) == Some("passwd") {
        args.next();
        let rest: Vec<OsString> = args.collect();
        return match rest.as_slice() {
            [h] if h == "-h" || h == "--help" => Ok(Command::Help),
            [file, user] => match user.to_str() {
                Some(user) => Ok(Command::Passwd {
                    file: PathBuf::from(file),
                    user: user.to_string(),
                }),
                None => Err(format!("user name {user:?} is not UTF-8")),
            },
            _ => Err("passwd needs FILE and USER".into()),
        };
    }
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
        Ok(Command::Passwd { file, user }) => match passwd(&file, &user) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("actimq: {e:#}");
                ExitCode::FAILURE
            }
        },
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

/// The password to store: asked twice without echo on a terminal, else the first
/// line of stdin (for scripts and tests).
fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("cannot read password")?;
        let again = rpassword::prompt_password("Again: ").context("cannot read password")?;
        anyhow::ensure!(first == again, "the passwords differ");
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// `actimq passwd FILE USER`: write FILE with USER's line set to a new argon2id hash,
/// through a temporary file and a rename, readable by its owner only.
fn passwd(file: &Path, user: &str) -> anyhow::Result<()> {
    use actimq::auth::password::{hash_password, set_user};
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let password = read_password()?;
    anyhow::ensure!(!password.is_empty(), "empty password");
    let phc = hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?;
    let text = set_user(&text, user, &phc).map_err(anyhow::Error::msg)?;
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    write().with_context(|| format!("cannot write {}", file.display()))?;
    eprintln!("actimq: user {user} set in {}", file.display());
    Ok(())
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
        let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

        let node = Node::start(config, log.clone()).await?;
        let name = loop {
            tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                _ = sighup.recv() => {
                    info!(log, "SIGHUP: reloading the password and ACL files");
                    if let Err(e) = node.reload_auth().await {
                        error!(log, "reload incomplete; old contents kept"; "error" => e);
                    }
                }
            }
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
        assert_eq!(
            parse(&["passwd", "pw", "alice"]),
            Ok(Command::Passwd {
                file: "pw".into(),
                user: "alice".into()
            })
        );
        assert!(parse(&["passwd", "pw"]).is_err());
        assert!(parse(&["passwd", "pw", "a", "b"]).is_err());
    }
}
