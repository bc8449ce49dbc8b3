//! Redis as the cluster's [`Transport`]: one Redis with Pub/Sub ([`Redis`]), or a Redis
//! Cluster with sharded Pub/Sub ([`RedisCluster`], Redis 7 or later), so that Redis scales
//! out with the relay: each topic lives on the shard that owns its slot, and a message is
//! only sent to the shard of its topic and the nodes subscribed there.
//!
//! `--redis-url` names one Redis (`redis://host:port/`) or, as a comma-separated list of two
//! or more seed nodes, a Redis Cluster (`redis://a:7000,redis://b:7001`).

use std::sync::Arc;

use futures_util::StreamExt;
use redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection, PubSubSink, SendError};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Pipeline, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use crate::backplane::{
    BoxFuture, Publisher, Subscription, Subscriptions, Transport, TransportError,
};
use crate::warn_throttled;

/// The transport `url` names (see the module's documentation).
pub fn transport(url: &str) -> RedisResult<Arc<dyn Transport>> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    match urls.as_slice() {
        [one] => Ok(Arc::new(Redis {
            client: redis::Client::open(*one)?,
        })),
        seeds => Ok(Arc::new(RedisCluster::new(seeds)?)),
    }
}

/// `url` (one URL or a comma-separated list) as logs, `/readyz` and error messages show it:
/// the password of each URL (`redis://:pw@host`, `redis://user:pw@host`, `rediss://…`; a
/// user name alone may be a password too) and any `pass…` query parameter become `***`.
/// Works on text that does not parse as a URL, so a mistyped one is shown safely too.
pub fn redacted(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The last `@` ends the user information, even when the password holds a `/` or `?`.
    let (authority, tail) = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, after) = rest.split_at(at);
            let hidden = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            (hidden, after)
        }
        None => (String::new(), rest),
    };
    let tail = match tail.split_once('?') {
        Some((before, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.to_ascii_lowercase().contains("pass") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{before}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// The secrets `url` holds (see [`redacted`]), to scrub from text that might echo them (an
/// error message from the Redis client).
pub fn secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    for one in url.split(',') {
        let rest = one.split_once("://").map_or(one, |(_, rest)| rest);
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            found.push(
                userinfo
                    .split_once(':')
                    .map_or(userinfo, |(_, pw)| pw)
                    .to_string(),
            );
        }
        if let Some((_, query)) = rest.split_once('?') {
            for (key, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
                if key.to_ascii_lowercase().contains("pass") {
                    found.push(value.to_string());
                }
            }
        }
    }
    found.retain(|secret| !secret.is_empty());
    found
}

/// One Redis: `PUBLISH`, and a dedicated Pub/Sub connection per subscription.
pub struct Redis {
    client: redis::Client,
}

impl Transport for Redis {
    fn publisher(&self) -> BoxFuture<'_, Result<Box<dyn Publisher>, TransportError>> {
        Box::pin(async move {
            let connection = self.client.get_multiplexed_async_connection().await?;
            Ok(Box::new(RedisPublisher(connection)) as Box<dyn Publisher>)
        })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Subscription, TransportError>> {
        Box::pin(async move {
            let (sink, stream) = self.client.get_async_pubsub().await?.split();
            // Read as Redis sends them: the socket's flow control bounds what waits here.
            let messages = stream.map(|message| {
                let topic = message.get_channel_name().to_string();
                (topic, message.get_payload_bytes().to_vec())
            });
            Ok(Subscription {
                control: Box::new(RedisSubscriptions(sink)),
                messages: Box::pin(messages),
            })
        })
    }
}

struct RedisPublisher(MultiplexedConnection);

impl Publisher for RedisPublisher {
    fn publish_batch<'a>(
        &'a mut self,
        batch: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            // A pipeline: one write, the replies read after it.
            let messages = batch
                .iter()
                .map(|(topic, message)| (topic.as_str(), message.as_str()));
            pipeline("PUBLISH", messages)
                .query_async::<()>(&mut self.0)
                .await?;
            Ok(())
        })
    }

    fn publish<'a>(
        &'a mut self,
        topic: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(publish_with(&mut self.0, "PUBLISH", topic, message))
    }

    fn subscribers<'a>(&'a mut self, topic: &'a str) -> BoxFuture<'a, Option<usize>> {
        Box::pin(subscribers_with(&mut self.0, "NUMSUB", topic))
    }
}

