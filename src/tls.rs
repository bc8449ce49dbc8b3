//! Optional TLS (SPEC §8): `--tls-cert` and `--tls-key` make the one port serve `https://`
//! and `wss://` (every HTTP route, every WebSocket path, SignalR, console, metrics).
//!
//! The files are read at start (a bad file stops the start with a one-line error naming it)
//! and then watched by [`watch`]: when either changes, both are parsed again, and on success
//! new handshakes use the new certificate while open connections keep theirs. On failure the
//! old certificate keeps serving and a warning says why.
//!
//! The handshake itself runs in each connection's own task (see `server::serve_http`), under
//! the connection's TCP place and the handshake timeout, never in the accept loop.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often [`watch`] looks at the files.
///
/// Polling rather than inotify (`notify`): Kubernetes replaces a mounted Secret by swapping a
/// symlink two levels up (`..data`), certbot repoints `live/` symlinks into `archive/`, and an
/// editor may rewrite the file in place; an inotify watch on the file sees some of these and
/// not others (and dies with the inode it watched). Reading two small files once a second sees
/// every one of them, costs nothing measurable, and needs no extra crate.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// The largest certificate or key file read. A chain is a few kilobytes; a path pointed at
/// something else by mistake must not be read into memory every second.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the certificate files could not be used. Each names the file and what is wrong, in one
/// line (the start-up error, or the reload warning).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: cannot read: {error}")]
    Read {
        flag: &'static str,
        path: String,
        error: io::Error,
    },
    #[error("{flag} {path}: larger than {MAX_FILE_BYTES} bytes: not a PEM certificate or key")]
    TooLarge { flag: &'static str, path: String },
    #[error("--tls-cert {0}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")]
    NoCertificate(String),
    #[error("--tls-key {0}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it")]
    NoKey(String),
    #[error("{flag} {path}: bad PEM: {error}")]
    Pem {
        flag: &'static str,
        path: String,
        error: pem::Error,
    },
    #[error(
        "--tls-cert {cert} with --tls-key {key}: the private key does not match the certificate"
    )]
    KeyMismatch { cert: String, key: String },
    #[error("--tls-cert {cert} with --tls-key {key}: {error}")]
    Rejected {
        cert: String,
        key: String,
        error: rustls::Error,
    },
}

/// The certificate files and the TLS configuration made from them. Shared by the accept path
/// (which takes [`Tls::current`] per connection) and the [`watch`] task (which swaps it).
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The configuration new handshakes use. Held only to clone or replace the `Arc`; a
    /// handshake in progress holds its own clone, so a swap never waits for one.
    current: RwLock<Arc<ServerConfig>>,
    /// What the files held when read at start, so [`watch`] does not load them again.
    loaded: Look,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks both files (the key must match the certificate).
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Tls, TlsError> {
        let files = Files::read(&cert, &key)?;
        let (config, _) = files.config(&cert, &key)?;
        Ok(Tls {
            loaded: files.look(),
            cert,
            key,
            current: RwLock::new(Arc::new(config)),
        })
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The configuration a new handshake should use.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, config: ServerConfig) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}

/// Both files as read, for one parse; dropped right after (no copy of the key is kept).
struct Files {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// What one look at the files saw: their contents by digest, so any change is seen (a rename,
/// a symlink swap, an in-place rewrite within the same second), or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Look {
    Read { cert: [u8; 32], key: [u8; 32] },
    Unreadable(String),
}

impl Files {
    fn read(cert: &Path, key: &Path) -> Result<Files, TlsError> {
        Ok(Files {
            cert_pem: read_bounded("--tls-cert", cert)?,
            key_pem: read_bounded("--tls-key", key)?,
        })
    }

    fn look(&self) -> Look {
        Look::Read {
            cert: Sha256::digest(&self.cert_pem).into(),
            key: Sha256::digest(&self.key_pem).into(),
        }
    }

    /// Parses both files into a server configuration; also returns the leaf certificate's
    /// SHA-256 fingerprint (hex), for the log.
    fn config(&self, cert: &Path, key: &Path) -> Result<(ServerConfig, String), TlsError> {
        let cert_name = cert.display().to_string();
        let key_name = key.display().to_string();
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                flag: "--tls-cert",
                path: cert_name.clone(),
                error,
            })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::NoCertificate(cert_name));
        };
        let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
        let private_key = match PrivateKeyDer::from_pem_slice(&self.key_pem) {
            Ok(private_key) => private_key,
            Err(pem::Error::NoItemsFound) => return Err(TlsError::NoKey(key_name)),
            Err(error) => {
                return Err(TlsError::Pem {
                    flag: "--tls-key",
                    path: key_name,
                    error,
                });
            }
        };
        // The provider named here rather than the process default: nothing else in the
        // process may install one, and two linked providers would make the default ambiguous.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rejected = |error| match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert_name.clone(),
                    key: key_name.clone(),
                }
            }
            error => TlsError::Rejected {
                cert: cert_name.clone(),
                key: key_name.clone(),
                error,
            },
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_no_client_auth()
            // Also checks that the key belongs to the certificate.
            .with_single_cert(chain, private_key)
            .map_err(rejected)?;
        // The server speaks HTTP/1.1 only; a client offering h2 first must not pick it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((config, fingerprint))
    }
}

