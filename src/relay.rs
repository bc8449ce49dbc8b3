//! The relay: what every task shares (configuration, the hub, the authenticator, metrics,
//! budgets, the backplane, the shutdown signal), and the one delivery path.
//!
//! [`Relay::deliver`] is how every notification reaches its recipients, whether it came from
//! a WebSocket event or the HTTP API: delivered to this node's connections, then passed to
//! the backplane for the other nodes, which call [`Relay::receive`] with the same value and
//! deliver it with the same code.

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::backplane::{Backplane, Local, Topic, channel_bucket};
use crate::config::Config;
use crate::delivery::{Delivery, Route, Sender};
use crate::hub::{Acknowledgement, Hub, looks_like_id};
use crate::invoke::{Invocations, Outcome, Reply};
use crate::kinds::Frame;
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::overload::Overload;
use crate::peer::{Peer, Wire};
use crate::pool::Forwarded;
use crate::protocol::{ProtocolError, event_frame, push_json_string};
use crate::server::Gate;
use crate::signalr::{Form, Notice};

pub struct Relay {
    pub config: Config,
    pub hub: Hub,
    pub auth: Authenticator,
    pub metrics: Metrics,
    /// The memory budget over every outbound queue and partial inbound message.
    pub memory: Arc<Memory>,
    /// Holds clients' messages back while the runtime lags.
    pub overload: Overload,
    /// The other nodes: [`Local`] on a single node.
    pub backplane: Arc<dyn Backplane>,
    /// Cancelled when the server shuts down; every connection task watches it.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket tasks (and the backplane's farewell) so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// The listener's connection counts and reserve.
    pub(crate) gate: Gate,
    /// SignalR connections negotiated and not yet connected.
    pub signalr: crate::signalr::Negotiations,
    /// Client → backend calls of this node's connections waiting for their results.
    pub invocations: Invocations,
    /// Presence queries asked and answered here, bounded (see [`crate::presence`]).
    pub presence: crate::presence::Presence,
}

/// A client's call, checked, to forward to a server (see [`Relay::invoke`]).
pub struct Call<'a> {
    /// Canonical JSON of the caller's id; `None` for a SignalR `send`, which expects no
    /// result (the server gets `"id":null`).
    pub id: Option<Box<str>>,
    pub method: &'a str,
    /// Raw JSON of the call's `data`.
    pub data: &'a str,
    pub reply: Reply,
}

/// What became of a delivery here.
struct Here {
    delivered: usize,
    /// Where it goes beyond this node, and in what form.
    onward: Option<(Route, Delivery)>,
    /// A group named through a connection id was resolved here: the other nodes that have
    /// members learn the group's name from this node.
    resolved: bool,
}

impl Relay {
    /// The state of a server that has not started listening: empty hub, fresh authenticator,
    /// the backplane the configuration asks for (`--redis-url`), else [`Local`].
    pub fn new(config: Config) -> Relay {
        let backplane: Arc<dyn Backplane> = match config.redis_url.as_deref() {
            Some(url) => match crate::cluster::redis::transport(url) {
                Ok(transport) => Arc::new(crate::cluster::Cluster::new(transport)),
                // Checked when the configuration was read; unreachable in practice.
                Err(_) => Arc::new(Local::new()),
            },
            None => Arc::new(Local::new()),
        };
        Relay::with_backplane(config, backplane)
    }

    /// A relay on the given backplane (tests put several nodes on one
    /// [`crate::backplane::Loopback`]).
    pub fn with_backplane(config: Config, backplane: Arc<dyn Backplane>) -> Relay {
        let metrics = Metrics::new();
        Relay {
            hub: Hub::new(
                config.pending_connects,
                config.pending_timeout,
                backplane.node_tag(),
                backplane.interest(),
                &config.signalr_notify_method,
            ),
            signalr: crate::signalr::Negotiations::new(),
            invocations: Invocations::new(config.invoke_timeout),
            presence: crate::presence::Presence::default(),
            auth: Authenticator::new(config.auth.clone(), metrics.auth.clone()),
            memory: Arc::new(Memory::new(config.max_memory, &metrics)),
            overload: Overload::new(config.overload_lag, &metrics),
            metrics,
            backplane,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            gate: Gate::new(&config),
            config,
        }
    }