struct RedisSubscriptions(PubSubSink);

impl Subscriptions for RedisSubscriptions {
    fn subscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { Ok(self.0.subscribe(topics).await?) })
    }

    fn unsubscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { Ok(self.0.unsubscribe(topics).await?) })
    }
}

/// `command` (`PUBLISH` or `SPUBLISH`) of one message.
async fn publish_with(
    connection: &mut impl ConnectionLike,
    command: &str,
    topic: &str,
    message: &str,
) -> Result<(), TransportError> {
    redis::cmd(command)
        .arg(topic)
        .arg(message)
        .query_async::<i64>(connection)
        .await?;
    Ok(())
}

/// `command` (`PUBLISH` or `SPUBLISH`) of each (topic, message), in one pipeline.
fn pipeline<'a>(command: &str, messages: impl Iterator<Item = (&'a str, &'a str)>) -> Pipeline {
    let mut pipe = redis::pipe();
    for (topic, message) in messages {
        pipe.cmd(command).arg(topic).arg(message).ignore();
    }
    pipe
}

/// `PUBSUB <subcommand> <topic>` (`NUMSUB` or `SHARDNUMSUB`): the topic's subscribers, `None`
/// when the answer cannot be had.
async fn subscribers_with(
    connection: &mut impl ConnectionLike,
    subcommand: &str,
    topic: &str,
) -> Option<usize> {
    let counts: RedisResult<(String, i64)> = redis::cmd("PUBSUB")
        .arg(subcommand)
        .arg(topic)
        .query_async(connection)
        .await;
    counts.ok().map(|(_, n)| usize::try_from(n).unwrap_or(0))
}

// ----------------------------------------------------------------------- Redis Cluster

/// Messages, and bytes, received and not yet applied, per subscription, beyond which the
/// newest are dropped (and a warning logged): the cluster connection reads pushes as fast as
/// Redis sends them, so this is the bound on what a node that cannot keep up holds.
const MAX_UNAPPLIED: usize = 100_000;
const MAX_UNAPPLIED_BYTES: usize = 64 * 1024 * 1024;

/// A Redis Cluster: `SPUBLISH` to the shard of a topic's slot, `SSUBSCRIBE` there. The
/// cluster connection follows slot moves and failovers and subscribes again by itself.
pub struct RedisCluster {
    client: ClusterClient,
    seeds: Vec<String>,
}

impl RedisCluster {
    fn new(seeds: &[&str]) -> RedisResult<RedisCluster> {
        let client = ClusterClient::new(seeds.to_vec())?;
        Ok(RedisCluster {
            client,
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
        })
    }
}

impl Transport for RedisCluster {
    fn publisher(&self) -> BoxFuture<'_, Result<Box<dyn Publisher>, TransportError>> {
        Box::pin(async move {
            let connection = self.client.get_async_connection().await?;
            Ok(Box::new(ClusterPublisher(connection)) as Box<dyn Publisher>)
        })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Subscription, TransportError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(MAX_UNAPPLIED);
            let shared = Arc::new(Shards::default());
            let pushes = Pushes {
                tx,
                shards: Arc::clone(&shared),
            };
            let client = redis::cluster::ClusterClientBuilder::new(self.seeds.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes)
                .build()?;
            let connection = client.get_async_connection().await?;
            let _ = shared.connection.set(connection.clone());
            let lost = shared.lost.clone();
            // Ends when a connection to a shard is lost: the node then subscribes to
            // everything again, where the slots are now.
            let held = Arc::clone(&shared.unapplied);
            let messages = futures_util::stream::unfold((rx, lost), move |(mut rx, lost)| {
                let held = Arc::clone(&held);
                async move {
                    tokio::select! {
                        message = rx.recv() => message.map(|message: (String, Vec<u8>)| {
                            held.fetch_sub(message.1.len(), std::sync::atomic::Ordering::Relaxed);
                            (message, (rx, lost))
                        }),
                        _ = lost.cancelled() => None,
                    }
                }
            });
            Ok(Subscription {
                control: Box::new(ClusterSubscriptions {
                    connection,
                    shards: shared,
                }),
                messages: Box::pin(messages),
            })
        })
    }
}

