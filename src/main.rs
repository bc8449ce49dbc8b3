//! The `jssocket` binary: parses the command line and runs the server (or `jssocket hash`).

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use jssocket::config::{Cli, Command, Config, LogFormat, first_line};
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // `hash` needs none of the server's options; don't let a bad SOCKET_* stop it.
    if std::env::args().nth(1).as_deref() == Some("hash") {
        return hash();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&with_env_source(first_line(&e))),
    };
    if let Some(Command::Hash) = cli.command {
        return hash();
    }
    let config = match Config::from_options(cli.options) {
        Ok(config) => config,
        Err(e) => return fail(&format!("error: {e}")),
    };
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
        Err(e) => return fail(&format!("error: cannot listen on {addr}: {e}")),
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

/// Every connection is a file descriptor; the usual soft limit (1024) would cap the server far
/// below what the OS allows, so raise it to the hard limit.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open file limit"),
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