fn read_bounded(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let name = || path.display().to_string();
    let read_error = |error| TlsError::Read {
        flag,
        path: name(),
        error,
    };
    // `metadata` and `read` follow symlinks: a swapped link is read as its new target.
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_FILE_BYTES {
        return Err(TlsError::TooLarge { flag, path: name() });
    }
    let bytes = std::fs::read(path).map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TlsError::TooLarge { flag, path: name() });
    }
    Ok(bytes)
}

/// What `/metrics` shows of TLS (registered by `metrics::Metrics`).
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    /// Handshakes that failed or timed out.
    pub handshake_failures: Counter,
    /// Changes of the files that were loaded.
    pub reloads: Counter,
    /// 1 while the files on disk cannot be loaded (the previous certificate is served).
    pub reload_failing: Gauge,
}

/// The watcher's memory, so that one change gives one log line however many ticks it lasts.
struct Watch {
    /// What the served configuration was made from.
    serving: Look,
    /// The previous look, and why it did not load (`None`: it did, or it is `serving`).
    last: Look,
    failure: Option<String>,
    /// The warning for `last` was given.
    warned: bool,
}

/// Re-reads the certificate files every [`POLL_EVERY`] until `shutdown`, and swaps the
/// configuration when they change and load (see the module doc).
pub async fn watch(tls: Arc<Tls>, metrics: TlsMetrics, shutdown: CancellationToken) {
    let mut state = Watch {
        serving: tls.loaded.clone(),
        last: tls.loaded.clone(),
        failure: None,
        warned: false,
    };
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let reader = Arc::clone(&tls);
        let read = tokio::task::spawn_blocking(move || Files::read(&reader.cert, &reader.key));
        let Ok(files) = read.await else { continue };
        state.check(&tls, &metrics, files);
    }
}

impl Watch {
    /// One look at the files.
    ///
    /// New contents are loaded at once. If they do not load, the next look decides: a writer
    /// may be half-way (certbot repoints the certificate's link, then the key's; `cp` writes
    /// a file in pieces), so only a failure that is still there a second later is warned
    /// about, once.
    fn check(&mut self, tls: &Tls, metrics: &TlsMetrics, files: Result<Files, TlsError>) {
        let look = match &files {
            Ok(files) => files.look(),
            Err(e) => Look::Unreadable(e.to_string()),
        };
        if look == self.serving {
            // Unchanged, or back to what is served after a failed change.
            self.last = look;
            self.failure = None;
            metrics.reload_failing.set(0);
            return;
        }
        if look != self.last {
            self.last = look.clone();
            self.warned = false;
            self.failure = match files {
                Err(e) => Some(e.to_string()),
                Ok(files) => match files.config(&tls.cert, &tls.key) {
                    Ok((config, fingerprint)) => {
                        tls.replace(config);
                        self.serving = look;
                        metrics.reloads.inc();
                        metrics.reload_failing.set(0);
                        info!(
                            cert = %tls.cert.display(),
                            sha256 = %fingerprint,
                            "TLS certificate reloaded"
                        );
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
            };
            return;
        }
        // The same failing contents a second time.
        if let Some(error) = &self.failure
            && !self.warned
        {
            warn!(%error, "TLS certificate not reloaded: still serving the previous certificate");
            metrics.reload_failing.set(1);
            self.warned = true;
        }
    }
}

/// What a client that spoke plain HTTP to the TLS port is told, instead of a TLS alert its
/// user cannot read.
const PLAIN_HTTP_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain\r\nConnection: close\r\nContent-Length: 62\r\n\r\n\
    400 Bad Request: this port speaks TLS: use https:// or wss://\n";

/// The TLS handshake on an accepted connection, with the configuration current now. The
/// caller bounds it in time (the handshake timeout) and holds the connection's TCP place.
///
/// A first byte that cannot start a TLS record (a plain `GET`) gets a short plain-text 400
/// and an error, rather than a TLS alert.
pub async fn accept(tls: &Tls, mut tcp: TcpStream) -> io::Result<MaybeTls> {
    /// A TLS handshake record starts with this content type.
    const HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the TLS handshake",
        ));
    }
    if first[0] != HANDSHAKE {
        if first[0].is_ascii_alphabetic() {
            refuse_plain_http(&mut tcp).await;
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a TLS handshake (plain HTTP to the TLS port?)",
        ));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    Ok(MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?)))
}

/// Answers [`PLAIN_HTTP_REFUSAL`] and closes. What the client sent is read (a bounded amount,
/// briefly) before the close, so the kernel sends a FIN after the answer, not a reset that
/// could destroy it.
async fn refuse_plain_http(tcp: &mut TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DRAIN_BYTES: usize = 16 * 1024;
    const DRAIN_FOR: Duration = Duration::from_millis(500);
    if tcp.write_all(PLAIN_HTTP_REFUSAL).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    let mut scratch = [0u8; 1024];
    let mut drained = 0;
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while drained < DRAIN_BYTES {
            match tcp.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// A connection's byte stream: plain TCP, or TLS over it. One type for both, so hyper, the
/// upgrade and the WebSocket tasks are the same code either way.
#[derive(Debug)]
pub enum MaybeTls {
    Plain(TcpStream),
    /// Boxed: rustls's state is a few hundred bytes the plain case should not carry.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// The TCP socket underneath (for socket options, and to see a hang-up).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(tls) => tls.get_ref().0,
        }
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(tls) => tls.get_mut().0,
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(tcp) => tcp.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }
}
