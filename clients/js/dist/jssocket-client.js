// jssocket-client browser bundle: generated from src/index.js by build.mjs; do not edit.
// <script src="jssocket-client.js"></script> defines globalThis.jssocket.
(function () {
  'use strict';

  // jssocket-client: the official JavaScript client of the jssocket relay (README "Browser",
  // SPEC §4, §5, §12, §13). One file, no dependencies: the platform's WebSocket (browsers, Node 22+)
  // or a constructor passed as `options.WebSocket` (Node 18/20: the `ws` package).
  //
  // What it does for an application: registers (`client_connect`, with a token or a token
  // callback asked again at every connect), reconnects with exponential backoff and full jitter
  // unless the close code means that retrying cannot help, registers and subscribes again after a
  // reconnect, and on history channels (SPEC §13) resumes from the last publication it delivered,
  // so nothing is missed or delivered twice; when the relay cannot recover a channel the
  // `subscribed` event says `recovered: false` and the application reloads its state.
  //
  // dist/jssocket-client.js is this file wrapped for a <script> tag (build.mjs writes it; it is
  // committed so the server embeds it without a build step).

  /** Default reconnect delays (ms): attempt n waits a random time in [0, min(maxDelay, minDelay * factor^n)]. */
  const DEFAULT_BACKOFF = Object.freeze({ minDelay: 500, maxDelay: 20000, factor: 2 });

  /** A connection that stayed open this long (ms) resets the backoff to its first step. */
  const STABLE_MS = 10000;

  /** Default time (ms) an `invoke` waits for its `invoke_result`: the relay's own timeout (10 s) plus slack. */
  const DEFAULT_INVOKE_TIMEOUT = 15000;

  /**
   * 1008 reasons that are transient: the relay was busy, not refusing this client.
   * "token expired" is in neither list: it reconnects only when the token is a callback.
   */
  const TRANSIENT_POLICY_REASONS = new Set([
    'authentication busy, retry',
    'slow consumer',
  ]);

  /**
   * Whether a connection closed with `code` / `reason` should be opened again (the default
   * policy; `options.shouldReconnect` replaces it). `refreshable`: the token is a callback, so a
   * new connection gets a new token.
   *
   * - 1000: a normal close (the client's own `close()` or `client_disconnect`): no.
   * - 1001 (server shutting down, ping timeout), 1005/1006 (no close frame: the network),
   *   1011–1014 (server error, restart, try again later), and any code not listed: yes.
   * - 1002, 1003, 1007, 1009: the client sent something the relay refuses (a protocol error,
   *   bad UTF-8, a message too big); a new connection would send it again: no.
   * - 1008 (policy): no ("not an admin", "too much bad input", "not reading replies", …), except
   *   "authentication busy, retry" and "slow consumer" (yes: the relay was loaded), and
   *   "token expired" (yes when the token is a callback, which is asked for a fresh one).
   * - 4000–4999: an admin disconnected this client (SPEC §12 `disconnect`): no.
   */
  function defaultShouldReconnect(code, reason, refreshable = false) {
    if (code === 1000) return false;
    if (code === 1002 || code === 1003 || code === 1007 || code === 1009) return false;
    if (code === 1008) {
      if (TRANSIENT_POLICY_REASONS.has(reason)) return true;
      return reason === 'token expired' && refreshable;
    }
    if (code >= 4000 && code <= 4999) return false;
    return true;
  }

  /**
   * The delay (ms) before reconnect attempt `attempt` (0 for the first after a close): full
   * jitter, uniformly random in [0, min(maxDelay, minDelay * factor^attempt)].
   */
  function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
    const cap = Math.min(backoff.maxDelay, backoff.minDelay * Math.pow(backoff.factor, attempt));
    return Math.floor(random() * cap);
  }

  /** Refusals of a `subscribe` that say "later", not "no": retried with backoff. */
  const RETRYABLE = new Set(['rate_limited', 'cluster_busy']);
  /** Most retries of one `subscribe` refused as busy before it is given up (an `error`). */
  const MAX_SUBSCRIBE_RETRIES = 8;

  /** WebSocket.OPEN (not read from the constructor: a custom one may lack the constants). */
  const OPEN = 1;

  /** A small typed event emitter: `on` returns a function that removes the listener. */
  class Emitter {
    constructor() {
      this._listeners = new Map();
    }

    on(type, listener) {
      let set = this._listeners.get(type);
      if (!set) this._listeners.set(type, (set = new Set()));
      set.add(listener);
      return () => this.off(type, listener);
    }

    once(type, listener) {
      const off = this.on(type, (event) => {
        off();
        listener(event);
      });
      return off;
    }

    off(type, listener) {
      const set = this._listeners.get(type);
      if (set) set.delete(listener);
    }

    // A listener that throws must not break the connection's bookkeeping: its error is rethrown
    // on its own task, where the platform reports it.
    _emit(type, event) {
      const set = this._listeners.get(type);
      if (!set) return;
      for (const listener of [...set]) {
        try {
          listener(event);
        } catch (error) {
          setTimeout(() => {
            throw error;
          }, 0);
        }
      }
    }
  }

  /**
   * One channel the client wants to be subscribed to, kept across reconnects. Events:
   * `subscribed` ({channel, recovered, epoch, offset}), `publish` ({channel, data, offset,
   * epoch, raw}), `error` ({code, message}), `unsubscribed` ({channel}).
   */
  class Subscription extends Emitter {
    constructor(client, name) {
      super();
      this.client = client;
      this.name = name;
      /** 'pending' (sent or waiting for a connection), 'subscribed', 'unsubscribed'. */
      this.state = 'pending';
      /** The last delivered position on a history channel: {offset, epoch}, else null. */
      this.position = null;
      // The `since` sent with the subscribe awaiting its answer (null: none sent).
      this._since = null;
    }

    unsubscribe() {
      this.client.unsubscribe(this.name);
    }
  }

  /** NOTIFY_KINDS: what a labelled connection (`?labels=1`) is told a payload came from. */
  const NOTIFY_KINDS = new Set(['notify_client', 'notify_group', 'notify_all']);

  // Asks for labelled notifies (README "Labelled notifies"): each notify payload then comes in
  // an envelope naming its event, so no payload can pass for one of the relay's envelopes.
  function withLabels(url) {
    const parsed = new URL(url);
    parsed.searchParams.set('labels', '1');
    return parsed.toString();
  }

  function isObject(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value);
  }

  function errorFrom(value, fallback) {
    const error = new Error(isObject(value) && typeof value.message === 'string' ? value.message
      : typeof value === 'string' ? value : fallback);
    error.code = isObject(value) && typeof value.code === 'string' ? value.code : 'error';
    error.detail = value;
    return error;
  }

  /**
   * A connection to the relay that stays up. `url`: the WebSocket URL (`ws://host:8080/ws`).
   * Options: `token` (string, or a function returning one or a promise of one, asked at every
   * connect), `connectData` (more fields for `client_connect`), `register` (default true; false
   * for an admin that only sends), `labels` (default true: `?labels=1` is added to the URL, so
   * notify payloads come labelled; false for a relay older than labels), `auth` (the admin password, sent as the `auth` header: Node
   * only, browsers cannot set headers), `WebSocket` (a constructor), `minDelay`, `maxDelay`,
   * `factor` (backoff), `shouldReconnect(code, reason)`, `invokeTimeout`, `random`.
   *
   * Events: `connecting` ({attempt}), `open` ({registered}: connected, `client_connect` and the
   * subscriptions sent), `acknowledged` ({target, roles, groups, data}),
   * `closed` ({code, reason, reconnect, delay}), `error` ({code, message, event, channel, data}),
   * `notify` ({data, raw, kind: 'notify_client' | 'notify_group' | 'notify_all' | null}), `publish` ({channel, data, offset, epoch, raw}), `subscribed`,
   * `unsubscribed`, `callback` ({data}), `message` ({type, data, raw}: every frame received).
   */
  class JssocketClient extends Emitter {
    constructor(url, options = {}) {
      super();
      this._labels = options.labels !== false;
      this.url = this._labels ? withLabels(url) : url;
      this.options = options;
      this.backoff = {
        minDelay: options.minDelay ?? DEFAULT_BACKOFF.minDelay,
        maxDelay: options.maxDelay ?? DEFAULT_BACKOFF.maxDelay,
        factor: options.factor ?? DEFAULT_BACKOFF.factor,
      };
      this._WebSocket = options.WebSocket || globalThis.WebSocket;
      if (typeof this._WebSocket !== 'function') {
        throw new Error('jssocket-client: no WebSocket here: pass options.WebSocket (e.g. the ws package)');
      }
      /** 'idle' (never connected or closed by the app), 'connecting', 'open', 'waiting' (to reconnect). */
      this.state = 'idle';
      /** This connection's id once a backend acknowledged it, else null. */
      this.target = null;
      this.acknowledged = false;
      /** @type {Map<string, Subscription>} */
      this.subscriptions = new Map();
      this._ws = null;
      this._attempt = 0;
      this._timer = null;
      this._openedAt = 0;
      this._invokeId = 0;
      this._calls = new Map(); // id -> {resolve, reject, timer}
      this._resetConnection();
    }

    // What belongs to one WebSocket: requests awaiting their answers.
    _resetConnection() {
      this._registered = false;
      // Registration sent (or not needed): subscribes may go out; before, they wait for it.
      this._ready = false;
      this._inflight = []; // subscribe/unsubscribe names awaiting their answer, in order
      this._sentTypes = new Set();
      this._callbacks = 0;
      this.acknowledged = false;
      this.target = null;
    }

    /** Opens the connection (again at once, resetting the backoff). */
    connect() {
      clearTimeout(this._timer);
      this._timer = null;
      this._attempt = 0;
      this._drop();
      this._open();
    }

    /** Closes the connection and stops reconnecting. Subscriptions are kept for a later connect(). */
    close(code = 1000, reason = '') {
      clearTimeout(this._timer);
      this._timer = null;
      const ws = this._ws;
      if (ws && ws.readyState <= OPEN) ws.close(code, reason);
      this._drop();
      this.state = 'idle';
      this._emit('closed', { code, reason, reconnect: false, delay: null });
    }

    // Forgets the current socket without reacting to its close.
    _drop() {
      const ws = this._ws;
      this._ws = null;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        if (ws.readyState <= OPEN) {
          try {
            ws.close(1000);
          } catch {
            // already closing
          }
        }
      }
      this._failCalls('disconnected', 'the connection closed before the answer');
      this._resetConnection();
      for (const [name, sub] of this.subscriptions) {
        if (sub.state === 'unsubscribed') this.subscriptions.delete(name);
        else sub.state = 'pending';
      }
    }

    _open() {
      this.state = 'connecting';
      this._emit('connecting', { attempt: this._attempt });
      let ws;
      try {
        ws = this.options.auth !== undefined
          ? new this._WebSocket(this.url, { headers: { auth: this.options.auth } })
          : new this._WebSocket(this.url);
      } catch (error) {
        this._emit('error', { code: 'transport', message: String(error && error.message) });
        this._scheduleReconnect(1006, '');
        return;
      }
      this._ws = ws;
      ws.onopen = () => {
        this.state = 'open';
        this._openedAt = Date.now();
        this._start(ws);
      };
      ws.onmessage = (event) => {
        if (typeof event.data === 'string') this._receive(event.data);
        else if (event.data && typeof event.data.text === 'function') {
          event.data.text().then((text) => {
            if (this._ws === ws) this._receive(text);
          });
        } else this._receive(String(event.data));
      };
      ws.onerror = () => {
        this._emit('error', { code: 'transport', message: 'WebSocket error' });
      };
      ws.onclose = (event) => {
        if (this._ws !== ws) return;
        if (Date.now() - this._openedAt >= STABLE_MS && this._openedAt) this._attempt = 0;
        this._openedAt = 0;
        this._drop();
        this._scheduleReconnect(event.code, event.reason || '');
      };
    }

    _scheduleReconnect(code, reason) {
      const refreshable = typeof this.options.token === 'function';
      const decide = this.options.shouldReconnect ||
        ((c, r) => defaultShouldReconnect(c, r, refreshable));
      if (!decide(code, reason)) {
        this.state = 'idle';
        this._emit('closed', { code, reason, reconnect: false, delay: null });
        return;
      }
      const delay = backoffDelay(this._attempt, this.backoff, this.options.random || Math.random);
      this._attempt++;
      this.state = 'waiting';
      this._emit('closed', { code, reason, reconnect: true, delay });
      this._timer = setTimeout(() => {
        this._timer = null;
        this._open();
      }, delay);
    }

    // Registers (unless `register: false`), then subscribes again with each history channel's
    // position: the relay answers a connection's requests in order, so the subscriptions follow
    // the registration they need.
    async _start(ws) {
      if (this.options.register !== false && this.options.auth === undefined) {
        let data;
        try {
          data = await this._connectData();
        } catch (error) {
          if (this._ws !== ws) return;
          this._emit('error', { code: 'token', message: 'the token callback failed: ' + (error && error.message) });
          this._drop();
          this._scheduleReconnect(1006, 'token callback failed');
          return;
        }
        if (this._ws !== ws) return;
        this._send('client_connect', data);
        this._registered = true;
      }
      this._ready = true;
      for (const sub of this.subscriptions.values()) this._sendSubscribe(sub);
      this._emit('open', { registered: this._registered });
    }

    /** Whether `client_connect` was sent on the current connection. */
    get registered() {
      return this._registered;
    }

    async _connectData() {
      const data = { ...(this.options.connectData || {}) };
      let token = this.options.token;
      if (typeof token === 'function') token = await token();
      if (token !== undefined && token !== null && token !== '') data.token = token;
      return data;
    }

    /** Sends `client_connect` again on the open connection (e.g. with a fresher token). */
    async register() {
      const ws = this._ws;
      if (!ws || ws.readyState !== OPEN) return false;
      const data = await this._connectData();
      if (this._ws !== ws) return false;
      this._registered = true;
      return this._send('client_connect', data);
    }

    _send(type, data) {
      const ws = this._ws;
      if (!ws || ws.readyState !== OPEN) return false;
      ws.send(JSON.stringify({ type, data }));
      this._sentTypes.add(type);
      return true;
    }

    /** Sends any event; false when not connected. */
    send(type, data) {
      return this._send(type, data);
    }

    /**
     * Subscribes to channel `name` now and after every reconnect; returns its Subscription.
     * `since` ({offset, epoch}, optional): recover from that position on a history channel.
     */
    subscribe(name, options = {}) {
      let sub = this.subscriptions.get(name);
      if (sub && sub.state !== 'unsubscribed') return sub;
      sub = new Subscription(this, name);
      if (options.since) sub.position = { offset: options.since.offset, epoch: options.since.epoch };
      this.subscriptions.set(name, sub);
      if (this._ready) this._sendSubscribe(sub);
      return sub;
    }

    _sendSubscribe(sub) {
      const data = { name: sub.name };
      if (sub.position) data.since = { offset: sub.position.offset, epoch: sub.position.epoch };
      sub._since = data.since || null;
      sub.state = 'pending';
      if (this._send('subscribe', data)) this._inflight.push({ name: sub.name, leave: false });
    }

    /** Leaves channel `name` (not subscribed again after a reconnect). */
    unsubscribe(name) {
      const sub = this.subscriptions.get(name);
      if (!sub) return;
      if (this._ready && this._send('unsubscribe', { name })) {
        sub.state = 'unsubscribed';
        this._inflight.push({ name, leave: true });
      } else {
        this.subscriptions.delete(name);
      }
    }

    /**
     * Calls `method` on a backend (SPEC §12): resolves with its `data`, rejects with an Error
     * whose `code` is the relay's (`timeout`, `no_server`, `rate_limited`, …), `disconnected`,
     * `not_connected`, or `error` for a backend's own error (in `detail`).
     */
    invoke(method, data = null, options = {}) {
      return new Promise((resolve, reject) => {
        const id = ++this._invokeId;
        if (!this._send('invoke', { id, method, data })) {
          reject(errorFrom({ code: 'not_connected', message: 'not connected' }));
          return;
        }
        const timeout = options.timeout ?? this.options.invokeTimeout ?? DEFAULT_INVOKE_TIMEOUT;
        const timer = setTimeout(() => {
          this._calls.delete(id);
          reject(errorFrom({ code: 'timeout', message: `no invoke_result within ${timeout} ms` }));
        }, timeout);
        this._calls.set(id, { resolve, reject, timer });
      });
    }

    _failCalls(code, message) {
      for (const call of this._calls.values()) {
        clearTimeout(call.timer);
        call.reject(errorFrom({ code, message }));
      }
      this._calls.clear();
    }

    /** `notify_client` (an admin, or an acknowledged client); `callback`: ask for a `callback` ack. */
    notifyClient(target, data, options = {}) {
      const body = { target, data };
      if (options.callback) body.callback = options.callback;
      return this._notify('notify_client', body, options.callback);
    }

    /** `notify_group` to group (or connection id) `target`. */
    notifyGroup(target, data, options = {}) {
      const body = { target, data };
      if (options.callback) body.callback = options.callback;
      return this._notify('notify_group', body, options.callback);
    }

    /** `notify_all` (admins only). */
    notifyAll(data) {
      return this._send('notify_all', data);
    }

    /** `publish` to channel `name` (admins only); `filter`: one of {roles}, {groups}, {users}, {clients}. */
    publish(name, data, filter = {}) {
      return this._send('publish', { ...filter, name, data });
    }

    _notify(type, body, callback) {
      const sent = this._send(type, body);
      if (sent && callback) this._callbacks++;
      return sent;
    }

    _receive(raw) {
      let value;
      try {
        value = JSON.parse(raw);
      } catch {
        this._emit('message', { type: 'text', data: raw, raw });
        this._emit('notify', { data: raw, raw, kind: null });
        return;
      }
      const type = isObject(value) && typeof value.type === 'string' && 'data' in value
        ? this._envelopeType(value.type, value.data) : null;
      if (type === null) {
        // notify_client / notify_group / notify_all deliver the bare payload.
        this._emit('message', { type: 'notify', data: value, raw });
        this._emit('notify', { data: value, raw, kind: null });
        return;
      }
      const data = value.data;
      this._emit('message', { type, data, raw });
      switch (type) {
        case 'notify_client':
        case 'notify_group':
        case 'notify_all':
          this._emit('notify', { data, raw, kind: type });
          break;
        case 'publish':
          this._onPublish(data, raw);
          break;
        case 'subscribed':
        case 'unsubscribed':
          this._onSubscribed(type, data);
          break;
        case 'client_connected':
          this.acknowledged = true;
          if (typeof data.target === 'string') this.target = data.target;
          this._emit('acknowledged', {
            target: this.target,
            roles: Array.isArray(data.roles) ? data.roles : [],
            groups: Array.isArray(data.groups) ? data.groups : [],
            data,
          });
          break;
        case 'invoke_result': {
          const call = this._calls.get(data.id);
          this._calls.delete(data.id);
          clearTimeout(call.timer);
          if ('error' in data) call.reject(errorFrom(data.error, 'the backend answered an error'));
          else call.resolve(data.data === undefined ? null : data.data);
          break;
        }
        case 'callback':
          this._callbacks--;
          this._emit('callback', { data });
          break;
        case 'error':
          this._onError(data);
          break;
        default:
          break;
      }
    }

    // Payloads are bare JSON, so a notify payload can look exactly like one of the relay's
    // envelopes. An envelope is taken as the relay's only when it answers something this client
    // sent on this connection and has not had answered, or is a publication of a channel it is
    // subscribed to; anything else is a notify payload.
    _envelopeType(type, data) {
      const field = (key) => (isObject(data) ? data[key] : undefined);
      if (NOTIFY_KINDS.has(type)) return this._labels ? type : null;
      switch (type) {
        case 'publish': {
          const sub = this.subscriptions.get(field('name'));
          return sub && sub.state === 'subscribed' ? type : null;
        }
        case 'subscribed':
        case 'unsubscribed': {
          const head = this._inflight[0];
          return head && head.name === field('name') && head.leave === (type === 'unsubscribed')
            ? type : null;
        }
        case 'client_connected':
          return this._registered && isObject(data) ? type : null;
        case 'invoke_result':
          return this._calls.has(field('id')) ? type : null;
        case 'callback':
          return this._callbacks > 0 ? type : null;
        case 'error': {
          const event = field('event');
          if (event === 'subscribe' || event === 'unsubscribe') return this._inflight.length ? type : null;
          return typeof event === 'string' && this._sentTypes.has(event) ? type : null;
        }
        default:
          return null;
      }
    }

    _onSubscribed(type, data) {
      const { name, leave } = this._inflight.shift();
      const sub = this.subscriptions.get(name);
      if (leave) {
        if (sub && sub.state === 'unsubscribed') {
          this.subscriptions.delete(name);
          sub._emit('unsubscribed', { channel: name });
        }
        this._emit('unsubscribed', { channel: name });
        return;
      }
      if (!sub || sub.state === 'unsubscribed') return;
      sub.state = 'subscribed';
      sub._retries = 0;
      const epoch = typeof data.epoch === 'string' ? data.epoch : null;
      const offset = Number.isSafeInteger(data.offset) ? data.offset : null;
      // `recovered`: true when the relay will replay what was missed (SPEC §13); false when it
      // cannot (the application reloads); null on a channel without history or a first subscribe.
      let recovered = null;
      if (epoch !== null && offset !== null) {
        if (sub._since) {
          recovered = data.recovered === true;
          // Recovered: the missed publications follow and move the position; not recovered:
          // start again from the channel's latest.
          sub.position = recovered ? { offset: sub._since.offset, epoch } : { offset, epoch };
        } else {
          sub.position = { offset, epoch };
        }
      }
      sub._since = null;
      const event = { channel: name, recovered, epoch, offset };
      sub._emit('subscribed', event);
      this._emit('subscribed', event);
    }

    _onPublish(data, raw) {
      const sub = this.subscriptions.get(data.name);
      const offset = Number.isSafeInteger(data.offset) ? data.offset : null;
      const epoch = typeof data.epoch === 'string' ? data.epoch : null;
      if (offset !== null && epoch !== null) {
        const position = sub.position;
        // Already delivered (a replay overlapping what arrived live): dropped, so each
        // publication reaches the application once.
        if (position && position.epoch === epoch && offset <= position.offset) return;
        // A gap: a publication was lost on its way (in a cluster the relay's backplane may drop
        // one). Delivering this one would break the order, so the client reconnects at once and
        // recovers from the last delivered position, as after a network drop.
        if (position && position.epoch === epoch && offset > position.offset + 1) {
          this._resync(`publication ${position.offset + 1} of ${data.name} missing`);
          return;
        }
        sub.position = { offset, epoch };
      }
      const event = { channel: data.name, data: data.data, offset, epoch, raw };
      sub._emit('publish', event);
      this._emit('publish', event);
    }

    // Drops the connection and opens a new one after the backoff delay (not reset: a relay
    // that keeps skipping cannot make the client reconnect in a loop), whatever the policy.
    _resync(reason) {
      this._drop();
      const delay = backoffDelay(this._attempt, this.backoff, this.options.random || Math.random);
      this._attempt++;
      this.state = 'waiting';
      this._emit('closed', { code: 1000, reason, reconnect: true, delay });
      this._timer = setTimeout(() => {
        this._timer = null;
        this._open();
      }, delay);
    }

    _onError(data) {
      const event = isObject(data) ? data.event : undefined;
      const error = {
        code: isObject(data) && typeof data.code === 'string' ? data.code : 'error',
        message: isObject(data) && typeof data.message === 'string' ? data.message : '',
        event,
        data,
      };
      if (event === 'subscribe' || event === 'unsubscribe') {
        const head = this._inflight.shift();
        if (head) error.channel = head.name;
        const sub = head && this.subscriptions.get(head.name);
        if (sub) {
          if (event === 'subscribe' && sub.state !== 'unsubscribed' && RETRYABLE.has(error.code)
              && (sub._retries || 0) < MAX_SUBSCRIBE_RETRIES) {
            // The relay was busy (e.g. its history store slow under a reconnect burst): the
            // channel is kept and asked for again after a backoff, with the same `since`.
            sub._retries = (sub._retries || 0) + 1;
            error.retrying = true;
            const delay = backoffDelay(sub._retries, this.backoff, this.options.random || Math.random);
            setTimeout(() => {
              if (this._ready && this.subscriptions.get(sub.name) === sub && sub.state === 'pending') {
                this._sendSubscribe(sub);
              }
            }, delay);
          } else if (event === 'subscribe' && sub.state !== 'unsubscribed') {
            // A refused subscribe forgets the channel; a refused unsubscribe keeps it.
            this.subscriptions.delete(head.name);
          } else if (event === 'unsubscribe') sub.state = 'subscribed';
          sub._emit('error', error);
        }
      }
      this._emit('error', error);
    }
  }

  /**
   * The admin HTTP API (README "HTTP publish API") for a backend in Node (or anywhere with
   * `fetch`): `base` is the server's http(s) URL, `password` the admin password. Each method
   * resolves with the JSON answer (`{delivered: N}`) or rejects with an Error carrying `status`
   * and the relay's `code`.
   */
  class JssocketAdmin {
    constructor(base, password, options = {}) {
      this.base = base.replace(/\/+$/, '');
      this.password = password;
      this._fetch = options.fetch || globalThis.fetch;
    }

    async post(event, body) {
      const response = await this._fetch(`${this.base}/api/${event}`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${this.password}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      const text = await response.text();
      let answer = null;
      try {
        answer = JSON.parse(text);
      } catch {
        // a plain-text answer (401, 404)
      }
      if (!response.ok) {
        const error = errorFrom(answer && answer.error ? answer.error : text.trim(), `HTTP ${response.status}`);
        error.status = response.status;
        throw error;
      }
      return answer;
    }

    notifyClient(target, data) {
      return this.post('notify_client', { target, data });
    }

    notifyGroup(target, data) {
      return this.post('notify_group', { target, data });
    }

    notifyAll(data) {
      return this.post('notify_all', data);
    }

    publish(name, data, filter = {}) {
      return this.post('publish', { ...filter, name, data });
    }

    invokeResult(target, id, result) {
      return this.post('invoke_result', { target, id, ...result });
    }
  }

  globalThis.jssocket = { DEFAULT_BACKOFF, STABLE_MS, DEFAULT_INVOKE_TIMEOUT, defaultShouldReconnect, backoffDelay, Subscription, JssocketClient, JssocketAdmin };
})();