    /// Delivers to this node's connections and passes the delivery on to the other nodes
    /// concerned. Returns how many connections of this node got it. A client's delivery may
    /// be refused by the backplane (after its local part was delivered).
    pub fn deliver(&self, delivery: Delivery, sender: Sender<'_>) -> Result<usize, ProtocolError> {
        // (In a cluster only: a single node has nothing to pass on.)
        if let Sender::Client(client) = sender
            && self.hub.interest().is_some()
        {
            // Refused before anyone here gets it: a retry then reaches everyone once.
            let local_target = match &delivery {
                Delivery::Client { target, .. } => self.hub.client(target).is_some(),
                _ => false,
            };
            if !local_target {
                self.backplane.room_for(self, client, delivery.size())?;
            }
        }
        let here = self.deliver_here(delivery)?;
        if let Some((route, delivery)) = here.onward {
            self.backplane.publish(self, route, delivery, sender)?;
        }
        Ok(here.delivered)
    }

    /// A delivery from another node: delivered here only, except a group named through a
    /// connection id of this node, which now goes to that group's other members.
    pub fn receive(&self, delivery: Delivery, sender: Sender<'_>) {
        let Ok(here) = self.deliver_here(delivery) else {
            return;
        };
        if here.resolved
            && let Some((route, delivery)) = here.onward
        {
            // A client's: refused only when the client lane is full (counted there).
            let _ = self.backplane.publish(self, route, delivery, sender);
        }
    }

    /// The local part of every delivery.
    fn deliver_here(&self, delivery: Delivery) -> Result<Here, ProtocolError> {
        let hub = &self.hub;
        let here = |delivered, onward| Here {
            delivered,
            onward,
            resolved: false,
        };
        Ok(match delivery {
            Delivery::All { frame } => {
                let n = hub.notify_all(&frame);
                self.metrics.sent(Frame::NotifyAll, n, frame.len());
                here(n, Some((Route::All, Delivery::All { frame })))
            }
            Delivery::Client { target, frame } => match hub.client(&target) {
                Some(client) => {
                    let n = usize::from(hub.send_to(&client, &frame, Form::Notify(Notice::Client)));
                    self.metrics.sent(Frame::NotifyClient, n, frame.len());
                    here(n, None)
                }
                None if self.backplane.elsewhere(&target) => {
                    let route = Route::Owner(target.clone());
                    here(0, Some((route, Delivery::Client { target, frame })))
                }
                None => here(0, None),
            },
            Delivery::Group { group, frame } => {
                let n = self.notify_group(&group, &frame);
                here(
                    n,
                    Some((
                        Route::Group(group.clone()),
                        Delivery::Group { group, frame },
                    )),
                )
            }
            Delivery::GroupOf { target, frame } => {
                let local = hub.client(&target).and_then(|c| c.group());
                if local.is_none() && looks_like_id(&target) && self.backplane.elsewhere(&target) {
                    // Only the node that has this connection knows its group.
                    let route = Route::Owner(target.clone());
                    return Ok(here(0, Some((route, Delivery::GroupOf { target, frame }))));
                }
                let resolved = local.is_some();
                let group = local.unwrap_or_else(|| Arc::from(&*target));
                let n = self.notify_group(&group, &frame);
                let onward = Delivery::Group {
                    group: group.clone(),
                    frame,
                };
                Here {
                    delivered: n,
                    onward: Some((Route::Group(group), onward)),
                    resolved,
                }
            }
            Delivery::Channel {
                channel,
                filter,
                frame,
            } => {
                let n = hub.publish(&channel, &filter, &frame);
                self.metrics.sent(Frame::Publish, n, frame.len());
                let route = Route::Channel(channel.clone());
                let delivery = Delivery::Channel {
                    channel,
                    filter,
                    frame,
                };
                here(n, Some((route, delivery)))
            }
            Delivery::Acknowledge {
                target,
                group,
                user,
                roles,
                groups,
                frame,
            } => {
                let ack = Acknowledgement {
                    group,
                    user,
                    roles,
                    groups,
                };
                if hub.client(&target).is_none() && self.backplane.elsewhere(&target) {
                    let route = Route::Owner(target.clone());
                    return Ok(here(
                        0,
                        Some((route, Delivery::acknowledge(target, ack, frame.0))),
                    ));
                }
                let group = ack.group.clone();
                let client = hub
                    .acknowledge(&target, ack)
                    .ok_or_else(|| ProtocolError::UnknownTarget(target.to_string()))?;
                // Its forward, if one was in flight, is settled.
                self.backplane.settled(&client);
                self.reply_when_subscribed(
                    Topic::Group(group),
                    &client,
                    frame.0,
                    Frame::ClientConnected,
                );
                here(1, None)
            }
            Delivery::InvokeResult {
                target,
                id,
                error,
                frame,
            } => {
                if hub.client(&target).is_none() && self.backplane.elsewhere(&target) {
                    let route = Route::Owner(target.clone());
                    let delivery = Delivery::InvokeResult {
                        target,
                        id,
                        error,
                        frame,
                    };
                    return Ok(here(0, Some((route, delivery))));
                }
                let outcome = match error {
                    true => Outcome::Error(frame.as_str()),
                    false => Outcome::Data(frame.as_str()),
                };
                let n = self.invocations.complete(self, &target, &id, outcome);
                here(usize::from(n), None)
            }
            // Only from other nodes: the origin applies its own (`events::membership`).
            Delivery::Membership { change, ack } => {
                let n = crate::membership::apply_change(hub, &change, false).unwrap_or(0);
                if let Some(ack) = ack {
                    self.backplane.applied(self, ack, n);
                }
                here(n, None)
            }
            Delivery::Disconnect { order, ack } => {
                let n = crate::membership::disconnect(hub, &order);
                if let Some(ack) = ack {
                    self.backplane.applied(self, ack, n);
                }
                here(n, None)
            }
        })
    }