struct ClusterPublisher(ClusterConnection);

impl Publisher for ClusterPublisher {
    fn publish_batch<'a>(
        &'a mut self,
        batch: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            // Each topic's messages in one pipeline (one slot, one shard, in order: the order
            // receivers rely on), the topics side by side.
            let mut by_topic: Vec<(&str, Vec<&str>)> = Vec::new();
            for (topic, message) in batch {
                match by_topic.iter_mut().find(|(t, _)| t == topic) {
                    Some((_, messages)) => messages.push(message),
                    None => by_topic.push((topic, vec![message])),
                }
            }
            let sends = by_topic.into_iter().map(|(topic, messages)| {
                let mut connection = self.0.clone();
                let pipe = pipeline("SPUBLISH", messages.into_iter().map(|m| (topic, m)));
                async move { pipe.query_async::<()>(&mut connection).await }
            });
            for sent in futures_util::future::join_all(sends).await {
                sent?;
            }
            Ok(())
        })
    }

    fn publish<'a>(
        &'a mut self,
        topic: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(publish_with(&mut self.0, "SPUBLISH", topic, message))
    }

    fn subscribers<'a>(&'a mut self, topic: &'a str) -> BoxFuture<'a, Option<usize>> {
        // On the shard that owns the topic.
        Box::pin(subscribers_with(&mut self.0, "SHARDNUMSUB", topic))
    }
}

struct ClusterSubscriptions {
    connection: ClusterConnection,
    shards: Arc<Shards>,
}

/// What the push handler needs to keep a subscription where its slot is.
///
/// When a slot moves to another master (a reshard), Redis ends the sharded subscriptions of
/// its channels with a `sunsubscribe` the client did not ask for: the handler subscribes
/// again to every topic it sees ended that this node did not leave. A failover ends them with
/// the connection: the subscription ends ([`Shards::lost`]) and is made anew.
#[derive(Default)]
struct Shards {
    /// The subscription's connection (set once it exists), to subscribe again with.
    connection: std::sync::OnceLock<ClusterConnection>,
    /// Topics this node is unsubscribing from: their `sunsubscribe` is expected.
    leaving: std::sync::Mutex<std::collections::HashSet<String>>,
    /// A connection to a shard was lost (its master died, say): the subscription ends. The
    /// cluster connection would reconnect to that address, and learn the new master only
    /// when a request of its own is refused, which a subscriber never sends.
    lost: tokio_util::sync::CancellationToken,
    /// Bytes of messages received and not yet taken by the subscriber.
    unapplied: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shards {
    fn leaving(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.leaving.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Subscriptions for ClusterSubscriptions {
    fn subscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // One command per topic (topics of one command must share a slot), all sent before
        // any confirmation is awaited: one round trip for the batch, not one per topic.
        Box::pin(async move {
            let subscribes = topics.iter().map(|topic| {
                let mut connection = self.connection.clone();
                async move { connection.ssubscribe(topic).await }
            });
            for subscribed in futures_util::future::join_all(subscribes).await {
                subscribed?;
            }
            Ok(())
        })
    }

    fn unsubscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            for topic in topics {
                self.shards.leaving().insert(topic.clone());
                let left = self.connection.sunsubscribe(topic).await;
                if left.is_err() {
                    self.shards.leaving().remove(topic);
                }
                left?;
            }
            Ok(())
        })
    }
}

