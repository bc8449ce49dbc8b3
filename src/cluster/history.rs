//! Channel history in Redis (SPEC §13 in a cluster): the I/O only. What is kept, and in what
//! order it is delivered, is [`crate::history`]'s.
//!
//! Per channel, three keys in one hash slot (`{jssocket:h:<channel>}`, so a Redis Cluster
//! keeps them together): `…:n`, the latest offset (`INCR`: an offset is given once,
//! cluster-wide); `…:e`, the epoch (made by the first publication after the keys were lost,
//! so a Redis that lost them gives a new one); `…:s`, a Stream of the stamped frames with ids
//! `0-<offset>` (so a read after an offset is one `XRANGE`), trimmed to the rule's count
//! (`MAXLEN`) and age (`MINID`, from the head, in the script). Every key expires after the
//! rule's age without a publication: Redis holds at most count × frames per channel, and
//! forgets quiet channels.
//!
//! Both scripts run atomically: the offset, the epoch and the entry never disagree.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisResult};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::history::{Entry, Retention};
use crate::hub::Filter;

/// Stamps and keeps one publication. KEYS: stream, offset, epoch. ARGV: the unstamped frame,
/// the filter (JSON), count, age (ms), an epoch to use if there is none. Returns
/// `{offset, epoch}`.
const PUBLISH: &str = r#"
local epoch = redis.call('GET', KEYS[3])
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  epoch = ARGV[5]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2])
end
local offset = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local frame = string.sub(ARGV[1], 1, -3) .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}}'
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '0-' .. offset, 'f', frame, 'x', ARGV[2], 't', ms)
local cutoff = ms - tonumber(ARGV[4])
local cut = nil
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 16)) do
  if tonumber(e[2][6]) >= cutoff then break end
  cut = tonumber(string.sub(e[1], 3))
end
if cut then redis.call('XTRIM', KEYS[1], 'MINID', '0-' .. (cut + 1)) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return {offset, epoch}
"#;

/// Reads a channel's position and what it keeps after an offset. KEYS: stream, offset,
/// epoch. ARGV: the offset to read after, most entries. Returns `{epoch, latest, entries}`;
/// a channel without keys is `{"", 0, {}}` (nothing is created for a reader).
const READ: &str = r#"
local epoch = redis.call('GET', KEYS[3])
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  return {'', 0, {}}
end
local entries = redis.call('XRANGE', KEYS[1], '0-' .. (tonumber(ARGV[1]) + 1), '+', 'COUNT', ARGV[2])
return {epoch, latest, entries}
"#;

/// Offsets a client may name that Lua's numbers (doubles) still count exactly.
const MAX_EXACT: u64 = 1 << 52;

/// Where history lives in a cluster.
pub struct Store {
    client: Client,
    /// One connection, made on first use and again after an error.
    connection: Mutex<Option<Connection>>,
}

/// One of each per node: the size of the bigger variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Client {
    One(redis::Client),
    Cluster(ClusterClient),
}

#[derive(Clone)]
enum Connection {
    /// With the SHA of [`PUBLISH`], loaded when it connected: a publication then sends the
    /// SHA, not the script (a Redis that restarted without it fails the batch, and the
    /// connection is made and the script loaded again).
    One(MultiplexedConnection, Arc<str>),
    Cluster(ClusterConnection),
}

/// A read of a channel: its epoch (`""`: never published, or forgotten), latest offset, and
/// the entries asked for, oldest first.
pub struct Read {
    pub epoch: String,
    pub latest: u64,
    pub entries: Vec<Entry>,
}