    /// Forwards a client's call to one server: this node's, round robin, else one on
    /// another node. It is in flight (with its deadline) before it goes out, so a fast
    /// answer finds it. No server: the caller gets a `no_server` result now. A refusal
    /// (limits, a duplicate id) is returned for the caller's event path to answer.
    pub fn invoke(&self, caller: &Arc<Peer>, call: Call<'_>) -> Result<(), ProtocolError> {
        if let Some(id) = &call.id {
            self.invocations.begin(caller, id, call.reply.clone())?;
        }
        let frame = invoke_frame(caller, &call);
        let len = frame.len();
        let id = call.id.as_deref();
        let sent = self.hub.pool.offer_invoke(frame.clone())
            || self.backplane.forward_invoke(self, caller, id, frame);
        if sent {
            self.metrics.sent(Frame::Invoke, 1, len);
            return Ok(());
        }
        if let Some(id) = id {
            self.invocations.abandon(caller.id, id);
            let error = crate::invoke::relay_error(
                crate::kinds::Code::NoServer,
                "no server is connected to take this call",
            );
            let frame = crate::invoke::result_frame(&call.reply, id, Outcome::Error(&error));
            self.metrics.sent(Frame::InvokeResult, 1, frame.len());
            caller.send(frame);
        }
        Ok(())
    }

    /// Delivers to a group's members here. While some of them still wait for their
    /// `client_connected` (held until this node receives the group's messages), the frame
    /// waits behind it for each member: nobody gets a group's message before being told it
    /// joined.
    fn notify_group(&self, group: &Arc<str>, frame: &Utf8Bytes) -> usize {
        let topic = Topic::Group(Arc::clone(group));
        let Some(interest) = self.hub.interest().filter(|i| i.has_held(&topic)) else {
            let n = self.hub.notify_group(group, frame);
            self.metrics.sent(Frame::NotifyGroup, n, frame.len());
            return n;
        };
        let members = self.hub.group_members(group);
        let method = self.hub.notify_method();
        let signalr = members
            .iter()
            .any(|m| m.wire == Wire::SignalR)
            .then(|| crate::signalr::encode(Form::Notify(Notice::Group), frame, method))
            .flatten();
        let labelled = members
            .iter()
            .any(|m| m.wire == Wire::Labelled)
            .then(|| crate::signalr::labelled(Form::Notify(Notice::Group), frame));
        for member in &members {
            let frame = match member.wire {
                Wire::Jssocket => frame.clone(),
                Wire::SignalR => match &signalr {
                    Some(frame) => frame.clone(),
                    None => continue,
                },
                Wire::Labelled => match &labelled {
                    Some(frame) => frame.clone(),
                    None => continue,
                },
            };
            interest.reply(self, topic.clone(), member, frame, Frame::NotifyGroup);
        }
        members.len()
    }

