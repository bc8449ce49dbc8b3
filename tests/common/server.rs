//! The server under test: a real jssocket running in this process on an ephemeral port.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tokio::time::timeout;

use jssocket::config::Config;

use super::{Conn, FAST_HASH, PASSWORD, SHUTDOWN_TIMEOUT, acknowledge, register};

/// A jssocket server running in this process on an ephemeral port. Dropping it asks it to
/// shut down.
///
/// The server gets its own thread and multi-threaded runtime, as in production: whatever it
/// does (even block a thread) cannot stop the test's own timeouts from firing, so a hung
/// server fails the test with a clear message instead of hanging the suite.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    result: Option<oneshot::Receiver<std::io::Result<()>>>,
}

impl Server {
    /// A server with every option at its default, but the admin password's hash is the
    /// cheap [`FAST_HASH`] (same password).
    pub async fn start() -> Server {
        Server::with_args(&[]).await
    }

    /// A server with every option at its default, the original relay's hash included.
    pub async fn start_default_auth() -> Server {
        let config = Config::default();
        assert!(config.auth_is_default);
        Server::with_config(config).await
    }

    /// A server configured by command-line options, e.g. `&["--client-send", "own"]`;
    /// `--auth` is [`FAST_HASH`] unless given.
    pub async fn with_args(args: &[&str]) -> Server {
        let mut argv = vec!["jssocket", "--host", "127.0.0.1", "--port", "0"];
        if !args.contains(&"--auth") {
            argv.extend_from_slice(&["--auth", FAST_HASH]);
        }
        argv.extend_from_slice(args);
        let config = Config::from_args(argv).expect("test options must be valid");
        Server::with_config(config).await
    }

    pub async fn with_config(config: Config) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (result_tx, result_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("jssocket-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("server runtime");
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    jssocket::server::run(listener, config, async move {
                        let _ = shutdown_rx.await;
                    })
                    .await
                });
                let _ = result_tx.send(result);
            })
            .expect("spawn the server thread");
        Server {
            addr,
            shutdown: Some(shutdown_tx),
            result: Some(result_rx),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Asks the server to stop (what SIGTERM does), without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Asks the server to stop and waits (bounded) for `run` to return its result.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.signal_shutdown();
        let result = self.result.take().expect("server result");
        match timeout(SHUTDOWN_TIMEOUT, result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => panic!("the server thread ended without a result (panicked?)"),
            Err(_) => panic!("server did not return within {SHUTDOWN_TIMEOUT:?} of shutdown"),
        }
    }

    /// A connection without `auth` header.
    pub async fn client(&self, name: &str) -> Conn {
        Conn::connect(&self.url(), None, name).await
    }

    /// A connection with the `auth: 12345678` header.
    pub async fn admin(&self, name: &str) -> Conn {
        Conn::connect(&self.url(), Some(PASSWORD), name).await
    }

    /// An admin that joined the server pool (`server_connect` answered `true`).
    pub async fn backend(&self, name: &str) -> Conn {
        let mut conn = self.admin(name).await;
        conn.server_connect().await;
        conn
    }

    /// A client registered through `backend` and acknowledged into group `user` (`None`:
    /// no `user` key, so `public`). Returns it with its id.
    pub async fn acked_client(&self, name: &str, backend: &mut Conn, user: Option<&str>) -> Conn {
        let mut client = self.client(name).await;
        let id = register(&mut client, backend).await;
        acknowledge(backend, &mut client, &id, user).await;
        client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