/// Longest wait for Redis to answer one history command (see [`Store::connection`]).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// The Redis (or Redis Cluster: a comma-separated list of seeds) at `url`, as
    /// `--redis-url` names it.
    pub fn new(url: &str) -> RedisResult<Store> {
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let client = match urls.as_slice() {
            [one] => Client::One(redis::Client::open(*one)?),
            seeds => Client::Cluster(
                ClusterClient::builder(seeds.to_vec())
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?,
            ),
        };
        Ok(Store {
            client,
            connection: Mutex::new(None),
        })
    }

    async fn connection(&self) -> RedisResult<Connection> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref() {
            return Ok(connection.clone());
        }
        let connection = match &self.client {
            Client::One(client) => {
                let mut connection = client.get_multiplexed_async_connection().await?;
                // Reads share this connection with publication batches (up to 256 scripts
                // each): on a busy Redis or machine a read may wait longer than the client's
                // default 500 ms, and a subscriber would be told to retry for nothing.
                connection.set_response_timeout(RESPONSE_TIMEOUT);
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(PUBLISH)
                    .query_async(&mut connection)
                    .await?;
                Connection::One(connection, Arc::from(sha))
            }
            Client::Cluster(client) => Connection::Cluster(client.get_async_connection().await?),
        };
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets a connection that failed: the next call makes another.
    async fn failed(&self) {
        *self.connection.lock().await = None;
    }

    /// Stamps and keeps publications, in order: `(channel, retention, unstamped frame,
    /// filter)` each. One pipeline on one Redis (Redis runs them in order); one after the
    /// other on a Redis Cluster, whose pipelines may not span slots.
    pub async fn publish(
        &self,
        batch: &[(Arc<str>, Retention, Utf8Bytes, Filter)],
        proposed_epoch: &str,
    ) -> RedisResult<Vec<(u64, String)>> {
        match self.publish_once(batch, proposed_epoch).await {
            // A Redis restarted since the script was loaded: load it again, once.
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.publish_once(batch, proposed_epoch).await
            }
            result => result,
        }
    }

    async fn publish_once(
        &self,
        batch: &[(Arc<str>, Retention, Utf8Bytes, Filter)],
        proposed_epoch: &str,
    ) -> RedisResult<Vec<(u64, String)>> {
        let connection = self.connection().await?;
        let (command, script) = match &connection {
            Connection::One(_, sha) => ("EVALSHA", Arc::clone(sha)),
            Connection::Cluster(_) => ("EVAL", Arc::from(PUBLISH)),
        };
        let commands: Vec<Cmd> = batch
            .iter()
            .map(|(channel, keep, frame, filter)| {
                let [stream, offset, epoch] = keys(channel);
                let filter = serde_json::to_string(filter).unwrap_or_else(|_| "null".into());
                let mut cmd = redis::cmd(command);
                cmd.arg(&*script)
                    .arg(3)
                    .arg(stream)
                    .arg(offset)
                    .arg(epoch)
                    .arg(frame.as_str())
                    .arg(filter)
                    .arg(keep.count)
                    .arg(keep.age.as_millis() as u64)
                    .arg(proposed_epoch);
                cmd
            })
            .collect();
        let result = match connection {
            Connection::One(mut connection, _) => {
                let mut pipe = redis::pipe();
                for cmd in &commands {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async::<Vec<(u64, String)>>(&mut connection)
                    .await
            }
            Connection::Cluster(mut connection) => {
                let mut out = Vec::with_capacity(commands.len());
                let mut failed = None;
                for cmd in &commands {
                    match cmd.query_async::<(u64, String)>(&mut connection).await {
                        Ok(stamped) => out.push(stamped),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(out),
                }
            }
        };
        if result.is_err() {
            self.failed().await;
        }
        result
    }

    /// A channel's epoch, latest offset and up to `count` entries after offset `after`
    /// (none younger than `keep.age` is left out: an aged one reads as lost).
    pub async fn read(
        &self,
        channel: &str,
        after: u64,
        count: usize,
        keep: Retention,
    ) -> RedisResult<Read> {
        let [stream, offset, epoch] = keys(channel);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ)
            .arg(3)
            .arg(stream)
            .arg(offset)
            .arg(epoch)
            .arg(after.min(MAX_EXACT))
            .arg(count.max(1));
        type Raw = (String, u64, Vec<(String, Vec<String>)>);
        let raw: RedisResult<Raw> = match self.connection().await? {
            Connection::One(mut connection, _) => cmd.query_async(&mut connection).await,
            Connection::Cluster(mut connection) => cmd.query_async(&mut connection).await,
        };
        let (epoch, latest, raw) = match raw {
            Ok(raw) => raw,
            Err(e) => {
                self.failed().await;
                return Err(e);
            }
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let now = Instant::now();
        let entries = raw
            .into_iter()
            .filter_map(|(id, fields)| entry(&id, fields, now, now_ms, keep.age))
            .collect();
        Ok(Read {
            epoch,
            latest,
            entries,
        })
    }
}

/// One Stream entry (`0-<offset>`, fields `f`, `x`, `t`) as kept here; `None` if it is
/// malformed or aged out. A filter that does not read back fails closed (nobody).
fn entry(id: &str, fields: Vec<String>, now: Instant, now_ms: u64, age: Duration) -> Option<Entry> {
    let offset: u64 = id.strip_prefix("0-")?.parse().ok()?;
    let (mut frame, mut filter, mut at) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match name.as_str() {
            "f" => frame = Some(value),
            "x" => filter = Some(value),
            "t" => at = value.parse::<u64>().ok(),
            _ => {}
        }
    }
    let old = Duration::from_millis(now_ms.saturating_sub(at?));
    if old > age {
        return None;
    }
    let filter = filter
        .and_then(|f| serde_json::from_str(&f).ok())
        .unwrap_or(Filter::Clients(Vec::new()));
    Some(Entry {
        offset,
        at: now.checked_sub(old).unwrap_or(now),
        frame: Utf8Bytes::from(frame?),
        filter,
    })
}

/// The channel's keys: stream, latest offset, epoch (one hash slot).
fn keys(channel: &str) -> [String; 3] {
    ["s", "n", "e"].map(|k| format!("{{jssocket:h:{channel}}}:{k}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channels_keys_share_a_slot_and_entries_read_back() {
        let keys = keys("orders.1");
        assert!(keys.iter().all(|k| k.starts_with("{jssocket:h:orders.1}:")));
        let now = Instant::now();
        let fields = |t: &str| {
            ["f", "{}", "x", "\"all\"", "t", t]
                .map(String::from)
                .to_vec()
        };
        let e = entry("0-7", fields("1000"), now, 1500, Duration::from_secs(1)).expect("entry");
        assert_eq!((e.offset, e.filter), (7, Filter::All));
        assert!(entry("0-7", fields("1000"), now, 5000, Duration::from_secs(1)).is_none());
        assert!(entry("5-7", fields("1000"), now, 1500, Duration::from_secs(1)).is_none());
    }
}