    /// This node's server pool changed (a server joined or left): the other nodes learn it
    /// now, not at the next heartbeat.
    pub fn servers_changed(&self) {
        self.backplane.servers_changed(self);
    }

    /// Answers a `subscribe` (`subscribed`) or an `unsubscribe` (`unsubscribed`) to
    /// `channel` once the channel's publishes reach this node, in the order of the requests
    /// (an `unsubscribed` waits behind a `subscribed` still waiting).
    pub fn channel_reply(&self, peer: &Arc<Peer>, channel: &str, frame: Utf8Bytes, kind: Frame) {
        let topic = Topic::Channels(channel_bucket(channel));
        self.reply_when_subscribed(topic, peer, frame, kind);
    }

    /// Forwards a client's `client_connect` to a server: this node's, round robin, else one
    /// on another node, else it waits for one.
    pub fn forward_connect(
        &self,
        client: &Arc<Peer>,
        frame: Utf8Bytes,
    ) -> Result<Forwarded, ProtocolError> {
        // This request settles the earlier one, wherever that was forwarded.
        self.backplane.settled(client);
        self.hub
            .pool
            .forward_connect(client, frame, |client, frame| {
                self.backplane.forward_connect(self, client, frame)
            })
    }

    /// Waits until the messages of all `topics` reach this node, for at most `limit`: a
    /// SignalR connection is answered its handshake only then, so a publish or a group
    /// notification sent right after it connected is not lost in a cluster. At once on a
    /// single node.
    pub async fn subscribed(&self, topics: &[Topic], limit: Duration) {
        let Some(interest) = self.hub.interest() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + limit;
        while !topics.iter().all(|topic| interest.is_ready(topic))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends `peer` a reply saying it joined `topic` (its `client_connected`, its
    /// `subscribed`) once messages for that topic reach this node (see
    /// [`crate::backplane::Interest`]): at once on a single node.
    /// A SignalR connection has no such replies: it is not sent one.
    fn reply_when_subscribed(&self, topic: Topic, peer: &Arc<Peer>, frame: Utf8Bytes, kind: Frame) {
        if peer.wire == Wire::SignalR {
            return;
        }
        match self.hub.interest() {
            Some(interest) => {
                interest.reply(self, topic, peer, frame, kind);
            }
            None => {
                self.metrics.sent(kind, 1, frame.len());
                peer.send(frame);
            }
        }
    }
}

/// `{"type":"invoke","data":{"id","method","data","target","user","roles","groups"}}`: the
/// caller's identity is what its acknowledgement gave (none before it), snapshotted so no lock
/// is held while the frame is written.
fn invoke_frame(caller: &Peer, call: &Call<'_>) -> Utf8Bytes {
    let (user, roles, groups) = {
        let state = caller.state();
        (
            state.user.clone(),
            state.roles.clone(),
            state.groups.clone(),
        )
    };
    let names = |names: &[String]| serde_json::to_string(names).unwrap_or_else(|_| "[]".into());
    let mut out = String::with_capacity(call.data.len() + call.method.len() + 160);
    out.push_str("{\"id\":");
    out.push_str(call.id.as_deref().unwrap_or("null"));
    out.push_str(",\"method\":");
    push_json_string(&mut out, call.method);
    out.push_str(",\"data\":");
    out.push_str(call.data);
    out.push_str(",\"target\":");
    push_json_string(&mut out, &caller.target);
    out.push_str(",\"user\":");
    match &user {
        Some(user) => push_json_string(&mut out, user),
        None => out.push_str("null"),
    }
    out.push_str(",\"roles\":");
    out.push_str(&names(&roles));
    out.push_str(",\"groups\":");
    out.push_str(&names(&groups));
    out.push('}');
    event_frame("invoke", &out)
}
