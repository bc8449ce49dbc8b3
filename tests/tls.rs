//! SPEC §8, optional TLS: `--tls-cert`/`--tls-key` serve `https://` and `wss://` on the one
//! port; the certificate files are re-read when they change (replaced by rename, or rewritten
//! in place) without a restart; a broken file keeps the old certificate serving; a silent or
//! plain-HTTP peer costs one connection until the handshake timeout and breaks nothing.
//!
//! Certificates come from a CA made by the test (`rcgen`); the client trusts that CA only.
//! The binary's start-up errors are checked as a user sees them (exact stderr, exit status).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SerialNumber,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod common;

use common::{LogCapture, PASSWORD, RECV_TIMEOUT, Server};

const BIN: &str = env!("CARGO_BIN_EXE_jssocket");
/// How long a reload may take to show: the files are polled every second, and a change that
/// does not parse at first is looked at once more.
const RELOAD_DEADLINE: Duration = Duration::from_secs(8);

type Wss = WebSocketStream<TlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Certificates and files
// ---------------------------------------------------------------------------------------------

/// The test's certificate authority; every server certificate is a leaf it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate for `localhost` (its chain: leaf, then the CA) and its key, as PEM.
struct Leaf {
    der: CertificateDer<'static>,
    chain_pem: String,
    key_pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "jssocket test CA");
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn leaf(&self, name: &str, serial: u64) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            der: cert.der().clone(),
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// A leaf for an existing key (PKCS#8 PEM); the key PEM of the result is that one.
    fn leaf_for_key(&self, name: &str, serial: u64, pkcs8_pem: &str) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::from_pem(pkcs8_pem).expect("rcgen reads the PKCS#8 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            der: cert.der().clone(),
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: pkcs8_pem.to_string(),
        }
    }

    fn client(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("trust the CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // As a browser offers: h2 first. The server must pick HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "jssocket-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` as cert-manager and certbot do: a new file renamed over the old one.
fn replace_by_rename(path: &Path, contents: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, contents).expect("write the new file");
    std::fs::rename(&staged, path).expect("rename over the old file");
}

/// Rewrites `path` in place (same inode), as an editor or `cat new > old` does.
fn rewrite_in_place(path: &Path, contents: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open for rewriting");
    file.write_all(contents.as_bytes()).expect("rewrite");
}

/// A server's files, written for `leaf`.
struct Files {
    _dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn write(leaf: &Leaf) -> Files {
        let dir = TempDir::new();
        let cert = dir.path("cert.pem");
        let key = dir.path("key.pem");
        std::fs::write(&cert, &leaf.chain_pem).expect("write cert");
        std::fs::write(&key, &leaf.key_pem).expect("write key");
        Files {
            _dir: dir,
            cert,
            key,
        }
    }

    fn args(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

async fn tls_server(files: &Files, extra: &[&str]) -> Server {
    let args = files.args();
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend_from_slice(extra);
    Server::with_args(&argv).await
}

/// The log of this test binary, installed once.
fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| LogCapture::install("jssocket=debug"))
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A TLS connection to `addr` as `localhost`, trusting `ca` only.
async fn tls_connect(ca: &Ca, addr: SocketAddr) -> TlsStream<TcpStream> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        ca.client().connect(name, tcp).await
    };
    timeout(RECV_TIMEOUT, connect)
        .await
        .expect("TLS handshake timed out")
        .unwrap_or_else(|e| panic!("TLS handshake with {addr} failed: {e}"))
}

/// The leaf certificate the server presented on `stream`.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// The leaf certificate a new connection gets now.
async fn served_now(ca: &Ca, addr: SocketAddr) -> CertificateDer<'static> {
    served(&tls_connect(ca, addr).await)
}

/// Waits until new connections get `leaf`; panics after [`RELOAD_DEADLINE`].
async fn wait_until_served(ca: &Ca, addr: SocketAddr, leaf: &Leaf, what: &str) {
    let start = Instant::now();
    while served_now(ca, addr).await != leaf.der {
        assert!(
            start.elapsed() < RELOAD_DEADLINE,
            "{what}: new connections still get the old certificate after {RELOAD_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTPS request (`Connection: close`); the status and the body.
async fn https(ca: &Ca, addr: SocketAddr, request_head: &str, body: &str) -> (u16, String) {
    let mut stream = tls_connect(ca, addr).await;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN");
    let request = format!(
        "{request_head}\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A TLS peer may close without close_notify after `Connection: close`; what arrived
        // before counts.
        let _ = (&mut stream).take(1 << 20).read_to_end(&mut response).await;
        Ok::<_, std::io::Error>(response)
    };
    let response = timeout(RECV_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{request_head}: no answer in time"))
        .unwrap_or_else(|e| panic!("{request_head}: {e}"));
    parse_response(&response, request_head)
}

fn parse_response(response: &[u8], what: &str) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: not an HTTP response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status in {head:?}"));
    (status, body.to_string())
}

/// The value of the sample `name` (no labels) on `/metrics`, over https.
async fn metric(ca: &Ca, addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = https(ca, addr, "GET /metrics HTTP/1.1", "").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on /metrics:\n{body}"))
}

/// A WebSocket over TLS to `/ws` (`wss://`), with `auth:` when `password` is given.
async fn wss(ca: &Ca, addr: SocketAddr, password: Option<&str>) -> Wss {
    wss_to(ca, addr, "/ws", password).await
}

async fn wss_to(ca: &Ca, addr: SocketAddr, path: &str, password: Option<&str>) -> Wss {
    let stream = tls_connect(ca, addr).await;
    let mut request = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .expect("request");
    if let Some(password) = password {
        request
            .headers_mut()
            .insert("auth", password.parse().expect("header value"));
    }
    let (ws, response) = timeout(
        RECV_TIMEOUT,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("wss upgrade timed out")
    .expect("wss upgrade failed");
    assert_eq!(response.status(), 101);
    ws
}

async fn send(ws: &mut Wss, text: &str) {
    timeout(RECV_TIMEOUT, ws.send(Message::text(text)))
        .await
        .expect("send timed out")
        .expect("send failed");
}

async fn recv(ws: &mut Wss) -> String {
    loop {
        let message = timeout(RECV_TIMEOUT, ws.next())
            .await
            .expect("no frame in time")
            .expect("the connection ended")
            .expect("the connection failed");
        match message {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame: {other:?}"),
        }
    }
}

/// A backend in the server pool and an acknowledged client, both over `wss://`.
async fn backend_and_client(ca: &Ca, addr: SocketAddr) -> (Wss, Wss) {
    let mut backend = wss(ca, addr, Some(PASSWORD)).await;
    send(&mut backend, r#"{"type":"server_connect","data":{}}"#).await;
    assert_eq!(
        recv(&mut backend).await,
        r#"{"type":"server_connect","data":true}"#
    );
    let mut client = wss(ca, addr, None).await;
    send(&mut client, r#"{"type":"client_connect","data":{}}"#).await;
    let forward: serde_json::Value =
        serde_json::from_str(&recv(&mut backend).await).expect("forward is JSON");
    let id = forward["data"]["target"]
        .as_str()
        .expect("forward names the client")
        .to_string();
    send(
        &mut backend,
        &format!(r#"{{"type":"client_connected","data":{{"target":"{id}"}}}}"#),
    )
    .await;
    assert_eq!(
        recv(&mut client).await,
        format!(r#"{{"type":"client_connected","data":{{"target":"{id}"}}}}"#)
    );
    (backend, client)
}

/// The backend's `notify_all` reaches the client: both connections are served.
async fn round_trip(backend: &mut Wss, client: &mut Wss, n: u32) {
    send(
        backend,
        &format!(r#"{{"type":"notify_all","data":{{"n":{n}}}}}"#),
    )
    .await;
    assert_eq!(recv(client).await, format!(r#"{{"n":{n}}}"#));
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wss_and_https_serve_every_route_on_one_port() {
    let ca = Ca::new();
    let leaf = ca.leaf("first", 1);
    let files = Files::write(&leaf);
    let server = tls_server(&files, &[]).await;
    let addr = server.addr;

    assert_eq!(served_now(&ca, addr).await, leaf.der, "the chain's leaf");
    let (status, body) = https(&ca, addr, "GET /healthz HTTP/1.1", "").await;
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    let (status, body) = https(&ca, addr, "GET /metrics HTTP/1.1", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("jssocket_connections"), "metrics: {body}");
    let (status, body) = https(&ca, addr, "GET /console HTTP/1.1", "").await;
    assert_eq!(status, 200, "console: {body}");
    let (status, body) = https(
        &ca,
        addr,
        "POST /sockets/negotiate?negotiateVersion=1 HTTP/1.1",
        "",
    )
    .await;
    assert_eq!(status, 200, "SignalR negotiate: {body}");
    assert!(body.contains("connectionToken"), "negotiate: {body}");

    let (mut backend, mut client) = backend_and_client(&ca, addr).await;
    round_trip(&mut backend, &mut client, 1).await;
    // The HTTP API over https reaches the wss client.
    let (status, body) = https(
        &ca,
        addr,
        &format!("POST /api/notify_all HTTP/1.1\r\nAuthorization: Bearer {PASSWORD}\r\nContent-Type: application/json"),
        r#"{"via":"api"}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":1}"#));
    assert_eq!(recv(&mut client).await, r#"{"via":"api"}"#);

    // A SignalR client over wss (no negotiation): its handshake, then a notify_all.
    let mut signalr = wss_to(&ca, addr, "/sockets", None).await;
    send(&mut signalr, "{\"protocol\":\"json\",\"version\":1}\u{1e}").await;
    assert_eq!(recv(&mut signalr).await, "{}\u{1e}");
    round_trip(&mut backend, &mut client, 2).await;
    assert_eq!(
        recv(&mut signalr).await,
        concat!(
            r#"{"type":1,"target":"notify","arguments":["{\"n\":2}"]}"#,
            "\u{1e}"
        )
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Runs `openssl` (for key formats rcgen does not write); its stdout.
fn openssl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it (Debian: apt-get install openssl)")
        });
    if let Some(input) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(input.as_bytes()).expect("write to openssl");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("openssl output");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("openssl prints PEM")
}

/// A key in PKCS#1 (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`), as older tools
/// and certbot's RSA keys write them, is read as well as PKCS#8.
#[tokio::test]
async fn pkcs1_and_sec1_keys_are_accepted() {
    let ca = Ca::new();
    for (genpkey, label) in [
        (
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
            "-----BEGIN EC PRIVATE KEY-----",
        ),
    ] {
        let pkcs8 = openssl(&[&["genpkey"][..], genpkey].concat(), None);
        let traditional = openssl(&["pkey", "-traditional"], Some(&pkcs8));
        assert!(
            traditional.starts_with(label),
            "openssl wrote {traditional}"
        );
        let mut leaf = ca.leaf_for_key(label, 7, &pkcs8);
        leaf.key_pem = traditional;
        let files = Files::write(&leaf);
        let server = tls_server(&files, &[]).await;
        assert_eq!(served_now(&ca, server.addr).await, leaf.der, "{label}");
        let (status, _) = https(&ca, server.addr, "GET /healthz HTTP/1.1", "").await;
        assert_eq!(status, 200, "{label}");
        server.shutdown().await.expect("clean shutdown");
    }
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn replaced_certificate_is_served_without_restart_and_old_connections_stay() {
    let logs = logs();
    let ca = Ca::new();
    let first = ca.leaf("first", 1);
    let files = Files::write(&first);
    let server = tls_server(&files, &[]).await;
    let addr = server.addr;
    let (mut backend, mut client) = backend_and_client(&ca, addr).await;
    assert_eq!(served_now(&ca, addr).await, first.der);

    // Replaced by rename (both files), as cert-manager and certbot do.
    let second = ca.leaf("second", 2);
    replace_by_rename(&files.key, &second.key_pem);
    replace_by_rename(&files.cert, &second.chain_pem);
    wait_until_served(&ca, addr, &second, "after rename").await;
    round_trip(&mut backend, &mut client, 1).await;

    // Rewritten in place (same inodes), the certificate first: for a moment the key does not
    // match it, and the server must ride that out.
    let third = ca.leaf("third", 3);
    rewrite_in_place(&files.cert, &third.chain_pem);
    rewrite_in_place(&files.key, &third.key_pem);
    wait_until_served(&ca, addr, &third, "after in-place rewrite").await;
    round_trip(&mut backend, &mut client, 2).await;

    // And the new certificate serves whole sessions, not just handshakes.
    let (mut backend2, mut client2) = backend_and_client(&ca, addr).await;
    round_trip(&mut backend2, &mut client2, 3).await;
    // The old client got that one too (notify_all), and the old backend still delivers.
    assert_eq!(recv(&mut client).await, r#"{"n":3}"#);
    round_trip(&mut backend, &mut client2, 4).await;
    assert_eq!(recv(&mut client).await, r#"{"n":4}"#);

    let reloaded = logs
        .text()
        .lines()
        .filter(|l| {
            l.contains("TLS certificate reloaded") && l.contains(&*files.cert.to_string_lossy())
        })
        .count();
    assert_eq!(reloaded, 2, "one info line per reload:\n{}", logs.text());
    server.shutdown().await.expect("clean shutdown");
}

/// A Secret volume as the kubelet writes it: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory and renames a new
/// `..data` link over the old one, so the files' own paths never change.
#[tokio::test]
async fn kubernetes_secret_volume_update_is_followed() {
    use std::os::unix::fs::symlink;
    let ca = Ca::new();
    let first = ca.leaf("first", 1);
    let second = ca.leaf("second", 2);
    let dir = TempDir::new();
    let version = |name: &str, leaf: &Leaf| {
        let versioned = dir.path(name);
        std::fs::create_dir(&versioned).expect("versioned directory");
        std::fs::write(versioned.join("tls.crt"), &leaf.chain_pem).expect("write cert");
        std::fs::write(versioned.join("tls.key"), &leaf.key_pem).expect("write key");
    };
    version("..2026_01", &first);
    symlink("..2026_01", dir.path("..data")).expect("..data link");
    symlink("..data/tls.crt", dir.path("tls.crt")).expect("tls.crt link");
    symlink("..data/tls.key", dir.path("tls.key")).expect("tls.key link");
    let cert = dir.path("tls.crt").to_string_lossy().into_owned();
    let key = dir.path("tls.key").to_string_lossy().into_owned();
    let server = Server::with_args(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let addr = server.addr;
    let (mut backend, mut client) = backend_and_client(&ca, addr).await;
    assert_eq!(served_now(&ca, addr).await, first.der);

    version("..2026_02", &second);
    symlink("..2026_02", dir.path("..data_tmp")).expect("new link");
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).expect("swap ..data");
    std::fs::remove_dir_all(dir.path("..2026_01")).expect("remove the old version");
    wait_until_served(&ca, addr, &second, "after the Secret's update").await;
    round_trip(&mut backend, &mut client, 1).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn broken_certificate_files_keep_the_old_certificate_serving() {
    let logs = logs();
    let ca = Ca::new();
    let first = ca.leaf("first", 1);
    let other = ca.leaf("other", 2);
    let files = Files::write(&first);
    let server = tls_server(&files, &[]).await;
    let addr = server.addr;
    // Every file of this test is in this directory (the log is the whole binary's).
    let path = files
        .cert
        .parent()
        .expect("directory")
        .to_string_lossy()
        .into_owned();
    let warnings = || {
        logs.text()
            .lines()
            .filter(|l| l.contains("TLS certificate not reloaded") && l.contains(&path))
            .count()
    };

    // Half-written: the certificate cut in the middle.
    rewrite_in_place(&files.cert, &first.chain_pem[..first.chain_pem.len() / 2]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(served_now(&ca, addr).await, first.der, "half-written file");
    assert_eq!(
        warnings(),
        1,
        "one warning for the change:\n{}",
        logs.text()
    );
    assert_eq!(metric(&ca, addr, "jssocket_tls_reload_failing").await, 1.0);

    // A whole certificate, but the key is not its key.
    rewrite_in_place(&files.cert, &other.chain_pem);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(served_now(&ca, addr).await, first.der, "mismatched key");
    assert_eq!(warnings(), 2, "one warning per change:\n{}", logs.text());

    // Mended: served at once.
    rewrite_in_place(&files.key, &other.key_pem);
    wait_until_served(&ca, addr, &other, "after mending").await;
    assert_eq!(warnings(), 2);
    assert_eq!(metric(&ca, addr, "jssocket_tls_reload_failing").await, 0.0);
    assert_eq!(metric(&ca, addr, "jssocket_tls_reloads_total").await, 1.0);

    // Removed (a botched deploy), then put back as it was: one warning, no reload.
    std::fs::remove_file(&files.key).expect("remove the key");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(served_now(&ca, addr).await, other.der, "key file missing");
    assert_eq!(
        warnings(),
        3,
        "one warning for the missing file:\n{}",
        logs.text()
    );
    assert_eq!(metric(&ca, addr, "jssocket_tls_reload_failing").await, 1.0);
    std::fs::write(&files.key, &other.key_pem).expect("put the key back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metric(&ca, addr, "jssocket_tls_reload_failing").await, 0.0);
    assert_eq!(metric(&ca, addr, "jssocket_tls_reloads_total").await, 1.0);
    assert_eq!(warnings(), 3);
    server.shutdown().await.expect("clean shutdown");
}

// ---------------------------------------------------------------------------------------------
// Attacks
// ---------------------------------------------------------------------------------------------

/// Reads until the server closes; how long that took. Panics if it stays open `within`.
async fn time_to_close(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(
            within.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!("the server kept the connection open for {within:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn silent_and_garbage_peers_are_closed_at_the_handshake_timeout_and_block_nobody() {
    let ca = Ca::new();
    let files = Files::write(&ca.leaf("first", 1));
    let server = tls_server(&files, &["--handshake-timeout", "3"]).await;
    let addr = server.addr;

    // Many peers that never send a ClientHello, and one that starts a record and stalls.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01])
        .await
        .expect("write a partial record");
    // Meanwhile the server accepts and serves others at once.
    let start = Instant::now();
    let (status, _) = https(&ca, addr, "GET /healthz HTTP/1.1", "").await;
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "a healthz over TLS took {:?} beside silent peers (the handshake timeout is 3 s)",
        start.elapsed()
    );

    // Each holds a TCP place meanwhile (and this scrape one more).
    let open = metric(&ca, addr, "jssocket_tcp_connections").await;
    assert!(open >= 52.0, "{open} TCP connections counted, 52 open");

    let waited = time_to_close(&mut stalled, Duration::from_secs(6)).await;
    assert!(
        waited >= Duration::from_secs(2),
        "closed too early: {waited:?}"
    );
    for stream in &mut silent {
        time_to_close(stream, Duration::from_secs(6)).await;
    }

    // Garbage that looks like a handshake record is refused without waiting for the timeout.
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write garbage");
    let waited = time_to_close(&mut garbage, Duration::from_secs(6)).await;
    assert!(
        waited < Duration::from_secs(2),
        "garbage held for {waited:?} (the handshake timeout is 3 s)"
    );

    assert_eq!(https(&ca, addr, "GET /healthz HTTP/1.1", "").await.0, 200);
    // 50 silent, one stalled, one garbage: each counted once.
    assert_eq!(
        metric(&ca, addr, "jssocket_tls_handshake_failures_total").await,
        52.0
    );
    assert_eq!(metric(&ca, addr, "jssocket_tcp_connections").await, 1.0);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_readable_refusal_and_breaks_nothing() {
    let ca = Ca::new();
    let files = Files::write(&ca.leaf("first", 1));
    let server = tls_server(&files, &[]).await;
    let addr = server.addr;

    for request in [
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ] {
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        timeout(RECV_TIMEOUT, plain.read_to_end(&mut response))
            .await
            .expect("closed in time")
            .expect("read the refusal");
        let (status, body) = parse_response(&response, "plain HTTP");
        assert_eq!(status, 400);
        assert_eq!(
            body,
            "400 Bad Request: this port speaks TLS: use https:// or wss://\n"
        );
    }
    assert_eq!(https(&ca, addr, "GET /healthz HTTP/1.1", "").await.0, 200);
    let (mut backend, mut client) = backend_and_client(&ca, addr).await;
    round_trip(&mut backend, &mut client, 1).await;
    server.shutdown().await.expect("clean shutdown");
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// The binary with no `SOCKET_*` from the shell running the tests.
fn jssocket() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SOCKET_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Kills the child when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a start that must be refused; its exit status and stderr.
fn refused(mut cmd: Command) -> (ExitStatus, String, String) {
    let mut child = Running(cmd.spawn().expect("spawn jssocket"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "jssocket did not exit: the start was not refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.0.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.0.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (status, stdout, stderr)
}

/// The start is refused with exactly `expected` on stderr (one line), nothing on stdout,
/// exit status 2.
fn assert_refused_with(cmd: Command, expected: &str) {
    let (status, stdout, stderr) = refused(cmd);
    assert_eq!(status.code(), Some(2), "exit status; stderr: {stderr}");
    assert_eq!(stdout, "", "stdout");
    assert_eq!(stderr, format!("{expected}\n"), "stderr");
}

#[test]
fn one_of_the_two_options_alone_is_refused_in_one_line() {
    let ca = Ca::new();
    let files = Files::write(&ca.leaf("first", 1));
    let cert = files.cert.to_string_lossy().into_owned();
    let key = files.key.to_string_lossy().into_owned();

    let mut cmd = jssocket();
    cmd.args(["-p", "0", "--tls-cert", &cert]);
    assert_refused_with(
        cmd,
        "error: --tls-cert needs --tls-key (TLS takes a certificate and its key)",
    );
    let mut cmd = jssocket();
    cmd.args(["-p", "0"]).env("SOCKET_TLS_KEY", &key);
    assert_refused_with(
        cmd,
        "error: --tls-key needs --tls-cert (TLS takes a certificate and its key)",
    );
}

#[test]
fn unreadable_or_invalid_files_are_refused_naming_the_file() {
    let ca = Ca::new();
    let leaf = ca.leaf("first", 1);
    let other = ca.leaf("other", 2);
    let files = Files::write(&leaf);
    let cert = files.cert.to_string_lossy().into_owned();
    let key = files.key.to_string_lossy().into_owned();
    let dir = files.cert.parent().expect("directory");
    let missing = dir.join("missing.pem").to_string_lossy().into_owned();
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let not_pem = not_pem.to_string_lossy().into_owned();
    let other_key = dir.join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).expect("write");
    let other_key = other_key.to_string_lossy().into_owned();

    let cases = [
        (
            [missing.as_str(), key.as_str()],
            format!(
                "error: --tls-cert {missing}: cannot read: No such file or directory (os error 2)"
            ),
        ),
        (
            [cert.as_str(), missing.as_str()],
            format!(
                "error: --tls-key {missing}: cannot read: No such file or directory (os error 2)"
            ),
        ),
        (
            [not_pem.as_str(), key.as_str()],
            format!(
                "error: --tls-cert {not_pem}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
            ),
        ),
        (
            [cert.as_str(), not_pem.as_str()],
            format!(
                "error: --tls-key {not_pem}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it"
            ),
        ),
        (
            [cert.as_str(), other_key.as_str()],
            format!(
                "error: --tls-cert {cert} with --tls-key {other_key}: the private key does not match the certificate"
            ),
        ),
    ];
    for ([cert, key], expected) in cases {
        let mut cmd = jssocket();
        cmd.args(["-p", "0", "--tls-cert", cert, "--tls-key", key]);
        assert_refused_with(cmd, &expected);
    }
}

#[tokio::test]
async fn the_binary_serves_tls_from_the_environment_and_says_so() {
    let ca = Ca::new();
    let leaf = ca.leaf("first", 1);
    let files = Files::write(&leaf);
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let mut cmd = jssocket();
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .env("SOCKET_TLS_CERT", &files.cert)
        .env("SOCKET_TLS_KEY", &files.key);
    let mut child = Running(cmd.spawn().expect("spawn jssocket"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_now(&ca, addr).await, leaf.der);
    assert_eq!(https(&ca, addr, "GET /healthz HTTP/1.1", "").await.0, 200);

    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut stdout = String::new();
    if let Some(mut out) = child.0.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    let expected = format!("TLS on: cert={}", files.cert.display());
    assert!(
        stdout.contains(&expected),
        "no {expected:?} in the log:\n{stdout}"
    );
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("console=https://127.0.0.1:{port}/console")),
        "the start-up line names the console's https URL: {first}"
    );
}