/// Takes the cluster connection's pushes: sharded messages go to the subscriber, bounded.
struct Pushes {
    tx: mpsc::Sender<(String, Vec<u8>)>,
    shards: Arc<Shards>,
}

impl Pushes {
    /// A sharded subscription ended: expected when this node left the topic; else its slot
    /// moved, and the topic is subscribed again where the slot now is.
    fn unsubscribed(&self, channel: Option<Value>) {
        let Some(Value::BulkString(channel)) = channel else {
            return;
        };
        let topic = String::from_utf8_lossy(&channel).into_owned();
        if self.shards.leaving().remove(&topic) {
            return;
        }
        let Some(connection) = self.shards.connection.get() else {
            return;
        };
        let mut connection = connection.clone();
        let lost = self.shards.lost.clone();
        tokio::spawn(async move {
            // The connection follows the slot (MOVED) to its new master. Failing that, the
            // subscription ends and everything is subscribed again.
            if let Err(e) = connection.ssubscribe(&topic).await {
                warn_throttled!(error = %e, "cluster: cannot subscribe again after a slot moved");
                lost.cancel();
            }
        });
    }
}

impl AsyncPushSender for Pushes {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        if info.kind == PushKind::Disconnection {
            self.shards.lost.cancel();
            return Ok(());
        }
        if info.kind == PushKind::SUnsubscribe {
            self.unsubscribed(info.data.into_iter().next());
            return Ok(());
        }
        if info.kind != PushKind::SMessage {
            return Ok(());
        }
        let mut data = info.data.into_iter();
        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
            return Ok(());
        };
        let text = |value: Value| match value {
            Value::BulkString(bytes) => Some(bytes),
            Value::SimpleString(text) => Some(text.into_bytes()),
            _ => None,
        };
        let (Some(channel), Some(payload)) = (text(channel), text(payload)) else {
            return Ok(());
        };
        let topic = String::from_utf8_lossy(&channel).into_owned();
        let len = payload.len();
        let unapplied = &self.shards.unapplied;
        if unapplied.load(std::sync::atomic::Ordering::Relaxed) + len > MAX_UNAPPLIED_BYTES {
            warn_throttled!("cluster: messages arrive faster than they are applied; dropped");
            return Ok(());
        }
        // Counted before it can be taken, so the count never goes below zero.
        unapplied.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        match self.tx.try_send((topic, payload)) {
            Ok(()) => Ok(()),
            Err(refused) => {
                unapplied.fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
                match refused {
                    mpsc::error::TrySendError::Full(_) => {
                        warn_throttled!(
                            "cluster: messages arrive faster than they are applied; dropped"
                        );
                        Ok(())
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(SendError),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_every_form() {
        for (url, shown) in [
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            (
                "redis://user:s3cret@host:6379/",
                "redis://user:***@host:6379/",
            ),
            (
                "rediss://default:s3cret@host/",
                "rediss://default:***@host/",
            ),
            ("redis://s3cret@host", "redis://***@host"),
            ("redis://:s3/c?r@t@host/", "redis://:***@host/"),
            ("redis://host:6379/", "redis://host:6379/"),
            (
                "redis+unix:///run/r.sock?pass=s3cret&db=1",
                "redis+unix:///run/r.sock?pass=***&db=1",
            ),
            (
                "redis://:s3cret@a:7000,redis://:s3cret@b:7001",
                "redis://:***@a:7000,redis://:***@b:7001",
            ),
            ("not a url :s3cret@", "not a url :***@"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
            assert!(!redacted(url).contains("s3cret"));
        }
        assert_eq!(
            secrets("redis://u:pw1@a,redis://:pw2@b?password=pw3"),
            ["pw1", "pw2", "pw3"]
        );
        assert!(secrets("redis://host/").is_empty());
    }
}
