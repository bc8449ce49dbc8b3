//! Wrong-password floods cannot lock the backend out (issue 10, item 2): failures never make a
//! right password refused; the verification queue is fair across addresses, skips requesters
//! that left and refuses clearly ("busy") when full; `--metrics-auth on` hides the counters.
//!
//! Everything runs over real sockets against an in-process server. Flooders use other
//! loopback addresses (127.0.0.2…) so the server sees distinct peers. The assertions count
//! bcrypt runs (`jssocket_auth_verifications_total`) instead of measuring time.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use tokio::time::timeout;

/// Long enough for any queued verification on a loaded machine; every wait is bounded.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(60);

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A hash of [`PASSWORD`] costly enough (cost 10) that bcrypt, not the sockets, sets the
/// pace of the queue.
fn slow_hash() -> String {
    bcrypt::hash(PASSWORD, 10).expect("hash the test password")
}

/// bcrypt workers the server runs (half the cores, at least one): how many verifications
/// can be in progress at once.
fn workers() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)) as f64
}

async fn counter(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr).await.get(name, &[]).unwrap_or(0.0)
}

/// Waits (bounded) until `done` holds for a scrape.
async fn wait_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let wait = async {
        loop {
            let scrape = scrape(addr).await;
            if done(&scrape) {
                return scrape;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(FLOOD_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not reached within {FLOOD_TIMEOUT:?}"))
}

fn queued(scrape: &Scrape) -> f64 {
    scrape.get("jssocket_auth_queue", &[]).unwrap_or(0.0)
}

fn runs(scrape: &Scrape) -> f64 {
    scrape
        .get("jssocket_auth_verifications_total", &[])
        .unwrap_or(0.0)
}

/// The three ways to present the admin password.
#[derive(Debug, Clone, Copy)]
enum Way {
    Header,
    ServerConnectData,
    HttpApi,
}

/// Presents `password` the `way` given, from `source`; true when admitted.
async fn log_in(server: &Server, source: IpAddr, way: Way, password: &str) -> bool {
    match way {
        Way::Header => {
            let mut conn = Conn::connect_from(server.addr, source, Some(password), "header").await;
            conn.send_text(r#"{"type":"server_connect","data":{}}"#)
                .await;
            server_connect_answer(&mut conn).await
        }
        Way::ServerConnectData => {
            let mut conn = Conn::connect_from(server.addr, source, None, "data").await;
            let frame = serde_json::json!({"type": "server_connect", "data": {"auth": password}});
            conn.send_text(&frame.to_string()).await;
            server_connect_answer(&mut conn).await
        }
        Way::HttpApi => {
            let auth = format!("Bearer {password}");
            let response = http_from(
                server.addr,
                source,
                "POST",
                "/api/notify_all",
                &[("Authorization", &auth)],
                b"{}",
            )
            .await;
            match response.status {
                200 => true,
                401 => false,
                other => panic!("HTTP API: unexpected {other}: {}", response.text()),
            }
        }
    }
}

/// `server_connect`'s answer: `true`, or `false` followed by close 1008 "not an admin".
async fn server_connect_answer(conn: &mut Conn) -> bool {
    match conn.next_event(FLOOD_TIMEOUT).await {
        Some(Event::Text(text)) if text == r#"{"type":"server_connect","data":true}"# => true,
        Some(Event::Text(text)) if text == r#"{"type":"server_connect","data":false}"# => {
            let reason = conn.expect_close_code(1008).await;
            assert_eq!(reason, "not an admin");
            false
        }
        other => panic!(
            "{}: expected a server_connect answer, got {other:?}",
            conn.name
        ),
    }
}

/// 30 wrong passwords from one address, each really verified (bcrypt ran 30 times: no
/// shortcut), then the right one from the same address is accepted.
async fn failures_do_not_lock_the_address_out(way: Way) {
    let server = Server::start().await;
    let me = loopback(1);
    for _ in 0..30 {
        assert!(!log_in(&server, me, way, "wrong password").await);
    }
    assert!(
        log_in(&server, me, way, PASSWORD).await,
        "{way:?}: the right password was refused after failures from its address"
    );
    let scrape = scrape(server.addr).await;
    assert_eq!(runs(&scrape), 31.0, "{way:?}: one bcrypt run per attempt");
    assert_eq!(
        scrape.value("jssocket_auth_failures_total", &[]),
        30.0,
        "{way:?}"
    );
}

#[tokio::test]
async fn header_password_accepted_after_30_failures_from_the_same_address() {
    failures_do_not_lock_the_address_out(Way::Header).await;
}

#[tokio::test]
async fn server_connect_password_accepted_after_30_failures_from_the_same_address() {
    failures_do_not_lock_the_address_out(Way::ServerConnectData).await;
}

#[tokio::test]
async fn http_api_password_accepted_after_30_failures_from_the_same_address() {
    failures_do_not_lock_the_address_out(Way::HttpApi).await;
}

/// Once the right password verified, every other one is refused without bcrypt, whatever
/// way it comes: a wrong one, one longer than bcrypt's 72 bytes (bcrypt only sees those, so
/// their digest decides), one with a NUL byte; and the remembered right one never runs it.
#[tokio::test]
async fn known_password_refuses_others_without_bcrypt() {
    let server = Server::start().await;
    let me = loopback(1);
    assert!(log_in(&server, me, Way::Header, PASSWORD).await);
    assert_eq!(
        counter(server.addr, "jssocket_auth_verifications_total").await,
        1.0
    );
    let long = "w".repeat(73);
    for way in [Way::Header, Way::ServerConnectData, Way::HttpApi] {
        assert!(!log_in(&server, me, way, "wrong password").await, "{way:?}");
        assert!(!log_in(&server, me, way, &long).await, "{way:?}");
        assert!(log_in(&server, me, way, PASSWORD).await, "{way:?}");
    }
    let with_nul = format!("{PASSWORD}\0");
    assert!(!log_in(&server, me, Way::ServerConnectData, &with_nul).await);
    let scrape = scrape(server.addr).await;
    assert_eq!(
        runs(&scrape),
        1.0,
        "bcrypt ran after the right password was known"
    );
    assert_eq!(scrape.value("jssocket_auth_failures_total", &[]), 7.0);
}

/// A password with a NUL byte is refused without bcrypt, as the original relay (Python
/// bcrypt) refuses it, even before any password is known and even when the rest is right.
#[tokio::test]
async fn password_with_nul_is_refused_without_bcrypt() {
    let server = Server::start().await;
    let me = loopback(1);
    let frame = format!(r#"{{"type":"server_connect","data":{{"auth":"{PASSWORD}\u0000"}}}}"#);
    let mut conn = Conn::connect_from(server.addr, me, None, "nul").await;
    conn.send_text(&frame).await;
    assert!(!server_connect_answer(&mut conn).await);
    let scrape = scrape(server.addr).await;
    assert_eq!(runs(&scrape), 0.0, "bcrypt ran for a password with NUL");
    assert_eq!(scrape.value("jssocket_auth_failures_total", &[]), 1.0);
    // The right password itself still verifies.
    assert!(log_in(&server, me, Way::ServerConnectData, PASSWORD).await);
}

/// 20 requesters present the right password at once from one address (a backend host whose
/// workers reconnect together), more than the per-address queue bound: they share one
/// bcrypt run and are all admitted, none refused as busy.
#[tokio::test]
async fn the_same_password_at_once_shares_one_bcrypt_run() {
    const AT_ONCE: usize = 20;
    let hash = slow_hash();
    let server = Server::with_args(&["--auth", &hash]).await;
    let host = loopback(40);
    let ways = [Way::Header, Way::ServerConnectData, Way::HttpApi];
    let logins = join_all((0..AT_ONCE).map(|i| log_in(&server, host, ways[i % 3], PASSWORD)));
    let admitted = timeout(FLOOD_TIMEOUT, logins)
        .await
        .expect("every login answered");
    assert!(admitted.iter().all(|ok| *ok), "{admitted:?}");
    let scrape = scrape(server.addr).await;
    assert_eq!(runs(&scrape), 1.0, "the logins did not share the run");
    assert_eq!(scrape.value("jssocket_auth_busy_total", &[]), 0.0);
}

/// At shutdown, an upgrade whose `auth` header waits for verification is closed with 1001
/// at once, not after its bcrypt run: it waits behind another address's run of a cost-14
/// hash (seconds in a debug build), longer than `--shutdown-timeout 1`, after which the
/// server's runtime would drop it without a close frame.
#[tokio::test]
async fn shutdown_closes_upgrades_waiting_for_verification() {
    // The default hash with its cost raised to 14: valid, slow, and no password matches.
    const COST_14: &str = "$2b$14$h.kWoWbqMCtV3QlUNUsdRevABi7SG0CxKWK5Zs03uqY284yl7WBZq";
    let mut server = Server::with_args(&["--auth", COST_14, "--shutdown-timeout", "1"]).await;
    let addr = server.addr;
    let mut running = Conn::connect_from(addr, loopback(50), Some("first"), "running").await;
    wait_until(addr, "the first verification running", |s| runs(s) == 1.0).await;
    let mut waiting = Conn::connect_from(addr, loopback(51), Some("second"), "waiting").await;
    wait_until(addr, "the second verification queued", |s| queued(s) == 1.0).await;
    server.signal_shutdown();
    for conn in [&mut waiting, &mut running] {
        match conn.next_event(FLOOD_TIMEOUT).await {
            Some(Event::Close(Some((code, _)))) => assert_eq!(code, 1001, "{}", conn.name),
            other => panic!("{}: expected close 1001, got {other:?}", conn.name),
        }
    }
}

/// 10 addresses open 8 wrong-password upgrades each (80 verifications queued at bcrypt cost
/// 10), then close 5 of each at once; the backend then logs in from its own address. It is
/// admitted before the flood's verifications have run: it waits at most for the addresses
/// that have not failed yet and the runs in progress, and once it is in, the remaining wrong
/// passwords are refused without bcrypt. The closed connections' verifications never run.
#[tokio::test]
async fn backend_logs_in_first_under_a_flood_from_ten_addresses() {
    const ADDRESSES: u8 = 10;
    const PER_ADDRESS: usize = 8;
    const CLOSED_PER_ADDRESS: usize = 5;
    let hash = slow_hash();
    let server = Server::with_args(&["--auth", &hash]).await;
    let addr = server.addr;

    let flood = flood(addr, Presented::Header, 2, ADDRESSES, PER_ADDRESS).await;
    let total = flood.len() as f64;
    let (closing, open): (Vec<_>, Vec<_>) = flood
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % PER_ADDRESS < CLOSED_PER_ADDRESS);
    let before_close = runs(&scrape(addr).await);
    drop(closing);

    let backend = async {
        let mut backend = Conn::connect(&server.url(), Some(PASSWORD), "backend").await;
        backend.server_connect().await;
        backend
    };
    let mut backend = timeout(FLOOD_TIMEOUT, backend)
        .await
        .expect("the backend logs in during the flood");
    let at_login = runs(&scrape(addr).await);

    // Every open flood connection is refused; the closed ones are never judged.
    let answers = join_all(open.into_iter().map(|(_, mut conn)| async move {
        assert!(!server_connect_answer(&mut conn).await, "{}", conn.name);
    }));
    timeout(FLOOD_TIMEOUT, answers)
        .await
        .expect("every open flood connection answered");
    let done = wait_until(addr, "queue drained", |s| queued(s) == 0.0).await;
    let open_count = f64::from(ADDRESSES) * (PER_ADDRESS - CLOSED_PER_ADDRESS) as f64;
    assert_eq!(
        done.value("jssocket_auth_failures_total", &[]),
        open_count,
        "exactly the open flood connections were refused"
    );
    let total_runs = runs(&done);
    eprintln!(
        "flood of {total}: {before_close} bcrypt runs before the close, {at_login} at the \
         backend's login, {total_runs} in all"
    );
    // Before the backend: the fresh addresses' first turns, the runs in progress (each
    // worker's, plus a closed one it may have picked before seeing the close), the backend.
    let bound = before_close + f64::from(ADDRESSES) + 2.0 * workers() + 1.0;
    assert!(
        at_login <= bound && total_runs <= bound,
        "bcrypt ran {at_login} times by the backend's login, {total_runs} in all (bound \
         {bound}): the backend waited behind the flood"
    );
    assert!(
        bound < total,
        "the flood ran before it was measured ({before_close} runs of {total}): not a test"
    );
    backend.ping(1, false).await;
}

/// Where a flood connection presents its wrong password.
#[derive(Clone, Copy)]
enum Presented {
    /// The `auth:` upgrade header (checked before the connection is served).
    Header,
    /// The old protocol's `server_connect` data (checked inside the event, on a connection
    /// already upgraded).
    Data,
}

/// `per_address` connections from each of `addresses` source addresses starting at
/// 127.0.0.`first_address`, each presenting its own wrong password (the same password from
/// many requesters shares one bcrypt run) in a `server_connect`; returns once every
/// verification is waiting or has started.
async fn flood(
    addr: SocketAddr,
    presented: Presented,
    first_address: u8,
    addresses: u8,
    per_address: usize,
) -> Vec<Conn> {
    let mut flood = Vec::new();
    for a in 0..addresses {
        for i in 0..per_address {
            let name = format!("flood{a}.{i}");
            let password = format!("wrong {name}");
            let source = loopback(first_address + a);
            let conn = match presented {
                Presented::Header => {
                    let mut conn = Conn::connect_from(addr, source, Some(&password), &name).await;
                    conn.send_text(r#"{"type":"server_connect","data":{}}"#)
                        .await;
                    conn
                }
                Presented::Data => {
                    let mut conn = Conn::connect_from(addr, source, None, &name).await;
                    let event = serde_json::json!(
                        {"type": "server_connect", "data": {"auth": password}}
                    );
                    conn.send_json(&event).await;
                    conn
                }
            };
            flood.push(conn);
        }
    }
    let total = flood.len() as f64;
    wait_until(addr, "flood verifications queued", |s| {
        queued(s) + runs(s) == total
    })
    .await;
    flood
}

/// Requesters that leave while their verification waits cost no bcrypt run: 4 addresses
/// queue 8 wrong-password requests each, 6 of each leave (half with a close frame, half by
/// dropping TCP); only the 2 left of each (and what was already running) are verified. No
/// right password ever verifies here, so nothing is refused by the known-password shortcut.
async fn closed_connections_get_no_bcrypt_run(presented: Presented, first_address: u8) {
    const ADDRESSES: u8 = 4;
    const PER_ADDRESS: usize = 8;
    const KEPT_PER_ADDRESS: usize = 2;
    let hash = slow_hash();
    let server = Server::with_args(&["--auth", &hash]).await;
    let addr = server.addr;
    let flood = flood(addr, presented, first_address, ADDRESSES, PER_ADDRESS).await;
    let total = flood.len() as f64;
    let (open, closing): (Vec<_>, Vec<_>) = flood
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % PER_ADDRESS < KEPT_PER_ADDRESS);
    let before_close = runs(&scrape(addr).await);
    let (polite, rude): (Vec<_>, Vec<_>) = closing.into_iter().partition(|(i, _)| i % 2 == 0);
    drop(rude);
    timeout(
        FLOOD_TIMEOUT,
        join_all(polite.into_iter().map(|(_, conn)| conn.close())),
    )
    .await
    .expect("polite closes answered");

    let answers = join_all(open.into_iter().map(|(_, mut conn)| async move {
        assert!(!server_connect_answer(&mut conn).await, "{}", conn.name);
    }));
    timeout(FLOOD_TIMEOUT, answers)
        .await
        .expect("every open flood connection answered");
    let done = wait_until(addr, "queue drained", |s| queued(s) == 0.0).await;
    let kept = f64::from(ADDRESSES) * KEPT_PER_ADDRESS as f64;
    let total_runs = runs(&done);
    eprintln!("{total} queued, {before_close} ran before the close, {total_runs} in all");
    // The kept ones, and per worker one closed job picked before its close was seen.
    let bound = before_close + kept + workers();
    assert!(
        total_runs <= bound,
        "bcrypt ran {total_runs} times (bound {bound}): closed connections were verified"
    );
    assert!(
        bound < total,
        "the flood ran before it was measured ({before_close} runs of {total}): not a test"
    );
}

#[tokio::test]
async fn closed_connections_get_no_bcrypt_run_for_the_auth_header() {
    closed_connections_get_no_bcrypt_run(Presented::Header, 20).await;
}

/// The verification of `server_connect` data waits inside the event, which still watches
/// the socket, so a requester that leaves withdraws it there too.
#[tokio::test]
async fn closed_connections_get_no_bcrypt_run_for_server_connect_data() {
    closed_connections_get_no_bcrypt_run(Presented::Data, 40).await;
}

/// More verifications than the queue holds for one address: the excess is refused clearly,
/// without being judged — an upgrade is closed with 1008 "authentication busy, retry", the
/// HTTP API answers 503 with Retry-After — and counted in `jssocket_auth_busy_total`; the
/// rest wait their turn and are refused as wrong.
#[tokio::test]
async fn a_full_queue_refuses_as_busy() {
    const FLOOD: usize = 20;
    // Cost 8: slow enough that the queue cannot drain while 20 attempts arrive at once, fast
    // enough that the waiting HTTP requests are answered within the helper's timeout.
    let hash = bcrypt::hash(PASSWORD, 8).expect("hash the test password");
    let server = Server::with_args(&["--auth", &hash]).await;
    let addr = server.addr;
    let upgrades = join_all((0..FLOOD).map(|i| async move {
        let name = format!("ws{i}");
        let password = format!("wrong {name}");
        let mut conn = Conn::connect_from(addr, loopback(30), Some(&password), &name).await;
        conn.send_text(r#"{"type":"server_connect","data":{}}"#)
            .await;
        match conn.next_event(FLOOD_TIMEOUT).await {
            Some(Event::Close(Some((1008, reason)))) => {
                assert_eq!(reason, "authentication busy, retry", "{name}");
                true
            }
            Some(Event::Text(text)) => {
                assert_eq!(text, r#"{"type":"server_connect","data":false}"#, "{name}");
                assert_eq!(conn.expect_close_code(1008).await, "not an admin");
                false
            }
            other => panic!("{name}: expected busy or false, got {other:?}"),
        }
    }));
    let requests = join_all((0..FLOOD).map(|i| async move {
        let auth = format!("Bearer wrong {i}");
        http_from(
            addr,
            loopback(31),
            "POST",
            "/api/notify_all",
            &[("Authorization", &auth)],
            b"{}",
        )
        .await
    }));
    let (upgrades, responses) = timeout(FLOOD_TIMEOUT, async { tokio::join!(upgrades, requests) })
        .await
        .expect("every flood attempt answered");
    let busy_upgrades = upgrades.iter().filter(|busy| **busy).count();
    let busy: Vec<_> = responses.iter().filter(|r| r.status == 503).collect();
    eprintln!(
        "busy: {busy_upgrades} of {FLOOD} upgrades, {} of {FLOOD} API requests",
        busy.len()
    );
    assert!((1..FLOOD).contains(&busy_upgrades), "{busy_upgrades}");
    assert!(!busy.is_empty() && busy.len() < FLOOD);
    assert!(
        responses.iter().all(|r| r.status == 503 || r.status == 401),
        "{responses:?}"
    );
    for response in &busy {
        assert_eq!(response.header("retry-after"), Some("1"));
        let error = response.json();
        assert_eq!(error["error"]["code"], "rate_limited");
        assert!(error["error"]["message"].as_str().unwrap().contains("busy"));
    }
    let scrape = scrape(addr).await;
    assert_eq!(
        scrape.value("jssocket_auth_busy_total", &[]),
        (busy_upgrades + busy.len()) as f64
    );
    assert_eq!(
        scrape.value("jssocket_auth_failures_total", &[]),
        (2 * FLOOD - busy_upgrades - busy.len()) as f64,
        "the others were judged wrong"
    );
}

/// `--metrics-auth on`: `/metrics` needs the admin password (401 without or wrong), and
/// serves the text with it, in either header.
#[tokio::test]
async fn metrics_auth_on_requires_the_admin_password() {
    let server = Server::with_args(&["--metrics-auth", "on"]).await;
    let get = |headers: &'static [(&'static str, &'static str)]| {
        http(server.addr, "GET", "/metrics", headers, b"")
    };
    assert_eq!(get(&[]).await.status, 401);
    assert_eq!(get(&[("Authorization", "Bearer wrong")]).await.status, 401);
    let bearer = format!("Bearer {PASSWORD}");
    let response = http(
        server.addr,
        "GET",
        "/metrics",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(response.status, 200);
    let scrape = Scrape::parse(&response.text());
    assert_eq!(scrape.get("jssocket_auth_failures_total", &[]), Some(1.0));
    assert!(scrape.get("jssocket_auth_queue", &[]).is_some());
    let response = http(server.addr, "GET", "/metrics", &[("auth", PASSWORD)], b"").await;
    assert_eq!(response.status, 200);

    // Off (the default): open to any scraper.
    let open = Server::start().await;
    assert_eq!(
        http(open.addr, "GET", "/metrics", &[], b"").await.status,
        200
    );
}

/// An attacker behind the backend's own address (a NAT) keeps the address's share of the
/// queue full with fresh wrong passwords, each answered at once by the next; the backend
/// retries its right password after every "busy". Its retries make it the most asked for,
/// so it takes a waiting place instead of being refused for ever, and gets in within a
/// bounded number of tries.
#[tokio::test]
async fn the_backend_behind_a_flooding_nat_gets_in_by_retrying() {
    const FLOODERS: usize = 16;
    const TRIES: usize = 40;
    let hash = slow_hash();
    let server = Server::with_args(&["--auth", &hash]).await;
    let addr = server.addr;
    let nat = loopback(40);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|f| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let auth = format!("Bearer wrong {f} {n}");
                    let headers = [("Authorization", auth.as_str())];
                    let request = http_from(addr, nat, "POST", "/api/notify_all", &headers, b"{}");
                    let _ = timeout(FLOOD_TIMEOUT, request).await;
                    n += 1;
                }
            })
        })
        .collect();
    // The share is full before the backend starts.
    wait_until(addr, "attacker's queue full", |s| queued(s) >= 8.0).await;
    let auth = format!("Bearer {PASSWORD}");
    let mut tries = 0;
    let admitted = loop {
        tries += 1;
        // Admitted, it waits behind the share's queued checks (bcrypt cost 10 each): a
        // second when the machine is quiet, more under a loaded test run.
        let response = http_from_within(
            Duration::from_secs(30),
            addr,
            nat,
            "POST",
            "/api/notify_all",
            &[("Authorization", &auth)],
            b"{}",
        )
        .await;
        match response.status {
            200 => break true,
            503 if tries < TRIES => tokio::time::sleep(Duration::from_millis(100)).await,
            503 => break false,
            other => panic!("backend: unexpected {other}: {}", response.text()),
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let busy = counter(addr, "jssocket_auth_busy_total").await;
    for flooder in flooders {
        let _ = timeout(FLOOD_TIMEOUT, flooder).await;
    }
    eprintln!("backend admitted after {tries} tries; {busy} busy refusals in all");
    assert!(admitted, "backend still busy after {TRIES} tries");
    assert!(busy >= 1.0, "the attacker did fill the share");
}
