//! The `jssocket` binary: parses the command line and runs the server (or `jssocket hash`).

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use jssocket::config::{Cli, Command, Config, LogFormat, Summary};
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // `hash` needs none of the server's options: its own definition is parsed alone, so a bad
    // SOCKET_* (clap reads every option's variable when the whole command line is parsed)
    // cannot stop it, while `hash --help` and `hash extra` get clap's usual answers.
    if args.get(1).is_some_and(|a| a == "hash") {
        let command = Cli::command()
            .find_subcommand("hash")
            .cloned()
            .map(|c| c.bin_name("jssocket hash"));
        if let Some(command) = command {
            return match command.try_get_matches_from(&args[1..]) {
                Ok(_) => hash(),
                Err(e) => clap_error(&e, &args),
            };
        }
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e, &args),
    };
    if let Some(Command::Hash) = cli.command {
        return hash();
    }
    let check = matches!(cli.command, Some(Command::Check(_)));
    let options = match cli.command {
        Some(Command::Check(options)) => *options,
        _ => cli.options,
    };
    let config = match Config::from_options(options) {
        Ok(config) => config,
        Err(e) => return fail(&format!("error: {e}")),
    };
    if check {
        return show_check(&config);
    }
    init_logging(config.log_format);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("error: cannot start the runtime: {e}")),
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = match listen(&addr).await {
        Ok(listener) => listener,
        Err(e) => return fail(&listen_error(&addr, config.port, &e)),
    };
    match jssocket::server::run(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("error: {e}")),
    }
}

/// Binds with a deep accept backlog: the default 128 overflows when thousands of clients
/// reconnect at once (after a deploy), and each overflow costs a client a 1 s SYN retry.
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(4096)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The one line a failed bind prints: the two usual causes say what to do about them.
fn listen_error(addr: &str, port: u16, e: &std::io::Error) -> String {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, PermissionDenied};
    let advice = match e.kind() {
        PermissionDenied if port < 1024 => {
            "permission denied: use `-p 8080` or run with CAP_NET_BIND_SERVICE".to_string()
        }
        AddrInUse => {
            "address in use: another process listens there; stop it or choose another port \
             with `-p`"
                .to_string()
        }
        AddrNotAvailable => {
            "address not available: `-h` must be an address of this machine (0.0.0.0: all)"
                .to_string()
        }
        _ => e.to_string(),
    };
    format!("error: cannot listen on {addr}: {advice}")
}

/// `jssocket check`: the configuration has been parsed and validated exactly as a start does
/// (key files read); say so and what a start would run as.
fn show_check(config: &Config) -> ExitCode {
    let addr = format!("{}:{}", config.host, config.port);
    println!("configuration ok");
    println!("{}", Summary::new(config, &addr));
    ExitCode::SUCCESS
}

/// Every connection is a file descriptor; the usual soft limit (1024) would cap the server far
/// below what the OS allows, so raise it to the hard limit.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        // Debug: the first line of a start is the server's summary (see `server::serve`).
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `jssocket hash`: password from stdin (or a prompt on a terminal) → hex bcrypt hash.
fn hash() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        match rpassword::prompt_password("Password: ") {
            Ok(p) => p,
            Err(e) => return fail(&format!("error: cannot read the password: {e}")),
        }
    } else {
        let mut input = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut input) {
            return fail(&format!("error: cannot read the password from stdin: {e}"));
        }
        input.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        return fail("error: the password is empty");
    }
    match jssocket::auth::hash_password(&password) {
        Ok(hex) => {
            println!("{hex}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("error: cannot hash the password: {e}")),
    }
}

/// `--help` and `--version` print and succeed; a refused command line prints clap's reason
/// and its hints as one short block (see [`error_block`]) and exits 2.
fn clap_error(e: &clap::Error, args: &[OsString]) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    fail(&error_block(e, args))
}

/// clap's reason and its hints (the valid values, "a similar argument exists"), without the
/// usage and "For more information" lines that would bury them; the reason says when the
/// value came from a `SOCKET_*` variable, and `-h` without a value says what `-h` is (it is
/// the host, as in the original relay, so it never shows help).
fn error_block(e: &clap::Error, args: &[OsString]) -> String {
    let text = e.to_string();
    let mut lines = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim_end)
        .filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string();
    let mut block = vec![with_env_source(first.clone())];
    block.extend(lines.map(|l| format!("  {}", l.trim_start())));
    if first.contains("a value is required for '--host") && args.iter().any(|a| a == "-h") {
        block.push("  tip: `-h` is the host; help is `--help`".to_string());
    }
    if first.starts_with("error: the subcommand 'check' cannot be used with") {
        block.push("  tip: options go after `check`: `jssocket check -p 8080`".to_string());
    }
    block.join("\n")
}

/// clap names the flag even when the bad value came from its environment variable; say so.
fn with_env_source(message: String) -> String {
    let Some(flag) = message
        .split("'--")
        .nth(1)
        .and_then(|rest| rest.split([' ', '\'']).next())
    else {
        return message;
    };
    let on_command_line =
        std::env::args().any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
    let var = format!("SOCKET_{}", flag.replace('-', "_").to_ascii_uppercase());
    if !on_command_line && std::env::var_os(&var).is_some() {
        format!("{message} (from {var})")
    } else {
        message
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(2)
}
